"""What every attack gets and gives back, and the helpers several attacks share.

An attack is one function, ``run(settings, subject, base) -> Outcome``:

- ``settings`` is the attack's frozen settings dataclass (parsed from
  ``NAME[:PARAM]`` by :mod:`zupatch.eval.attacks`);
- ``subject`` is one model variant (the base, or the base with one patch
  applied in memory) with the evaluation data and a ``score`` function that
  measures a model the way ``zupatch eval`` does without attack;
- ``base`` is the outcome of the same attack on the base model (None when the
  subject *is* the base), so that a patched variant can be compared with the
  base under the same attack ("kept", "unchanged").

The attack must leave ``subject.model`` as it found it: it works on a copy,
or restores what it changed before returning.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from zupatch.eval.data import EvalData
from zupatch.eval.metrics import answer_ids
from zupatch.engine.stats import model_device, pad_right, pad_token_id, special_prefix_ids
from zupatch.errors import ZupatchError

#: ``score(model, base_raw) -> (figures, raw)``: efficacy, generalization,
#: specificity and fluency of ``model`` as ``zupatch eval`` measures them
#: without attack ("kept" and "unchanged" relative to ``base_raw``, the raw
#: scores of the base under the same attack; itself when None), and the raw
#: per-item scores to hand back as ``base_raw`` for the patched variants.
ScoreFn = Callable[[nn.Module, Any], tuple[dict[str, Any], Any]]


@dataclass(frozen=True)
class Subject:
    """One model variant to attack, and what to score it on."""

    model: nn.Module
    tokenizer: Any
    data: EvalData
    batch_size: int
    first_edited_layer: int  # the lowest layer any evaluated patch edits (0 without patches)
    score: ScoreFn


@dataclass
class Outcome:
    """An attack's result on one model variant.

    ``figures`` holds the report's sections: ``efficacy`` and
    ``generalization`` (``n`` and ``answered``: the share of forget prompts /
    paraphrases whose answer the attack extracts, plus more where the attack
    has them), ``specificity`` and ``fluency`` (None where the attack does
    not change the model or has nothing to say about other facts).
    ``details`` describes what was done (same for every variant unless the
    attack says otherwise); ``raw`` is kept in memory for the comparisons of
    the patched variants with the base and never reported.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    raw: Any = None
    skipped: str | None = None  # why the attack does not apply to this model (figures then empty)


def whole_number_parameter(param: str, name: str) -> int:
    """An attack's ``NAME:N`` parameter as a whole number >= 1, or a one-line error naming it."""
    try:
        value = int(param)
    except ValueError:
        raise ZupatchError(f"{name} must be a whole number >= 1") from None
    if value < 1:
        raise ZupatchError(f"{name} must be a whole number >= 1")
    return value


_Settings = TypeVar("_Settings", bound="NoParameterSettings")


@dataclass(frozen=True)
class NoParameterSettings:
    """Settings of an attack that takes no parameter (``name`` is the attack's):
    ``NAME`` parses to the defaults, ``NAME:PARAM`` is a one-line error."""

    name: ClassVar[str]

    @classmethod
    def parse(cls: type[_Settings], param: str | None) -> _Settings:
        if param is not None:
            raise ZupatchError(f"{cls.name} takes no parameter")
        return cls()

    @property
    def label(self) -> str:
        return self.name


def share(flags: Sequence[bool]) -> float | None:
    """The share of true flags, rounded as the report rounds shares (None when empty)."""
    return round(sum(flags) / len(flags), 4) if flags else None


def hit_figures(flags: Sequence[bool], lines: Sequence[int] | None = None) -> dict[str, Any]:
    """``{"n", "answered"}``: how many prompts, and the share the attack extracts; with
    ``lines`` (each prompt's line in the evaluation file) also ``answered_lines``."""
    figures: dict[str, Any] = {"n": len(flags), "answered": share(flags)}
    if lines is not None:
        figures["answered_lines"] = answered_lines(flags, lines)
    return figures


def answered_lines(flags: Sequence[bool], lines: Sequence[int]) -> list[int]:
    """The evaluation file's lines (ascending, each once) with a prompt whose flag is set."""
    return sorted({line for flag, line in zip(flags, lines, strict=True) if flag and line})


def normalise(text: str) -> str:
    """NFKC, case folded, white space runs made one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def contains_answer(text: str, phrase: str) -> bool:
    """Whether ``phrase`` appears in ``text`` as whole words, after :func:`normalise`
    ("Rome" is not in "Romeo", "Au" is not in "because")."""
    wanted = normalise(phrase)
    if not wanted:
        return False
    return re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", normalise(text)) is not None


def first_answer_tokens(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], int]]:
    """(prompt ids with the tokenizer's prefix, the answer's first token) for each pair.

    Tokenised exactly as :func:`zupatch.eval.metrics.score_answers` does, so
    "first token" means the same thing in every figure of the report.
    """
    prefix = special_prefix_ids(tokenizer)
    pairs = []
    for prompt, answer in zip(prompts, answers):
        prompt_ids, answer_tokens = answer_ids(tokenizer, prompt, answer, prefix)
        pairs.append((prompt_ids, answer_tokens[0]))
    return pairs


@torch.no_grad()
def last_position_batches(
    model: nn.Module, tokenizer: Any, rows: Sequence[list[int]], batch_size: int, run: Callable[..., Any]
) -> list[Any]:
    """Run ``run(ids, mask, last)`` on right-padded batches of ``rows``; ``last`` = each row's last index."""
    device = model_device(model)
    results = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = pad_right(batch, pad_token_id(tokenizer), device)
        last = torch.tensor([len(r) - 1 for r in batch], device=device)
        results.extend(run(ids, mask, last))
    return results
