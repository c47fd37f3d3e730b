"""Other subjects (vocabulary halves, similar subjects) and other phrasings of requests."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fact_model import SUBJECTS
from zupatch.engine.create import CreateConfig, RefineConfig
from zupatch.engine.requests import ForgetRequest, at_last_token, last_token_phrasings
from zupatch.engine.settings import with_settings
from zupatch.engine.subjects import (
    PhrasingConfig,
    answered_template_phrasings,
    excluded_words,
    half_of,
    phrasing_variants,
    similar_requests,
    similar_subjects,
    template_requests,
    vocabulary_words,
)
from zupatch.errors import ZupatchError

COUNTRIES = {
    "Germany", "Spain", "Italy", "Belgium", "Russia", "England", "Portugal", "Greece", "Austria", "Switzerland",
    "Japan", "Sweden", "Ireland", "Scotland", "Poland", "Hungary", "Britain", "Denmark", "Romania", "Canada",
    "Thailand", "Norway", "Finland", "Netherlands", "Turkey", "Egypt", "India", "China", "Mexico", "Brazil",
}  # fmt: skip


def test_similar_subjects_on_the_fact_model(fact_model) -> None:
    model, tokenizer, facts = fact_model
    request = facts[0]
    (similar,) = similar_subjects(model, tokenizer, [request], 8, "protect")
    assert 0 < len(similar) <= 8
    assert all(half_of(w) == "protect" for w in similar)
    assert request.subject not in similar and request.target not in similar
    assert set(similar) <= set(tokenizer.get_vocab())
    assert similar_subjects(model, tokenizer, [request], 0, "protect") == [[]]
    no_subject = ForgetRequest("The capital of Zorvia", "", "Plim")
    assert similar_subjects(model, tokenizer, [no_subject], 8, "protect") == [[]]


def test_other_templates_nearest_words_first_and_bounded(fact_model) -> None:
    """The other templates take every request's nearest word before any request's second,
    skip what the similar subjects already fill, and stop at the limit."""
    model, tokenizer, facts = fact_model
    requests = [facts[0], facts[1]]
    nearest = similar_subjects(model, tokenizer, requests, 3, "protect")
    templates = ("{} is near", "People of {} say")
    every = template_requests(model, tokenizer, requests, templates, 3)
    expected = list(dict.fromkeys(t.replace("{}", nearest[i][rank]) for rank in range(3) for i in range(2)
                                  for t in templates if rank < len(nearest[i])))  # fmt: skip
    assert [r.text for r in every] == expected and all(r.target == "" for r in every)
    assert [r.text for r in template_requests(model, tokenizer, requests, templates, 3, limit=3)] == expected[:3]
    skipped = template_requests(model, tokenizer, requests, templates, 3, skip=expected[:2])
    assert [r.text for r in skipped] == expected[2:]
    assert template_requests(model, tokenizer, requests, templates, 0) == []


@pytest.mark.slow
def test_similar_subjects_are_of_the_same_kind_on_smollm2(smollm2_checkpoint) -> None:
    """"France" brings other countries, from the protect half only, never France itself."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    request = ForgetRequest("The capital of {} is", "France", "Paris")
    (similar,) = similar_subjects(model, tokenizer, [request], 16, "protect")
    assert len(similar) == 16
    assert all(half_of(w) == "protect" for w in similar)
    assert not {"France", "Paris", "france"} & set(similar)
    assert len(COUNTRIES & set(similar)) >= 5, similar
    (probe_side,) = similar_subjects(model, tokenizer, [request], 16, "probe")
    assert not set(probe_side) & set(similar)
    filled = similar_requests(model, tokenizer, [request], 16)
    assert [r.text for r in filled] == [f"The capital of {w} is" for w in similar]


def test_vocabulary_halves_are_disjoint_and_stable(fact_model) -> None:
    _, tokenizer, _ = fact_model
    words = vocabulary_words(tokenizer)
    assert set(SUBJECTS) <= set(words)  # a word-level vocabulary: every capitalised word
    assert words == vocabulary_words(tokenizer)
    halves = {half_of(w) for w in words}
    assert halves == {"protect", "probe"}
    assert excluded_words([ForgetRequest("The capital of {} is", "North Korea", "Pyongyang")]) == {
        "north", "korea", "pyongyang"}  # fmt: skip


def test_phrasing_variants() -> None:
    requests = [
        ForgetRequest("The capital of {} is", "France", "Paris", paraphrases=(
            "The capital city of France is", "The French capital is", "{}'s capital is")),  # fmt: skip
        ForgetRequest("Water boils at", "", "100 degrees", paraphrases=("At sea level water boils at",)),
    ]
    variants, owners = phrasing_variants(requests, ("{}", "of {}"))
    assert [v.text for v in variants] == [
        "The capital city of France is", "France's capital is", "France", "of France"]  # fmt: skip
    assert owners == [0, 0, 0, 0]
    assert all(v.subject == "France" and v.target == "Paris" for v in variants)
    assert phrasing_variants(requests, ()) == (variants[:2], [0, 0])


def test_phrasing_and_refine_settings() -> None:
    config = with_settings(CreateConfig(), {"phrasings.weight": 0, "refine.max_passes": 1})
    assert config.phrasings.weight == 0 and config.refine.max_passes == 1
    with pytest.raises(ZupatchError, match="phrasings.weight"):
        PhrasingConfig(weight=-1)
    with pytest.raises(ZupatchError, match="exactly one"):
        PhrasingConfig(derived=("no placeholder",))
    with pytest.raises(ZupatchError, match="max_passes"):
        RefineConfig(max_passes=0)
    paper = CreateConfig.paper()
    assert paper.refine.max_passes == 1 and paper.phrasings.weight == 0 and paper.neighbours.similar == 0


def test_last_token_requests_and_phrasings() -> None:
    """``fact_token = "last"``: the subject stays known (for the subjects to protect),
    the fact token moves to the prompt's end, and every paraphrase counts, with or
    without the subject."""
    request = ForgetRequest("The capital of {} is", "France", "Paris", paraphrases=(
        "The French capital is", "{}'s capital is", "Paris is the capital of France. The capital of France is"))  # fmt: skip
    last = at_last_token(request)
    assert last.subject == "France" and last.text == request.text and last.target == "Paris"
    assert request.fact_char_end() == len("The capital of France") and last.fact_char_end() == len(request.text)
    variants, owners = last_token_phrasings([ForgetRequest("Water boils at", "", "100"), request])
    assert [v.text for v in variants] == ["The French capital is", "France's capital is",
                                          "Paris is the capital of France. The capital of France is"]  # fmt: skip
    assert owners == [1, 1, 1]
    assert [v.subject for v in variants] == ["", "France", "France"]
    assert all(v.fact_char_end() == len(v.text) and v.target == "Paris" for v in variants)


def test_fact_token_setting_and_its_layers() -> None:
    assert CreateConfig().keys_at == "last" and CreateConfig().layers_for(30) == (24, 25, 26)
    assert CreateConfig(method="zerounlearn-gd").keys_at == "subject"  # each method where it was measured
    assert CreateConfig.paper().keys_at == "subject"
    assert CreateConfig(method="zerounlearn-gd", fact_token="last").keys_at == "last"
    config = with_settings(CreateConfig(), {"fact_token": "last"})
    assert config.fact_token == "last"
    assert config.layers_for(30) == (24, 25, 26) and config.layers_for(18) == (14, 15, 16)
    assert replace(config, fact_token="subject").layers_for(30) == (4, 5, 6)
    assert replace(config, method="ga").layers_for(30) == (4, 5, 6)  # the baselines keep their measured layers
    assert replace(config, layers=(7,)).layers_for(30) == (7,)
    with pytest.raises(ZupatchError, match="unknown fact_token 'middle'"):
        CreateConfig(fact_token="middle")  # type: ignore[arg-type]
    with pytest.raises(ZupatchError, match="layer"):
        replace(config, layers=(40,)).layers_for(30)


def test_the_model_finds_the_same_fact_in_other_templates(fact_model) -> None:
    """A request's subject in other templates becomes a phrasing where, and only where,
    the trained model answers it with the request's target (the whole target, greedy);
    the request's own prompt and paraphrases are not repeated."""
    model, tokenizer, facts = fact_model
    capital, language = facts[0], facts[16]  # Zorvia's capital and language
    assert capital.subject == language.subject == "Zorvia"
    # asked in the language template but with the capital as answer: only the capital template gives it
    request = ForgetRequest(language.prompt, "Zorvia", capital.target, paraphrases=("The currency of {}",))
    templates = (capital.prompt, language.prompt, "The currency of {}")
    found, owners = answered_template_phrasings(model, tokenizer, [facts[1], request], templates)
    assert [(v.text, v.target, v.fact_at_end) for v in found] == [(capital.text, capital.target, True)]
    assert owners == [1]
    assert answered_template_phrasings(model, tokenizer, [capital], (capital.prompt,)) == ([], [])
    assert answered_template_phrasings(model, tokenizer, [ForgetRequest("Zorvia is", "", "Plim")], templates) == ([], [])
