"""zupatch: ZeroUnlearn edits as small, exact, invertible safetensors patches.

The library API (the CLI is a thin layer over it)::

    import zupatch
    patch = zupatch.load_patch("forget-paris.zup.safetensors")
    zupatch.apply_to_checkpoint(patch, "./SmolLM2-135M", "./unlearned")
    with zupatch.applied(patch, model):      # in memory, restored exactly afterwards
        ...
    zupatch.invert(patch).save("restore.zup.safetensors")

    # computing an edit (this part imports torch and transformers)
    requests = [zupatch.ForgetRequest("The capital of {} is", "France", "Paris")]
    patch = zupatch.create(model, tokenizer, requests)   # model left unchanged

Public names: create, CreateConfig, ForgetRequest (compute an edit);
load_patch, Patch, Step, Entry (the file); apply_to_checkpoint,
checkpoint_state (checkpoint folders); applied, apply_to_module (a model in
memory); invert, stack, build_patch, LowRankEdit, DenseEdit (algebra);
ZupatchError, PatchFormatError, BaseMismatchError (errors).

Importing zupatch imports nothing else: every name below loads its module
on first use (``zupatch.create``, the edit engine, brings torch and
transformers). So the ``zupatch`` command (:mod:`zupatch.__main__`) starts
in a few milliseconds before its own error handling is in place, and Ctrl-C
during start-up ends it with one line rather than a traceback.
"""

from zupatch._version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read it as True)
if TYPE_CHECKING:
    from zupatch.checkpoint.apply import apply_to_checkpoint, checkpoint_state
    from zupatch.engine import CreateConfig, ForgetRequest, create
    from zupatch.errors import BaseMismatchError, PatchFormatError, ZupatchError
    from zupatch.patch.format import Entry, Patch, Step
    from zupatch.patch.module import applied, apply_to_module
    from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch, invert, stack

    load_patch = Patch.load

#: Public name -> the module that defines it.
_WHERE = {
    "apply_to_checkpoint": "zupatch.checkpoint.apply",
    "checkpoint_state": "zupatch.checkpoint.apply",
    "create": "zupatch.engine",
    "CreateConfig": "zupatch.engine",
    "ForgetRequest": "zupatch.engine",
    "BaseMismatchError": "zupatch.errors",
    "PatchFormatError": "zupatch.errors",
    "ZupatchError": "zupatch.errors",
    "Entry": "zupatch.patch.format",
    "Patch": "zupatch.patch.format",
    "Step": "zupatch.patch.format",
    "applied": "zupatch.patch.module",
    "apply_to_module": "zupatch.patch.module",
    "DenseEdit": "zupatch.patch.ops",
    "LowRankEdit": "zupatch.patch.ops",
    "build_patch": "zupatch.patch.ops",
    "invert": "zupatch.patch.ops",
    "stack": "zupatch.patch.ops",
}


def __getattr__(name: str) -> object:
    """The public names, each imported from its module on first use (then cached here)."""
    import importlib

    if name == "load_patch":
        value = getattr(__getattr__("Patch"), "load")  # noqa: B009 - __getattr__ is typed as returning object
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        raise AttributeError(f"module 'zupatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
