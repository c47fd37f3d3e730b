"""Publishing to the Hub: a patch with its model card, its PEFT adapter export, or a full patched checkpoint.

Both create the repository when it does not exist and make at most one
commit. Before committing, the files already on the branch are compared with
what would be uploaded (sha256 for LFS files, git blob id for the others):
pushing the same patch again makes no commit. The token is taken from the
argument, else from ``HF_TOKEN`` or the ``hf auth login`` store, and never
appears in a message.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.utils.sha import git_hash

from zupatch.errors import ZupatchError
from zupatch.export.peft import ADAPTER_WEIGHTS
from zupatch.hub.card import (
    AdapterCardInfo,
    PatchCardInfo,
    adapter_card,
    card_base_model,
    check_source_url,
    layers_of,
    patch_card,
    robustness_section,
)
from zupatch.hub.errors import LOGIN_HINT, hub_error
from zupatch.io import jsondoc
from zupatch.hub.pull import PATCH_FILENAME, PATCH_SUFFIX, is_hub_repo_id, locate_patch

README = "README.md"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class PushResult:
    """What a push did."""

    repo_id: str
    url: str
    revision: str  # the branch pushed to (or the PR's base)
    commit: str | None  # the new commit, or the existing head when nothing changed
    unchanged: bool  # True: the repo already had these bytes, no commit was made
    private: bool | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    uploaded: list[str] = field(default_factory=list)  # paths in the repo that the commit changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo_id,
            "url": self.url,
            "revision": self.revision,
            "commit": self.commit,
            "unchanged": self.unchanged,
            "private": self.private,
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
            "uploaded": self.uploaded,
        }


def require_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else the logged-in one; a clear error when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise ZupatchError(f"pushing needs a Hugging Face token with write access: {LOGIN_HINT}")
    return found


def check_repo_id(repo_id: str) -> str:
    if not is_hub_repo_id(repo_id):
        raise ZupatchError("not a Hub repository id (expected NAMESPACE/NAME)", repo_id)
    return repo_id


def _same(remote: Any, data_sha256: str, data_blob_id: str) -> bool:
    """Does a ``RepoFile`` from ``get_paths_info`` hold exactly these bytes?"""
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == data_sha256
    return getattr(remote, "blob_id", None) == data_blob_id


def _changed(api: Any, repo_id: str, files: dict[str, bytes], head: str,
             repo_type: str = "model") -> tuple[list, set[str]]:  # fmt: skip
    """The uploads for the files whose bytes differ from the branch's (at ``head``), and the paths it has."""
    from huggingface_hub import CommitOperationAdd

    remote = {f.path: f for f in api.get_paths_info(repo_id, list(files), revision=head, repo_type=repo_type)}
    ops = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)
        for path, data in files.items()
        if not _same(remote.get(path), hashlib.sha256(data).hexdigest(), git_hash(data))
    ]
    return ops, set(remote)


def _committed(result: PushResult, api: Any, repo_id: str, ops: list, stage: list[str], *, message: str,
               create_pr: bool = False, repo_type: str = "model") -> PushResult:  # fmt: skip
    """Upload ``ops`` and commit them on ``result``'s branch, on top of ``result.commit`` (its head).

    ``result`` then records the new commit and what it changed.
    """
    commit = _upload_and_commit(
        api, repo_id, ops, stage, commit_message=message, revision=result.revision, create_pr=create_pr,
        parent_commit=None if create_pr else result.commit, repo_type=repo_type,
    )  # fmt: skip
    result.commit = commit.oid
    result.commit_url = commit.commit_url
    result.pr_url = commit.pr_url
    result.uploaded = [op.path_in_repo for op in ops]
    return result


@contextmanager
def _hub_errors(stage: list[str], repo_id: str, target: str, revision: str | None, token: str | None) -> Iterator[None]:
    """Every failure of a push as one line; Ctrl-C says what reached the Hub (``stage``)."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_hub_state(stage[0], repo_id, target)) from None
    except ZupatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(exc, repo_id, revision, token=token, writing=True) from None


def _skipped(op: Any) -> bool:
    """Did the client leave this file out of the commit because the branch already has it?"""
    remote, local = getattr(op, "_remote_oid", None), getattr(op, "_local_oid", None)
    return remote is not None and remote == local


def base_weights_bytes(base_model: str | None, base_revision: str | None, token: str | None = None) -> int | None:
    """Total bytes of the base's ``*.safetensors`` files at a pinned commit, or None (best effort).

    Only an immutable commit is asked about, so the card stays the same from
    one push to the next; any failure just leaves the number out.
    """
    if not base_model or not is_hub_repo_id(base_model) or not base_revision or not _COMMIT.match(base_revision):
        return None
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=token).model_info(base_model, revision=base_revision, files_metadata=True)
    except Exception:  # noqa: BLE001 - optional information
        return None
    sizes = [s.size for s in (info.siblings or []) if s.rfilename.endswith(".safetensors") and s.size]
    return sum(sizes) or None


def _begin(api: Any, repo_id: str, *, private: bool, revision: str | None, create_pr: bool,
           repo_type: str = "model") -> tuple[str, bool | None, str]:  # fmt: skip
    """Create the repo (and branch) if needed; return (url, private, head commit of the target revision)."""
    # private=None (not False) lets an organisation's default visibility apply to a new repo
    url = str(api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type=repo_type))
    if revision and revision != "main" and not create_pr and not _COMMIT.match(revision):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
    info = api.repo_info(repo_id, revision=revision or "main", repo_type=repo_type)
    return url, info.private, info.sha


def _hub_state(stage: str, repo_id: str, target: str) -> str:
    """What an interrupted push left on the Hub, by the stage it reached (see :func:`_upload_and_commit`)."""
    if stage == "commit":
        return f"the commit to {repo_id} ({target}) was sent but not confirmed: check on the Hub whether it landed"
    if stage == "upload":
        return f"no commit was made to {repo_id} ({target}); file contents uploaded so far belong to no revision"
    return f"nothing was uploaded to {repo_id}"


def _upload_and_commit(api: Any, repo_id: str, ops: list, stage: list[str], **commit: Any) -> Any:
    """Upload the files' contents, then make the one commit that shows them; ``stage[0]`` says which is running.

    Until the commit request is sent, nothing is visible on any branch, so an
    interruption can say what reached the Hub.
    """
    stage[0] = "upload"
    api.preupload_lfs_files(repo_id, additions=ops, revision=commit["revision"], create_pr=commit["create_pr"],
                            repo_type=commit.get("repo_type", "model"), free_memory=False)  # fmt: skip
    stage[0] = "commit"
    return api.create_commit(repo_id, ops, **commit)


def push_patch(
    patch_ref: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    filename: str = PATCH_FILENAME,
    base_model: str | None = None,
    commit_message: str | None = None,
    eval_report: str | os.PathLike | None = None,
    source_url: str | None = None,
) -> PushResult:
    """Upload a patch and its model card to ``repo_id`` (created if needed).

    ``patch_ref`` is a patch file (or a Hub reference to one). The patch goes
    to ``filename`` (default ``patch.zup.safetensors``), the card to
    ``README.md``, both in one commit on ``revision`` (a branch, created from
    main when missing; default main), or in a pull request against it with
    ``create_pr``. When the branch already holds the same bytes, no commit is
    made and ``unchanged`` is true. ``base_model`` names the base on the card
    when the patch records a local path rather than a Hub repo id.

    Interrupted (Ctrl-C), it raises ``KeyboardInterrupt`` whose message says
    what reached the Hub: nothing, uploads that belong to no revision, or a
    commit sent but not confirmed.
    ``eval_report`` is a ``zupatch eval --json`` report that evaluated this
    patch file: the card then shows its figures, without and after each
    attack (:func:`zupatch.hub.card.robustness_section`).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if not filename.endswith(PATCH_SUFFIX) or "/" in filename or filename.startswith("."):
        raise ZupatchError(f"the patch file name in the repo must be a plain name ending in {PATCH_SUFFIX}", filename)
    if base_model is not None and not is_hub_repo_id(base_model):
        raise ZupatchError("--base-model must be a Hub repo id (NAMESPACE/NAME)", base_model)
    report = read_eval_report(eval_report) if eval_report is not None else None
    tok = require_token(token)
    source = locate_patch(patch_ref, token=tok)
    from zupatch.patch.format import Patch

    patch = Patch.load(source.path)
    data = source.path.read_bytes()
    data_sha = hashlib.sha256(data).hexdigest()
    robustness: tuple[str, ...] = ()
    if report is not None:
        try:
            robustness = robustness_section(report, data_sha)
        except ValueError as error:
            raise ZupatchError(str(error), eval_report) from None
    api = HfApi(token=tok)
    target = revision or "main"
    stage = ["begin"]
    with _hub_errors(stage, repo_id, target, revision, tok):
        url, is_private, head = _begin(api, repo_id, private=private, revision=revision, create_pr=create_pr)
        base = card_base_model(patch, base_model)
        info = PatchCardInfo(
            repo_id=repo_id, filename=filename, revision=None if create_pr else revision, base_model=base_model,
            base_bytes=base_weights_bytes(base, patch.base_revision, tok), file_bytes=len(data), file_sha256=data_sha,
            robustness=robustness,
            source_url=source_url,
        )  # fmt: skip
        card = patch_card(patch, info).encode()
        ops, remote = _changed(api, repo_id, {filename: data, README: card}, head)
        result = PushResult(repo_id, url, target, head, unchanged=not ops, private=is_private)
        if not ops:
            return result
        requests = patch.request_count
        layers = layers_of(patch.tensor_names)
        message = commit_message or (
            f"zupatch: {'update' if filename in remote else 'add'} patch ({patch.steps[0].method}, "
            f"{requests} request{'s' if requests != 1 else ''}, layer{'s' if len(layers) != 1 else ''} "
            f"{', '.join(map(str, layers)) or 'n/a'})"
        )
        return _committed(result, api, repo_id, ops, stage, message=message, create_pr=create_pr)


def read_eval_report(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in a ``zupatch eval --json`` file, with one-line errors naming the file."""
    try:
        report = jsondoc.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise ZupatchError("file not found", path) from None
    except jsondoc.JSONDocumentError as error:
        raise ZupatchError(f"not JSON: {error}; pass the output of zupatch eval --json", path) from None
    except OSError as error:
        raise ZupatchError(f"cannot read: {error}", path) from None
    if not isinstance(report, dict):
        raise ZupatchError("not a `zupatch eval --json` report", path)
    return report
def push_adapter(
    patch_ref: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
    source_url: str | None = None,
) -> PushResult:
    """Upload a patch as a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) with its card.

    The card's metadata has ``base_model`` and ``base_model_relation: adapter``,
    so the Hub lists the repo among the base's adapters; the base must
    therefore be a Hub repo id (the patch's, or ``base_model``). A patch with
    no LoRA form is refused before anything is uploaded
    (:func:`zupatch.export.peft.to_adapter`). One commit, only of the files
    that differ: the same patch again makes no commit. Interrupted, it says
    what reached the Hub, as :func:`push_patch` does.
    """
    from huggingface_hub import HfApi

    from zupatch.export.peft import to_adapter
    from zupatch.patch.format import Patch

    check_repo_id(repo_id)
    check_source_url(source_url)
    if base_model is not None and not is_hub_repo_id(base_model):
        raise ZupatchError("--base-model must be a Hub repo id (NAMESPACE/NAME)", base_model)
    tok = require_token(token)
    source = locate_patch(patch_ref, token=tok)
    patch = Patch.load(source.path)
    base = card_base_model(patch, base_model)
    if base is None:
        raise ZupatchError("an adapter repo names its base on the Hub, but the patch records a local base; "
                           "pass --base-model NAMESPACE/NAME", patch_ref)  # fmt: skip
    base_revision = patch.base_revision if base == patch.base_model else None
    adapter = to_adapter(patch, source=patch_ref, base_model=base, base_revision=base_revision)
    files = adapter.files()
    info = AdapterCardInfo(
        repo_id=repo_id, base_model=base, base_revision=base_revision,
        modules=tuple((m.module, m.rank) for m in adapter.modules), adapter_bytes=len(files[ADAPTER_WEIGHTS]),
        patch_sha256=hashlib.sha256(source.path.read_bytes()).hexdigest(), source_url=source_url,
    )  # fmt: skip
    files[README] = adapter_card(patch, info).encode()
    api = HfApi(token=tok)
    target = revision or "main"
    stage = ["begin"]
    with _hub_errors(stage, repo_id, target, revision, tok):
        url, is_private, head = _begin(api, repo_id, private=private, revision=revision, create_pr=create_pr)
        ops, remote = _changed(api, repo_id, files, head)
        result = PushResult(repo_id, url, target, head, unchanged=not ops, private=is_private)
        if not ops:
            return result
        layers = adapter.layers
        message = commit_message or (
            f"zupatch: {'update' if ADAPTER_WEIGHTS in remote else 'add'} PEFT adapter (rank {adapter.rank}, "
            f"layer{'s' if len(layers) != 1 else ''} {', '.join(map(str, layers))})"
        )
        return _committed(result, api, repo_id, ops, stage, message=message, create_pr=create_pr)


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    readme: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload a checkpoint folder (e.g. the output of ``apply``) with ``readme`` as its card, in one commit.

    Hidden files and the folder's own ``README.md`` (usually the base's card)
    are left out. Files already on the branch with the same content are
    skipped by the client; when nothing changed, no commit is made.
    Interrupted, it raises ``KeyboardInterrupt`` saying what reached the Hub
    (as :func:`push_patch` does).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    root = Path(folder)
    if not root.is_dir():
        raise ZupatchError("not a folder", root)
    tok = require_token(token)
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_dir() or any(part.startswith(".") for part in rel.parts) or rel.as_posix() == README:
            continue
        files.append((rel.as_posix(), path))
    api = HfApi(token=tok)
    target = revision or "main"
    stage = ["begin"]
    with _hub_errors(stage, repo_id, target, revision, tok):
        url, is_private, head = _begin(api, repo_id, private=private, revision=revision, create_pr=create_pr)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        ops.append(CommitOperationAdd(path_in_repo=README, path_or_fileobj=readme.encode()))
        commit = _upload_and_commit(
            api, repo_id, ops, stage, commit_message=commit_message or "zupatch: upload patched checkpoint",
            revision=target, create_pr=create_pr, parent_commit=None if create_pr else head,
        )  # fmt: skip
    unchanged = commit.oid == head and not commit.pr_url
    return PushResult(
        repo_id, url, target, commit.oid, unchanged=unchanged, private=is_private,
        commit_url=None if unchanged else commit.commit_url, pr_url=commit.pr_url,
        uploaded=[] if unchanged else [op.path_in_repo for op in ops if not _skipped(op)],
    )  # fmt: skip
