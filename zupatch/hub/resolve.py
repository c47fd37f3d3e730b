"""Turn what the user typed after ``--model`` into a local folder.

A path that exists is a folder. Otherwise ``namespace/name`` (or a bare name)
is a Hub repo id, resolved through the Hugging Face cache with
``snapshot_download``: it downloads what is missing, and with
``HF_HUB_OFFLINE=1`` uses only what is cached. Files in the cache are shared
blobs; zupatch reads them and never writes there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from zupatch.errors import ZupatchError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
# Weights in other formats duplicate the safetensors ones; never download them.
MODEL_IGNORE = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "original/*", "onnx/*"]


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder and, when it came from the Hub, where from."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit sha the files belong to

    @property
    def label(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision[:12]}" if self.revision else self.repo_id
        return str(self.path)


def is_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and ".." not in ref and not Path(ref).exists()


def resolve_model(ref: str, revision: str | None = None, *, token: str | None = None) -> ResolvedModel:
    """A checkpoint folder for ``ref`` (a folder path or a Hub repo id).

    ``token`` defaults to the logged-in one (``HF_TOKEN`` or ``hf auth login``).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if revision:
            raise ZupatchError("--revision applies to Hub repo ids, not to local folders", path)
        return ResolvedModel(path=path)
    if not is_repo_id(ref):
        raise ZupatchError("no such folder, and not a Hub repo id (namespace/name)", ref)
    return _snapshot(ref, revision, token)


def _snapshot(repo_id: str, revision: str | None, token: str | None = None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    from zupatch.hub.errors import hub_error

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=MODEL_IGNORE, token=token))
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(exc, repo_id, revision, token=token) from None
    return ResolvedModel(path=folder, repo_id=repo_id, revision=folder.name)
