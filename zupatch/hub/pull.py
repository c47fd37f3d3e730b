"""Patches and base models from the Hub, through the Hugging Face cache.

A patch reference is either a local file (an existing path always wins) or a
Hub reference::

    NAMESPACE/NAME                      the repo's patch file (see below)
    NAMESPACE/NAME:FILE                 a named file of the repo
    NAMESPACE/NAME@REVISION[:FILE]      at a branch, tag or commit

Without ``:FILE`` the repo's patch file is ``patch.zup.safetensors`` when it
exists, otherwise its single ``*.zup.safetensors`` at the top level. The
repo's file list is read first and only that one file is downloaded (never
the other patches a repo may hold, in subfolders or not). Files come through
the Hugging Face cache: they are downloaded once, reused afterwards, and used
without a network when ``HF_HUB_OFFLINE=1`` is set or the Hub cannot be
reached (a file that is not cached is then a clear error).
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
    from zupatch.hub.resolve import ResolvedModel
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
    where = f"{hub.repo_id}@{rev}" if rev else hub.repo_id
    names, cached = _repo_file_names(hub.repo_id, rev, token)
    filename = hub.filename or _choose_patch_file(hub.repo_id, names, where)
    if filename not in names:
        if cached:  # offline, or the Hub unreachable: that file was never downloaded
            raise _not_cached(hub.repo_id, rev, filename, token)
        raise ZupatchError(f"file not found in the repository{f' at revision {rev!r}' if rev else ''}",
                           f"{hub.repo_id}:{filename}")  # fmt: skip
    from huggingface_hub import hf_hub_download

    with hub_output(quiet=True):
        try:
            found = Path(hf_hub_download(hub.repo_id, filename, revision=rev, token=token))
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
            raise hub_error(exc, hub.repo_id, rev, filename, token=token) from None
    if not found.is_file():
        raise ZupatchError(f"file not found in the repository{f' at revision {rev!r}' if rev else ''}",
                           f"{hub.repo_id}:{filename}")  # fmt: skip
    return ResolvedPatch(found, hub.repo_id, filename, _snapshot_commit(found))


#: How many file names an error lists before "and N more".
_LISTED = 4


def _choose_patch_file(repo_id: str, names: list[str], where: str) -> str:
    """The file a reference without ``:FILE`` means, among the repo's files ``names``.

    ``patch.zup.safetensors`` when the repo has it, else its one top-level ``*.zup.safetensors``.
    """
    top = sorted(n for n in names if "/" not in n and n.endswith(PATCH_SUFFIX))
    if PATCH_FILENAME in top:
        return PATCH_FILENAME
    if len(top) == 1:
        return top[0]
    if top:
        raise ZupatchError(f"the repository has several patch files ({_listed(top)}): name one as "
                           f"{repo_id}:FILE, e.g. {repo_id}:{top[0]}", where)  # fmt: skip
    nested = sorted(n for n in names if n.endswith(PATCH_SUFFIX))
    hint = f" (it has {len(nested)} in subfolders: name one as {repo_id}:{nested[0]})" if nested else ""
    raise ZupatchError(f"the repository has no patch file (*{PATCH_SUFFIX}) at its top level{hint}", where)


def _listed(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def _repo_file_names(repo_id: str, revision: str | None, token: str | None) -> tuple[list[str], bool]:
    """Every file path of the repo at ``revision``, and whether the list is the cache's.

    One listing request (nothing is downloaded). Offline, when the Hub cannot
    be reached or fails (5xx), the files of the cached snapshot instead: those
    downloaded before. Asking first also makes a file that is not cached fail
    at once while the network is down, where a download would retry for ~20 s.
    """
    from huggingface_hub import errors as hf
    from huggingface_hub import repo_info

    with hub_output(quiet=True):
        try:
            return [s.rfilename for s in repo_info(repo_id, revision=revision, token=token).siblings or ()], False
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
            status = getattr(getattr(exc, "response", None), "status_code", None)
            unreachable = isinstance(exc, (hf.OfflineModeIsEnabled, ConnectionError, TimeoutError)) or any(
                k in exc.__class__.__name__ for k in ("Connect", "Timeout", "Network")
            )
            if not unreachable and not (isinstance(exc, hf.HfHubHTTPError) and status is not None and status >= 500):
                raise hub_error(exc, repo_id, revision, token=token) from None
            cached = _cached_snapshot(repo_id, revision)
            if cached is None:
                raise _not_cached(repo_id, revision, None, token, exc) from None
            return [p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()], True


def _not_cached(repo_id: str, revision: str | None, filename: str | None, token: str | None,
                cause: Exception | None = None) -> ZupatchError:  # fmt: skip
    """The one-line error for something the Hub cannot give now and the cache does not hold."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    missing = hf.LocalEntryNotFoundError(f"{repo_id} is not cached")
    missing.__cause__ = cause or (hf.OfflineModeIsEnabled("HF_HUB_OFFLINE") if constants.HF_HUB_OFFLINE else None)
    return hub_error(missing, repo_id, revision, filename, token=token)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if there is one."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = revision or "main"
    if commit.startswith("/") or ".." in commit.split("/"):
        return None
    if not _COMMIT.match(commit):
        ref = storage / "refs" / commit
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    folder = storage / "snapshots" / commit
    return folder if _COMMIT.match(commit) and folder.is_dir() else None


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file in the cache (``.../snapshots/<commit>/FILE``, FILE may hold folders)."""
    parts = path.parts
    if "snapshots" not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return parts[i + 1] if i + 1 < len(parts) and _COMMIT.match(parts[i + 1]) else None


def loaded_from(ref: str, patch: "Patch") -> ResolvedPatch:
    """Where a patch loaded from ``ref`` came from, without asking the Hub again.

    The commit is read from the cache path (``.../snapshots/<commit>/FILE``), so
    it is the one actually used even if the branch moved since.
    """
    path = Path(patch.source or ref)
    hub = None if Path(ref).expanduser().exists() else parse_hub_ref(ref)
    if hub is None:
        return ResolvedPatch(path=path)
    return ResolvedPatch(path, hub.repo_id, hub.filename or path.name, _snapshot_commit(path))


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
