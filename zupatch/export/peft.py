"""A patch as a PEFT LoRA adapter folder (``zupatch export PATCH --to peft -o DIR``).

Why: serving stacks (PEFT, vLLM, TGI) keep one base model in memory and swap
many LoRA adapters on it per request. A ZeroUnlearn patch made with the
default settings changes each edited down projection as ``W' = W + U·B``
(scale ``c = 1``, rank ≤ 2 per forget request): exactly a LoRA delta
``lora_B · lora_A`` with scaling 1. So each "forget" edit can be served as an
adapter instead of as a full copy of the weights (docs/serving.md).

What is exported, and what is refused (one line naming the patch file):

- every entry must be ``lowrank``, ``forward``, with scale 1 and no bit
  correction (``fix``) of its result; a dense entry (``--method ga/npo``), an
  inverse entry (``zupatch invert``) or a scale ``c ≠ 1`` (``--projection``)
  has no LoRA form;
- every tensor must be an MLP down projection PEFT can target
  (``*.layers.N.mlp.down_proj``, GPT-2's ``*.h.N.mlp.c_proj``, GPT-NeoX's
  ``*.layers.N.mlp.dense_4h_to_h``);
- several steps on one tensor (a stack) are summed by concatenating their
  factors, ``U = [U1 U2]``, ``B = [B1; B2]``: still low rank, and the same sum
  in real arithmetic. ``zupatch apply`` rounds to the checkpoint's dtype after
  every step instead, so the two differ by rounding only.

Layers may have different ranks: ``r`` and ``lora_alpha`` are the largest
rank, and ``rank_pattern``/``alpha_pattern`` give each other module its own
rank with alpha = rank, so the scaling alpha/r is 1 everywhere (no zero
padding; a server that ignores the patterns still computes alpha/r = 1). The
factors are stored in the patch's own factor dtype (float32 for 16-bit
checkpoints), so the adapter holds the patch's factors bit for bit and is
about as large as they are. Nothing here imports torch or peft: the files are
written with safetensors and json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zupatch.errors import ZupatchError
from zupatch.io.files import current_umask

if TYPE_CHECKING:
    from zupatch.patch.format import Entry, Patch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
#: PeftModel wraps the *ForCausalLM in a LoraModel: adapter keys start with this.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class DownProjKind:
    """One way model families name their MLP down projection (kept as data)."""

    families: str  # for messages
    pattern: re.Pattern[str]  # full checkpoint tensor name; groups: prefix, layer
    layers_pattern: str  # PEFT's name of the decoder-layer list
    target: str  # PEFT target_modules entry (a suffix of the module name)
    transposed: bool  # stored as in × out (GPT-2 Conv1D): PEFT's fan_in_fan_out
    default_prefix: str  # the base-model prefix older checkpoints leave out of tensor names


DOWN_PROJ_KINDS: tuple[DownProjKind, ...] = (
    DownProjKind(
        "Llama, Qwen, Mistral, Gemma, Phi-3",
        re.compile(r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.mlp\.down_proj\.weight$"),
        "layers", "down_proj", False, "model.",
    ),
    DownProjKind(
        "GPT-2",
        re.compile(r"^(?P<prefix>(?:.+\.)?)h\.(?P<layer>\d+)\.mlp\.c_proj\.weight$"),
        "h", "mlp.c_proj", True, "transformer.",
    ),
    DownProjKind(
        "GPT-NeoX",
        re.compile(r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.mlp\.dense_4h_to_h\.weight$"),
        "layers", "dense_4h_to_h", False, "gpt_neox.",
    ),
)  # fmt: skip
_KNOWN = "*.layers.N.mlp.down_proj, *.h.N.mlp.c_proj (GPT-2), *.layers.N.mlp.dense_4h_to_h (GPT-NeoX)"


@dataclass(frozen=True)
class AdapterModule:
    """One LoRA module of the adapter: a patched tensor and its summed factors."""

    tensor: str  # the checkpoint tensor name
    module: str  # the module path PEFT wraps, e.g. model.layers.17.mlp.down_proj
    layer: int
    rank: int
    lora_A: np.ndarray  # r × in
    lora_B: np.ndarray  # out × r


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter made from a patch: its config and its tensors."""

    config: dict[str, Any]
    modules: list[AdapterModule]
    factor_bytes: int  # bytes of the patch's U and B arrays (what the adapter stores)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def layers(self) -> list[int]:
        return list(self.config["layers_to_transform"])

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for m in self.modules:
            out[f"{PEFT_PREFIX}{m.module}.lora_A.weight"] = m.lora_A
            out[f"{PEFT_PREFIX}{m.module}.lora_B.weight"] = m.lora_B
        return out

    def files(self) -> dict[str, bytes]:
        """The adapter folder's files, deterministic bytes (a re-push of the same patch changes nothing)."""
        from safetensors.numpy import save

        config = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        return {ADAPTER_CONFIG: config.encode(), ADAPTER_WEIGHTS: save(self.tensors(), metadata={"format": "pt"})}


@dataclass
class ExportReport:
    """What ``export`` wrote."""

    output: Path
    adapter: Adapter
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes

    @property
    def adapter_bytes(self) -> int:
        return self.files.get(ADAPTER_WEIGHTS, 0)

    def to_dict(self) -> dict[str, Any]:
        c = self.adapter.config
        return {
            "output": str(self.output),
            "format": "peft-lora",
            "base_model": c["base_model_name_or_path"],
            "target_modules": c["target_modules"],
            "layers": c["layers_to_transform"],
            "r": c["r"],
            "ranks": {m.module: m.rank for m in self.adapter.modules},
            "files": self.files,
            "adapter_bytes": self.adapter_bytes,
            "patch_factor_bytes": self.adapter.factor_bytes,
        }


def _refuse(message: str, source: str | os.PathLike | None) -> ZupatchError:
    return ZupatchError(f"cannot export as a PEFT adapter: {message}", source)


def _check_entry(e: "Entry", step: int, source: str | os.PathLike | None) -> None:
    where = f"{e.name} (step {step})"
    if e.kind == "bits":
        raise _refuse(f"{where} is stored as the difference of its bits from the base's (smaller than its factors "
                      "for a high-rank update); `zupatch create --encoding arithmetic` keeps the factors", source)  # fmt: skip
    if e.kind != "lowrank":
        raise _refuse(f"{where} is a dense change; only c = 1 low-rank patches are LoRA adapters "
                      "(ZeroUnlearn, not --method ga/npo)", source)  # fmt: skip
    if e.direction != "forward":
        raise _refuse(f"{where} is an inverse entry (an inverted patch); an adapter can only add U·B to the base",
                      source)  # fmt: skip
    if e.scale != 1.0:
        raise _refuse(f"{where} scales W by c = {e.scale:.9g}, not 1; an adapter only adds U·B "
                      "(patches made with the default --projection off have c = 1)", source)  # fmt: skip
    if e.fix is not None:
        raise _refuse(f"{where} has {e.fix.count} bit correction(s) of its result, which an adapter cannot carry",
                      source)  # fmt: skip
    if len(e.shape) != 2:
        raise _refuse(f"{where} is not a 2-D weight", source)


def _module_of(name: str, source: str | os.PathLike | None) -> tuple[DownProjKind, str, int]:
    for kind in DOWN_PROJ_KINDS:
        m = kind.pattern.match(name)
        if m:
            module = name.removesuffix(".weight")
            if not m.group("prefix"):
                module = kind.default_prefix + module
            return kind, module, int(m.group("layer"))
    raise _refuse(f"{name} is not an MLP down projection PEFT can target (known: {_KNOWN})", source)


def to_adapter(patch: "Patch", *, source: str | os.PathLike | None = None, base_model: str | None = None,
               base_revision: str | None = None) -> Adapter:  # fmt: skip
    """The LoRA adapter equal (in real arithmetic) to ``patch``, or a :class:`ZupatchError` saying why there is none.

    ``source`` names the patch in errors. ``base_model`` overrides the base the
    patch records (``base_model_name_or_path``); ``base_revision`` likewise
    (PEFT's ``revision``: the base's revision, used by ``AutoPeftModel``).
    """
    if not patch.steps or not patch.tensor_names:
        raise _refuse("the patch changes no tensor", source)
    for i, step in enumerate(patch.steps):
        for e in step.entries:
            _check_entry(e, i, source)
    kinds: set[DownProjKind] = set()
    modules: list[AdapterModule] = []
    factor_bytes = 0
    for name in patch.tensor_names:
        kind, module, layer = _module_of(name, source)
        kinds.add(kind)
        chain = patch.chain(name)
        U = np.concatenate([e.U for e in chain], axis=1)  # rows × r, in the stored layout
        B = np.concatenate([e.B for e in chain], axis=0)  # r × cols
        factor_bytes += sum(e.U.nbytes + e.B.nbytes for e in chain)
        if kind.transposed:  # stored in × out: the delta PEFT adds is (lora_B·lora_A)ᵀ = U·B
            lora_A, lora_B = U.T, B.T
        else:  # stored out × in: the delta is lora_B·lora_A = U·B
            lora_A, lora_B = B, U
        modules.append(AdapterModule(name, module, layer, int(U.shape[1]), np.ascontiguousarray(lora_A),
                                     np.ascontiguousarray(lora_B)))  # fmt: skip
    if len({(k.layers_pattern, k.transposed) for k in kinds}) > 1:
        raise _refuse("its tensors belong to different model families", source)
    if len({m.module for m in modules}) != len(modules):
        raise _refuse("two tensors name the same module", source)
    kind = next(iter(kinds))
    r = max(m.rank for m in modules)
    pattern = {m.module: m.rank for m in modules if m.rank != r}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or patch.base_model,
        "revision": base_revision if base_revision is not None else (None if base_model else patch.base_revision),
        "r": r,
        "lora_alpha": r,  # scaling alpha/r = 1: the adapter adds exactly lora_B·lora_A = U·B
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({k.target for k in kinds}),
        "layers_to_transform": sorted({m.layer for m in modules}),
        "layers_pattern": kind.layers_pattern,
        "fan_in_fan_out": kind.transposed,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return Adapter(config=config, modules=modules, factor_bytes=factor_bytes)


def _is_adapter_folder(folder: Path) -> bool:
    """A folder ``export`` may overwrite with --force: it holds nothing but adapter files (and a card)."""
    return folder.is_dir() and all(p.name in (*ADAPTER_FILES, "README.md") for p in folder.iterdir())


def write_adapter(adapter: Adapter, output: str | os.PathLike, *, overwrite: bool = False) -> ExportReport:
    """Write the adapter folder: each file through a temporary file renamed into place.

    ``output`` must not exist, or be an empty folder; with ``overwrite``, it
    may also be a folder of adapter files (only those are replaced). A new
    folder is removed again when writing fails.
    """
    out = Path(output)
    if out.exists() or out.is_symlink():
        empty = out.is_dir() and not any(out.iterdir())
        if not empty and not overwrite:
            raise ZupatchError("already exists (pass --force to overwrite)", out)
        if not empty and not _is_adapter_folder(out):
            raise ZupatchError("exists and is not an adapter folder; refusing to overwrite it", out)
    elif not out.parent.is_dir():
        raise ZupatchError("folder does not exist", out.parent)
    files = adapter.files()
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    os.fchmod(fh.fileno(), 0o666 & ~current_umask())
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return ExportReport(out, adapter, {name: len(data) for name, data in files.items()})


def export_peft(patch: "Patch", output: str | os.PathLike, *, source: str | os.PathLike | None = None,
                base_model: str | None = None, overwrite: bool = False) -> ExportReport:  # fmt: skip
    """``zupatch export --to peft``: check the patch, then write its adapter folder (nothing is written on refusal)."""
    adapter = to_adapter(patch, source=source or patch.source, base_model=base_model)
    return write_adapter(adapter, output, overwrite=overwrite)
