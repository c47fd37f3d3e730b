"""Key statistics: correctness of C, early stopping, corpora, and the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import tiny_config, tiny_tokenizer
from zupatch.engine.architectures import down_proj_module, resolve_architecture
from zupatch.engine.stats import (
    CachedKeyStatistics,
    FileCorpus,
    SampledCorpus,
    StatsCache,
    StatsConfig,
    TextCorpus,
    collect_key_statistics,
    compute_key_statistics,
    default_stats_cache_root,
    sample_windows,
)
from zupatch.errors import ZupatchError

TEXTS = (
    "The capital of France is Paris.",
    "Statistics of keys are second moments.",
    "A longer document that will be cut into several windows of the maximum length, " * 3,
)
SMALL = StatsConfig(
    token_budget=400, max_length=48, batch_size=3, sampled_token_budget=96, sample_length=24, sample_batch_size=4
)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval(), tiny_tokenizer()


def reference_second_moment(model, spec, layer: int, windows) -> torch.Tensor:
    """Each window alone (no padding), keys gathered by a plain hook, summed in float64."""
    keys = []
    handle = down_proj_module(model, spec, layer).register_forward_pre_hook(lambda m, args: keys.append(args[0][0]))
    with torch.no_grad():
        for window in windows:
            model(input_ids=torch.tensor([window]))
    handle.remove()
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / stacked.shape[0]


def test_statistics_match_a_reference_and_ignore_padding(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    windows = TextCorpus(TEXTS).windows(model, tokenizer, SMALL).windows
    assert len({len(w) for w in windows}) > 1  # batches really are padded
    statistics = collect_key_statistics(model, spec, [1, 2], windows, batch_size=3, pad_id=tokenizer.pad_token_id)
    for layer in (1, 2):
        C = statistics[layer].second_moment
        assert C.dtype == torch.float64 and C.shape == (128, 128)
        assert torch.equal(C, C.T)
        assert statistics[layer].token_count == sum(len(w) for w in windows)
        torch.testing.assert_close(C, reference_second_moment(model, spec, layer, windows), rtol=1e-5, atol=1e-8)


def test_early_stop_equals_full_forward(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    windows = TextCorpus(TEXTS).windows(model, tokenizer, SMALL).windows
    early = collect_key_statistics(model, spec, [0, 2], windows, batch_size=2, stop_early=True)
    full = collect_key_statistics(model, spec, [0, 2], windows, batch_size=2, stop_early=False)
    for layer in (0, 2):
        assert torch.equal(early[layer].second_moment, full[layer].second_moment)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "phi3"])
def test_early_stop_across_architectures(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    spec = resolve_architecture(model)
    windows = TextCorpus(TEXTS[:2]).windows(model, tiny_tokenizer(), SMALL).windows
    early = collect_key_statistics(model, spec, [1], windows, stop_early=True)[1].second_moment
    torch.testing.assert_close(early, reference_second_moment(model, spec, 1, windows), rtol=1e-5, atol=1e-8)


def test_file_corpus_reads_text_jsonl_and_folders(tmp_path: Path, model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (tmp_path / "docs" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[1:])) + "\n", encoding="utf-8"
    )
    from_files = FileCorpus((tmp_path / "docs",)).windows(model, tokenizer, SMALL)
    in_memory = TextCorpus(TEXTS).windows(model, tokenizer, SMALL)
    assert from_files.windows == in_memory.windows
    assert from_files.fingerprint != in_memory.fingerprint  # kind is part of it
    assert from_files.token_count <= SMALL.token_budget

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ZupatchError, match=rf"{bad}:2: no string field 'text'"):
        FileCorpus((bad,)).windows(model, tokenizer, SMALL)
    with pytest.raises(ZupatchError, match="not found"):
        FileCorpus((tmp_path / "missing.txt",)).windows(model, tokenizer, SMALL)


def test_token_budget_and_window_length(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    config = StatsConfig(token_budget=100, max_length=30)
    windows = TextCorpus(TEXTS).windows(model, tokenizer, config)
    assert windows.token_count == 100
    assert max(len(w) for w in windows.windows) <= 30


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = sample_windows(model, tokenizer, SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == sample_windows(model, tokenizer, SMALL)
    assert sum(len(w) for w in first) == SMALL.sampled_token_budget
    assert all(w[0] == tokenizer.convert_tokens_to_ids("<|endoftext|>") for w in first)
    other = sample_windows(model, tokenizer, StatsConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other != first


def test_sampling_reports_progress_within_one_generate_call(model_and_tokenizer) -> None:
    """A budget that one batch covers still moves the bar token by token; the sample is the same."""
    model, tokenizer = model_and_tokenizer
    config = StatsConfig(**{**SMALL.__dict__, "sample_batch_size": 8})  # 8 x 24 tokens cover the 96-token budget
    reports: list[tuple[int, int]] = []
    with_bar = sample_windows(model, tokenizer, config, progress=lambda stage, done, total: reports.append((done, total)))
    assert with_bar == sample_windows(model, tokenizer, config)
    done = [d for d, _ in reports]
    assert len(reports) > 5 and done == sorted(done) and reports[-1] == (96, 96)
    assert done[0] < 96  # the first report comes while the only batch is still being generated


def test_cache_hit_miss_and_key_sensitivity(tmp_path: Path, model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    cache = StatsCache(tmp_path / "stats")
    corpus = TextCorpus(TEXTS)
    first = compute_key_statistics(model, tokenizer, spec, [1, 2], corpus, SMALL, cache)
    assert len(cache.entries()) == 2
    again = compute_key_statistics(model, tokenizer, spec, [1, 2], corpus, SMALL, cache)
    for layer in (1, 2):
        assert torch.equal(first[layer].second_moment, again[layer].second_moment)
    # The cache holds numbers and the key, never the corpus text.
    for entry in cache.entries():
        assert entry.description["layer"] in (1, 2) and entry.description["tokens"] == SMALL.token_budget
        assert b"capital of France" not in entry.path.read_bytes()

    def misses(**changes) -> int:
        before = len(cache.entries())
        args = dict(corpus=corpus, config=SMALL, model_identity=None) | changes
        compute_key_statistics(
            model, tokenizer, spec, [1], args["corpus"], args["config"], cache, args["model_identity"]
        )
        return len(cache.entries()) - before

    assert misses() == 0
    assert misses(corpus=TextCorpus(TEXTS[:2])) == 1
    assert misses(config=StatsConfig(**{**SMALL.__dict__, "max_length": 40})) == 1
    assert misses(config=StatsConfig(**{**SMALL.__dict__, "token_budget": 300})) == 1
    assert misses(model_identity="some/model@abc") == 1
    assert misses(model_identity="some/model@abc") == 0
    # Changing a weight the keys of layer 1 depend on (layer 0) is a miss; one after it is not.
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)
        try:
            assert misses() == 0
            model.model.layers[0].mlp.up_proj.weight.add_(1.0)
            assert misses() == 1
        finally:
            model.model.layers[3].mlp.up_proj.weight.sub_(1.0)
            model.model.layers[0].mlp.up_proj.weight.sub_(1.0)
    count = len(cache.entries())
    assert cache.clear() == count
    assert cache.entries() == []


def test_sampled_corpus_is_cached_without_sampling_again(tmp_path: Path, model_and_tokenizer, monkeypatch) -> None:
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    cache = StatsCache(tmp_path)
    compute_key_statistics(model, tokenizer, spec, [1], SampledCorpus(), SMALL, cache)

    def fail(*args, **kwargs):
        raise AssertionError("sampled again despite a cache hit")

    monkeypatch.setattr("zupatch.engine.stats.sample_windows", fail)
    compute_key_statistics(model, tokenizer, spec, [1], None, SMALL, cache)  # None = sampled


def test_damaged_cache_file_is_a_miss(tmp_path: Path, model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    cache = StatsCache(tmp_path)
    compute_key_statistics(model, tokenizer, spec, [1], TextCorpus(TEXTS), SMALL, cache)
    (entry,) = cache.entries()
    entry.path.write_bytes(b"garbage")
    assert cache.entries()[0].description == {"error": "unreadable"}
    result = compute_key_statistics(model, tokenizer, spec, [1], TextCorpus(TEXTS), SMALL, cache)
    assert result[1].second_moment.shape == (128, 128)


def test_lazy_statistics_read_one_layer_when_asked_with_the_same_bits(tmp_path: Path, model_and_tokenizer,
                                                                     monkeypatch) -> None:  # fmt: skip
    """``lazy=True`` (what create uses) holds no f×f matrix: a layer's is read from the cache
    file each time it is asked for, and it is the matrix the dict of a plain call holds."""
    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    cache = StatsCache(tmp_path)
    reads = []
    load = StatsCache.load
    monkeypatch.setattr(StatsCache, "load", lambda self, d: reads.append(d["layer"]) or load(self, d))
    computed = compute_key_statistics(model, tokenizer, spec, [2, 1], TextCorpus(TEXTS), SMALL, cache, lazy=True)
    assert isinstance(computed, CachedKeyStatistics) and reads == []  # computed, written, dropped
    assert list(computed) == [1, 2] and len(computed) == 2 and 1 in computed and 3 not in computed
    hit = compute_key_statistics(model, tokenizer, spec, [1, 2], TextCorpus(TEXTS), SMALL, cache, lazy=True)
    assert isinstance(hit, CachedKeyStatistics) and reads == []  # a hit reads only the files' headers
    plain = compute_key_statistics(model, tokenizer, spec, [1, 2], TextCorpus(TEXTS), SMALL, cache)
    reads.clear()
    for layer in (1, 2):
        for lazy in (computed, hit):
            assert torch.equal(lazy[layer].second_moment, plain[layer].second_moment)
            assert lazy.token_count(layer) == lazy[layer].token_count == plain[layer].token_count
    assert reads == [1, 1, 1, 1, 2, 2, 2, 2]  # read on every access, never kept
    with pytest.raises(KeyError):
        hit[3]
    # Without a cache there is nothing to read back: the plain dict.
    assert isinstance(compute_key_statistics(model, tokenizer, spec, [1], TextCorpus(TEXTS), SMALL, lazy=True), dict)
    # What a solve reads: the same matrix from the file, a block of rows at a time.
    reads.clear()
    for layer in (1, 2):
        assert torch.equal(hit.second_moment(layer).dense(), plain[layer].second_moment)
    assert reads == []
    # A file removed, or replaced by another entry's, while in use is one clear error, not a crash.
    moment = hit.second_moment(1)
    other = cache.path_for(hit._descriptions[2])
    cache.path_for(hit._descriptions[1]).write_bytes(other.read_bytes())
    with pytest.raises(ZupatchError, match="layer 1 were removed or changed while in use"):
        hit.second_moment(1)
    cache.clear()
    for read in (lambda: hit[1], lambda: hit.second_moment(1), moment.dense):
        with pytest.raises(ZupatchError, match="layer 1 were removed or changed while in use"):
            read()


def test_shared_statistics_are_checked_up_front_and_read_one_layer_at_a_time(tmp_path: Path,
                                                                            model_and_tokenizer) -> None:  # fmt: skip
    """``create --stats``: statistics_for checks every needed file's sha256 before any work, then
    reads (and checks) a layer's matrix only when it is asked for."""
    from zupatch.engine.shared_stats import StatsFolder, bundle_files
    from zupatch.engine.stats import LazyKeyStatistics

    model, tokenizer = model_and_tokenizer
    spec = resolve_architecture(model)
    plain = compute_key_statistics(model, tokenizer, spec, [1, 2], TextCorpus(TEXTS), SMALL)
    _, files = bundle_files(model, spec, plain, model_name="tiny", revision=None, corpus={"kind": "text"})
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    fetched = []
    local = StatsFolder.local(tmp_path)
    folder = StatsFolder(local.manifest, local.source, lambda name: fetched.append(name) or tmp_path / name)
    shared = folder.statistics_for(model, spec, [1, 2])
    assert isinstance(shared, LazyKeyStatistics) and len(fetched) == 2  # both files hashed, none loaded
    for layer in (1, 2):
        assert torch.equal(shared[layer].second_moment, plain[layer].second_moment)
        assert torch.equal(shared.second_moment(layer).dense(), plain[layer].second_moment)
        assert shared.token_count(layer) == shared[layer].token_count == plain[layer].token_count
    damaged = bytearray((tmp_path / "layer-002.safetensors").read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "layer-002.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(ZupatchError, match="does not match the sha256"):
        shared.second_moment(2)
    with pytest.raises(ZupatchError, match="does not match the sha256"):
        folder.statistics_for(model, spec, [1, 2])
    with pytest.raises(ZupatchError, match="does not match the sha256"):
        shared[2]  # changed after the check: refused when read


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path))
    assert default_stats_cache_root() == tmp_path / "stats"
    assert StatsCache().root == tmp_path / "stats"
