"""Errors a user can cause, reported as one line without a traceback.

Library code raises :class:`ZupatchError` (or a subclass) for anything that is
the user's input being wrong: a malformed patch, a checkpoint that does not fit,
an output path that exists. The CLI prints ``str(error)`` and exits non-zero;
programming errors keep their tracebacks.
"""

from __future__ import annotations

import os


class ZupatchError(Exception):
    """A problem with something the user handed in, named in one line."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PatchFormatError(ZupatchError):
    """The patch file is not a valid zupatch patch."""


class CheckpointError(ZupatchError):
    """The checkpoint folder is missing files or is malformed."""


class BaseMismatchError(ZupatchError):
    """The checkpoint is not the base the patch was made for."""

    exit_code = 4


class OutputExistsError(ZupatchError):
    """Refusing to overwrite an existing output."""


class NonFiniteError(ZupatchError):
    """The patch would write NaN or Inf where the weights were finite."""
