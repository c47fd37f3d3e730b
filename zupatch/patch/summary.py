"""A plain-dict description of a patch: what ``zupatch inspect --json`` prints."""

from __future__ import annotations

from typing import Any

import numpy as np

from zupatch.patch.format import Entry, Patch


def change_norm(e: Entry) -> float:
    """``|U B|_F`` (lowrank) or ``|delta|_F`` (dense) in float64: the additive part of the change.

    NaN for a ``bits`` entry, whose change is only known with the base at hand
    (``inspect --model`` measures it).
    """
    if e.kind == "bits":
        return float("nan")
    if e.kind == "lowrank":
        assert e.U is not None and e.B is not None
        U, B = e.U.astype(np.float64), e.B.astype(np.float64)
        with np.errstate(all="ignore"):
            return float(np.sqrt(max(np.trace((U.T @ U) @ (B @ B.T)), 0.0)))
    assert e.delta is not None
    return float(np.linalg.norm(e.delta.astype(np.float64)))


def _finite(x: float) -> float | None:
    """JSON has no Inf or NaN: such a measure is reported as null."""
    return x if np.isfinite(x) else None


def summarize(patch: Patch, file_bytes: int | None = None,
              changes: dict[str, list[dict[str, float]]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything a person or a script wants to know about a patch, no arrays.

    Per entry: rank, ``change_norm`` (``|U B|_F`` or ``|delta|_F``) and the
    count of its bit corrections. With ``changes`` measured on the base
    (``inspect --model``, see ``measure_changes`` in zupatch.checkpoint.apply):
    ``relative_change`` ``= |W' - W|_F / |W|_F`` and ``fix_max`` /
    ``inverse_fix_max``, the largest value change one correction makes, over
    the tensor's RMS.
    """
    position: dict[str, int] = {}
    touched = patch.touched_bytes()
    size = file_bytes if file_bytes is not None else len(patch.to_bytes())
    entries = []
    for i, step in enumerate(patch.steps):
        for e in step.entries:
            d: dict[str, Any] = {
                "step": i,
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "kind": e.kind,
                "direction": e.direction,
                "sha256_before": e.sha256_before,
                "sha256_after": e.sha256_after,
                "fix_count": e.fix.count if e.fix else 0,
                "diff_count": e.diff.count if e.diff else 0,
                "inverse_fix_count": e.inverse_fix.count if e.inverse_fix else 0,
                "change_norm": _finite(change_norm(e)),
                "stored_bytes": e.stored_bytes(),
            }
            if e.kind == "lowrank":
                d["rank"] = e.rank
                d["scale"] = e.scale
            k = position[e.name] = position.get(e.name, -1) + 1
            if changes is not None:
                d.update({key: _finite(value) for key, value in changes[e.name][k].items()})
            entries.append(d)
    return {
        "format_version": patch.format_version,
        "created": patch.created,
        "base_model": patch.base_model,
        "base_revision": patch.base_revision,
        "steps": [
            {
                "method": s.method,
                "hyperparameters": s.hyperparameters,
                "requests": s.requests.get("count", 0),
                "inverted": s.inverted,
                "created": s.created,
                "tool_version": s.tool_version,
                "base_model": s.base_model,
                "base_revision": s.base_revision,
            }
            for s in patch.steps
        ],
        "tensors": [
            {"name": n, "sha256_before": patch.sha256_before(n), "sha256_after": patch.sha256_after(n)}
            for n in patch.tensor_names
        ],
        "entries": entries,
        "sizes": {
            "file_bytes": size,
            "touched_bytes": touched,
            "ratio": size / touched if touched else 0.0,
        },
    }
