"""Apply a patch to a model loaded in memory (and undo it exactly).

Useful in notebooks and for ``zupatch eval``: no checkpoint is written. The
weights are changed with the same canonical arithmetic as a checkpoint apply,
so the in-memory model and an applied checkpoint hold identical bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from zupatch.errors import BaseMismatchError, ZupatchError
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import invert, run_chain_in_memory, sha256_hex

if TYPE_CHECKING:
    import torch

_TORCH_TO_NAME = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32", "torch.float64": "F64"}
_NAME_TO_TORCH = {name: torch_name.removeprefix("torch.") for torch_name, name in _TORCH_TO_NAME.items()}


def bits_of(t: "torch.Tensor") -> tuple[np.ndarray, nm.DType]:
    """A tensor's bit pattern as an unsigned numpy array (a copy, on CPU)."""
    import torch

    name = _TORCH_TO_NAME.get(str(t.dtype))
    if name is None:
        raise ZupatchError(f"tensor dtype {t.dtype} is not supported (bf16, fp16, fp32, fp64)")
    dtype = nm.FLOAT_DTYPES[name]
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    arr = t.detach().to("cpu").contiguous().view(as_int).numpy().view(dtype.bits)
    return arr.copy(), dtype


def tensor_of(bits: np.ndarray, dtype: nm.DType) -> "torch.Tensor":
    """A CPU tensor of ``dtype`` holding a bit pattern (the inverse of :func:`bits_of`)."""
    import torch

    return torch.from_numpy(bits.view(np.dtype(f"<i{bits.dtype.itemsize}")).copy()).view(getattr(torch, _NAME_TO_TORCH[dtype.name]))


def write_bits(t: "torch.Tensor", bits: np.ndarray) -> None:
    """Overwrite a tensor's values with a bit pattern (keeps device and dtype)."""
    import torch

    src = torch.from_numpy(bits.view(np.dtype(f"<i{bits.dtype.itemsize}")).copy()).view(t.dtype)
    with torch.no_grad():
        t.copy_(src.reshape(t.shape).to(t.device))


#: Prefixes that name the same tensors in a loaded model and in checkpoint files, as
#: (model's ``state_dict`` prefix, prefix in the files). transformers 5 loads the language
#: model of a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration) as
#: ``model.language_model.*``, while its files (Google's, and what ``save_pretrained``
#: writes) name it ``language_model.model.*``.
CHECKPOINT_PREFIXES: tuple[tuple[str, str], ...] = (("model.language_model.", "language_model.model."),)


def other_spellings(name: str, base_model_prefix: str = "") -> list[str]:
    """The names ``name`` may have on the other side (model <-> checkpoint files), most likely first.

    Without or with the model's base prefix (``h.0...`` for GPT-2's
    ``transformer.h.0...``), and across :data:`CHECKPOINT_PREFIXES` in both directions.
    """
    spellings: list[str] = []
    for model_prefix, file_prefix in CHECKPOINT_PREFIXES:
        for a, b in ((model_prefix, file_prefix), (file_prefix, model_prefix)):
            if name.startswith(a):
                spellings.append(b + name[len(a) :])
    if base_model_prefix:
        if name.startswith(base_model_prefix + "."):
            spellings.append(name[len(base_model_prefix) + 1 :])
        spellings.append(f"{base_model_prefix}.{name}")
    return [s for i, s in enumerate(spellings) if s != name and s not in spellings[:i]]


def find_parameter(model: "torch.nn.Module", name: str) -> "torch.Tensor":
    """The parameter (or buffer) a checkpoint tensor name refers to (see :func:`other_spellings`)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    if name in params:
        return params[name]
    for candidate in other_spellings(name, getattr(model, "base_model_prefix", "")):
        if candidate in params:
            return params[candidate]
    raise ZupatchError(f"the model has no parameter {name!r}")


def apply_to_module(
    patch: Patch, model: "torch.nn.Module", *, check_base: bool = True, allow_nonfinite: bool = False
) -> None:
    """Apply ``patch`` to ``model``'s weights in place, bit-exactly.

    With ``check_base`` the weights must hash to the patch's base; otherwise a
    :class:`BaseMismatchError` names the tensors that differ and nothing changes.
    Like checkpoint apply, it proves that the patch can be undone and refuses
    new NaN/Inf values unless ``allow_nonfinite``; on refusal nothing changes.
    """
    nm.check_ieee_environment()
    targets = {name: find_parameter(model, name) for name in patch.tensor_names}
    results = {}
    mismatched = []
    for name, param in targets.items():
        chain = patch.chain(name)
        bits, dtype = bits_of(param)
        if dtype.name != chain[0].dtype or tuple(bits.shape) != chain[0].shape:
            raise ZupatchError(
                f"parameter {name!r} is {dtype.name} {list(bits.shape)}, the patch expects "
                f"{chain[0].dtype} {list(chain[0].shape)}"
            )
        if check_base and sha256_hex(bits) != chain[0].sha256_before:
            mismatched.append(name)
            continue
        results[name] = run_chain_in_memory(
            chain, bits, patch.source, prove_inverse=True, allow_nonfinite=allow_nonfinite
        )
    if mismatched:
        raise BaseMismatchError(
            f"the model is not the patch's base ({patch.base_model or 'unknown base'}): "
            f"{len(mismatched)} tensor(s) differ, e.g. {mismatched[0]!r}"
        )
    for name, bits in results.items():
        write_bits(targets[name], bits)


@contextmanager
def applied(patch: Patch, model: "torch.nn.Module", *, check_base: bool = True) -> Iterator["torch.nn.Module"]:
    """``with applied(patch, model): ...`` runs the block on the patched model and
    restores the original weights bit for bit afterwards (via the exact inverse)."""
    apply_to_module(patch, model, check_base=check_base, allow_nonfinite=True)
    try:
        yield model
    finally:
        apply_to_module(invert(patch), model, check_base=True, allow_nonfinite=True)
