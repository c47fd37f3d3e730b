"""Patches and base models from the Hub, through the Hugging Face cache.

A patch reference is either a local file (an existing path always wins) or a
Hub reference::

    NAMESPACE/NAME                      the repo's patch file (see below)
    NAMESPACE/NAME:FILE                 a named file of the repo
    NAMESPACE/NAME@REVISION[:FILE]      at a branch, tag or commit

Without ``:FILE`` the repo's patch file is ``patch.zup.safetensors`` when it
exists, otherwise its single ``*.zup.safetensors`` at the top level. Files
come through ``snapshot_download``, i.e. the Hugging Face cache: they are
downloaded once, reused afterwards, and used without a network when
``HF_HUB_OFFLINE=1`` is set (a file that is not cached is then a clear error).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zupatch.errors import ZupatchError
from zupatch.hub.errors import hub_error

if TYPE_CHECKING:
    from zupatch.checkpoint.resolve import ResolvedModel
    from zupatch.patch.format import Patch

#: The name ``zupatch push`` gives the patch inside a repo, and the one a pull looks for first.
PATCH_FILENAME = "patch.zup.safetensors"
PATCH_SUFFIX = ".zup.safetensors"

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_repo_id(text: str) -> bool:
    """``namespace/name`` with Hub-legal characters (no ``..``, no ``--`` games)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and len(text) <= 96 * 2 + 1


@dataclass(frozen=True)
class HubRef:
    """A parsed ``NAMESPACE/NAME[@REVISION][:FILE]``."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.filename}" if self.filename else "")


def parse_hub_ref(ref: str) -> HubRef | None:
    """The Hub reference ``ref`` names, or None when it does not look like one.

    Something ending in ``.safetensors`` with no ``:`` is taken for a file path
    (a mistyped local file should say "no such file", not "repository not found").
    """
    left, sep, filename = ref.partition(":")
    if sep and (not filename or filename.startswith("/") or ".." in filename.split("/") or "\\" in filename):
        return None
    repo_id, at, revision = left.partition("@")
    if at and not revision:
        return None
    if not is_hub_repo_id(repo_id):
        return None
    if not sep and not at and repo_id.endswith(".safetensors"):
        return None
    return HubRef(repo_id, revision or None, filename or None)


@dataclass(frozen=True)
class ResolvedPatch:
    """A patch file on disk and, when it came from the Hub, where from."""

    path: Path
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None  # the commit sha the file belongs to

    @property
    def label(self) -> str:
        if not self.repo_id:
            return str(self.path)
        name = "" if self.filename == PATCH_FILENAME else f":{self.filename}"
        return f"{self.repo_id}{name}" + (f"@{self.revision[:12]}" if self.revision else "")

    @property
    def pinned(self) -> str:
        """A reference naming exactly this file: ``repo@commit[:file]`` (the path for a local file)."""
        if not self.repo_id:
            return str(self.path)
        name = "" if self.filename == PATCH_FILENAME else f":{self.filename}"
        return f"{self.repo_id}" + (f"@{self.revision}" if self.revision else "") + name


def locate_patch(ref: str, revision: str | None = None, *, token: str | None = None) -> ResolvedPatch:
    """Find the patch file ``ref`` names: a local file, or a file of a Hub repo (downloaded into the cache).

    ``revision`` pins the Hub revision (it may also be given as ``@REVISION`` in ``ref``,
    not both). ``token`` defaults to the logged-in one (``HF_TOKEN`` or ``hf auth login``).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if revision:
            raise ZupatchError("--revision applies to Hub references, not to local files", path)
        if path.is_dir():
            raise ZupatchError("is a folder, not a patch file", path)
        return ResolvedPatch(path=path)
    hub = parse_hub_ref(ref)
    if hub is None:
        raise ZupatchError("no such file, and not a Hub reference (namespace/name[@revision][:file])", ref)
    if hub.revision and revision and hub.revision != revision:
        raise ZupatchError(f"two revisions given ({hub.revision!r} in the reference, {revision!r} as an option)", ref)
    rev = hub.revision or revision
    patterns = [hub.filename] if hub.filename else [f"*{PATCH_SUFFIX}"]
    from huggingface_hub import snapshot_download

    with hub_output(quiet=True):
        try:
            folder = Path(snapshot_download(hub.repo_id, revision=rev, allow_patterns=patterns, token=token))
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
            raise hub_error(exc, hub.repo_id, rev, hub.filename, token=token) from None
    commit = folder.name if _COMMIT.match(folder.name) else None
    where = f"{hub.repo_id}@{rev}" if rev else hub.repo_id
    if hub.filename:
        found = folder / hub.filename
        if not found.is_file():
            raise ZupatchError(f"file not found in the repository{f' at revision {rev!r}' if rev else ''}",
                               f"{hub.repo_id}:{hub.filename}")  # fmt: skip
        return ResolvedPatch(found, hub.repo_id, hub.filename, commit)
    names = sorted(p.name for p in folder.glob(f"*{PATCH_SUFFIX}") if p.is_file())
    if PATCH_FILENAME in names:
        name = PATCH_FILENAME
    elif len(names) == 1:
        name = names[0]
    elif not names:
        raise ZupatchError(f"the repository has no patch file (*{PATCH_SUFFIX}) at its top level", where)
    else:
        raise ZupatchError(f"the repository has several patch files ({', '.join(names)}): name one as "
                           f"{hub.repo_id}:FILE", where)  # fmt: skip
    return ResolvedPatch(folder / name, hub.repo_id, name, commit)


def loaded_from(ref: str, patch: "Patch") -> ResolvedPatch:
    """Where a patch loaded from ``ref`` came from, without asking the Hub again.

    The commit is read from the cache path (``.../snapshots/<commit>/FILE``), so
    it is the one actually used even if the branch moved since.
    """
    path = Path(patch.source or ref)
    hub = None if Path(ref).expanduser().exists() else parse_hub_ref(ref)
    if hub is None:
        return ResolvedPatch(path=path)
    parts = path.parts
    commit = None
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _COMMIT.match(parts[i + 1]):
            commit = parts[i + 1]
    return ResolvedPatch(path, hub.repo_id, hub.filename or path.name, commit)


def resolve_patch(ref: str, revision: str | None = None, *, token: str | None = None) -> Path:
    """The local path of the patch file ``ref`` names (see :func:`locate_patch`)."""
    return locate_patch(ref, revision, token=token).path


def load_patch(ref: str, revision: str | None = None, *, token: str | None = None) -> "Patch":
    """Load the patch ``ref`` names: a local file or a Hub reference."""
    from zupatch.patch.format import Patch

    located = locate_patch(ref, revision, token=token)
    try:
        return Patch.load(located.path)
    except ZupatchError as exc:
        if located.repo_id:  # name the Hub file, not its path inside the cache
            exc.path = located.label
        raise


# --------------------------------------------------------------------------- base revision


def base_revision_note(patch: "Patch", model: "ResolvedModel") -> str | None:
    """A warning when a Hub base is not the repo or revision the patch records, else None.

    Not an error: the patch checks every touched tensor by sha256, and another
    revision (or a mirror) whose tensors are identical is a valid base. The
    note tells the user which revision the patch expects, before the hash check
    decides.
    """
    if model.repo_id is None or not patch.steps or patch.steps[0].inverted:
        return None  # an inverse patch's base is a patched model, which the metadata does not name
    recorded = patch.base_model
    if recorded and is_hub_repo_id(recorded) and recorded != model.repo_id:
        return (
            f"the patch was made from {recorded}, not {model.repo_id}; the tensor hashes decide whether it fits"
        )
    expected = patch.base_revision
    if not expected or not model.revision or model.revision.startswith(expected) or expected.startswith(model.revision):
        return None
    return (
        f"the patch was made from revision {expected[:12]} of {model.repo_id}, but --model resolved to "
        f"{model.revision[:12]}; the tensor hashes decide whether it fits (pass --revision {expected} "
        "to use the recorded base)"
    )


# --------------------------------------------------------------------------- terminal output


@contextlib.contextmanager
def hub_output(quiet: bool) -> Iterator[None]:
    """huggingface_hub's progress bars only on a terminal (and not when ``quiet``); its log warnings off.

    zupatch reports Hub problems itself, as one line; the client's own warnings
    ("Retrying in 1s", "No files matched") would only repeat them.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    silence = (quiet or not sys.stderr.isatty()) and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)
        if silence:
            enable_progress_bars()
