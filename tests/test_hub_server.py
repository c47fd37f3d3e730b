"""The loopback Hub, exercised only through the real ``huggingface_hub`` client over HTTP.

No client function is mocked: every call below goes through httpx to the server
started by the ``loopback_hub`` fixture (see ``tests/hub_server.py`` for how the
client is pointed at it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:  # works whether or not `tests` is importable as a package
    from tests.hub_server import LoopbackHub, loopback_hub  # noqa: F401  (fixture)
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    from hub_server import LoopbackHub, loopback_hub  # type: ignore[no-redef]  # noqa: F401

# lfs.py PUTs the LFS bytes with `data=<file>`, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "alice/patches"
BIG = 10 * 1024 * 1024 + 4096  # just over the 10 MiB LFS threshold
SHA1 = re.compile(r"^[0-9a-f]{40}$")


@pytest.fixture
def api(loopback_hub: LoopbackHub) -> HfApi:
    """An `HfApi` authenticated as alice (the owner of the ``alice`` namespace)."""
    return HfApi(token=loopback_hub.token)


@pytest.fixture
def repo(api: HfApi) -> str:
    api.create_repo(REPO)
    return REPO


def _status(err: pytest.ExceptionInfo) -> int:
    return err.value.response.status_code


# --------------------------------------------------------------------------- wiring


def test_client_is_pointed_at_loopback(loopback_hub: LoopbackHub) -> None:
    from huggingface_hub import constants

    assert constants.ENDPOINT == loopback_hub.endpoint
    assert os.environ["HF_ENDPOINT"] == loopback_hub.endpoint
    assert constants.HF_HUB_DISABLE_XET and os.environ["HF_HUB_DISABLE_XET"] == "1"
    assert HfApi().endpoint == loopback_hub.endpoint
    assert "HF_TOKEN" not in os.environ
    # The module-level helpers are methods of an HfApi built at import time.
    assert huggingface_hub.whoami(token=loopback_hub.token)["name"] == "alice"


def test_client_environment_is_restored(tmp_path: Path) -> None:
    from huggingface_hub import constants
    from huggingface_hub.hf_api import api as default_api

    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, default_api.endpoint, os.environ.get("HF_ENDPOINT"))
    with LoopbackHub() as hub:
        with hub.client_environment(tmp_path / "home"):
            assert constants.HF_HUB_CACHE == str(tmp_path / "home" / "hub")
            assert default_api.endpoint == hub.endpoint
        assert (constants.ENDPOINT, constants.HF_HUB_CACHE, default_api.endpoint, os.environ.get("HF_ENDPOINT")) == before


def test_subprocess_sees_the_hub_through_env_vars(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    """A fresh interpreter (e.g. a CLI under test) needs no patching: the env vars are enough."""
    import subprocess
    import sys

    api.upload_file(path_or_fileobj=os.urandom(BIG), path_in_repo="old.bin", repo_id=repo)
    code = (
        "import huggingface_hub as h, os;"
        "h.upload_file(path_or_fileobj=os.urandom(%d), path_in_repo='new.bin', repo_id=%r);"
        "print(open(h.hf_hub_download(%r, 'old.bin'), 'rb').read()[:4].hex())" % (BIG, repo, repo)
    )
    env = {**os.environ, "HF_TOKEN": loopback_hub.token}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == loopback_hub.files(repo)["old.bin"][:4].hex()
    assert loopback_hub.lfs_files(repo) == {"old.bin", "new.bin"}  # classic LFS, not Xet


def test_whoami_and_tokens(loopback_hub: LoopbackHub) -> None:
    assert HfApi(token="hf_bob_token").whoami()["name"] == "bob"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_token").whoami()
    assert _status(err) == 401
    with pytest.raises(LocalTokenNotFoundError):  # no token anywhere on the client side
        HfApi().whoami()


# --------------------------------------------------------------------------- repos


def test_create_public_and_private_repos(loopback_hub: LoopbackHub, api: HfApi) -> None:
    url = api.create_repo("alice/public")
    assert url == f"{loopback_hub.endpoint}/alice/public" and url.repo_id == "alice/public"
    api.create_repo("alice/secret", private=True)
    assert loopback_hub.is_private("alice/secret") and not loopback_hub.is_private("alice/public")

    # exist_ok relies on the 409 body carrying `url`
    assert api.create_repo("alice/public", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/public")
    assert _status(err) == 409

    info = api.model_info("alice/secret")
    assert info.private is True and info.id == "alice/secret" and SHA1.match(info.sha)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    assert api.model_info("alice/public").private is False
    # private repos are invisible to others
    assert api.repo_exists("alice/secret")
    assert not HfApi(token="hf_bob_token").repo_exists("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("alice/secret", token=False)
    assert HfApi().model_info("alice/public").id == "alice/public"


def test_repo_settings_and_delete(loopback_hub: LoopbackHub, api: HfApi) -> None:
    api.create_repo("alice/flip")
    api.update_repo_settings("alice/flip", private=True)
    assert loopback_hub.is_private("alice/flip")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("alice/flip")
    with pytest.raises(RepositoryNotFoundError):  # bob cannot even see it
        HfApi(token="hf_bob_token").delete_repo("alice/flip")
    api.delete_repo("alice/flip")
    assert not loopback_hub.repo_exists("alice/flip")
    api.delete_repo("alice/flip", missing_ok=True)


def test_dataset_repo(loopback_hub: LoopbackHub, api: HfApi) -> None:
    url = api.create_repo("alice/data", repo_type="dataset")
    assert url == f"{loopback_hub.endpoint}/datasets/alice/data" and url.repo_type == "dataset"
    big = os.urandom(BIG)
    api.upload_file(path_or_fileobj=big, path_in_repo="train.bin", repo_id="alice/data", repo_type="dataset")
    assert loopback_hub.lfs_files("alice/data", repo_type="dataset") == {"train.bin"}
    assert not loopback_hub.repo_exists("alice/data")  # the model namespace is separate
    path = hf_hub_download("alice/data", "train.bin", repo_type="dataset")
    assert Path(path).read_bytes() == big and "datasets--alice--data" in path
    assert api.dataset_info("alice/data").sha == loopback_hub.resolve("alice/data", repo_type="dataset")


def test_repo_not_found_and_revision_not_found(api: HfApi, repo: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "x.txt")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nope")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, ".gitattributes", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="no-such-branch")
    assert not api.revision_exists(repo, "no-such-branch") and api.revision_exists(repo, "main")


def test_entry_not_found(api: HfApi, repo: str) -> None:
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download(repo, "missing.txt")
    assert isinstance(err.value, EntryNotFoundError)
    assert not api.file_exists(repo, "missing.txt") and api.file_exists(repo, ".gitattributes")
    with pytest.raises(RemoteEntryNotFoundError):  # deleting what is not there
        api.delete_file("missing.txt", repo_id=repo)


# --------------------------------------------------------------------------- uploads


def test_upload_regular_and_lfs_files(loopback_hub: LoopbackHub, api: HfApi, repo: str, tmp_path: Path) -> None:
    text = b'{"rank": 4}\n'
    info1 = api.upload_file(path_or_fileobj=text, path_in_repo="patch.json", repo_id=repo)
    assert SHA1.match(info1.oid) and info1.commit_url.endswith(info1.oid)

    folder = tmp_path / "up"
    (folder / "weights").mkdir(parents=True)
    big = os.urandom(BIG)
    (folder / "weights" / "delta.bin").write_bytes(big)
    (folder / "small.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # LFS by .gitattributes
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# patch\n")
    info2 = api.upload_folder(folder_path=folder, repo_id=repo, commit_message="add weights")

    assert info2.oid != info1.oid
    assert loopback_hub.resolve(repo) == info2.oid == api.model_info(repo).sha
    files = loopback_hub.files(repo)
    assert files["weights/delta.bin"] == big and files["patch.json"] == text
    assert loopback_hub.lfs_files(repo) == {"weights/delta.bin", "small.safetensors"}
    assert len(loopback_hub.requests_matching("PUT", r"^/_loopback/lfs/")) == 2  # the LFS bytes went by PUT

    commits = api.list_repo_commits(repo)
    assert [c.commit_id for c in commits] == [c.id for c in loopback_hub.commits(repo)]
    assert [c.title for c in commits] == ["add weights", "Upload patch.json with huggingface_hub", "initial commit"]
    assert commits[0].authors == ["alice"] and commits[-1].authors == ["system"]

    assert sorted(api.list_repo_files(repo)) == [
        ".gitattributes", "README.md", "patch.json", "small.safetensors", "weights/delta.bin"
    ]
    tree = {e.path: e for e in api.list_repo_tree(repo, recursive=True)}
    assert tree["weights/delta.bin"].lfs.size == BIG and tree["patch.json"].lfs is None
    assert type(tree["weights"]).__name__ == "RepoFolder"
    top = {e.path for e in api.list_repo_tree(repo)}
    assert top == {".gitattributes", "README.md", "patch.json", "small.safetensors", "weights"}
    assert [(e.path, e.size) for e in api.list_repo_tree(repo, path_in_repo="weights")] == [("weights/delta.bin", BIG)]
    infos = {i.path: i for i in api.get_paths_info(repo, ["patch.json", "weights", "missing"])}
    assert set(infos) == {"patch.json", "weights"} and infos["patch.json"].size == len(text)
    sib = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    assert sib["weights/delta.bin"].lfs.sha256 == loopback_hub.entries(repo)["weights/delta.bin"].sha256


def test_identical_reupload_makes_no_commit(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    big = os.urandom(BIG)
    first = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo)
    second = api.upload_file(path_or_fileobj=big, path_in_repo="big.dat", repo_id=repo)
    n_commits = len(loopback_hub.commits(repo))
    loopback_hub.requests.clear()

    again = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo)
    again_big = api.upload_file(path_or_fileobj=big, path_in_repo="big.dat", repo_id=repo)

    # The client compares the preupload `oid` with its own hash, drops the no-op and
    # answers with the current head instead of committing.
    assert again.oid == again_big.oid == second.oid != first.oid
    assert len(loopback_hub.commits(repo)) == n_commits
    assert not loopback_hub.requests_matching("POST", r"/commit/")
    assert not loopback_hub.requests_matching("PUT")  # LFS batch said "already there"

    changed = api.upload_file(path_or_fileobj=b"different", path_in_repo="a.txt", repo_id=repo)
    assert changed.oid != second.oid and len(loopback_hub.commits(repo)) == n_commits + 1


def test_copy_operations_and_readme_validation(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    big = os.urandom(BIG)
    api.create_commit(
        repo, operations=[CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("w.bin", big)], commit_message="m"
    )
    api.create_commit(
        repo,
        operations=[CommitOperationCopy("a.txt", "copy/a.txt"), CommitOperationCopy("w.bin", "copy/w.bin")],
        commit_message="copies",
    )
    files = loopback_hub.files(repo)
    assert files["copy/a.txt"] == b"a" and files["copy/w.bin"] == big
    assert loopback_hub.lfs_files(repo) == {"w.bin", "copy/w.bin"}

    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo)
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\nhi\n", path_in_repo="README.md", repo_id=repo)


def test_create_commit_with_delete_and_parent_commit(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    c1 = api.create_commit(
        repo,
        operations=[
            CommitOperationAdd("x/one.txt", b"1"),
            CommitOperationAdd("x/two.txt", b"2"),
            CommitOperationAdd("keep.txt", b"k"),
        ],
        commit_message="three files",
    )
    c2 = api.create_commit(
        repo,
        operations=[CommitOperationDelete("x/"), CommitOperationAdd("new.txt", b"n")],
        commit_message="drop folder",
        parent_commit=c1.oid,
    )
    assert set(loopback_hub.files(repo)) == {".gitattributes", "keep.txt", "new.txt"}
    assert set(loopback_hub.files(repo, c1.oid)) == {".gitattributes", "keep.txt", "x/one.txt", "x/two.txt"}
    with pytest.raises(HfHubHTTPError) as err:  # stale parent
        api.create_commit(repo, operations=[CommitOperationAdd("z", b"z")], commit_message="m", parent_commit=c1.oid)
    assert _status(err) == 412
    assert loopback_hub.resolve(repo) == c2.oid


def test_write_without_token_is_refused(loopback_hub: LoopbackHub, repo: str) -> None:
    anonymous = HfApi()  # no token configured on the client side
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert _status(err) == 401
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo("alice/other")
    assert _status(err) == 401
    with pytest.raises(HfHubHTTPError) as err:  # a token the hub does not know
        HfApi(token="hf_bogus").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert _status(err) == 401
    assert err.value.server_message and "Invalid credentials" in err.value.server_message
    assert len(loopback_hub.commits(repo)) == 1


def test_write_to_someone_elses_namespace_is_forbidden(loopback_hub: LoopbackHub, repo: str) -> None:
    bob = HfApi(token="hf_bob_token")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert _status(err) == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/bobs-idea")
    assert _status(err) == 403
    # exist_ok on a 403 makes the client fall back to repo_info: fine for an existing public repo
    assert bob.create_repo(repo, exist_ok=True).repo_id == repo
    assert bob.create_repo("bobs-own").repo_id == "bob/bobs-own"  # no namespace = the token's user
    assert len(loopback_hub.commits(repo)) == 1


def test_org_members_can_write(tmp_path: Path) -> None:
    with LoopbackHub(orgs={"zu": ["alice"]}) as hub, hub.client_environment(tmp_path / "home"):
        HfApi(token=hub.token).create_repo("zu/shared", private=True)
        HfApi(token=hub.token).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="zu/shared")
        assert hub.files("zu/shared")["x"] == b"x"
        assert [o["name"] for o in HfApi(token=hub.token).whoami()["orgs"]] == ["zu"]
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token="hf_bob_token").model_info("zu/shared")


# --------------------------------------------------------------------------- downloads


def test_download_and_old_revisions(loopback_hub: LoopbackHub, api: HfApi, repo: str, tmp_path: Path) -> None:
    big_v1, big_v2 = os.urandom(BIG), os.urandom(BIG)
    v1 = api.create_commit(
        repo,
        operations=[CommitOperationAdd("patch.json", b"v1"), CommitOperationAdd("w/delta.bin", big_v1)],
        commit_message="v1",
    ).oid
    v2 = api.create_commit(
        repo,
        operations=[CommitOperationAdd("patch.json", b"v2"), CommitOperationAdd("w/delta.bin", big_v2)],
        commit_message="v2",
    ).oid

    path = Path(hf_hub_download(repo, "patch.json"))
    assert path.read_bytes() == b"v2" and path.parent.name == v2
    assert Path(hf_hub_download(repo, "w/delta.bin")).read_bytes() == big_v2

    old = Path(hf_hub_download(repo, "patch.json", revision=v1))
    assert old.read_bytes() == b"v1" and old.parent.name == v1
    assert Path(hf_hub_download(repo, "w/delta.bin", revision=v1[:12])).read_bytes() == big_v1

    snap = Path(snapshot_download(repo))
    assert snap.name == v2
    assert (snap / "patch.json").read_bytes() == b"v2" and (snap / "w" / "delta.bin").read_bytes() == big_v2
    old_snap = Path(snapshot_download(repo, revision=v1))
    assert (old_snap / "patch.json").read_bytes() == b"v1"

    local = Path(snapshot_download(repo, local_dir=tmp_path / "checkout", allow_patterns=["*.json"]))
    assert sorted(p.name for p in local.iterdir() if p.is_file()) == ["patch.json"]


def test_private_repo_download_needs_token(loopback_hub: LoopbackHub, api: HfApi) -> None:
    api.create_repo("alice/secret", private=True)
    api.upload_file(path_or_fileobj=b"s3cr3t", path_in_repo="s.txt", repo_id="alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "s.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "s.txt", token="hf_bob_token")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret")
    assert Path(hf_hub_download("alice/secret", "s.txt", token=loopback_hub.token)).read_bytes() == b"s3cr3t"


def test_implicit_token_from_env(loopback_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", loopback_hub.token)
    huggingface_hub.create_repo("alice/envtoken", private=True)
    huggingface_hub.upload_file(path_or_fileobj=b"e", path_in_repo="e.txt", repo_id="alice/envtoken")
    assert Path(hf_hub_download("alice/envtoken", "e.txt")).read_bytes() == b"e"


def test_offline_mode_resolves_cached_files(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="a.txt", repo_id=repo)
    api.upload_file(path_or_fileobj=b"never fetched", path_in_repo="b.txt", repo_id=repo)
    online = hf_hub_download(repo, "a.txt")
    snap = snapshot_download(repo, allow_patterns=["a.txt"])
    seen = len(loopback_hub.requests)

    with LoopbackHub.offline():
        assert hf_hub_download(repo, "a.txt") == online
        assert snapshot_download(repo, allow_patterns=["a.txt"]) == snap
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(repo, "b.txt")
    assert len(loopback_hub.requests) == seen  # offline means no HTTP at all


def test_network_down_falls_back_to_cache(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="a.txt", repo_id=repo)
    online = hf_hub_download(repo, "a.txt")
    snap = snapshot_download(repo)
    with loopback_hub.down():
        assert not loopback_hub.is_running
        assert hf_hub_download(repo, "a.txt") == online
        assert snapshot_download(repo) == snap
        # (An *uncached* file is not tried here: on a connection error with nothing cached,
        # hf_hub_download retries the HEAD with backoff, 1+2+4+8+8 s, before raising
        # LocalEntryNotFoundError.) force_download cannot fall back, and fails at once:
        with pytest.raises(ValueError, match="Force download failed"):
            hf_hub_download(repo, "a.txt", force_download=True)
    assert loopback_hub.is_running  # same port, same state
    assert Path(hf_hub_download(repo, "a.txt", force_download=True)).read_bytes() == b"cached"


def test_lfs_redirect_to_cdn_origin(tmp_path: Path) -> None:
    with LoopbackHub(lfs_redirect=True) as hub, hub.client_environment(tmp_path / "home"):
        api = HfApi(token=hub.token)
        api.create_repo(REPO, private=True)
        big = os.urandom(BIG)
        api.upload_file(path_or_fileobj=big, path_in_repo="delta.bin", repo_id=REPO)
        hub.requests.clear()
        assert Path(hf_hub_download(REPO, "delta.bin", token=hub.token)).read_bytes() == big
        cdn = hub.requests_matching("GET", r"^/_loopback/cdn/")
        assert len(cdn) == 1 and cdn[0].user is None  # the client does not send the token off-Hub


# --------------------------------------------------------------------------- refs


def test_create_pr(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    base = api.upload_file(path_or_fileobj=b"main", path_in_repo="a.txt", repo_id=repo).oid
    pr = api.upload_file(path_or_fileobj=os.urandom(BIG), path_in_repo="a.bin", repo_id=repo, create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert pr.pr_url == f"{loopback_hub.endpoint}/{repo}/discussions/1"
    assert loopback_hub.resolve(repo) == base  # main untouched
    assert loopback_hub.pull_requests(repo) == {1: pr.oid}
    assert "a.bin" in loopback_hub.files(repo, "refs/pr/1")

    # anyone who can read may open a PR; a PR can be pushed to again
    bobs = HfApi(token="hf_bob_token").upload_file(
        path_or_fileobj=b"bob", path_in_repo="b.txt", repo_id=repo, create_pr=True
    )
    assert bobs.pr_num == 2
    more = api.upload_file(path_or_fileobj=b"more", path_in_repo="c.txt", repo_id=repo, revision="refs/pr/1")
    assert loopback_hub.pull_requests(repo)[1] == more.oid
    assert Path(hf_hub_download(repo, "c.txt", revision="refs/pr/1")).read_bytes() == b"more"

    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert {r.ref: r.target_commit for r in refs.pull_requests} == {"refs/pr/1": more.oid, "refs/pr/2": bobs.oid}


def test_branches_and_tags(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    v1 = api.upload_file(path_or_fileobj=b"1", path_in_repo="v.txt", repo_id=repo).oid
    api.create_branch(repo, branch="dev")
    api.create_branch(repo, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo, branch="dev")
    assert _status(err) == 409
    dev = api.upload_file(path_or_fileobj=b"2", path_in_repo="v.txt", repo_id=repo, revision="dev").oid
    assert loopback_hub.branches(repo) == {"main": v1, "dev": dev}
    assert Path(hf_hub_download(repo, "v.txt", revision="dev")).read_bytes() == b"2"
    assert Path(hf_hub_download(repo, "v.txt")).read_bytes() == b"1"

    api.create_tag(repo, tag="v1.0", revision=v1)
    assert Path(hf_hub_download(repo, "v.txt", revision="v1.0")).read_bytes() == b"1"
    refs = api.list_repo_refs(repo)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1.0"]
    api.delete_branch(repo, branch="dev")
    assert set(loopback_hub.branches(repo)) == {"main"}
    # the commit stays reachable by id
    assert loopback_hub.files(repo, dev)["v.txt"] == b"2"


def test_injected_error_and_server_health(loopback_hub: LoopbackHub, api: HfApi, repo: str) -> None:
    loopback_hub.inject_error(r"/commit/", 400, message="nope")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)
    assert _status(err) == 400 and "nope" in str(err.value)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo)  # only once

    # ranged GETs (what the client sends to resume a download), through the client's own session
    url = huggingface_hub.hf_hub_url(repo, "x.txt")
    response = huggingface_hub.get_session().get(url, headers={"Range": "bytes=0-"})
    assert response.status_code == 206 and response.headers["Content-Range"] == "bytes 0-0/1"
    assert loopback_hub.unhandled == [] and loopback_hub.errors == []
