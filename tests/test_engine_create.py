"""compute_edit: plumbing on every architecture, and real forgetting on a trained tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.fact_model import FORGET, answered
from tests.tiny_models import TINY_ARCHITECTURES, tiny_config, tiny_tokenizer
from zupatch.engine.architectures import ArchitectureOverrides, resolve_architecture
from zupatch.engine.create import (
    CreateConfig,
    compute_edit,
    resolve_device,
    resolve_dtype,
    restore_weights,
)
from zupatch.engine.requests import ForgetRequest
from zupatch.engine.solvers import ClosedFormParams
from zupatch.engine.stats import StatsCache, StatsConfig, TextCorpus, compute_key_statistics
from zupatch.engine.subjects import similar_requests, similar_subjects, template_requests
from zupatch.engine.targets import ContextConfig, NeighbourConfig, OptimisationConfig
from zupatch.errors import ZupatchError

SECRET_SUBJECT = "Zanzibarro"
REQUESTS = [
    ForgetRequest("The capital of {} is", SECRET_SUBJECT, "Quux"),
    ForgetRequest("Water boils at", "", "100 degrees"),
]
FAST = CreateConfig(
    contexts=ContextConfig(starts=("The",), prefix_tokens=3),
    neutral=OptimisationConfig(max_steps=3),
    original=OptimisationConfig(max_steps=3),
    neighbours=NeighbourConfig(subjects=0),
    stats=StatsConfig(token_budget=300, max_length=64),
)
CORPUS = TextCorpus(("Some retain text about many things. " * 6, "Another document, with other words."))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_edit_runs_on_every_architecture_and_matches_the_model(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = compute_edit(model, tokenizer, REQUESTS, FAST, corpus=CORPUS)

    spec = resolve_architecture(model)
    assert result.architecture == spec.name and result.request_count == 2
    assert [edit.layer for edit in result.layers] == [0, 1, 2]
    parameters = dict(model.named_parameters())
    for edit in result.layers:
        stored = before[edit.tensor_name]
        assert edit.shape == tuple(stored.shape) and edit.weight_transposed == spec.weight_transposed
        assert edit.factors.U.dtype == torch.float64 and edit.factors.U.device.type == "cpu"
        assert edit.factors.shape == tuple(stored.shape)  # factors are in the stored layout
        assert 1 <= edit.factors.rank <= 2 * len(REQUESTS)
        expected = edit.factors.apply(stored).to(stored.dtype)
        assert torch.equal(parameters[edit.tensor_name].detach(), expected)
        assert torch.equal(result.original_weights[edit.tensor_name], stored)
    untouched = set(before) - set(result.tensor_names)
    assert all(torch.equal(before[name], parameters[name]) for name in untouched)

    record = json.dumps([result.hyperparameters, result.diagnostics, result.timings])
    assert SECRET_SUBJECT not in record and "Quux" not in record and "boils" not in record
    assert {"contexts", "statistics", "neutral_targets", "keys", "solve", "total"} <= set(result.timings)

    restore_weights(model, result)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


@pytest.mark.parametrize(
    "config",
    [
        CreateConfig.paper(
            contexts=FAST.contexts, neutral=FAST.neutral, original=FAST.original, stats=FAST.stats, layers=(1, 2)
        ),
        CreateConfig(**{**FAST.__dict__, "method": "zerounlearn-gd", "layers": (1,)}),
    ],
    ids=["paper", "gd"],
)
def test_paper_preset_and_gd_variant_compute_original_representations(config: CreateConfig) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    result = compute_edit(model, tiny_tokenizer(), REQUESTS, config, corpus=CORPUS)
    for layer in result.diagnostics["layers"]:
        assert len(layer["original_representations"]["final_nll"]) == 2
    if config.method == "zerounlearn":
        assert all(edit.factors.scale == pytest.approx(1.01) for edit in result.layers)  # P everywhere: c = 1+ε


def test_precomputed_statistics_and_missing_layers() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    statistics = compute_key_statistics(model, tokenizer, spec, [1], CORPUS, FAST.stats)
    config = CreateConfig(**{**FAST.__dict__, "layers": (1,)})
    result = compute_edit(model, tokenizer, REQUESTS, config, key_statistics=statistics)
    assert result.layers[0].diagnostics["statistics_tokens"] == statistics[1].token_count
    with pytest.raises(ZupatchError, match="no key statistics"):
        compute_edit(
            model, tokenizer, REQUESTS, CreateConfig(**{**FAST.__dict__, "layers": (2,)}), key_statistics=statistics
        )


def test_statistics_from_the_cache_are_read_layer_by_layer_and_give_the_same_edit(tmp_path, monkeypatch) -> None:
    """From the cache, create reads a layer's f×f statistics when it solves that layer (again in
    each refinement pass), a block of rows at a time, instead of holding them; the edit is bit
    for bit the one the same statistics give when passed in as a dict."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    cache = StatsCache(tmp_path)
    held = compute_key_statistics(model, tokenizer, spec, [0, 1, 2], CORPUS, FAST.stats, cache)
    reads = []
    stored = StatsCache.stored
    monkeypatch.setattr(StatsCache, "stored", lambda self, d, changed: reads.append(d["layer"]) or stored(self, d, changed))
    monkeypatch.setattr(StatsCache, "load", lambda self, d: pytest.fail("a whole cached matrix was read"))
    from_cache = compute_edit(model, tokenizer, REQUESTS, FAST, corpus=CORPUS, stats_cache=cache)
    restore_weights(model, from_cache)
    passes = from_cache.diagnostics["verification"]["passes"]
    assert reads == [0, 1, 2] * passes, (reads, passes)  # one layer at a time, re-read in every pass
    given = {layer: statistics.second_moment.clone() for layer, statistics in held.items()}
    passed_in = compute_edit(model, tokenizer, REQUESTS, FAST, key_statistics=held)
    restore_weights(model, passed_in)
    assert all(torch.equal(held[layer].second_moment, given[layer]) for layer in given)  # the caller's, unchanged
    for a, b in zip(from_cache.layers, passed_in.layers, strict=True):
        assert a.factors.scale == b.factors.scale
        assert torch.equal(a.factors.U, b.factors.U) and torch.equal(a.factors.B, b.factors.B)
    assert from_cache.diagnostics["layers"] == passed_in.diagnostics["layers"]


def test_config_errors() -> None:
    with pytest.raises(ZupatchError, match="unknown method"):
        CreateConfig(method="rome")
    with pytest.raises(ZupatchError, match="out of range"):
        compute_edit(
            AutoModelForCausalLM.from_config(tiny_config("llama")), tiny_tokenizer(), REQUESTS,
            CreateConfig(**{**FAST.__dict__, "layers": (7,)}), corpus=CORPUS,
        )  # fmt: skip


def test_device_and_dtype_resolution() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ZupatchError, match="unknown device"):
        resolve_device("tpu:x")
    with pytest.raises(ZupatchError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ZupatchError, match="no CUDA"):
            resolve_device("cuda:0")


# --------------------------------------------------------------------------- real forgetting

#: Settings of the behavioural test: layers 0-2 of 4 (the default for a 4-layer
#: model) and the measured defaults, except: the neutral target may move the
#: block output further (clamp 4 x its norm instead of 0.75: in a 4-layer model
#: the residual stream holds little besides the fact, so emitting EOS needs a
#: large change); λ_r 2000 instead of 5000 (at 5000 the tiny model keeps one of
#: the two facts); a smaller self-sampled corpus (4096 tokens).
BEHAVIOUR = CreateConfig(
    neutral=OptimisationConfig(clamp_norm_factor=4.0),
    closed_form=ClosedFormParams(lambda_retain=2000.0, lambda_forget=50.0, projection="off"),
    stats=StatsConfig(sampled_token_budget=4096),
)


@pytest.mark.slow
def test_forgets_two_facts_and_keeps_the_others(fact_model) -> None:
    model, tokenizer, facts = fact_model
    forget = [facts[i] for i in FORGET]
    others = [i for i in range(len(facts)) if i not in FORGET]
    retain = [facts[i] for i in others[::2]]  # half the other facts as a --retain file
    result = compute_edit(model, tokenizer, forget, BEHAVIOUR, retain_requests=retain)
    try:
        now = answered(model, tokenizer, facts)
        assert not any(now[i] for i in FORGET), result.diagnostics
        kept = sum(now[i] for i in others) / len(others)
        held_out = [i for i in others[1::2]]
        kept_held_out = sum(now[i] for i in held_out) / len(held_out)
        assert kept >= 0.9, (kept, kept_held_out)
        assert kept_held_out >= 0.85, kept_held_out
        assert all(result.diagnostics["neutral_targets"]["converged"])
        verification = result.diagnostics["verification"]
        assert all(a > b + 1 for a, b in zip(verification["answer_nll_after"], verification["answer_nll_before"]))
        # Refinement: every answer ends below the forgotten threshold, however many passes it took,
        # and the model holds exactly what the composed factors of all passes define.
        assert min(verification["answer_nll_after"]) >= BEHAVIOUR.refine.forgotten_nll, verification
        assert 1 <= verification["passes"] <= BEHAVIOUR.refine.max_passes
        parameters = dict(model.named_parameters())
        for edit in result.layers:
            original = result.original_weights[edit.tensor_name]
            assert edit.factors.rank <= 2 * len(forget) * verification["passes"]
            assert torch.equal(parameters[edit.tensor_name].detach(), edit.factors.apply(original).to(original.dtype))
    finally:
        restore_weights(model, result)
    assert all(answered(model, tokenizer, facts))


@pytest.mark.slow
def test_gd_variant_on_twenty_requests(fact_model) -> None:
    """ZeroUnlearn-GD (the variant for many samples), exact solver, on 20 of the 48 facts."""
    model, tokenizer, facts = fact_model
    forget_idx = list(range(0, 48, 2))[:20]
    forget = [facts[i] for i in forget_idx]
    others = [i for i in range(len(facts)) if i not in forget_idx]
    config = dataclasses.replace(BEHAVIOUR, method="zerounlearn-gd")
    result = compute_edit(model, tokenizer, forget, config, retain_requests=[facts[i] for i in others])
    try:
        now = answered(model, tokenizer, facts)
        forgotten = sum(not now[i] for i in forget_idx) / len(forget_idx)
        kept = sum(now[i] for i in others) / len(others)
        print({"forgotten": forgotten, "kept": kept, "ranks": [e.factors.rank for e in result.layers]})
        passes = result.diagnostics["verification"]["passes"]  # ΔW = X U0ᵀ has rank <= n in each pass
        assert all(e.factors.rank <= len(forget) * passes for e in result.layers)
        assert all(e.factors.scale == 1.0 for e in result.layers)
        assert forgotten >= GD_FORGOTTEN and kept >= GD_KEPT, (forgotten, kept)
    finally:
        restore_weights(model, result)
    assert all(answered(model, tokenizer, facts))

#: Bars of the GD test: measured 18/20 forgotten and 28/28 kept with the relative β and the fact
#: model trained in float64 (2026-12-02). Trained in float32 the model differed between machines,
#: and the same test forgot 17/20 on one and 9/20 on another (tests/fact_model.py).
GD_FORGOTTEN, GD_KEPT = 0.8, 0.9  # two requests of margin below 18/20


@pytest.mark.slow
@pytest.mark.parametrize("separate", [True, False])
def test_keys_per_context_forget_with_the_rank_of_one_key_per_request(fact_model, separate: bool) -> None:
    """Each context's key as its own column, all asked for the same change: the
    facts are forgotten, the others kept, and the repeated change collapses to
    rank n per pass (the patch is no larger than with averaged keys)."""
    model, tokenizer, facts = fact_model
    forget = [facts[i] for i in FORGET]
    others = [i for i in range(len(facts)) if i not in FORGET]
    config = dataclasses.replace(BEHAVIOUR, contexts=ContextConfig(separate_keys=separate))
    result = compute_edit(model, tokenizer, forget, config)
    try:
        now = answered(model, tokenizer, facts)
        assert not any(now[i] for i in FORGET), result.diagnostics["verification"]
        assert sum(now[i] for i in others) / len(others) >= 0.9
        passes = result.diagnostics["verification"]["passes"]
        assert all(e.factors.rank <= len(forget) * passes for e in result.layers)
        assert all(len(d["residual_achieved"]) == len(forget) for d in result.diagnostics["layers"])
    finally:
        restore_weights(model, result)


@pytest.mark.slow
@pytest.mark.parametrize("fact_token", ["subject", "last"])
def test_without_a_retain_file_the_other_facts_of_the_relation_stay(fact_model, fact_token: str) -> None:
    """Forgetting one capital keeps the other capitals with no --retain file, no
    request neighbours and no model-proposed subjects: the default protection
    (the forget template filled with the vocabulary words nearest the subject)
    keeps the shared "capital of" direction out of the edit, whether the keys
    are read at the subject or at the prompt's last token. Judged on the
    capitals whose subjects were not among the protected words."""
    model, tokenizer, facts = fact_model
    forget_index = FORGET[0]
    relation = [i for i, f in enumerate(facts) if f.prompt == facts[forget_index].prompt and i != forget_index]
    config = dataclasses.replace(BEHAVIOUR, neighbours=NeighbourConfig(subjects=0), fact_token=fact_token)
    result = compute_edit(model, tokenizer, [facts[forget_index]], config)
    try:
        now = answered(model, tokenizer, facts)
        assert not now[forget_index], result.diagnostics["verification"]
        (protected,) = similar_subjects(model, tokenizer, [facts[forget_index]], config.neighbours.similar, "protect")
        unseen = [i for i in relation if facts[i].subject not in protected]  # never protected by name
        assert len(unseen) >= 5, unseen
        kept = sum(now[i] for i in unseen) / len(unseen)
        assert kept >= 0.9, kept
        assert result.diagnostics["verification"]["probes"]["n"] > 0
    finally:
        restore_weights(model, result)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "olmo2", "olmo3"])
def test_behind_a_post_mlp_norm_the_edit_moves_the_residual_towards_the_target(arch: str) -> None:
    """Gemma 2/3 and OLMo 2/3 add N(W k) to the residual: each layer's share R of the way to the
    neutral target is placed through N (zupatch.engine.norms), so the change of
    N(W k) at the forget keys points along R (residual_achieved, weighted by ‖R‖²)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    with torch.no_grad():  # a gain that is not all ones, as in a trained model
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.normal_(0.0 if arch.startswith("gemma") else 1.0, 0.5)  # 1 + w, w
            if arch.startswith("olmo"):  # no norm before OLMo's MLP: at this init its output is ~1e-7,
                for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):  # below eps
                    linear.weight.mul_(20.0)
        if arch.startswith("olmo"):
            model.model.embed_tokens.weight.mul_(50.0)
    config = CreateConfig(**{**FAST.__dict__, "neutral": OptimisationConfig(max_steps=10)})
    result = compute_edit(model, tiny_tokenizer(), REQUESTS, config, corpus=CORPUS)
    assert result.architecture == arch
    for layer in result.diagnostics["layers"]:  # in total: a tiny R can be pushed aside by a large one
        weights = [norm**2 for norm in layer["residual_norm"]]
        total = sum(w * share for w, share in zip(weights, layer["residual_achieved"])) / sum(weights)
        assert 0.0 < total <= 1.05, layer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_skipping_the_unedited_layers_gives_the_same_edit(arch: str) -> None:
    """The layer-input cache (default) against full forwards everywhere (layer_cache_mb=0)."""
    config = dataclasses.replace(FAST, layers=(2, 3))
    edits = []
    for cache_mb in (None, 0):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
        result = compute_edit(
            model, tiny_tokenizer(), REQUESTS, dataclasses.replace(config, layer_cache_mb=cache_mb), corpus=CORPUS
        )
        edits.append({e.tensor_name: dict(model.named_parameters())[e.tensor_name].detach() for e in result.layers})
    cached, full = edits
    assert cached.keys() == full.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_layer_cache_size_must_be_whole_mib(value) -> None:
    with pytest.raises(ZupatchError, match="layer_cache_mb"):
        CreateConfig(layer_cache_mb=value)


def test_progress_reaches_the_end_of_every_phase(fact_model) -> None:
    """Every phase longer than a moment reports through ``progress``, each stage's count
    never goes back within a pass, and each stage ends at its total."""
    model, tokenizer, facts = fact_model
    events: list[tuple[str, int, int]] = []
    config = dataclasses.replace(FAST, neighbours=NeighbourConfig(subjects=4, similar=8))
    compute_edit(model, tokenizer, facts[:1], config, lambda *event: events.append(event), corpus=CORPUS)
    stages = list(dict.fromkeys(stage for stage, _, _ in events))
    assert stages[:2] == ["preparing", "key statistics"], stages
    assert {"neutral targets", "probes", "similar keys", "layers"} <= set(stages), stages
    for stage in stages:
        counts = [(done, total) for s, done, total in events if s == stage]
        assert counts[-1][0] == counts[-1][1] > 0, (stage, counts)
        if stage != "layers":  # layers start again with each refinement pass
            assert all(a[0] <= b[0] for a, b in zip(counts, counts[1:])), (stage, counts)


@pytest.mark.parametrize("count", [1, 2, None])
def test_similar_subjects_are_read_in_as_many_contexts_as_set(fact_model, count: int | None) -> None:
    """``neighbours.similar_contexts`` bounds the contexts the similar-subject prompts run
    in (their rows, as the progress counts them); unset, all of them; 0 is refused."""
    model, tokenizer, facts = fact_model
    events: list[tuple[str, int, int]] = []
    config = dataclasses.replace(FAST, contexts=ContextConfig(starts=("The", "I"), prefix_tokens=3),
                                 neighbours=NeighbourConfig(subjects=0, similar=8, similar_contexts=count,
                                                            templates=()))  # fmt: skip
    result = compute_edit(model, tokenizer, facts[:1], config, lambda *event: events.append(event), corpus=CORPUS)
    restore_weights(model, result)
    assert result.hyperparameters["context_prefixes"] == 3
    prompts = len(similar_requests(model, tokenizer, facts[:1], 8))
    assert prompts > 0
    read = [(done, total) for stage, done, total in events if stage == "similar keys"]
    # rows run, as counted per forward: once, for every edited layer in the same forwards
    assert read[-1] == (prompts * (count or 3),) * 2 and len(result.layers) > 1, read
    assert result.diagnostics["protection"] == {"similar_prompts": prompts, "similar_contexts": count or 3,
                                                "template_prompts": 0}  # fmt: skip
    with pytest.raises(ZupatchError, match="similar_contexts"):
        NeighbourConfig(similar_contexts=0)


@pytest.mark.parametrize("on", [True, False])
def test_phrasings_from_other_templates_join_the_forget_keys_when_asked(fact_model, on: bool) -> None:
    """``phrasings.templates`` (off by default): the templates where the model gives the
    request's own answer join its forget key as phrasings; counts in the diagnostics."""
    model, tokenizer, facts = fact_model
    capital = facts[0]
    other = tuple(dict.fromkeys(f.prompt for f in facts))  # capital, language, currency
    config = dataclasses.replace(FAST, phrasings=dataclasses.replace(FAST.phrasings, templates=on),
                                 neighbours=NeighbourConfig(subjects=0, similar=4, templates=other))  # fmt: skip
    # the capital asked in the language template: only the capital template is answered with it
    request = ForgetRequest(facts[16].prompt, capital.subject, capital.target)
    result = compute_edit(model, tokenizer, [request], config, corpus=CORPUS)
    restore_weights(model, result)
    assert result.diagnostics["phrasings"] == {"variants": int(on), "found": int(on)}
    assert CreateConfig().phrasings.templates is False


@pytest.mark.parametrize("weight", [0.25, 0.0])
def test_other_templates_of_the_similar_subjects_are_read_in_bare_prompts(fact_model, weight: float) -> None:
    """``neighbours.templates`` filled with the subjects nearest the request's join the
    protected keys (bare prompts: one row each, as the progress counts them), those the
    similar subjects already fill once only; weight 0 turns them off. Bad entries are
    refused in one line."""
    model, tokenizer, facts = fact_model
    templates = ("The language of {}", "The currency of {}", facts[0].prompt)
    events: list[tuple[str, int, int]] = []
    config = dataclasses.replace(FAST, neighbours=NeighbourConfig(subjects=0, similar=8, templates=templates,
                                                                  template_subjects=4, template_weight=weight))  # fmt: skip
    result = compute_edit(model, tokenizer, facts[:1], config, lambda *event: events.append(event), corpus=CORPUS)
    restore_weights(model, result)
    similar = {r.text for r in similar_requests(model, tokenizer, facts[:1], 8)}
    other = [r for r in template_requests(model, tokenizer, facts[:1], templates, 4) if r.text not in similar]
    assert other and len(other) < 3 * 4  # the request's own template adds nothing new
    contexts = result.hyperparameters["context_prefixes"]
    expected = len(similar) * contexts + (len(other) if weight else 0)  # read once for every edited layer
    read = [(done, total) for stage, done, total in events if stage == "similar keys"]
    assert read[-1] == (expected, expected), read
    assert result.layers[0].diagnostics["retain_keys"] == len(similar) + (len(other) if weight else 0)
    # the patch metadata names the templates without their text (a user's own may tell the forgotten fact)
    recorded = result.hyperparameters["neighbours"]["templates"]
    assert recorded["count"] == 3 and len(recorded["sha256"]) == 64
    assert not any(t.split("{")[0] in json.dumps(result.hyperparameters) for t in templates)
    assert dataclasses.replace(FAST, neighbours=NeighbourConfig()).hyperparameters()["neighbours"]["templates"] == (
        "built-in"
    )
    with pytest.raises(ZupatchError, match="exactly one"):
        NeighbourConfig(templates=("no placeholder",))
    with pytest.raises(ZupatchError, match="template_weight"):
        NeighbourConfig(template_weight=-1.0)


def test_a_norm_on_the_mlp_output_that_the_layout_does_not_name_is_refused() -> None:
    """OLMo 2 edited by hand (--layers-path/--down-proj, its own entry not applying): its MLP
    output passes a norm that the hand-named layout does not model, so the edit would be solved
    for the wrong output. It is refused in one line before any work. With the norm named too
    (--post-mlp-norm) it is edited, exactly as under its own entry."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2")).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.config.model_type = "olmo2-by-hand"
    by_hand = dataclasses.replace(FAST, overrides=ArchitectureOverrides("model.layers", "mlp.down_proj"))
    with pytest.raises(ZupatchError, match=r"model\.layers\.0\.mlp\.down_proj's output does not reach") as info:
        compute_edit(model, tiny_tokenizer(), REQUESTS, by_hand, corpus=CORPUS)
    assert "\n" not in str(info.value) and "as it is" in str(info.value)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    named = dataclasses.replace(
        FAST, overrides=ArchitectureOverrides("model.layers", "mlp.down_proj", "post_feedforward_layernorm")
    )
    by_hand_with_norm = compute_edit(model, tiny_tokenizer(), REQUESTS, named, corpus=CORPUS)
    edited = {name: dict(model.named_parameters())[name].detach().clone() for name in by_hand_with_norm.tensor_names}
    restore_weights(model, by_hand_with_norm)
    model.config.model_type = "olmo2"
    result = compute_edit(model, tiny_tokenizer(), REQUESTS, FAST, corpus=CORPUS)
    assert result.architecture == "olmo2"  # its own entry: the same edit as with the norm named by hand
    for name, weight in edited.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), weight), name


def test_how_far_ordinary_text_moves_is_measured_from_the_key_statistics(fact_model) -> None:
    """``ordinary_text_change`` is sqrt(tr(ΔW S ΔWᵀ) / tr(W S Wᵀ)) (with a scale too);
    create reports it per layer, and the CLI warns above the line only."""
    from zupatch.cli.create_cli import ordinary_change_message
    from zupatch.engine.create import ORDINARY_CHANGE_WARNING, ordinary_text_change
    from zupatch.engine.solvers import Factors, SecondMoment

    g = torch.Generator().manual_seed(0)
    d, f = 6, 9
    W, U, B = torch.randn(d, f, generator=g), torch.randn(d, 2, generator=g), torch.randn(2, f, generator=g)
    K = torch.randn(f, 40, generator=g, dtype=torch.float64)
    S = K @ K.T / 40
    for scale in (1.0, 1.5):
        after = Factors(scale, U, B).apply(W, torch.float64)
        delta = after - W.double()
        want = (torch.trace(delta @ S @ delta.T) / torch.trace(W.double() @ S @ W.double().T)).sqrt().item()
        got = ordinary_text_change(after, W, SecondMoment.of(S))
        assert got == pytest.approx(want, rel=1e-12)
    assert ordinary_text_change(W, W, SecondMoment.of(S)) == 0
    assert ordinary_text_change(W + 1, W, SecondMoment.of(S), rows=3) > 0  # a row sample

    model, tokenizer, facts = fact_model
    result = compute_edit(model, tokenizer, [facts[0]], FAST, corpus=CORPUS)
    restore_weights(model, result)
    changes = result.diagnostics["ordinary_change"]
    assert len(changes) == len(result.layers) and all(c > 0 for c in changes), changes
    summary = {"layers": [4, 5], "diagnostics": {"ordinary_change": [0.01, ORDINARY_CHANGE_WARNING / 2]}}
    assert ordinary_change_message(summary) is None
    summary["diagnostics"]["ordinary_change"] = [0.01, 1.31]
    assert "layer 5's MLP output on ordinary text by 131%" in ordinary_change_message(summary)


@pytest.mark.slow
def test_a_rank_tolerance_keeps_fewer_directions_and_forgets_as_much(fact_model) -> None:
    """``closed_form.rank_tolerance``: forgetting eight facts of the fact model, the edit keeps
    fewer output directions than the full one and forgets as many of them; the model holds
    exactly what the stored factors define, and each pass's rank is in the diagnostics."""
    model, tokenizer, facts = fact_model
    chosen = range(0, 48, 6)
    outcome = {}
    for tolerance in (0.0, 0.1):
        closed_form = dataclasses.replace(BEHAVIOUR.closed_form, rank_tolerance=tolerance)
        result = compute_edit(model, tokenizer, [facts[i] for i in chosen],
                              dataclasses.replace(BEHAVIOUR, closed_form=closed_form))  # fmt: skip
        try:
            now = answered(model, tokenizer, facts)
            parameters = dict(model.named_parameters())
            for edit in result.layers:
                original = result.original_weights[edit.tensor_name]
                stored = edit.factors.apply(original).to(original.dtype)
                assert torch.equal(parameters[edit.tensor_name].detach(), stored)
            outcome[tolerance] = (sum(not now[i] for i in chosen), [e.factors.rank for e in result.layers],
                                  [d["rank"] for d in result.diagnostics["layers"]])  # fmt: skip
        finally:
            restore_weights(model, result)
    (forgotten_all, ranks_all, _), (forgotten_few, ranks_few, passes_few) = outcome[0.0], outcome[0.1]
    assert forgotten_few >= forgotten_all >= 7, outcome
    assert sum(ranks_few) < sum(ranks_all) and all(a <= b for a, b in zip(ranks_few, ranks_all)), outcome
    assert all(rank >= 1 for rank in passes_few), outcome


def test_the_ordinary_bound_holds_every_layer_and_reports_what_the_weights_show(fact_model) -> None:
    """With ``closed_form.max_ordinary_change`` at half of what an unbounded edit moves, every
    layer's figure is at most the bound, the solve says it scaled λ_f down, and the figure
    it reports is the one the stored weights give (computed here from the statistics)."""
    from zupatch.engine.architectures import down_proj_weight_math
    from zupatch.engine.create import ordinary_text_change
    from zupatch.engine.solvers import SecondMoment

    model, tokenizer, facts = fact_model
    spec = resolve_architecture(model)
    free_config = dataclasses.replace(FAST, closed_form=dataclasses.replace(FAST.closed_form, max_ordinary_change=0.0))
    layers = free_config.layers_for(model.config.num_hidden_layers)
    statistics = compute_key_statistics(model, tokenizer, spec, layers, CORPUS, FAST.stats)
    free = compute_edit(model, tokenizer, facts[:3], free_config, key_statistics=statistics)
    restore_weights(model, free)
    unbounded = free.diagnostics["ordinary_change"]
    assert all(d["forget_scale"] == 1.0 for d in free.diagnostics["layers"])

    bound = min(unbounded) / 2
    config = dataclasses.replace(FAST, closed_form=dataclasses.replace(FAST.closed_form, max_ordinary_change=bound))
    result = compute_edit(model, tokenizer, facts[:3], config, key_statistics=statistics)
    try:
        figures = result.diagnostics["ordinary_change"]
        assert all(figure <= bound * 1.001 for figure in figures), (figures, bound)
        entries = result.diagnostics["layers"]
        assert all(0 < d["forget_scale"] < 1 for d in entries if d["pass"] == 1)
        for d in entries:  # a layer at the bound is not read or solved again in a later pass
            if d["ordinary_change"] >= bound - 1e-4:
                assert not [e for e in entries if e["layer"] == d["layer"] and e["pass"] > d["pass"]]
        for edit, figure in zip(result.layers, figures):
            module = dict(model.named_modules())[edit.tensor_name.removesuffix(".weight")]
            after = down_proj_weight_math(module, spec).detach().double()
            before = result.original_weights[edit.tensor_name].double()
            before = before.T if spec.weight_transposed else before
            moment = SecondMoment.of(statistics[edit.layer].second_moment)
            assert figure == pytest.approx(ordinary_text_change(after, before, moment, rows=10**6), abs=2e-4)
    finally:
        restore_weights(model, result)


def test_the_cli_says_when_the_bound_held_answers_back() -> None:
    """One warning naming the held-back layers and the bound, only when answers are still given."""
    from zupatch.cli.create_cli import held_back_message

    layers = [{"layer": 24, "forget_scale": 1.0}, {"layer": 25, "forget_scale": 0.4}, {"layer": 26, "forget_scale": 0.0}]
    summary = {"requests": 300, "targets_still_given": [3, 9],
               "diagnostics": {"ordinary_bound": 0.2, "layers": layers}}  # fmt: skip
    message = held_back_message(summary)
    assert message.startswith("2 of 300 answer(s) are still given") and "layer(s) 25, 26" in message
    assert "at most 20%" in message and "closed_form.max_ordinary_change" in message
    assert held_back_message({**summary, "targets_still_given": []}) is None  # all forgotten: nothing to say
    assert held_back_message({**summary, "diagnostics": {"ordinary_bound": None, "layers": layers}}) is None
    unbounded = [{**d, "forget_scale": 1.0} for d in layers]
    assert held_back_message({**summary, "diagnostics": {"ordinary_bound": 0.2, "layers": unbounded}}) is None
