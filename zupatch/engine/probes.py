"""Same-pattern probes: collateral damage measured without any retain data.

An edit that makes a model forget "The capital of France is → Paris" by
erasing the shared "capital of ..." direction looks perfect on the forget
prompts; the damage only shows on the *same templates filled with other
subjects*. This module derives such probe prompts from the forget requests
alone, so ``zupatch eval`` (and ``create``'s own summary) can measure
specificity when the user brings no retain data.

The templates are the requests' prompts and paraphrases holding ``{}``; the
other subjects come from two sources:

- the model itself: ``create`` protects the first ``NeighbourConfig().subjects``
  subjects the model lists after "Examples: France," (see
  :func:`~zupatch.engine.targets.propose_neighbour_subjects`); those are never
  probes. The model is then asked to go on ("Examples: France, Germany, Italy,")
  and lists new subjects of the same kind;
- capitalised whole-word tokens of the vocabulary from the ``"probe"`` half
  (:mod:`zupatch.engine.subjects`); ``create``'s vocabulary keys come from
  the other half.

A probe must never be something the edit was told to protect: no subject
shares a word with a request's subject or answer, with a subject ``create``
protects by default, and no subject has a word, in any usual spelling, in the
protect half of the vocabulary (``create`` protects the words of that half
nearest each subject, however many ``neighbours.similar`` asks for: leaving
out the whole half keeps probes apart whatever the setting). No answer is known for a probe, so the figure is whether the
model's top-1 next token is still the base model's (:func:`next_token_ids`,
:func:`top1_unchanged`). Everything is deterministic (greedy decoding, hash
order) and nothing of the requests' text is logged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from zupatch.engine.requests import SUBJECT_PLACEHOLDER, ForgetRequest
from zupatch.engine.stats import model_device, pad_right, pad_token_id, special_prefix_ids
from zupatch.engine.subjects import (
    excluded_words,
    filled_templates,
    half_of,
    other_subjects,
    request_templates,
)
from zupatch.engine.targets import NeighbourConfig, _logits_at, propose_neighbour_subjects
from zupatch.errors import ZupatchError

#: Rounds of "Examples: ..., <listed so far>," after create's own list, and tokens per round:
#: small models end or repeat a list after a handful of items.
_PROPOSAL_ROUNDS = 4
_ROUND_TOKENS = 64


@dataclass(frozen=True)
class ProbeSet:
    """The templates and the other subjects of a set of probes (by source)."""

    templates: tuple[str, ...]
    proposed: tuple[str, ...]  # subjects the model listed, past those create protects
    vocabulary: tuple[str, ...]  # probe-half vocabulary words

    @property
    def subjects(self) -> tuple[str, ...]:
        return self.proposed + self.vocabulary

    @property
    def prompts(self) -> list[str]:
        """Every template filled with every subject (distinct texts, template-major)."""
        return list(dict.fromkeys(r.text for r in filled_templates(self.templates, self.subjects)))


def _words(text: str) -> set[str]:
    return {w.casefold() for w in re.findall(r"\w+", text)}


def _protectable(subject: str) -> bool:
    """Whether ``create`` could protect a subject: one of its words, in any of the
    spellings a vocabulary holds (as is, lower case, capitalised), is in the
    protect half (:func:`~zupatch.engine.subjects.similar_subjects` draws from it)."""
    for word in re.findall(r"\w+", subject):
        if any(half_of(form) == "protect" for form in {word, word.lower(), word.capitalize()}):
            return True
    return False


def derive_probes(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    *,
    proposed: int = 16,
    vocabulary: int = 16,
    skip_proposed: int | None = None,
    protected: Sequence[str] | None = None,
) -> ProbeSet:
    """Templates of ``requests`` and up to ``proposed`` + ``vocabulary`` other subjects for them.

    ``skip_proposed`` (default ``NeighbourConfig().subjects``) is how many
    subjects ``create`` has the model list and protects: that list is made
    exactly as ``create`` makes it, and no probe shares a word with it (nor
    begins with its last item, which the token budget may have cut short).
    Then the model is asked to go on, the subjects listed so far appended to
    the examples, for up to four rounds (small models end or repeat a list
    after a few items). Proposed subjects with a protect-half vocabulary word
    or a word of a request's subject or answer are dropped. ``create`` hands
    its own list as ``protected`` (then ``skip_proposed`` is not used), which
    spares generating it again.
    """
    if proposed < 0 or vocabulary < 0 or (skip_proposed is not None and skip_proposed < 0):
        raise ZupatchError("probe counts must be >= 0")
    templates = tuple(request_templates(requests))
    if not templates or proposed + vocabulary == 0:
        return ProbeSet(templates, (), ())
    default = NeighbourConfig()
    skip = default.subjects if skip_proposed is None else skip_proposed
    banned = excluded_words(requests)
    # create's own list, exactly: never a probe. Its last item may be cut short by the
    # token budget, so a subject it begins is out too.
    if protected is None:
        protected = propose_neighbour_subjects(model, tokenizer, requests, replace(default, subjects=skip)) if skip else []
    protected = list(protected)
    for subject in protected:
        banned |= _words(subject)
    cut = protected[-1].casefold() if protected else None
    known = list(dict.fromkeys([*(r.subject for r in requests if r.subject), *protected]))
    chosen: list[str] = []
    for _ in range(_PROPOSAL_ROUNDS):
        if len(chosen) >= proposed:
            break
        # The model continues "Examples: <forget subjects>, <listed so far>,": only subjects matter.
        listing = [ForgetRequest(SUBJECT_PLACEHOLDER, subject, "") for subject in known]
        wanted = replace(default, subjects=2 * (proposed - len(chosen)), new_tokens=_ROUND_TOKENS)
        seen = {k.casefold() for k in known}
        new = [s for s in propose_neighbour_subjects(model, tokenizer, listing, wanted) if s.casefold() not in seen]
        if not new:
            break
        known += new
        for subject in new:
            if (
                not _words(subject) & banned
                and not _protectable(subject)
                and not (cut and subject.casefold().startswith(cut))
            ):
                chosen.append(subject)
                banned.add(subject.casefold())
    from_vocabulary: list[str] = []
    if vocabulary > 0:
        # about half of the probe half has a spelling in the protect half: ask for enough
        words = other_subjects(tokenizer, requests, 4 * vocabulary + len(banned), "probe")
        from_vocabulary = [w for w in words if w.casefold() not in banned and not _protectable(w)][:vocabulary]
    return ProbeSet(templates, tuple(chosen[:proposed]), tuple(from_vocabulary))


def derive_probe_prompts(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    *,
    proposed: int = 16,
    vocabulary: int = 16,
    skip_proposed: int | None = None,
    protected: Sequence[str] | None = None,
) -> list[str]:
    """Same-pattern probe prompts: the requests' templates filled with other subjects
    (see :func:`derive_probes`); empty when no request has a ``{}`` template."""
    probes = derive_probes(
        model, tokenizer, requests, proposed=proposed, vocabulary=vocabulary, skip_proposed=skip_proposed,
        protected=protected,
    )  # fmt: skip
    return probes.prompts


@torch.no_grad()
def next_token_ids(model: nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = 64) -> list[int]:
    """The greedy (top-1) next token after each prompt.

    Each prompt is encoded as the tokenizer's own prefix (BOS, when it adds
    one) followed by the prompt's tokens; batches are right-padded.
    """
    if batch_size < 1:
        raise ZupatchError("batch size must be at least 1")
    device = model_device(model)
    prefix = special_prefix_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    tokens: list[int] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        rows = [prefix + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in batch]
        if any(not row for row in rows):
            raise ZupatchError("a prompt tokenizes to no tokens")
        ids, mask = pad_right(rows, pad, device)
        # Logits at each row's last token only; the head's final scaling, if any
        # (Gemma's soft cap), is monotonic and leaves the top-1 token as it is.
        last = torch.tensor([len(r) - 1 for r in rows], device=device)
        tokens += _logits_at(model, ids, mask, torch.arange(len(rows), device=device), last).argmax(dim=-1).tolist()
    return tokens


def top1_unchanged(before: Sequence[int], after: Sequence[int]) -> dict[str, Any]:
    """``{"n": prompts, "unchanged": share whose top-1 token is the same}`` (share rounded
    to 4 decimals, None without prompts)."""
    if len(before) != len(after):
        raise ValueError("before and after must hold one token per prompt")
    same = sum(a == b for a, b in zip(before, after))
    return {"n": len(before), "unchanged": round(same / len(before), 4) if before else None}


__all__ = ["ProbeSet", "derive_probe_prompts", "derive_probes", "next_token_ids", "top1_unchanged"]
