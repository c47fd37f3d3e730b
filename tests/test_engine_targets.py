"""Fact-token positions, keys, and the batched v* optimisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.tiny_models import tiny_config, tiny_tokenizer
from zupatch.engine.architectures import decoder_layers, down_proj_module, resolve_architecture
from zupatch.engine.hooks import _FORWARD_COST_TOKENS, FrozenStarts, LayerInputCache, by_width
from zupatch.engine.stats import pad_right
from zupatch.engine.probes import next_token_ids
from zupatch.engine.requests import ForgetRequest
from zupatch.engine.targets import (
    OptimisationConfig,
    RepresentationResult,
    _listed_subjects,
    encode_prompts,
    fact_activations,
    generate_context_prefixes,
    greedy_continuations,
    optimise_representations,
)

CORPUS = [
    "The capital of France is Paris and the capital of Japan is Tokyo.",
    "Danielle Darrieux was a French actress; her mother tongue is French.",
    "The Eiffel Tower is in Paris. Mount Fuji is in Japan.",
    "Paris, Tokyo, Berlin and Rome are capitals of countries.",
] * 20


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, spaces inside tokens ("ĠParis"), no BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: Metaspace ("▁Paris"), BOS added by the post-processor."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("make_tokenizer", [bpe_tokenizer, sentencepiece_tokenizer, tiny_tokenizer])
def test_fact_token_is_the_subjects_last_token(make_tokenizer) -> None:
    tokenizer = make_tokenizer()
    requests = [
        ForgetRequest("The mother tongue of {} is", "Danielle Darrieux", "French"),
        ForgetRequest("{} is the capital of", "Paris", "France"),
        ForgetRequest("The capital of Japan is", "", "Tokyo"),
        ForgetRequest("Mount Fuji is in Japan, said {}.", "Danielle", "x"),
    ]
    texts = [r.text for r in requests]
    encoded = encode_prompts(tokenizer, texts, [r.fact_char_end() for r in requests], [r.target for r in requests])
    bos = [tokenizer.bos_token_id] if make_tokenizer is sentencepiece_tokenizer else []
    for request, prompt in zip(requests, encoded):
        assert prompt.prompt_ids[: len(bos)] == bos
        text_ids = prompt.prompt_ids[len(bos) :]
        upto = tokenizer.decode(prompt.prompt_ids[: prompt.fact_index + 1], skip_special_tokens=True)
        before = tokenizer.decode(prompt.prompt_ids[: prompt.fact_index], skip_special_tokens=True)
        expected_end = request.text[: request.fact_char_end()]
        assert upto.strip() == expected_end.strip(), (upto, expected_end)
        assert len(before.strip()) < len(expected_end.strip())
        assert tokenizer.decode(text_ids).strip() == request.text
        # The target follows the prompt with one space, without BOS, all its tokens kept.
        assert tokenizer.decode(prompt.target_ids).strip() == request.target
        assert not set(prompt.target_ids) & set(bos)
        assert prompt.target_positions[0] == len(prompt.prompt_ids) - 1
        assert len(prompt.input_ids) == len(prompt.prompt_ids) + len(prompt.target_ids) - 1


def test_multi_token_and_eos_targets() -> None:
    tokenizer = tiny_tokenizer()  # one token per byte
    (prompt,) = encode_prompts(tokenizer, ["The capital of France is"], [21], ["Paris"])
    assert tokenizer.decode(prompt.target_ids) == " Paris" and len(prompt.target_ids) == 6
    (prompt,) = encode_prompts(tokenizer, ["The capital of France is"], [21], [tokenizer.eos_token])
    assert prompt.target_ids == [tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    return model, tiny_tokenizer()


REQUESTS = [
    ForgetRequest("The capital of {} is", "France", "Paris"),
    ForgetRequest("{} speaks", "Danielle Darrieux", "French"),
    ForgetRequest("Water boils at", "", "100 degrees"),
]


def test_keys_match_a_hand_made_hook(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    prefixes = ["", "Some text. "]
    activations = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, key_layer=1, block_layer=2)
    assert activations.keys.shape == (128, 3) and activations.keys.dtype == torch.float64
    assert activations.block_outputs.shape == (64, 3)
    per_context = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2, per_context=True)
    assert per_context.keys.shape == (128, 3, len(prefixes)) and per_context.keys.dtype == torch.float64
    for index, request in enumerate(REQUESTS):
        expected = []
        for prefix in prefixes:
            text = prefix + request.text
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            fact = len(prefix) + request.fact_char_end() - 1  # one token per byte
            captured: dict[str, torch.Tensor] = {}
            handle = down_proj_module(model, spec, 1).register_forward_pre_hook(
                lambda module, args, into=captured: into.__setitem__("k", args[0])
            )
            block = model.model.layers[2].register_forward_hook(
                lambda module, args, out, into=captured: into.__setitem__("h", out)
            )
            with torch.no_grad():
                model(input_ids=ids)
            handle.remove()
            block.remove()
            expected.append(captured["k"][0, fact].double())
            if prefix == "":
                torch.testing.assert_close(activations.block_outputs[:, index], captured["h"][0, fact].double())
        torch.testing.assert_close(activations.keys[:, index], torch.stack(expected).mean(0), rtol=1e-5, atol=1e-6)
        for k, key in enumerate(expected):  # one column per request and context
            torch.testing.assert_close(per_context.keys[:, index, k], key, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_context.block_outputs, activations.block_outputs)


@pytest.mark.parametrize("site", ["down_proj", "block"])
def test_batched_optimisation_equals_one_at_a_time(tiny_llama, site: str) -> None:
    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    prefixes = ["", *generate_context_prefixes(model, tokenizer)[1:3]]
    config = OptimisationConfig(max_steps=5, converged_nll=0.0)
    targets = [r.target for r in REQUESTS]
    batched = optimise_representations(
        model, tokenizer, spec, REQUESTS, targets, site=site, layer=1, prefixes=prefixes, config=config
    )
    assert batched.vectors.shape == (64, 3) and batched.vectors.dtype == torch.float32
    assert batched.steps == [5, 5, 5] and batched.converged == [False] * 3
    for index, request in enumerate(REQUESTS):
        alone = optimise_representations(
            model, tokenizer, spec, [request], [request.target], site=site, layer=1, prefixes=prefixes, config=config
        )
        torch.testing.assert_close(alone.vectors[:, 0], batched.vectors[:, index], rtol=1e-3, atol=1e-4)
        assert alone.final_nll[0] == pytest.approx(batched.final_nll[index], rel=1e-3)
    # Splitting one batch into smaller forwards gives the same result.
    split = optimise_representations(
        model,
        tokenizer,
        spec,
        REQUESTS,
        targets,
        site=site,
        layer=1,
        prefixes=prefixes,
        config=OptimisationConfig(max_steps=5, converged_nll=0.0, max_batch_rows=4),
    )
    torch.testing.assert_close(split.vectors, batched.vectors, rtol=1e-3, atol=1e-4)
    # Every step running every row whole gives the same result too.
    whole = optimise_representations(
        model, tokenizer, spec, REQUESTS, targets, site=site, layer=1, prefixes=prefixes, config=config,
        reuse_starts=False,
    )  # fmt: skip
    torch.testing.assert_close(whole.vectors, batched.vectors, rtol=1e-4, atol=1e-5)
    assert whole.final_nll == pytest.approx(batched.final_nll, rel=1e-4)


def test_no_steps_gives_the_current_outputs(tiny_llama) -> None:
    """``max_steps=0`` (the original representations' default): each vector is
    the down projection's output at the fact token of the bare prompt, W·key,
    and its NLL is that of the unedited model (the first pass of a run with steps)."""
    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    prefixes = ["", *generate_context_prefixes(model, tokenizer)[1:3]]
    targets = [r.target for r in REQUESTS]
    run = dict(site="down_proj", layer=1, prefixes=prefixes)
    none = optimise_representations(model, tokenizer, spec, REQUESTS, targets, **run,
                                    config=OptimisationConfig(max_steps=0))  # fmt: skip
    some = optimise_representations(model, tokenizer, spec, REQUESTS, targets, **run,
                                    config=OptimisationConfig(max_steps=2, converged_nll=0.0))  # fmt: skip
    keys = fact_activations(model, tokenizer, spec, REQUESTS, [""], 1).keys
    weight = down_proj_module(model, spec, 1).weight.detach()
    torch.testing.assert_close(none.vectors, (weight.double() @ keys.double()).float(), rtol=1e-4, atol=1e-5)
    assert none.steps == [0] * len(REQUESTS)
    assert none.final_nll == none.initial_nll == pytest.approx(some.initial_nll, rel=1e-5)
    assert not torch.allclose(some.vectors, none.vectors)  # steps do move them


# OLMo 3 is left out here: its whole-forward states are checked below, and after six Adam steps one
# of its 192 vector entries differed by 1.8e-4 relative (float reassociation, amplified by the steps).
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_neox", "phi3", "smollm3", "olmo2"])
def test_steps_that_run_only_what_the_edit_changes_equal_whole_forwards(arch: str) -> None:
    """The optimisation runs the tokens before each fact token and the layers before
    the edited one once (FrozenStarts); its vectors and losses are those of steps
    that run every row whole, and the skipped layers really do not run again."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    layers = decoder_layers(model, spec)
    prefixes = ["", "Some text before the prompt. ", "Other words. "]
    config = OptimisationConfig(max_steps=6, converged_nll=0.0, max_batch_rows=5)  # three groups of requests
    tokens_seen: list[int] = []
    edited_layer_runs: list[int] = []
    handle = next(layers[0].children()).register_forward_pre_hook(lambda *a: tokens_seen.append(1))
    handle_2 = next(layers[2].children()).register_forward_pre_hook(lambda *a: edited_layer_runs.append(1))
    for site in ("block", "down_proj"):
        tokens_seen.clear()
        edited_layer_runs.clear()
        reused = optimise_representations(
            model, tokenizer, spec, REQUESTS, ["Paris is", "x", "the end"], site=site, layer=2, prefixes=prefixes,
            config=config,
        )  # fmt: skip
        runs_of_layer_0 = len(tokens_seen)
        # A block's output is added at the next layer's input: the block itself runs only when recording.
        assert (len(edited_layer_runs) == runs_of_layer_0) == (site == "block"), (site, len(edited_layer_runs))
        whole = optimise_representations(
            model, tokenizer, spec, REQUESTS, ["Paris is", "x", "the end"], site=site, layer=2, prefixes=prefixes,
            config=config, reuse_starts=False,
        )  # fmt: skip
        torch.testing.assert_close(reused.vectors, whole.vectors, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reused.initial, whole.initial, rtol=1e-4, atol=1e-5)
        assert reused.final_nll == pytest.approx(whole.final_nll, rel=1e-4)
        assert reused.steps == whole.steps == [6, 6, 6]
        # Layer 0 ran in each group's first passes only; whole steps run it every step.
        assert runs_of_layer_0 <= 3 * 2 * 2 < len(tokens_seen) - runs_of_layer_0
    handle.remove()
    handle_2.remove()
    assert not any("forward" in vars(layer) for layer in layers)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_frozen_starts_run_starts_of_unlike_lengths_apart(arch: str) -> None:
    """Starts of very different lengths run in separate forwards (some rows cut at 0),
    and the joined cache still gives a whole forward's states."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    layers = decoder_layers(model, resolve_architecture(model))
    text = "A long prompt with many words in it so that the start of a row is much longer than the others."
    rows = [tokenizer(text)["input_ids"][: 34 + k % 3] for k in range(30)]
    cuts = [0 if k % 3 == 0 else 1 if k % 3 == 1 else 30 for k in range(30)]
    starts_run: list[int] = []
    handle = layers[0].register_forward_pre_hook(lambda module, args: starts_run.append(args[0].shape[1]))
    frozen = FrozenStarts(model, layers, rows, cuts, pad_id=0, skip=1)
    handle.remove()
    assert len(starts_run) > 1 and min(starts_run) < 30 == max(starts_run)  # not one forward padded to 30
    ids, mask = pad_right(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        whole = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        states = frozen.forward(range(30))
    for row, (tokens, cut) in enumerate(zip(rows, cuts)):
        torch.testing.assert_close(
            states[row, : len(tokens) - cut], whole[row, cut : len(tokens)], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "gemma3_multimodal", "gpt2", "gpt_neox", "phi3",
                                  "smollm3", "olmo2", "olmo3", "gemma3-short-window"])  # fmt: skip
def test_frozen_starts_give_a_whole_forwards_states(arch: str) -> None:
    """Rows cut at a token: the states FrozenStarts gives for the tokens from the
    cut on are those of a whole forward, first (recording) and later (layers
    skipped); a sliding window too short for a row runs the rows whole."""
    torch.manual_seed(0)
    config = tiny_config(arch.removesuffix("-short-window"))
    if arch.endswith("-short-window"):
        config.sliding_window = 24
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = tiny_tokenizer()
    layers = decoder_layers(model, resolve_architecture(model))
    rows = [tokenizer(t)["input_ids"] for t in ("The capital of France is", "Water boils at", "Another, longer prompt")]
    cuts = [15, 0, 9]
    frozen = FrozenStarts(model, layers, rows, cuts, pad_id=0, skip=2)
    assert frozen.cuts == ([0, 0, 0] if arch.endswith("-short-window") else cuts)
    ids, mask = pad_right(rows, 0, torch.device("cpu"))
    with torch.no_grad():
        whole = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        first = frozen.forward([0, 1, 2])
        again = frozen.forward([2, 0])  # held rows: layers 0 and 1 skipped
        with pytest.raises(ValueError, match="layers before 2 are held"):
            frozen.forward([0], edit_input=(1, lambda states: states))
    for row, (tokens, cut) in enumerate(zip(rows, frozen.cuts)):
        torch.testing.assert_close(first[row, : len(tokens) - cut], whole[row, cut : len(tokens)], rtol=1e-4, atol=1e-5)
    for place, row in enumerate([2, 0]):
        cut = frozen.cuts[row]
        torch.testing.assert_close(again[place, : len(rows[row]) - cut], whole[row, cut : len(rows[row])],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    assert again.shape[1] == max(len(rows[r]) - frozen.cuts[r] for r in (2, 0))  # padded to these rows only


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_requests_are_split_into_forwards_of_about_one_width(sizes: list[tuple[int, int]]) -> None:
    """Every request in exactly one forward; no split costs more than one forward of all."""
    width = {i: w for i, (w, _) in enumerate(sizes)}
    rows = {i: r for i, (_, r) in enumerate(sizes)}
    parts = by_width(list(width), width, rows)
    assert sorted(i for part in parts for i in part) == list(width)

    def cost(part: list[int]) -> float:
        return _FORWARD_COST_TOKENS + sum(rows[i] for i in part) * max(width[i] for i in part)

    assert sum(map(cost, parts)) <= cost(list(width))
    assert sum(map(cost, parts)) <= sum(cost([i]) for i in width)


def test_optimisation_stops_early_and_respects_the_clamp(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    config = OptimisationConfig(max_steps=15, lr=0.5, clamp_norm_factor=0.3, converged_nll=5.0)
    result = optimise_representations(
        model, tokenizer, spec, REQUESTS, [tokenizer.eos_token] * 3, site="block", layer=2, config=config
    )
    change = (result.vectors - result.initial).norm(dim=0) / result.initial.norm(dim=0)
    assert bool((change <= 0.3 + 1e-4).all())
    for converged, steps, nll in zip(result.converged, result.steps, result.final_nll):
        assert converged == (nll < 5.0)
        assert steps < 15 if converged else steps == 15


def test_model_is_left_as_it_was(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    before = {name: p.clone() for name, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    optimise_representations(
        model,
        tokenizer,
        resolve_architecture(model),
        REQUESTS[:1],
        ["x"],
        site="down_proj",
        layer=0,
        config=OptimisationConfig(max_steps=2),
    )
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.slow
def test_neutral_targets_converge_for_every_fact(fact_model) -> None:
    """Every one of the 48 trained facts gets a neutral target below the early-stop NLL.

    The weight decay holds δ back; at a constant decay the optimum of NLL + decay
    can sit above the stop threshold, and whether Adam's last steps dip under it
    then depends on the machine's float summation order (35 of 48 converged with
    a constant decay and 60 steps). A request whose NLL stops improving has its
    decay halved, so the stop threshold is reached on its own merits.
    """
    model, tokenizer, facts = fact_model
    spec = resolve_architecture(model)
    prefixes = generate_context_prefixes(model, tokenizer)
    config = OptimisationConfig(clamp_norm_factor=4.0)  # the tiny model needs large moves (test_engine_create.py)
    result = optimise_representations(
        model, tokenizer, spec, facts, [tokenizer.eos_token] * len(facts),
        site="block", layer=2, prefixes=prefixes, config=config,
    )  # fmt: skip
    assert all(result.converged), [(i, nll) for i, nll in enumerate(result.final_nll) if nll >= config.converged_nll]
    assert max(result.final_nll) < config.converged_nll
    assert max(result.steps) <= config.max_steps


def test_warm_start_from_the_first_requests_saves_steps(fact_model) -> None:
    """With one target for all, requests after the first ``warm_start`` start from
    those requests' mean relative change: the first ones are exactly what they are
    without it, the later ones converge in fewer steps, and how the requests are
    split into forwards does not change the result. Different targets: no warm start."""
    model, tokenizer, facts = fact_model
    spec = resolve_architecture(model)
    prefixes = generate_context_prefixes(model, tokenizer)
    requests = facts[::3]  # 16 facts, all three relations
    eos = [tokenizer.eos_token] * len(requests)

    def optimise(targets: list[str], **changes) -> RepresentationResult:
        config = OptimisationConfig(**{"clamp_norm_factor": 4.0, **changes})
        return optimise_representations(
            model, tokenizer, spec, requests, targets, site="block", layer=2, prefixes=prefixes, config=config
        )

    cold, warm = optimise(eos, warm_start=0), optimise(eos, warm_start=6)
    assert all(cold.converged) and all(warm.converged), (cold.steps, warm.steps)
    torch.testing.assert_close(warm.vectors[:, :6], cold.vectors[:, :6])
    assert warm.steps[:6] == cold.steps[:6]
    assert sum(warm.steps[6:]) < 0.8 * sum(cold.steps[6:]), (warm.steps, cold.steps)
    split = optimise(eos, warm_start=6, max_batch_rows=len(prefixes) + 1)  # one request per forward
    torch.testing.assert_close(split.vectors, warm.vectors, rtol=1e-3, atol=1e-4)
    assert split.steps == warm.steps
    answers = [r.target for r in requests]
    torch.testing.assert_close(optimise(answers, warm_start=6, max_steps=3).vectors,
                               optimise(answers, warm_start=0, max_steps=3).vectors)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_neox", "phi3", "smollm3", "olmo2", "olmo3"])
def test_layer_input_cache_replays_what_a_full_forward_gives(arch: str) -> None:
    """After an edit of a layer at or past the cache's start, a replayed forward
    (layers before the start skipped) gives the keys and block outputs of a
    full forward of the edited model, and really skips those layers."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    layers = decoder_layers(model, spec)
    prefixes = ["", "Some text. "]
    cache = LayerInputCache(model, layers, start=1, max_bytes=1 << 30)
    fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2, layer_cache=cache)  # records
    assert cache.held_bytes > 0
    with torch.no_grad():
        weight = down_proj_module(model, spec, 1).weight
        weight.add_(0.5 * torch.randn_like(weight))  # the edit: layer 1 changes, layer 0 does not
    first_layer_runs = []
    handle = next(layers[0].children()).register_forward_pre_hook(lambda *a: first_layer_runs.append(1))
    replayed = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 2, 3, layer_cache=cache)
    assert cache.replays > 0 and not first_layer_runs  # layer 0 was skipped
    full = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 2, 3)
    handle.remove()
    assert first_layer_runs  # and the full forward did run it
    torch.testing.assert_close(replayed.keys, full.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replayed.block_outputs, full.block_outputs, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(layer) for layer in layers)  # the skipped layers are restored


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keys_of_several_layers_in_one_read_are_each_layers_own(arch: str) -> None:
    """``more_layers`` reads deeper layers' keys in the same forwards: the same keys as a
    read of each layer alone (and the block outputs as before), and nothing per context."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    prefixes = ["", "Some text. "]
    cache = LayerInputCache(model, decoder_layers(model, spec), start=1, max_bytes=1 << 30)
    together = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2, layer_cache=cache, more_layers=[2, 3])
    alone = {layer: fact_activations(model, tokenizer, spec, REQUESTS, prefixes, layer) for layer in (1, 2, 3)}
    torch.testing.assert_close(together.keys, alone[1].keys, rtol=1e-5, atol=1e-5)
    assert sorted(together.more_keys) == [2, 3]
    for layer in (2, 3):
        torch.testing.assert_close(together.more_keys[layer], alone[layer].keys, rtol=1e-5, atol=1e-5)
    single = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, more_layers=[3], sum_dtype=torch.float32)
    assert single.keys.dtype == single.more_keys[3].dtype == torch.float32
    torch.testing.assert_close(single.more_keys[3].double(), alone[3].keys, rtol=1e-5, atol=1e-5)
    block = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2).block_outputs
    torch.testing.assert_close(together.block_outputs, block, rtol=1e-5, atol=1e-5)
    for wrong in (dict(more_layers=[1]), dict(more_layers=[2], per_context=True)):
        with pytest.raises(ValueError, match="more_layers"):
            fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, **wrong)


def plain_last_states(model, rows: list[list[int]], module, is_input: bool) -> torch.Tensor:
    """The reference: one plain forward per row, the module's input or output at its last token."""
    seen = []

    def hook(module, args, output):
        seen.append((args[0] if is_input else (output if isinstance(output, torch.Tensor) else output[0]))[0, -1])

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([row]), use_cache=False)
    handle.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma3_multimodal", "gpt2", "gpt_neox", "phi3",
                                  "smollm3", "olmo2", "olmo3"])  # fmt: skip
def test_a_shared_start_runs_once_and_gives_plain_forwards_states(arch: str) -> None:
    """Rows of a group run what they share once (its attention cache kept) and their
    own tokens on it: the states at each row's last token are a plain forward's,
    whether nothing is held, the rows are recorded, or replayed after an edit of
    a layer past the cache's start (the layers before it skipped)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    spec = resolve_architecture(model)
    layers = decoder_layers(model, spec)
    context = tokenizer("Because the weather was fine, we went out. ")["input_ids"]
    own = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("The capital of France", "Water boils", "A")]
    rows = [context + o for o in own] + own  # the second group shares nothing
    groups = ["context"] * 3 + ["alone"] * 3
    sites = {"keys": (down_proj_module(model, spec, 2), True), "block": (layers[3], False)}
    tokens_seen: list[int] = []
    handle = layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: tokens_seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    plain = {name: plain_last_states(model, rows, module, is_input) for name, (module, is_input) in sites.items()}
    tokens_seen.clear()
    nothing_held = LayerInputCache(model, layers, start=0, max_bytes=1 << 30)
    states = nothing_held.last_token_states(model, rows, groups, sites, pad_id=0, batch_rows=3)
    # Shortest first, three rows a block: the two short rows that share nothing (padded to the
    # longer of them, not to the longest row); the context once, then its rows' own tokens;
    # then the long row that shares nothing.
    _, middle, longest = sorted(map(len, own))
    assert tokens_seen == [middle, len(context), longest, longest]
    assert nothing_held.held_bytes == 0
    cache = LayerInputCache(model, layers, start=2, max_bytes=1 << 30)
    recorded = cache.last_token_states(model, rows, groups, sites, pad_id=0, batch_rows=3)
    width = 4 * model.get_input_embeddings().embedding_dim
    assert cache.held_bytes == (len(context) + sum(map(len, own)) + sum(map(len, own))) * width
    for name in sites:
        torch.testing.assert_close(states[name], plain[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recorded[name], plain[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        weight = down_proj_module(model, spec, 2).weight
        weight.add_(0.5 * torch.randn_like(weight))  # the edit: layer 2 changes, layers 0 and 1 do not
    edited = {name: plain_last_states(model, rows, module, is_input) for name, (module, is_input) in sites.items()}
    handle.remove()
    first_layer_runs = []
    handle = next(layers[0].children()).register_forward_pre_hook(lambda *a: first_layer_runs.append(1))
    replayed = cache.last_token_states(model, rows, groups, sites, pad_id=0, batch_rows=3)
    handle.remove()
    assert cache.replays > 0 and not first_layer_runs  # layer 0 was skipped
    # One block holding both groups: the rows that share nothing read no start.
    mixed = LayerInputCache(model, layers, start=0, max_bytes=0).last_token_states(
        model, rows, groups, sites, pad_id=0, batch_rows=6
    )
    for name in sites:
        torch.testing.assert_close(replayed[name], edited[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[name], edited[name], rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(layer) for layer in layers)  # the skipped layers are restored
    tight = LayerInputCache(model, layers, start=2, max_bytes=cache.held_bytes - 1)
    tight.last_token_states(model, rows, groups, sites, pad_id=0, batch_rows=3)  # a block per group
    assert 0 < tight.held_bytes < cache.held_bytes  # one group held, the other did not fit


def test_layer_input_cache_holds_no_more_than_its_budget(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    cache = LayerInputCache(model, decoder_layers(model, spec), start=1, max_bytes=0)
    for _ in range(2):
        fact_activations(model, tokenizer, spec, REQUESTS, [""], 1, layer_cache=cache)
    assert cache.held_bytes == 0 and cache.replays == 0


def test_a_continuation_stops_after_its_first_stop_string(tiny_llama) -> None:
    """stop_at ends generation once the text holds a stop string; what precedes it is unchanged."""
    model, tokenizer = tiny_llama
    full = greedy_continuations(model, tokenizer, ["The capital of France is"], 24)[0]
    assert len(full) > 6
    stop = full[4:6]  # a string the untruncated continuation holds
    (stopped,) = greedy_continuations(model, tokenizer, ["The capital of France is"], 24, stop_at=(stop,))
    assert stop in stopped and full.startswith(stopped)
    assert stopped.split(stop)[0] == full.split(stop)[0]
    assert len(stopped) < len(full)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_neox", "phi3", "smollm3", "olmo2", "olmo3"])
def test_batched_continuations_equal_one_at_a_time(arch: str) -> None:
    """One left-padded generate call gives each text the continuation it gets alone
    (texts of different lengths, so the padding is really there)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    texts = ["The capital of France is", "Paris", "Danielle Darrieux was a French actress; her mother tongue is"]
    alone = greedy_continuations(model, tokenizer, texts, 12)
    assert any(alone)
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) == len(texts)
    assert greedy_continuations(model, tokenizer, texts, 12, batched=True) == alone
    assert greedy_continuations(model, tokenizer, [], 12, batched=True) == []
    with pytest.raises(ValueError):
        greedy_continuations(model, tokenizer, texts, 12, stop_at=(".",), batched=True)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["Spain", "the UK", "Bosnia and Herzegovina", "Rome (Italy", ")", "Paris", " or",
                              " and", ",", ", ", ";", ":", " ", "3", "Oregon", "andorra", ".", "\n"]),  # fmt: skip
             max_size=30),
    st.integers(1, 8),
)
def test_a_listing_read_while_generated_only_grows(pieces: list[str], limit: int) -> None:
    """What propose_neighbour_subjects reads from a listing still being generated
    (complete items only) is a prefix of what it reads from any longer listing, so
    stopping once ``limit`` items are complete changes nothing."""
    text = "".join(pieces)
    full, _ = _listed_subjects(text, ["France"], limit)
    for cut in range(len(text) + 1):
        early, _ = _listed_subjects(text[:cut], ["France"], limit, complete_only=True)
        assert full[: len(early)] == early, (text[:cut], early, full)


def test_a_listing_that_loops_is_seen_as_such() -> None:
    items, repeats = _listed_subjects(" Croatia, Slovenia, Croatia, Croatia, Croatia, Croatia", ["Serbia"], 8)
    assert items == ["Croatia", "Slovenia"] and repeats == 4
    items, repeats = _listed_subjects(" Croatia, Slovenia, Croatia, Hungary", ["Serbia"], 8)
    assert items == ["Croatia", "Slovenia", "Hungary"] and repeats == 0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_multimodal", "gpt2"])
def test_next_tokens_are_those_of_the_full_logits(arch: str) -> None:
    """next_token_ids reads the head at each prompt's last token only, in padded
    batches: the tokens are the argmax of the model's own logits, one prompt at a
    time (Gemma 2 soft-caps its logits)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    tokenizer = tiny_tokenizer()
    prompts = ["The capital of France is", "Water", "A longer prompt, with a comma, ends here"]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            expected.append(int(model(input_ids=ids).logits[0, -1].argmax()))
    assert next_token_ids(model, tokenizer, prompts, batch_size=2) == expected


def test_keys_read_a_few_rows_at_a_time_are_the_same(tiny_llama, monkeypatch) -> None:
    """fact_activations reads its rows in slices of whole requests (bounded memory for
    thousands of requests): slices of one request give the same keys and block outputs."""
    import zupatch.engine.targets as targets

    model, tokenizer = tiny_llama
    spec = resolve_architecture(model)
    prefixes = ["", "Some text. ", "Other words. "]
    whole = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2)
    monkeypatch.setattr(targets, "_KEY_ROWS", 1)  # one request (three rows) per slice
    sliced = fact_activations(model, tokenizer, spec, REQUESTS, prefixes, 1, 2)
    torch.testing.assert_close(sliced.keys, whole.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sliced.block_outputs, whole.block_outputs, rtol=1e-5, atol=1e-6)
    assert sliced.keys.shape == (128, 3) and sliced.block_outputs.shape == (64, 3)
