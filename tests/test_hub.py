"""The Hub through the real CLI: push, re-push, private repos, pull by repo id, the cache offline, errors.

A `LoopbackHub` (tests/hub_server.py) serves the Hub HTTP API on 127.0.0.1 and
the real ``huggingface_hub`` client talks HTTP to it; no client function is
mocked. Every CLI run here also checks that the token never appears in the
output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCardData
from packaging.requirements import Requirement
from typer.testing import CliRunner

from tests.hub_server import LoopbackHub
from tests.patching import folder_digest, random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app
from zupatch.errors import ZupatchError
from zupatch.hub import PatchCardInfo, checkpoint_card, parse_hub_ref, patch_card
from huggingface_hub.utils.sha import git_hash
from zupatch.patch.format import Patch
from zupatch.patch.ops import invert

# lfs.py PUTs the LFS bytes with `data=<file>`, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

runner = CliRunner()
TOKEN = "hf_zupatchAliceSECRET0123456789"  # distinctive: asserted absent from every output
BOB = "hf_zupatchBobSECRET9876543210"
BAD = "hf_zupatchNotAValidToken000000"
BASE = "alice/tiny-base"
PATCH_REPO = "alice/forget-facts"
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]
SECRET_PROMPT = "The secret capital of Zubrowka is"  # request text that must never be published
SALTED = [hashlib.sha256(f"salt:{i}".encode()).hexdigest() for i in range(2)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hubworld")
    base = make_tiny_checkpoint("llama", root / "base", max_shard_size="60KB")
    other = make_tiny_checkpoint("llama", root / "other", max_shard_size="60KB", seed=1)
    return {"root": root, "base": base, "other": other, "files": _folder_bytes(base)}


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> LoopbackHub:
    """A loopback Hub with alice's and bob's distinctive tokens; the client points at it, no token set."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("COLUMNS", "200")
    with LoopbackHub(tokens={TOKEN: "alice", BOB: "bob"}) as server, server.client_environment(home):
        yield server


@pytest.fixture
def base_rev(hub: LoopbackHub, world: dict) -> str:
    """The tiny base checkpoint published as alice/tiny-base; its commit id."""
    hub.create_repo(BASE)
    return hub.commit(BASE, world["files"], message="base weights")


def make_patch(world: dict, base_rev: str, path: Path, *, seed: int = 0, scale: float = 1.01) -> Path:
    """A patch recording its Hub base, with salted request hashes and (opted-in) request text in its metadata."""
    patch = random_patch(world["base"], DOWN, seed=seed, method="zerounlearn", scale=scale)
    step = patch.steps[0]
    step.base_model, step.base_revision = BASE, base_rev
    step.hyperparameters = {"lambda_r": 2000.0, "layers": [1, 2], "target": "<eos>"}
    step.requests = {"count": 2, "salt": "5a1t", "sha256": SALTED, "text": [SECRET_PROMPT, "Zubrowka"]}
    patch.save(path)
    return path


def zup(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    for secret in (TOKEN, BOB, BAD):
        assert secret not in result.output, result.output
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def one_error(code: int, out: str, *needles: str) -> str:
    """The error contract: non-zero exit, exactly one ``error:`` line holding every needle."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def pushed(hub: LoopbackHub, world: dict, base_rev: str, tmp: Path, repo: str = PATCH_REPO, *extra: str) -> Path:
    patch = make_patch(world, base_rev, tmp / "forget.zup.safetensors")
    code, out = zup("push", str(patch), "--repo", repo, "--token", TOKEN, *extra)
    assert code == 0, out
    return patch


# --------------------------------------------------------------------------- push


def test_push_creates_repo_with_card_and_repush_is_noop(hub: LoopbackHub, world: dict, base_rev: str,
                                                        tmp_path: Path) -> None:  # fmt: skip
    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors")
    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN)
    assert code == 0, out
    assert "pushed" in out and PATCH_REPO in out
    assert "%|" not in out and "it/s" not in out  # no progress bars when not on a terminal

    files = hub.files(PATCH_REPO)
    assert set(files) == {".gitattributes", "patch.zup.safetensors", "README.md"}
    assert files["patch.zup.safetensors"] == patch_file.read_bytes()
    assert "patch.zup.safetensors" in hub.lfs_files(PATCH_REPO)
    assert not hub.is_private(PATCH_REPO)
    commits = hub.commits(PATCH_REPO)
    assert len(commits) == 2 and commits[0].author == "alice"

    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == BASE
    assert front["library_name"] == "zupatch"
    assert {"zupatch", "unlearning"} <= set(front["tags"])
    assert "`zerounlearn`" in card and "Layers: 1, 2" in card and "Forget requests: 2" in card
    assert f"zupatch apply {PATCH_REPO} --model {BASE} --revision {base_rev} -o ./forget-facts-applied" in card
    assert f"Base revision: `{base_rev}`" in card
    size = len(patch_file.read_bytes())
    assert f"| {size:,} |" in card
    base_weights = sum(len(b) for n, b in world["files"].items() if n.endswith(".safetensors"))
    assert f"| base model weights | {base_weights:,} |" in card  # size against the base, from the Hub
    assert hashlib.sha256(patch_file.read_bytes()).hexdigest() in card
    # never the requests: not their text, not their salted hashes, not the salt
    for secret in (SECRET_PROMPT, "Zubrowka", "5a1t", *SALTED, *(s[:16] for s in SALTED)):
        assert secret not in card
    assert "lambda_r=2000" in card and "target='<eos>'" in card

    # the same patch again: nothing uploaded, no new commit
    before = len(hub.requests_matching("PUT")), len(hub.requests_matching("POST", r"/commit/"))
    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["unchanged"] is True and result["commit"] == commits[0].id and result["uploaded"] == []
    assert len(hub.commits(PATCH_REPO)) == 2
    assert (len(hub.requests_matching("PUT")), len(hub.requests_matching("POST", r"/commit/"))) == before
    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN)
    assert code == 0 and "unchanged" in out and "no commit" in out, out
    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--private")
    assert code == 0 and "already exists and is public" in out, out
    assert len(hub.commits(PATCH_REPO)) == 2 and not hub.is_private(PATCH_REPO)

    # another patch replaces it in one new commit
    other = make_patch(world, base_rev, tmp_path / "other.zup.safetensors", seed=5)
    code, out = zup("push", str(other), "--repo", PATCH_REPO, "--token", TOKEN, "--json")
    assert code == 0, out
    assert set(json.loads(out)["uploaded"]) == {"patch.zup.safetensors", "README.md"}
    assert len(hub.commits(PATCH_REPO)) == 3
    assert hub.files(PATCH_REPO)["patch.zup.safetensors"] == other.read_bytes()


def test_card_is_deterministic_and_has_no_request_text(world: dict, tmp_path: Path) -> None:
    patch = Patch.load(make_patch(world, "a" * 40, tmp_path / "p.zup.safetensors"))
    info = PatchCardInfo(repo_id=PATCH_REPO, file_bytes=123, file_sha256="f" * 64)
    assert patch_card(patch, info) == patch_card(Patch.load(tmp_path / "p.zup.safetensors"), info)
    assert SECRET_PROMPT not in patch_card(patch, info)
    inverse = patch_card(invert(patch), info)  # an inverse patch applies to the patched model
    assert "restores 2 facts" in inverse and "--model PATH/TO/PATCHED/MODEL" in inverse
    # a patch made from a local folder: its name only on the card, and no base_model unless given
    patch.steps[0].base_model, patch.steps[0].base_revision = "/home/me/models/tiny-base", None
    card = patch_card(patch, info)
    assert "/home/me" not in card and "`tiny-base`" in card and "base_model" not in card
    assert "--model PATH/TO/BASE -o" in card
    card = patch_card(patch, PatchCardInfo(repo_id=PATCH_REPO, base_model=BASE, filename="x.zup.safetensors"))
    assert yaml.safe_load(card.split("---")[1])["base_model"] == BASE
    assert f"zupatch apply {PATCH_REPO}:x.zup.safetensors --model {BASE} -o" in card


def test_cards_install_zupatch_in_a_way_that_works(world: dict, tmp_path: Path) -> None:
    """zupatch is not on PyPI: no card says `pip install zupatch`; it names the source repo or a clone."""
    patch = Patch.load(make_patch(world, "a" * 40, tmp_path / "p.zup.safetensors"))
    cards = [
        patch_card(patch, PatchCardInfo(repo_id=PATCH_REPO)),
        checkpoint_card("alice/x", base_model=BASE, base_revision=None, patch=patch, patch_ref="p.zup.safetensors",
                        patch_repo_id=None, patch_sha256="0" * 64),
    ]  # fmt: skip
    for card in cards:
        lines = card.splitlines()
        assert not any(line.strip() == "pip install zupatch" for line in lines), card
        assert "pypi.org" not in card
        assert "pip install ./zupatch   # the folder of your clone" in lines
    url = "https://git.example.org/tools/zupatch.git"
    card = patch_card(patch, PatchCardInfo(repo_id=PATCH_REPO, source_url=url))
    (line,) = [line for line in card.splitlines() if line.startswith("pip install")]
    requirement = Requirement(shlex.split(line)[2])  # what pip parses
    assert requirement.name == "zupatch" and requirement.url == f"git+{url}", line
    assert f"[zupatch]({url})" in card
    for bad in ("http://example.org/z.git", 'https://x.org/a" && rm -rf ~ "', "https://x.org/a b"):
        with pytest.raises(ZupatchError, match="--source-url"):
            patch_card(patch, PatchCardInfo(repo_id=PATCH_REPO, source_url=bad))

    # the clone form works: pip resolves a copy of this source tree named ./zupatch (offline, installing nothing)
    root = Path(__file__).resolve().parents[1]
    clone = tmp_path / "zupatch"
    shutil.copytree(root / "zupatch", clone / "zupatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, clone / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "./zupatch", "--dry-run", "--no-deps", "--no-index",
                           "--no-build-isolation", "--quiet", "--report", "-"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [i["metadata"]["name"] for i in json.loads(proc.stdout)["install"]] == ["zupatch"]


def test_push_as_adapter(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    """The PEFT export on the Hub: adapter files plus a card the Hub lists among the base's adapters."""
    repo = "alice/forget-facts-lora"
    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors", scale=1.0)
    code, out = zup("push", str(patch_file), "--repo", repo, "--as-adapter", "--token", TOKEN)
    assert code == 0 and "pushed adapter to" in out, out
    files = hub.files(repo)
    assert set(files) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "adapter_model.safetensors" in hub.lfs_files(repo)
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(tmp_path / "local"), "-q")
    assert code == 0, out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert files[name] == (tmp_path / "local" / name).read_bytes(), name  # the export, byte for byte
    config = json.loads(files["adapter_config.json"])
    assert config["base_model_name_or_path"] == BASE and config["revision"] == base_rev
    assert config["layers_to_transform"] == [1, 2] and config["target_modules"] == ["down_proj"]

    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == BASE and front["base_model_relation"] == "adapter"
    assert front["library_name"] == "peft" and {"zupatch", "unlearning", "lora"} <= set(front["tags"])
    data = ModelCardData(**front).to_dict()  # the fields as huggingface_hub reads them
    assert data["base_model"] == BASE and data["base_model_relation"] == "adapter"
    assert f'PeftModel.from_pretrained(base, "{repo}")' in card and "--enable-lora" in card
    assert hashlib.sha256(patch_file.read_bytes()).hexdigest() in card
    assert not any(line.strip() == "pip install zupatch" for line in card.splitlines())
    for secret in (SECRET_PROMPT, "Zubrowka", "5a1t", *SALTED):
        assert secret not in card

    # the same patch again: no commit
    commits = len(hub.commits(repo))
    code, out = zup("push", str(patch_file), "--repo", repo, "--as-adapter", "--token", TOKEN, "--json")
    assert code == 0 and json.loads(out)["unchanged"] is True, out
    assert len(hub.commits(repo)) == commits

    # a patch with no LoRA form (scale 1.01): one line, nothing created on the Hub
    scaled = make_patch(world, base_rev, tmp_path / "scaled.zup.safetensors")
    one_error(*zup("push", str(scaled), "--repo", "alice/nope", "--as-adapter", "--token", TOKEN),
              "cannot export as a PEFT adapter", "c = 1.01", str(scaled))  # fmt: skip
    assert not hub.repo_exists("alice/nope")

    # PEFT itself loads the pushed adapter from the Hub, onto the base, with the patch's factors
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["base"]), repo, token=TOKEN)
    lora = model.base_model.model.model.layers[2].mlp.down_proj
    entry = Patch.load(patch_file).steps[0].entries[1]
    assert torch.equal(lora.lora_B["default"].weight.detach(), torch.from_numpy(entry.U))


def test_push_private_branch_and_pull_request(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment this time
    code, out = zup("push", str(patch_file), "--repo", "alice/secret-patch", "--private")
    assert code == 0, out
    assert hub.is_private("alice/secret-patch")

    # a private patch: invisible without a token, usable with one
    monkeypatch.delenv("HF_TOKEN")
    one_error(*zup("inspect", "alice/secret-patch"), "alice/secret-patch", "not found", "private", "no token")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out = zup("inspect", "alice/secret-patch", "--json")
    assert code == 0, out
    assert json.loads(out)["base_revision"] == base_rev

    # --revision pushes to a branch (created from main); --create-pr opens a pull request
    other = make_patch(world, base_rev, tmp_path / "other.zup.safetensors", seed=5)
    code, out = zup("push", str(other), "--repo", "alice/secret-patch", "--revision", "v2")
    assert code == 0, out
    assert hub.files("alice/secret-patch", "v2")["patch.zup.safetensors"] == other.read_bytes()
    assert hub.files("alice/secret-patch")["patch.zup.safetensors"] == patch_file.read_bytes()
    assert "zupatch apply alice/secret-patch@v2 --model" in hub.files("alice/secret-patch", "v2")["README.md"].decode()
    code, out = zup("inspect", "alice/secret-patch@v2", "--json")
    assert code == 0 and json.loads(out)["sizes"]["file_bytes"] == other.stat().st_size, out

    code, out = zup("push", str(other), "--repo", "alice/secret-patch", "--filename", "second.zup.safetensors")
    assert code == 0, out
    code, out = zup("inspect", "alice/secret-patch:second.zup.safetensors", "--json")  # the default file stays first
    assert code == 0 and json.loads(out)["sizes"]["file_bytes"] == other.stat().st_size, out
    code, out = zup("inspect", "alice/secret-patch", "--json")
    assert code == 0 and json.loads(out)["sizes"]["file_bytes"] == patch_file.stat().st_size, out

    main_before = hub.resolve("alice/secret-patch")
    code, out = zup("push", str(other), "--repo", "alice/secret-patch", "--create-pr")
    assert code == 0 and "pull request" in out, out
    prs = hub.pull_requests("alice/secret-patch")
    assert len(prs) == 1 and hub.resolve("alice/secret-patch") == main_before
    assert hub.files("alice/secret-patch", f"refs/pr/{next(iter(prs))}")["patch.zup.safetensors"] == other.read_bytes()


# --------------------------------------------------------------------------- pull


def test_apply_verify_inspect_by_repo_id(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    patch_file = pushed(hub, world, base_rev, tmp_path)
    local = tmp_path / "local"
    assert zup("apply", str(patch_file), "--model", str(world["base"]), "-o", str(local))[0] == 0

    out_dir = tmp_path / "from-hub"
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(out_dir))
    assert code == 0, out
    assert "warning" not in out  # the recorded base revision is main's
    assert "%|" not in out  # no progress bars when not on a terminal
    assert folder_digest(out_dir) == folder_digest(local)  # bit-equal to applying the local file
    # the Hugging Face cache is never written to: every blob still has the content its name (its hash) says
    blobs = list((Path(os.environ["HF_HOME"]) / "hub" / "models--alice--tiny-base" / "blobs").iterdir())
    assert len(blobs) == len(world["files"]) + 1  # and .gitattributes
    for blob in blobs:
        data = blob.read_bytes()
        assert blob.name in (hashlib.sha256(data).hexdigest(), git_hash(data)), blob.name

    assert zup("verify", PATCH_REPO, "--model", str(out_dir))[0] == 3
    assert zup("verify", PATCH_REPO, "--model", BASE, "--revision", base_rev)[0] == 0
    code, out = zup("inspect", f"{PATCH_REPO}:patch.zup.safetensors", "--json")
    assert code == 0 and json.loads(out)["base_model"] == BASE, out
    code, out = zup("inspect", PATCH_REPO, "--patch-revision", hub.resolve(PATCH_REPO)[:10])
    assert code == 0 and PATCH_REPO in out, out
    code, out = zup("invert", PATCH_REPO, "-o", str(tmp_path / "restore.zup.safetensors"))
    assert code == 0, out
    code, out = zup("apply", str(tmp_path / "restore.zup.safetensors"), "--model", str(out_dir),
                    "-o", str(tmp_path / "restored"))  # fmt: skip
    assert code == 0, out
    assert folder_digest(tmp_path / "restored") == folder_digest(world["base"])


def test_offline_uses_the_cache(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    pushed(hub, world, base_rev, tmp_path)
    assert zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "warm"))[0] == 0  # fills the cache
    hub.create_repo("alice/never-downloaded")
    hub.commit("alice/never-downloaded", {"patch.zup.safetensors": (tmp_path / "forget.zup.safetensors").read_bytes()})
    served = len(hub.requests)

    with hub.offline():
        code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "offline"))
        assert code == 0, out
        assert zup("verify", PATCH_REPO, "--model", BASE)[0] == 0
        assert zup("inspect", PATCH_REPO, "--json")[0] == 0
        one_error(*zup("inspect", "alice/never-downloaded"), "alice/never-downloaded", "not in the local",
                  "HF_HUB_OFFLINE")  # fmt: skip
        one_error(*zup("verify", "alice/never-downloaded", "--model", BASE), "HF_HUB_OFFLINE")
    assert len(hub.requests) == served  # offline means no request at all
    assert folder_digest(tmp_path / "offline") == folder_digest(tmp_path / "warm")

    with hub.down():  # the network is down: cached files are used at once, missing ones fail at once
        code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "down"))
        assert code == 0, out
        one_error(*zup("inspect", "alice/never-downloaded"), "alice/never-downloaded", "cannot reach the Hub",
                  "not in the local Hugging Face cache")  # fmt: skip
        one_error(*zup("push", str(tmp_path / "forget.zup.safetensors"), "--repo", PATCH_REPO, "--token", TOKEN),
                  PATCH_REPO, "cannot reach the Hub")  # fmt: skip


def test_base_revision_is_checked(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    pushed(hub, world, base_rev, tmp_path)
    # main moves on, tensors unchanged: a warning, and the hashes say it fits
    moved = hub.commit(BASE, {"README.md": "# tiny base\n"}, message="card")
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "a"))
    assert code == 0, out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and base_rev[:12] in warning[0] and moved[:12] in warning[0], out
    assert f"--revision {base_rev}" in warning[0]
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "--revision", base_rev, "-o", str(tmp_path / "b"))
    assert code == 0 and "warning" not in out, out

    # main's weights change: the warning, then the hash check refuses
    other = _folder_bytes(world["other"])
    hub.commit(BASE, {k: v for k, v in other.items() if k.endswith(".safetensors")}, message="retrained")
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "c"))
    assert code == 4, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("warning:") and lines[1].startswith("error:") and "not the base" in lines[1]
    assert not (tmp_path / "c").exists()
    # a base from another repo is named too
    hub.create_repo("bob/mirror")
    hub.commit("bob/mirror", world["files"])
    code, out = zup("apply", PATCH_REPO, "--model", "bob/mirror", "-o", str(tmp_path / "d"))
    assert code == 0 and "made from alice/tiny-base, not bob/mirror" in out, out


def test_apply_push_to_publishes_patched_checkpoint(hub: LoopbackHub, world: dict, base_rev: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    pushed(hub, world, base_rev, tmp_path)
    out_dir = tmp_path / "out"
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(out_dir), "--push-to", "alice/tiny-unlearned",
                    "--token", TOKEN, "--private")  # fmt: skip
    assert code == 0, out
    assert "pushed patched checkpoint" in out
    assert hub.is_private("alice/tiny-unlearned")
    files = hub.files("alice/tiny-unlearned")
    local = _folder_bytes(out_dir)
    for name, data in local.items():
        if name != "README.md":
            assert files[name] == data, name
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == BASE and "zupatch" in front["tags"] and "unlearning" in front["tags"]
    assert front["base_model_relation"] == "finetune"
    assert f"patched copy of [{BASE}]" in card and f"`{base_rev}`" in card
    assert f"{PATCH_REPO}@{hub.resolve(PATCH_REPO)}" in card and SECRET_PROMPT not in card
    # it is a regular checkpoint with the patch applied
    code, out = zup("verify", PATCH_REPO, "--model", "alice/tiny-unlearned", env={"HF_TOKEN": TOKEN})
    assert code == 3, out
    # publishing the same result again makes no commit
    commits = len(hub.commits("alice/tiny-unlearned"))
    code, out = zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "again"), "--push-to",
                    "alice/tiny-unlearned", "--token", TOKEN, "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["pushed"]["unchanged"] is True, out
    assert len(hub.commits("alice/tiny-unlearned")) == commits
    # no token: refused before anything is written
    one_error(*zup("apply", PATCH_REPO, "--model", BASE, "-o", str(tmp_path / "nope"), "--push-to", "alice/x"),
              "token", "HF_TOKEN")  # fmt: skip
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------- errors


def test_errors_are_one_clear_line(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    patch_file = pushed(hub, world, base_rev, tmp_path)
    p = str(patch_file)
    # repository, file or revision not found
    one_error(*zup("apply", "alice/nope", "--model", BASE, "-o", str(tmp_path / "o")), "alice/nope",
              "repository not found")  # fmt: skip
    one_error(*zup("apply", PATCH_REPO, "--model", "alice/no-base", "-o", str(tmp_path / "o")), "alice/no-base",
              "repository not found")  # fmt: skip
    one_error(*zup("inspect", f"{PATCH_REPO}:missing.zup.safetensors"), f"{PATCH_REPO}:missing.zup.safetensors",
              "file not found in the repository")  # fmt: skip
    one_error(*zup("inspect", f"{PATCH_REPO}@no-such-branch"), PATCH_REPO, "revision 'no-such-branch' does not exist")
    one_error(*zup("verify", PATCH_REPO, "--model", BASE, "--revision", "v9"), BASE, "revision 'v9' does not exist")
    one_error(*zup("inspect", BASE), BASE, "no patch file")
    hub.commit(PATCH_REPO, {"b.zup.safetensors": patch_file.read_bytes()}, delete=["patch.zup.safetensors"])
    hub.commit(PATCH_REPO, {"a.zup.safetensors": patch_file.read_bytes()})
    one_error(*zup("inspect", PATCH_REPO), PATCH_REPO, "several patch files", "a.zup.safetensors, b.zup.safetensors")
    assert zup("inspect", f"{PATCH_REPO}:a.zup.safetensors")[0] == 0
    hub.commit(PATCH_REPO, {"bad.zup.safetensors": b"\x00not a patch"})
    one_error(*zup("inspect", f"{PATCH_REPO}:bad.zup.safetensors"), f"{PATCH_REPO}:bad.zup.safetensors@",
              "not a valid safetensors file")  # fmt: skip
    one_error(*zup("inspect", str(tmp_path / "typo.zup.safetensors")), "typo.zup.safetensors", "no such file")
    one_error(*zup("inspect", "out/typo.zup.safetensors"), "out/typo.zup.safetensors", "no such file")

    # no token, an invalid token, a token without permission
    one_error(*zup("push", p, "--repo", "alice/new"), "token", "HF_TOKEN", "hf auth login")
    assert not hub.repo_exists("alice/new")
    one_error(*zup("push", p, "--repo", "alice/new", "--token", BAD), "alice/new", "rejected the token")
    one_error(*zup("push", p, "--repo", "alice/new", "--token", BOB), "alice/new", "no permission", "'alice'")
    one_error(*zup("push", p, "--repo", PATCH_REPO, "--token", BOB), PATCH_REPO, "no permission")
    one_error(*zup("inspect", PATCH_REPO, env={"HF_TOKEN": BAD}), PATCH_REPO, "rejected the token")
    one_error(*zup("push", p, "--repo", "not-a-repo-id", "--token", TOKEN), "not-a-repo-id", "NAMESPACE/NAME")
    one_error(*zup("push", p, "--repo", PATCH_REPO, "--token", TOKEN, "--create-pr", "--revision", "nope"),
              PATCH_REPO, "revision 'nope' does not exist")  # fmt: skip
    # the Hub failing
    hub.inject_error(r"/api/repos/create", 400, message="Invalid request")
    one_error(*zup("push", p, "--repo", PATCH_REPO, "--token", TOKEN), PATCH_REPO, "HTTP 400")
    assert hub.errors == [] and hub.unhandled == []


def test_parse_hub_ref() -> None:
    assert parse_hub_ref("alice/p") == parse_hub_ref("alice/p")
    r = parse_hub_ref("alice/p@v1:x.zup.safetensors")
    assert (r.repo_id, r.revision, r.filename) == ("alice/p", "v1", "x.zup.safetensors")
    assert parse_hub_ref("alice/p@refs/pr/1").revision == "refs/pr/1"
    for bad in ("p.zup.safetensors", "dir/p.zup.safetensors", "alice", "../x/y", "alice/p:../x", "alice/p@",
                "./a/b", "a/b/c"):  # fmt: skip
        assert parse_hub_ref(bad) is None, bad
    assert re.match(r"^alice/p$", str(parse_hub_ref("alice/p")))


def test_real_process_env_only(hub: LoopbackHub, world: dict, base_rev: str, tmp_path: Path) -> None:
    """The installed CLI in a fresh process: configured by environment variables alone (HF_TOKEN, HF_HUB_OFFLINE)."""
    import subprocess
    import sys

    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", "from zupatch.cli.main import main; main()", *args],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert TOKEN not in proc.stdout + proc.stderr
        return proc

    proc = run("push", str(patch_file), "--repo", PATCH_REPO, HF_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert "%|" not in proc.stderr  # not a terminal: no progress bars
    assert run("inspect", PATCH_REPO, "--json").returncode == 0  # fills the cache
    served = len(hub.requests)
    proc = run("inspect", PATCH_REPO, "--json", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0 and json.loads(proc.stdout)["base_model"] == BASE, proc.stderr
    proc = run("inspect", "alice/elsewhere", HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "HF_HUB_OFFLINE=1" in proc.stderr
    assert len(hub.requests) == served


def test_a_hub_reference_downloads_only_the_patch_it_reads(hub: LoopbackHub, world: dict, base_rev: str,
                                                           tmp_path: Path) -> None:  # fmt: skip
    """The repo's files are listed first, then the one patch file is fetched: not every *.zup.safetensors in it."""
    patch_file = pushed(hub, world, base_rev, tmp_path)
    # distinct contents: a blob already in the cache would not be fetched again, whatever its name
    other, old, a = (make_patch(world, base_rev, tmp_path / f"{i}.zup.safetensors", seed=i).read_bytes()
                     for i in (1, 2, 3))  # fmt: skip
    junk = patch_file.read_bytes() + b"never read"
    hub.commit(PATCH_REPO, {"other.zup.safetensors": other, "v1/old.zup.safetensors": old,
                            "v2/deep/older.zup.safetensors": junk})  # fmt: skip

    def fetched() -> list[str]:
        return sorted(r.path.split("/resolve/", 1)[1].split("/", 1)[1]
                      for r in hub.requests_matching("GET", rf"^/{PATCH_REPO}/resolve/"))  # fmt: skip

    code, out = zup("apply", PATCH_REPO, "--model", str(world["base"]), "-o", str(tmp_path / "out"))
    assert code == 0, out
    assert fetched() == ["patch.zup.safetensors"]
    cache = Path(os.environ["HF_HOME"]) / "hub" / "models--alice--forget-facts"
    assert [p.name for p in (cache / "snapshots").rglob("*.zup.safetensors")] == ["patch.zup.safetensors"]

    hub.requests.clear()
    assert zup("inspect", f"{PATCH_REPO}:v1/old.zup.safetensors")[0] == 0  # a file in a subfolder, by name
    assert fetched() == ["v1/old.zup.safetensors"]

    # without patch.zup.safetensors and with several top-level patches: which one is for the user to say
    hub.commit(PATCH_REPO, {"a.zup.safetensors": a}, delete=["patch.zup.safetensors"])
    hub.requests.clear()
    line = one_error(*zup("inspect", PATCH_REPO), PATCH_REPO, "several patch files", "a.zup.safetensors",
                     "other.zup.safetensors", f"{PATCH_REPO}:FILE")  # fmt: skip
    assert "old.zup" not in line  # only the top level counts
    assert fetched() == []  # nothing downloaded to say so
    # a single top-level patch (subfolders hold others) is the one
    hub.commit(PATCH_REPO, {}, delete=["a.zup.safetensors"])
    hub.requests.clear()
    assert zup("inspect", PATCH_REPO)[0] == 0
    assert fetched() == ["other.zup.safetensors"]
    # only subfolders: the error names one to pick
    hub.commit(PATCH_REPO, {}, delete=["other.zup.safetensors"])
    one_error(*zup("inspect", PATCH_REPO), PATCH_REPO, "no patch file", f"{PATCH_REPO}:v1/old.zup.safetensors")
    # network down: a named file is read from the cache (main as last seen), one never downloaded fails at once
    with hub.down():
        assert zup("inspect", f"{PATCH_REPO}:other.zup.safetensors")[0] == 0
        started = time.monotonic()
        one_error(*zup("inspect", f"{PATCH_REPO}:v2/deep/older.zup.safetensors"), "cannot reach the Hub",
                  "not in the local Hugging Face cache")  # fmt: skip
        assert time.monotonic() - started < 5


@contextlib.contextmanager
def held(hub: LoopbackHub, method: str, path_regex: str) -> Iterator[threading.Event]:
    """The first request matching ``method path_regex`` waits inside the server until the block ends;
    the yielded event is set once it arrived (the client is then blocked on its answer)."""
    arrived, release, original = threading.Event(), threading.Event(), hub._handle

    def handle(m: str, raw_path: str, headers: Any, body: bytes) -> Any:
        if m == method and re.search(path_regex, raw_path) and not arrived.is_set():
            arrived.set()
            release.wait(30)
        return original(m, raw_path, headers, body)

    hub._handle = handle  # type: ignore[method-assign]
    try:
        yield arrived
    finally:
        release.set()
        del hub._handle


@pytest.mark.parametrize("stage, path, says", [
    ("upload", r"/api/models/alice/tiny-unlearned/preupload/", "no commit was made to alice/tiny-unlearned (main)"),
    ("commit", r"/api/models/alice/tiny-unlearned/commit/", "was sent but not confirmed"),
])  # fmt: skip
def test_interrupted_push_to_says_the_output_was_written(stage: str, path: str, says: str, hub: LoopbackHub,
                                                         world: dict, base_rev: str, tmp_path: Path) -> None:  # fmt: skip
    """Ctrl-C while `apply --push-to` uploads: the output folder stays and the message says so, and what the Hub got."""
    import signal
    import subprocess
    import sys

    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors")
    out_dir = tmp_path / "out"
    # the held request is answered after the client is gone: the server's broken pipe is expected, not news
    hub._server.handle_error = lambda request, client_address: None  # type: ignore[union-attr,method-assign]
    args = ["apply", str(patch_file), "--model", str(world["base"]), "-o", str(out_dir), "--push-to",
            "alice/tiny-unlearned"]  # fmt: skip
    with held(hub, "POST", path) as arrived:
        proc = subprocess.Popen([sys.executable, "-m", "zupatch", *args], env={**os.environ, "HF_TOKEN": TOKEN},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert arrived.wait(60), proc.communicate(timeout=60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("applied ") and "Traceback" not in err, err
    assert lines[1].startswith("interrupted: ") and "nothing was written" not in err, err
    assert f"the patched checkpoint was written to {out_dir}, but the push to alice/tiny-unlearned did not complete" \
        in lines[1] and says in lines[1], err  # fmt: skip
    assert folder_digest(out_dir) != folder_digest(world["base"])  # the output is there, patched
    if stage == "upload":
        assert [c.author for c in hub.commits("alice/tiny-unlearned")] == ["system"]  # no commit of ours

# --------------------------------------------------------------------------- the eval report on the card


def test_push_with_eval_report_shows_the_attacks_on_the_card(hub: LoopbackHub, world: dict, base_rev: str,
                                                            tmp_path: Path) -> None:  # fmt: skip
    """A real ``eval --json`` report of the pushed patch (tiny model, with its chat template):
    the card gets its figures without and after each attack, never its prompts or continuations."""
    patch_file = make_patch(world, base_rev, tmp_path / "forget.zup.safetensors")
    data = tmp_path / "forget.jsonl"
    data.write_text(json.dumps({"prompt": SECRET_PROMPT, "target": "Lutz", "paraphrases": ["Zubrowka's capital:"]}) + "\n")
    text = tmp_path / "text.txt"
    text.write_text("An ordinary line of text for perplexity.\n")
    code, out = zup("eval", "-m", str(world["base"]), "-d", str(data), "-p", str(patch_file), "--text", str(text),
                    "--probes", "0", "-a", "quant:Q8_0", "-a", "topk", "-a", "chat", "-a", "relearn:2", "--json")  # fmt: skip
    assert code == 0, out
    report_file = tmp_path / "report.json"
    report_file.write_text(out)
    report = json.loads(out)
    assert SECRET_PROMPT in out  # the report holds the forget text (its generations)...

    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--eval-report", str(report_file))
    assert code == 0, out
    card = hub.files(PATCH_REPO)["README.md"].decode()
    for secret in (SECRET_PROMPT, "Zubrowka", "Lutz", str(world["base"])):  # ...the card never does
        assert secret not in card
    section = card[card.index("## Robustness") : card.index("## How to apply")]
    base, patched = report["models"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"none", "quant:Q8_0", "topk:5", "chat", "relearn:2"}
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    for name, b, p in [("none", base, patched), *((a["name"], base["attacks"][i], patched["attacks"][i])
                                                   for i, a in enumerate(report["attacks"]))]:  # fmt: skip
        assert f"| {pct(b['efficacy']['answered'])} → {pct(p['efficacy']['answered'])} |" in rows[name], rows[name]
        assert f"| {pct(b['generalization']['answered'])} → {pct(p['generalization']['answered'])} |" in rows[name]
    assert f"{base['attacks'][0]['fluency']['perplexity']:.2f} → {patched['attacks'][0]['fluency']['perplexity']:.2f}" in rows["quant:Q8_0"]
    assert "2 Adam steps, learning rate 2e-05, on built-in text" in section
    # the same patch and report again: the same card, no commit
    commits = len(hub.commits(PATCH_REPO))
    code, out = zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--eval-report", str(report_file))
    assert code == 0 and "unchanged" in out and len(hub.commits(PATCH_REPO)) == commits, out

    other = make_patch(world, base_rev, tmp_path / "other.zup.safetensors", seed=3)
    code, out = zup("push", str(other), "--repo", PATCH_REPO, "--token", TOKEN, "--eval-report", str(report_file))
    one_error(code, out, "report.json", "no figures for this patch")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**report, "version": 2}))
    one_error(*zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--eval-report", str(old)),
              "old.json", "report version 2")  # fmt: skip
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not json")
    one_error(*zup("push", str(patch_file), "--repo", PATCH_REPO, "--token", TOKEN, "--eval-report", str(text_file)),
              "notes.txt", "not JSON")  # fmt: skip
    assert len(hub.commits(PATCH_REPO)) == commits
