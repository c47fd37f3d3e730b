"""zupatch: ZeroUnlearn edits as small, exact, invertible safetensors patches.

The library API (the CLI is a thin layer over it)::

    import zupatch
    patch = zupatch.load_patch("forget-paris.zup.safetensors")
    zupatch.apply_to_checkpoint(patch, "./SmolLM2-135M", "./unlearned")
    with zupatch.applied(patch, model):      # in memory, restored exactly afterwards
        ...
    zupatch.invert(patch).save("restore.zup.safetensors")

Importing zupatch does not import torch or transformers.
"""

from zupatch._version import __version__
from zupatch.checkpoint.apply import apply_to_checkpoint, checkpoint_state
from zupatch.errors import BaseMismatchError, PatchFormatError, ZupatchError
from zupatch.patch.format import Entry, Patch, Step
from zupatch.patch.module import applied, apply_to_module
from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch, invert, stack

load_patch = Patch.load

__all__ = [
    "__version__",
    "BaseMismatchError",
    "DenseEdit",
    "Entry",
    "LowRankEdit",
    "Patch",
    "PatchFormatError",
    "Step",
    "ZupatchError",
    "applied",
    "apply_to_checkpoint",
    "apply_to_module",
    "build_patch",
    "checkpoint_state",
    "invert",
    "load_patch",
    "stack",
]
