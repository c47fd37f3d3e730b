"""A plain-dict description of a patch: what ``zupatch inspect --json`` prints."""

from __future__ import annotations

from typing import Any

from zupatch.patch.format import FORMAT_VERSION, Patch


def human_bytes(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as the Hub shows sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summarize(patch: Patch, file_bytes: int | None = None) -> dict[str, Any]:
    """Everything a person or a script wants to know about a patch, no arrays."""
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
                "inverse_fix_count": e.inverse_fix.count if e.inverse_fix else 0,
                "stored_bytes": e.stored_bytes(),
            }
            if e.kind == "lowrank":
                d["rank"] = e.rank
                d["scale"] = e.scale
            entries.append(d)
    return {
        "format_version": FORMAT_VERSION,
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
