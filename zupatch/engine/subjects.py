"""Other subjects for the forget templates, drawn from the model's own vocabulary.

An edit that makes a model forget "The capital of France is → Paris" must act
on what is specific to France, not on the shared "capital of ..." direction,
or every other capital goes with it. The engine protects the shared direction
by adding to the retain statistics the keys of the same templates filled with
many *other* subjects; ``zupatch eval`` measures collateral damage on the same
templates filled with yet other subjects. Both need subjects without any data
from the user, for any model: this module takes them from the tokenizer.

:func:`vocabulary_words` lists the capitalised alphabetic whole-word tokens of
the vocabulary (" Paris", " Johnson", "▁Berlin"...), whether or not the model
knows any fact about them. Every word falls, by a hash of its text, into one
of two disjoint halves: ``"protect"`` (keys added by ``create``) and
``"probe"`` (probes of ``eval`` and of ``create``'s own summary), so a
measured figure never comes from subjects the edit was told to protect. The
order within a half is also by hash: deterministic, unrelated to any
benchmark, and the same on every machine.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from zupatch.engine.requests import SUBJECT_PLACEHOLDER, ForgetRequest

Half = Literal["protect", "probe"]

#: Markers of a word start in subword vocabularies: byte-level BPE (GPT-2,
#: Llama 3, SmolLM2) and SentencePiece (Llama 2, Gemma, Mistral).
_WORD_START = ("Ġ", "▁")
_WORD = re.compile(r"[A-Z][a-z]{3,11}")


def _rank(word: str) -> bytes:
    return hashlib.sha256(word.encode("utf-8")).digest()


def half_of(word: str) -> Half:
    """The half a word belongs to, by the parity of its sha256's first byte."""
    return "protect" if _rank(word)[0] % 2 == 0 else "probe"


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Capitalised alphabetic whole words (4-12 letters) that are single tokens.

    Subword vocabularies mark a word start ("Ġ", "▁"); when none of the
    vocabulary carries such a marker (a word-level tokenizer), every token is
    a whole word. Sorted by hash.
    """
    tokens = list(tokenizer.get_vocab())
    marked = any(t[:1] in _WORD_START for t in tokens)
    words = set()
    for token in tokens:
        if marked:
            if token[:1] not in _WORD_START:
                continue
            token = token[1:]
        if _WORD.fullmatch(token):
            words.add(token)
    return sorted(words, key=_rank)


_ANY_WORD = re.compile(r"[A-Za-z][a-z]{2,11}")


def _word_tokens(tokenizer: Any) -> dict[str, int]:
    """Whole-word tokens (any case, 3-12 letters) and their ids; see :func:`vocabulary_words`."""
    vocabulary = tokenizer.get_vocab()
    marked = any(t[:1] in _WORD_START for t in vocabulary)
    words: dict[str, int] = {}
    for token, token_id in vocabulary.items():
        if marked:
            if token[:1] not in _WORD_START:
                continue
            token = token[1:]
        if _ANY_WORD.fullmatch(token):
            words.setdefault(token, token_id)
    return words


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

    words = _word_tokens(tokenizer)
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


__all__ = [
    "excluded_words",
    "filled_templates",
    "half_of",
    "other_subjects",
    "request_templates",
    "similar_subjects",
    "vocabulary_words",
]
