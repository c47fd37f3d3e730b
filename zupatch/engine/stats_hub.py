"""Key statistics on the Hub: a *dataset* repo holding a statistics folder and its card.

The folder's layout, and the check before an edit uses it, are
:mod:`zupatch.engine.shared_stats`. Pushing works as for patches
(:mod:`zupatch.hub.push`): the repo is created if needed, one commit holds
only the files whose bytes differ (the same statistics again: no commit),
the token comes from the argument, ``HF_TOKEN`` or ``hf auth login`` and never
appears in a message, and an interruption says what reached the Hub.

Pulling reads the manifest first and downloads layer files only when they are
asked for, all from the commit the manifest came from, through the Hugging
Face cache: downloaded once, then used offline (``HF_HUB_OFFLINE=1`` or an
unreachable Hub); a file that was never downloaded is then a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zupatch.engine.shared_stats import MANIFEST, StatsFolder, StatsManifest
from zupatch.errors import ZupatchError
from zupatch.hub.card import stats_card
from zupatch.hub.errors import hub_error
from zupatch.hub.pull import _snapshot_commit, hub_output, parse_hub_ref
from zupatch.hub.push import (
    README,
    PushResult,
    _begin,
    _changed,
    _committed,
    _hub_errors,
    check_repo_id,
    require_token,
)

REPO_TYPE = "dataset"


def push_stats(
    manifest: StatsManifest,
    files: dict[str, bytes],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    source_url: str | None = None,
) -> PushResult:
    """Upload a statistics folder's ``files`` (:func:`~zupatch.engine.shared_stats.bundle_files`) and its card.

    One commit on main of the dataset repo ``repo_id`` (created if needed),
    holding only the files whose bytes differ; none when nothing does.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    tok = require_token(token)
    files = {**files, README: stats_card(manifest, repo_id, source_url).encode()}
    api = HfApi(token=tok)
    stage = ["begin"]
    with _hub_errors(stage, repo_id, "main", None, tok):
        url, is_private, head = _begin(api, repo_id, private=private, revision=None, create_pr=False,
                                       repo_type=REPO_TYPE)  # fmt: skip
        ops, remote = _changed(api, repo_id, files, head, repo_type=REPO_TYPE)
        result = PushResult(repo_id, url, "main", head, unchanged=not ops, private=is_private)
        if not ops:
            return result
        layers = manifest.layer_numbers
        message = commit_message or (
            f"zupatch: {'update' if MANIFEST in remote else 'add'} key statistics of {manifest.label} "
            f"(layer{'s' if len(layers) != 1 else ''} {', '.join(map(str, layers))}, {manifest.tokens} tokens)"
        )
        return _committed(result, api, repo_id, ops, stage, message=message, repo_type=REPO_TYPE)


def _download(repo_id: str, filename: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_output(quiet=True):
        try:
            return Path(hf_hub_download(repo_id, filename, repo_type=REPO_TYPE, revision=revision, token=token))
        except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
            raise hub_error(exc, repo_id, revision, filename, token=token) from None


def locate_stats(ref: str, *, token: str | None = None) -> StatsFolder:
    """The statistics ``ref`` names: a local folder, or a dataset repo ``NAMESPACE/NAME[@REVISION]``.

    For a repo only the manifest is downloaded here; the folder's ``fetch``
    downloads a layer file when it is read, from the manifest's commit.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ZupatchError("is a file; --stats takes a statistics folder or a Hub dataset repo", path)
        return StatsFolder.local(path)
    hub = parse_hub_ref(ref)
    if hub is None or hub.filename:
        raise ZupatchError("no such folder, and not a Hub dataset repo (namespace/name[@revision])", ref)
    manifest_path = _download(hub.repo_id, MANIFEST, hub.revision, token)
    commit = _snapshot_commit(manifest_path) or hub.revision
    source = f"{hub.repo_id}@{commit[:12]}" if commit else hub.repo_id
    manifest = StatsManifest.from_json(manifest_path.read_bytes(), source)

    def fetch(name: str) -> Path:
        return _download(hub.repo_id, name, commit, token)

    return StatsFolder(manifest, source, fetch)


def pull_stats(ref: str, *, token: str | None = None, cache: Any = None) -> tuple[StatsFolder, list[Path]]:
    """Download every layer of the statistics ``ref`` names and copy them into the local statistics cache.

    ``cache`` is a :class:`~zupatch.engine.stats.StatsCache` (default: the
    user's). A layer whose file records no cache description (statistics not
    computed through a cache) is checked and downloaded, but not copied.
    Returns the folder and the cache files written.
    """
    from zupatch.engine.stats import StatsCache

    cache = cache if cache is not None else StatsCache()
    folder = locate_stats(ref, token=token)
    written = []
    for layer in folder.manifest.layer_numbers:
        statistics = folder.read(layer)  # sha256, shape and finiteness checked
        if statistics.description:
            written.append(cache.store(statistics.description, statistics))
    return folder, written
