"""Key statistics on 2 gloo processes equal those of one process (docs/create.md states the tolerance).

Two forked processes join a gloo group on a free localhost port, as torchrun
would set it up. Each computes the statistics of a tiny model, with a text
corpus and with the self-sampled corpus (several sample batches, so each
rank samples its own), through the library and through ``zupatch stats
compute`` (which writes the cache on rank 0). The parent compares them with a
single-process run: the same cache file name (the same key) and the same
matrices up to the order of float64 additions.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.tiny_models import make_tiny_checkpoint
from zupatch.engine.api import load_model
from zupatch.engine.architectures import resolve_architecture
from zupatch.engine.distributed import Ranks, current_ranks
from zupatch.engine.stats import SampledCorpus, StatsCache, StatsConfig, TextCorpus, compute_key_statistics

#: The tolerance docs/create.md states: |C_ranks - C_single| <= RTOL * max |C_single|.
RTOL = 1e-9
LAYERS = [1, 2]
TEXTS = tuple(f"Document {i}: " + "the keys of a layer are summed over tokens. " * (1 + i % 4) for i in range(24))
CONFIG = StatsConfig(token_budget=2000, max_length=40, batch_size=3, sampled_token_budget=240, sample_length=24,
                     sample_batch_size=3)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _statistics(checkpoint: Path, ranks: Ranks) -> dict[str, torch.Tensor]:
    model, tokenizer = load_model(checkpoint, "float32", "cpu")
    spec = resolve_architecture(model)
    out: dict[str, torch.Tensor] = {}
    for name, corpus in (("text", TextCorpus(TEXTS)), ("sampled", SampledCorpus())):
        stats = compute_key_statistics(model, tokenizer, spec, LAYERS, corpus, CONFIG, ranks=ranks)
        for layer, s in stats.items():
            out[f"{name}.{layer}"] = s.second_moment
            out[f"{name}.{layer}.tokens"] = torch.tensor(s.token_count)
    return out


def _cli(checkpoint: Path, corpus: Path) -> tuple[int, str]:
    from zupatch.cli.main import app

    args = ["stats", "compute", "-m", str(checkpoint), "--layers", "1,2", "--corpus", str(corpus),
            "--tokens", "2000", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _worker(rank: int, port: int, checkpoint: Path, corpus: Path, out: Path) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # two ranks on one machine share its cores
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "ZUPATCH_CACHE": str(out / "cache-ranks")})  # fmt: skip
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=2)
        ranks = current_ranks()
        assert ranks == Ranks(rank, 2, "gloo")
        statistics = _statistics(checkpoint, ranks)
        code, output = _cli(checkpoint, corpus)
        assert code == 0, output
        if rank == 0:
            torch.save(statistics, out / "ranks.pt")
            assert "2 processes, gloo" in output, output
        else:
            assert output.strip() == "", output  # only rank 0 prints
        dist.destroy_process_group()
    except BaseException:  # the parent sees the exit code; the traceback goes to stderr
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def test_two_gloo_processes_equal_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = make_tiny_checkpoint("llama", tmp_path / "model", dtype=torch.float32)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    # spawn, not fork: a fork after torch started its intra-op thread pool can deadlock the child
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(r, port, checkpoint, corpus, tmp_path)) for r in range(2)]
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.join(timeout=300)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    assert [w.exitcode for w in workers] == [0, 0]

    single = _statistics(checkpoint, Ranks())
    ranks = torch.load(tmp_path / "ranks.pt")
    assert set(ranks) == set(single)
    for name, expected in single.items():
        if name.endswith(".tokens"):
            assert int(ranks[name]) == int(expected), name
        else:
            difference = (ranks[name] - expected).abs().max() / expected.abs().max()
            assert difference <= RTOL, (name, float(difference))

    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache-single"))
    code, output = _cli(checkpoint, corpus)
    assert code == 0, output
    single_files = {e.path.name: e for e in StatsCache(tmp_path / "cache-single" / "stats").entries()}
    ranks_files = {e.path.name: e for e in StatsCache(tmp_path / "cache-ranks" / "stats").entries()}
    assert len(single_files) == 2 and set(ranks_files) == set(single_files)  # the same cache keys
    for name, entry in single_files.items():
        description = {k: v for k, v in entry.description.items() if k != "token_count"}
        one, two = StatsCache(entry.path.parent).load(description), StatsCache(ranks_files[name].path.parent).load(description)
        assert one is not None and two is not None and one.token_count == two.token_count
        difference = (two.second_moment - one.second_moment).abs().max() / one.second_moment.abs().max()
        assert difference <= RTOL, float(difference)
