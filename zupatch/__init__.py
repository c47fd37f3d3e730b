"""zupatch: ZeroUnlearn edits as small, exact, invertible safetensors patches.

The library API (the CLI is a thin layer over it)::

    import zupatch
    patch = zupatch.load_patch("forget-paris.zup.safetensors")
    zupatch.apply_to_checkpoint(patch, "./SmolLM2-135M", "./unlearned")
    with zupatch.applied(patch, model):      # in memory, restored exactly afterwards
        ...
    zupatch.invert(patch).save("restore.zup.safetensors")

Importing zupatch does not import torch or transformers; ``zupatch.create``
(the edit engine) loads them on first use.
"""

from zupatch._version import __version__
from zupatch.checkpoint.apply import apply_to_checkpoint, checkpoint_state
from zupatch.errors import BaseMismatchError, PatchFormatError, ZupatchError
from zupatch.patch.format import Entry, Patch, Step
from zupatch.patch.module import applied, apply_to_module
from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch, invert, stack

load_patch = Patch.load


def __getattr__(name: str):
    """``zupatch.create`` / ``zupatch.CreateConfig`` / ``zupatch.ForgetRequest``, imported on first use."""
    if name in ("create", "CreateConfig", "ForgetRequest"):
        from zupatch import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'zupatch' has no attribute {name!r}")

__all__ = [
    "__version__",
    "BaseMismatchError",
    "CreateConfig",
    "ForgetRequest",
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
    "create",
    "invert",
    "load_patch",
    "stack",
]
