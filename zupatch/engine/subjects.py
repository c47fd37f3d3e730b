"""Other subjects for the forget templates, and other phrasings of the requests.

An edit that makes a model forget "The capital of France is → Paris" must act
on what is specific to France, not on what all countries share, or every
other capital goes with it. The engine protects the shared part by adding to
the retain statistics the keys of the same templates filled with *similar*
subjects (:func:`similar_requests`: the vocabulary words nearest the subject
in the model's input embeddings: Germany, Spain, Belgium...); ``zupatch
eval`` measures collateral damage on the same templates filled with yet other
subjects. Both take subjects from the tokenizer, for any model, with no data
from the user.

Every whole-word token falls, by a hash of its text, into one of two disjoint
halves: ``"protect"`` (what ``create`` may protect) and ``"probe"`` (what
``eval`` and ``create``'s own summary measure on), so a measured figure never
comes from subjects the edit was told to protect. Orders are by hash too:
deterministic, unrelated to any benchmark, the same on every machine.

:class:`PhrasingConfig` and :func:`phrasing_variants` give the other
phrasings whose subject keys join each request's forget key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zupatch.engine.requests import SUBJECT_PLACEHOLDER, ForgetRequest
from zupatch.errors import ZupatchError

Half = Literal["protect", "probe"]

#: Markers of a word start in subword vocabularies: byte-level BPE (GPT-2,
#: Llama 3, SmolLM2) and SentencePiece (Llama 2, Gemma, Mistral).
_WORD_START = ("Ġ", "▁")
_WORD = re.compile(r"[A-Z][a-z]{3,11}")
_ANY_WORD = re.compile(r"[A-Za-z][a-z]{2,11}")


def _rank(word: str) -> bytes:
    return hashlib.sha256(word.encode("utf-8")).digest()


def half_of(word: str) -> Half:
    """The half a word belongs to, by the parity of its sha256's first byte."""
    return "protect" if _rank(word)[0] % 2 == 0 else "probe"


def _word_tokens(tokenizer: Any, pattern: re.Pattern[str]) -> dict[str, int]:
    """Whole-word tokens matching ``pattern``, by their text, with their ids.

    Subword vocabularies mark a word start ("Ġ", "▁"); when none of the
    vocabulary carries such a marker (a word-level tokenizer), every token is
    a whole word.
    """
    vocabulary = tokenizer.get_vocab()
    marked = any(t[:1] in _WORD_START for t in vocabulary)
    words: dict[str, int] = {}
    for token, token_id in vocabulary.items():
        if marked:
            if token[:1] not in _WORD_START:
                continue
            token = token[1:]
        if pattern.fullmatch(token):
            words.setdefault(token, token_id)
    return words


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Capitalised alphabetic whole words (4-12 letters) that are single tokens, sorted by hash."""
    return sorted(_word_tokens(tokenizer, _WORD), key=_rank)


def similar_subjects(
    model: Any, tokenizer: Any, requests: Sequence[ForgetRequest], count: int, half: Half
) -> list[list[str]]:
    """Per request, the ``count`` vocabulary words of ``half`` closest to its subject.

    Closeness is the cosine of input embeddings, the subject represented by
    its last word's token: "France" gives Germany, Spain, Belgium..., "gold"
    gives silver, copper, platinum. These are the facts an edit is most
    likely to take along, so the engine protects them. Words sharing a word
    (or its first four letters: Japan/Japanese) with any request's subject or
    answer are left out. Requests without a subject get an empty list.
    """
    if count <= 0:
        return [[] for _ in requests]
    import torch

    words = _word_tokens(tokenizer, _ANY_WORD)
    banned = excluded_words(requests)
    stems = {w[:4] for w in banned if len(w) >= 4}
    candidates = [
        w for w in words if half_of(w) == half and w.casefold() not in banned and w.casefold()[:4] not in stems
    ]
    if not candidates:
        return [[] for _ in requests]
    embeddings = model.get_input_embeddings().weight.detach()
    table = torch.nn.functional.normalize(
        embeddings[torch.tensor([words[w] for w in candidates], device=embeddings.device)].float(), dim=1
    )
    chosen = []
    for request in requests:
        last = re.findall(r"\w+", request.subject)
        if not last:
            chosen.append([])
            continue
        token = words.get(last[-1])
        if token is None:
            ids = tokenizer(" " + last[-1], add_special_tokens=False)["input_ids"]
            token = ids[-1] if ids else None
        if token is None:
            chosen.append([])
            continue
        query = torch.nn.functional.normalize(embeddings[token].float(), dim=0)
        top = (table @ query).topk(min(count, len(candidates))).indices.tolist()
        chosen.append([candidates[i] for i in top])
    return chosen


def excluded_words(requests: Iterable[ForgetRequest]) -> set[str]:
    """Casefolded words of the requests' subjects and answers: never used as other subjects."""
    out: set[str] = set()
    for request in requests:
        for text in (request.subject, request.target):
            out.update(w.casefold() for w in re.findall(r"\w+", text))
    return out


def other_subjects(
    tokenizer: Any, requests: Sequence[ForgetRequest], count: int, half: Half
) -> list[str]:
    """Up to ``count`` vocabulary words of ``half``, none sharing a word with a request's
    subject or answer."""
    if count <= 0:
        return []
    banned = excluded_words(requests)
    chosen = []
    for word in vocabulary_words(tokenizer):
        if half_of(word) == half and word.casefold() not in banned:
            chosen.append(word)
            if len(chosen) == count:
                break
    return chosen


def request_templates(requests: Sequence[ForgetRequest], paraphrases: bool = True) -> list[str]:
    """The distinct prompts (and, with ``paraphrases``, paraphrase prompts) that hold ``{}``."""
    templates = []
    for request in requests:
        if not request.subject:
            continue
        candidates = [request.prompt, *(request.paraphrases if paraphrases else ())]
        templates += [t for t in candidates if t.count(SUBJECT_PLACEHOLDER) == 1]
    return list(dict.fromkeys(templates))


def filled_templates(templates: Sequence[str], subjects: Sequence[str]) -> list[ForgetRequest]:
    """Every template filled with every subject, answers unknown."""
    return [ForgetRequest(template, subject, "") for template in templates for subject in subjects]


#: Factual templates of the kinds users most often ask to forget (places, languages,
#: currencies, what a thing is known for), written for ``create``'s protection and chosen on
#: the tuning facts (docs/create.md, "Other templates of the similar subjects").
GENERIC_TEMPLATES = (
    "The capital of {} is",
    "The official language of {} is",
    "The primary language spoken in {} is",
    "The currency of {} is the",
    "{} is located in",
    "The people of {} speak",
    "{} is famous for its",
    "The population of {} is",
)


def template_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    templates: Sequence[str],
    count: int,
    limit: int | None = None,
    skip: Iterable[str] = (),
) -> list[ForgetRequest]:
    """``templates`` filled with the ``count`` protect-half words closest to each request's
    subject (:func:`similar_subjects`): the other facts of the similar subjects, which an
    edit of one relation must not move either. Distinct texts, none in ``skip``; answers
    unknown. At most ``limit`` of them: every request's nearest word first, then every
    request's second..., so a long deletion list protects fewer words per request
    rather than growing without bound."""
    seen = set(skip)
    out: list[ForgetRequest] = []
    nearest = similar_subjects(model, tokenizer, requests, count, "protect")
    for rank in range(count):
        for subjects in nearest:
            for filled in filled_templates(templates, subjects[rank : rank + 1]):
                if limit is not None and len(out) >= limit:
                    return out
                if filled.text not in seen:
                    seen.add(filled.text)
                    out.append(filled)
    return out


def answered_template_phrasings(
    model: Any, tokenizer: Any, requests: Sequence[ForgetRequest], templates: Sequence[str]
) -> tuple[list[ForgetRequest], list[int]]:
    """Each request's subject in ``templates`` where the model's greedy answer is the
    request's whole target, read at the last token, with the index of its request:
    the same fact in other words, found by the model itself ("The people of Italy
    speak" for "The official language of Italy is" → Italian), for requests that
    bring no paraphrases. The request's own prompt and paraphrases are not repeated."""
    from zupatch.engine.precheck import check_targets  # here: precheck imports targets, which imports subjects

    candidates: list[ForgetRequest] = []
    owners: list[int] = []
    for index, request in enumerate(requests):
        if not request.subject or not request.target:
            continue
        own = {request.text, *request.paraphrase_texts()}
        for template in templates:
            candidate = ForgetRequest(template, request.subject, request.target, fact_at_end=True)
            if candidate.text not in own:
                own.add(candidate.text)
                candidates.append(candidate)
                owners.append(index)
    if not candidates:
        return [], []
    given = [check.given for check in check_targets(model, tokenizer, candidates)]
    return [c for c, g in zip(candidates, given) if g], [o for o, g in zip(owners, given) if g]


def similar_requests(
    model: Any, tokenizer: Any, requests: Sequence[ForgetRequest], count: int
) -> list[ForgetRequest]:
    """Each request's templates filled with the ``count`` protect-half words closest to
    its subject (:func:`similar_subjects`): the facts of the same kind that the
    edit must leave alone. Distinct texts only; answers unknown."""
    similar = similar_subjects(model, tokenizer, requests, count, "protect")
    out: dict[str, ForgetRequest] = {}
    for request, subjects in zip(requests, similar):
        for filled in filled_templates(request_templates([request]), subjects):
            out.setdefault(filled.text, filled)
    return list(out.values())


@dataclass(frozen=True)
class PhrasingConfig:
    """Other phrasings of each request whose subject keys join its forget key.

    The key at the subject's last token depends only on the text before it, so
    a phrasing matters through what precedes the subject. Each request's key
    becomes the mean of its own (weight 1) and its variants' keys (``weight``
    each): the request's paraphrases that contain the subject, and the
    ``derived`` phrasings, ``{}`` being the subject, which the engine adds to
    every request with a subject (default: the subject mentioned alone, the
    key that "China's capital is" and "The Mona Lisa is a painting by" share
    with nothing else), so that a fact asked in other words stays forgotten
    when the request brings no paraphrases. With keys at the prompt's last
    token (the default) the variants are the paraphrases as written and, with
    ``templates``, the built-in factual templates (``neighbours.templates``)
    filled with the request's subject wherever the model answers them with
    the request's target (:func:`answered_template_phrasings`).
    ``weight = 0`` uses the bare prompt only. docs/create.md has the
    measured trade-off.
    """

    weight: float = 0.5
    derived: tuple[str, ...] = ("{}",)
    templates: bool = False

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ZupatchError("phrasings.weight must be >= 0")
        bad = [d for d in self.derived if d.count(SUBJECT_PLACEHOLDER) != 1]
        if bad:
            raise ZupatchError(f"each derived phrasing needs exactly one '{{}}': {bad[0]!r}")


def phrasing_variants(
    requests: Sequence[ForgetRequest], derived: Sequence[str]
) -> tuple[list[ForgetRequest], list[int]]:
    """The requests' paraphrases that contain the subject and the ``derived`` phrasings
    of every request with a subject, as requests, with the index of the request
    each belongs to. A paraphrase without the subject has no subject token to
    edit at (its last token is shared with every other subject's phrasing), so
    it is left out."""
    variants, owners = [], []
    for index, request in enumerate(requests):
        if not request.subject:
            continue
        for phrasing in [*request.paraphrases, *derived]:
            if SUBJECT_PLACEHOLDER in phrasing or request.subject in phrasing:
                variants.append(ForgetRequest(phrasing, request.subject, request.target))
                owners.append(index)
    return variants, owners


__all__ = [
    "GENERIC_TEMPLATES",
    "PhrasingConfig",
    "excluded_words",
    "filled_templates",
    "half_of",
    "other_subjects",
    "phrasing_variants",
    "request_templates",
    "similar_requests",
    "similar_subjects",
    "template_requests",
    "vocabulary_words",
]
