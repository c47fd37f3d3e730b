"""Key statistics on the Hub: stats push / stats pull round-trips and create --stats, through the real CLI.

A `LoopbackHub` (tests/hub_server.py) serves the Hub HTTP API on 127.0.0.1 and
the real ``huggingface_hub`` client talks to it, as in tests/test_hub.py.
Pushed statistics of a tiny model are pulled back into a fresh cache (equal
bits), used by ``create --stats``, and refused in one line for another
model, another revision of the same repo, and another layer set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tests.hub_server import LoopbackHub
from tests.tiny_models import make_tiny_checkpoint
from zupatch.cli.main import app
from zupatch.engine.stats import StatsCache

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

runner = CliRunner()
TOKEN = "hf_zupatchAliceSECRET0123456789"
BASE, OTHER, STATS = "alice/tiny-base", "alice/tiny-other", "alice/tiny-base-stats"
CORPUS_SECRET = "Zubrowka's archive holds the words no card may show"
FAST = ["--set", "neutral.max_steps=3", "--set", "original.max_steps=3", "--set", "contexts.prefix_tokens=3",
        "--set", "neighbours.subjects=0", "--set", "refine.max_passes=1"]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zup(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert TOKEN not in result.output and "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def one_error(code: int, out: str, *needles: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LoopbackHub:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))
    with LoopbackHub(tokens={TOKEN: "alice"}) as server, server.client_environment(tmp_path / "hf_home"):
        yield server


def test_stats_push_pull_and_create_with_shared_stats(hub: LoopbackHub, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    other = make_tiny_checkpoint("llama", tmp_path / "other", seed=1)
    hub.create_repo(BASE)
    base_rev = hub.commit(BASE, _files(base), message="base weights")
    hub.create_repo(OTHER)
    hub.commit(OTHER, _files(other), message="other weights")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((CORPUS_SECRET + ". ") * 20)

    # push: a dataset repo with one file per layer, a manifest and a card; numbers only
    push = ["stats", "push", STATS, "-m", BASE, "--layers", "1,2", "--corpus", str(corpus), "--tokens", "300",
            "--description", "twenty lines of a test corpus", "--device", "cpu", "--token", TOKEN]  # fmt: skip
    code, out = zup(*push)
    assert code == 0 and "pushed" in out, out
    files = hub.files(STATS, repo_type="dataset")
    assert set(files) >= {"README.md", "zupatch_stats.json", "layer-001.safetensors", "layer-002.safetensors"}
    manifest = json.loads(files["zupatch_stats.json"])
    assert (manifest["model"], manifest["revision"], manifest["tokens"]) == (BASE, base_rev, 300)
    assert [e["layer"] for e in manifest["layers"]] == [1, 2] and manifest["hidden_size"] == 64
    card = files["README.md"].decode()
    assert BASE in card and base_rev in card and "300" in card and "twenty lines" in card and "1, 2" in card
    for name, data in files.items():
        assert b"Zubrowka" not in data, name  # never the corpus text
    commits = len(hub.commits(STATS, repo_type="dataset"))

    # pushing the same statistics again changes nothing
    code, out = zup(*push)
    assert code == 0 and "unchanged" in out, out
    assert len(hub.commits(STATS, repo_type="dataset")) == commits
    # and so does computing them afresh with layer 2 offloaded by a device map: the same fingerprints and bits
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "mapped"))
    code, out = zup(*push, "--dtype", "float32", "--device-map", "sequential", "--max-memory", "cpu=600KB")
    assert code == 0 and "unchanged" in out, out
    assert len(hub.commits(STATS, repo_type="dataset")) == commits
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))

    # pull into a fresh cache: the same matrices, bit for bit; then offline from the HF cache
    pushed_cache = StatsCache(tmp_path / "cache" / "stats")
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "pulled"))
    code, out = zup("stats", "pull", STATS)
    assert code == 0 and "pulled" in out and "layers 1, 2" in out, out
    pulled = {e.path.name: e.path for e in StatsCache(tmp_path / "pulled" / "stats").entries()}
    assert set(pulled) == {e.path.name for e in pushed_cache.entries()}  # the same cache keys
    for entry in pushed_cache.entries():
        with safe_open(str(entry.path), "pt") as a, safe_open(str(pulled[entry.path.name]), "pt") as b:
            assert torch.equal(a.get_tensor("second_moment"), b.get_tensor("second_moment"))
    with hub.offline():
        code, out = zup("stats", "pull", STATS)
        assert code == 0 and "pulled" in out, out
        one_error(*zup("stats", "pull", "alice/never-pushed"), "alice/never-pushed", "HF_HUB_OFFLINE")

    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}\n')

    def create(model: str, layers: str, out_name: str, *extra: str) -> tuple[int, str]:
        out = tmp_path / out_name
        return zup("create", "-m", model, "--forget", str(forget), "-o", str(out), "--layers", layers,
                   "--stats", STATS, "-q", "--device", "cpu", *FAST, *extra)  # fmt: skip

    # create uses them: no statistics are computed, so the cache stays empty
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "create-cache"))
    code, out = create(BASE, "1,2", "ok.zup.safetensors")
    assert code == 0, out
    assert (tmp_path / "ok.zup.safetensors").is_file() and not (tmp_path / "create-cache" / "stats").exists()
    code, out = create(str(base), "1", "local.zup.safetensors")  # the same weights in a folder, a subset of layers
    assert code == 0, out

    # refused in one line: another model, another layer set, another revision of the same repo
    one_error(*create(OTHER, "1,2", "x.zup.safetensors"), f"computed from {BASE}@{base_rev[:12]}, not {OTHER}@")
    one_error(*create(BASE, "1,3", "x.zup.safetensors"), "cover layer(s) 1,2", "needs 1,3")
    new_rev = hub.commit(BASE, {"model.safetensors": (other / "model.safetensors").read_bytes()}, message="retrain")
    one_error(*create(BASE, "1,2", "x.zup.safetensors"), f"{BASE}@{base_rev[:12]}, not {BASE}@{new_rev[:12]}")
    code, out = create(BASE, "1,2", "pinned.zup.safetensors", "--revision", base_rev)
    assert code == 0, out
    one_error(*create(BASE, "1,2", "x.zup.safetensors", "--tokens", "10"), "--stats", "--tokens")
    assert not (tmp_path / "x.zup.safetensors").exists()
