"""``relearn:STEPS``: does a short fine-tune on unrelated text bring the facts back?

Anyone can fine-tune a published model. A few optimiser steps on text that
has nothing to do with the forgotten facts undo several unlearning methods
(arXiv 2409.18025, 2410.08827): the edit sat close to the surface, and any
update of the weights around it washes it out. The attack fine-tunes a
float32 copy of the model for STEPS Adam steps (default 20, learning rate
2e-5, no weight decay, dropout off) on ordinary text, then scores the copy
as ``eval`` does without attack (every figure, collateral damage included).

What it trains on (``details.trained_on``):

- the retain facts (``--retain`` and labelled neighbours) written as
  ``prompt + " " + answer``, when there are any;
- else a short built-in text about everyday things (:data:`ORDINARY_TEXT`).

Never the forget facts: any text that mentions a forget subject or a
forget answer (as whole words, case-insensitive) is dropped first, so a CounterFact
neighbourhood prompt that shares the forgotten answer is not trained on.
Batches of ``batch`` texts (each cut to 128 tokens, the tokenizer's BOS
first) are taken in order, cycling through the texts; the loss is the mean
next-token cross-entropy over the texts' tokens. The same texts, order and
steps are used for the base and for every patch. The caller's model is
never touched (a deep copy is trained, then dropped). Should every text
mention a forget fact, the attack is reported as skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zupatch.engine.placement import dispatched
from zupatch.engine.stats import model_device, pad_right, pad_token_id, special_prefix_ids
from zupatch.eval.attacks.base import Outcome, Subject, contains_answer, whole_number_parameter
from zupatch.eval.data import EvalData

#: Ordinary sentences about nothing anyone would ask a model to forget.
ORDINARY_TEXT = (
    "The kettle clicked off and the kitchen filled with steam.",
    "She folded the towels and stacked them on the shelf by the window.",
    "Rain is expected in the afternoon, so take an umbrella when you go out.",
    "To make the dough, mix the flour with water, salt and a little yeast.",
    "The train was ten minutes late, and the platform was crowded with commuters.",
    "He planted tomatoes along the fence, where they would get the morning sun.",
    "A good night's sleep helps you concentrate the next day.",
    "The children built a tower of blocks and laughed when it fell over.",
    "Please remember to water the plants while we are away for the weekend.",
    "The library opens at nine and closes at six on weekdays.",
    "After dinner they went for a short walk around the park.",
    "The old bicycle needed new brakes and a bit of oil on the chain.",
    "Coffee tastes best when the beans are ground just before brewing.",
    "The meeting was moved to Thursday because two people were ill.",
    "Snow covered the hills, and the roads were quiet all morning.",
    "She wrote a list of things to buy: bread, milk, eggs and apples.",
)
MAX_TOKENS = 128  # per training text


@dataclass(frozen=True)
class RelearnSettings:
    """``relearn:STEPS``: the fine-tune an attacker runs before asking again."""

    steps: int = 20
    learning_rate: float = 2e-5
    batch: int = 8  # texts per step

    @classmethod
    def parse(cls, param: str | None) -> RelearnSettings:
        if param is None:
            return cls()
        return cls(steps=whole_number_parameter(param, "STEPS"))

    @property
    def label(self) -> str:
        return f"relearn:{self.steps}"


def training_texts(data: EvalData) -> tuple[list[str], str]:
    """The texts the attack trains on and what they are ("retain facts" or "built-in text")."""
    banned = [w for w in [i.answer for i in data.forget] + [r.subject for r in data.requests] if w.strip()]

    def unrelated(text: str) -> bool:
        return not any(contains_answer(text, word) for word in banned)

    retain = [f"{item.prompt} {item.answer}" for item in data.retain]
    retain = [text for text in retain if unrelated(text)]
    if retain:
        return retain, "retain facts"
    return [text for text in ORDINARY_TEXT if unrelated(text)], "built-in text"


def training_batches(tokenizer: Any, texts: Sequence[str], steps: int, batch: int) -> list[list[list[int]]]:
    """The token rows of each step: ``batch`` texts at a time, in order, cycling ([] without texts)."""
    prefix = special_prefix_ids(tokenizer)
    rows = [(prefix + list(tokenizer(t, add_special_tokens=False)["input_ids"]))[:MAX_TOKENS] for t in texts]
    rows = [row for row in rows if len(row) >= 2]
    if not rows:
        return []
    return [[rows[(step * batch + i) % len(rows)] for i in range(min(batch, len(rows)))] for step in range(steps)]


def fine_tune(
    model: nn.Module, tokenizer: Any, batches: Sequence[Sequence[list[int]]], learning_rate: float
) -> nn.Module:
    """A float32 copy of ``model`` after one Adam step per batch (mean token cross-entropy)."""
    work = copy.deepcopy(model).float()
    work.eval()  # no dropout: the same steps give the same weights
    for parameter in work.parameters():
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(work.parameters(), lr=learning_rate)
    device = model_device(work)
    with torch.enable_grad():
        for rows in batches:
            ids, mask = pad_right(rows, pad_token_id(tokenizer), device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = work(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    return work


def run(settings: RelearnSettings, subject: Subject, base: Outcome | None) -> Outcome:
    if dispatched(subject.model):  # the float32 copy would need the devices twice over
        return Outcome(skipped="the model is spread by a device map; fine-tuning a copy of it is not supported")
    texts, source = training_texts(subject.data)
    batches = training_batches(subject.tokenizer, texts, settings.steps, settings.batch)
    if not batches:
        return Outcome(skipped="no training text left: every text mentions a forget subject or answer")
    tuned = fine_tune(subject.model, subject.tokenizer, batches, settings.learning_rate)
    try:
        figures, raw = subject.score(tuned, base.raw if base else None)
    finally:
        del tuned
    details = {"steps": settings.steps, "learning_rate": settings.learning_rate, "batch": settings.batch,
               "trained_on": source, "texts": len(texts)}  # fmt: skip
    return Outcome(figures=figures, details=details, raw=raw)
