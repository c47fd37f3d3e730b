"""``topk:K``: is the forgotten answer still among the model's top-K candidates?

``eval`` counts a fact as forgotten when greedy decoding no longer produces
the answer. Sampling at a temperature, or an attacker who reads the top few
candidates (Patil et al., arXiv 2309.17410), still gets it if it is the
second or fifth most likely token. This attack counts, on the forget prompts
and on the paraphrases, the share whose answer's first token (tokenised as
every other figure of the report) is among the K most likely next tokens:
fewer than K tokens have a strictly higher logit. Default K = 5.

The model is not changed, so specificity and fluency are those of the
unattacked model: the attack reports none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zupatch.eval.attacks.base import (
    Outcome,
    Subject,
    first_answer_tokens,
    hit_figures,
    last_position_batches,
    whole_number_parameter,
)
from zupatch.eval.data import Item


@dataclass(frozen=True)
class TopKSettings:
    """``topk:K``: how many candidates the attacker reads."""

    k: int = 5

    @classmethod
    def parse(cls, param: str | None) -> TopKSettings:
        if param is None:
            return cls()
        return cls(whole_number_parameter(param, "K"))

    @property
    def label(self) -> str:
        return f"topk:{self.k}"


def answer_ranks(subject: Subject, items: Sequence[Item]) -> list[int]:
    """For each item, how many tokens have a strictly higher next-token logit than the answer's first token."""
    if not items:
        return []
    pairs = first_answer_tokens(subject.tokenizer, [i.prompt for i in items], [i.answer for i in items])
    targets = [token for _, token in pairs]
    rows = [ids for ids, _ in pairs]
    offset = 0

    def ranks(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> list[int]:
        nonlocal offset
        logits = subject.model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits[torch.arange(len(last), device=logits.device), last]
        wanted = torch.tensor(targets[offset : offset + len(last)], device=logits.device)
        offset += len(last)
        target_logits = logits.gather(1, wanted[:, None])
        return (logits > target_logits).sum(dim=1).tolist()

    return last_position_batches(subject.model, subject.tokenizer, rows, subject.batch_size, ranks)


def run(settings: TopKSettings, subject: Subject, base: Outcome | None) -> Outcome:
    figures: dict[str, Any] = {}
    for section, items in (("efficacy", subject.data.forget), ("generalization", subject.data.paraphrases)):
        figures[section] = hit_figures([rank < settings.k for rank in answer_ranks(subject, items)],
                                       [i.line for i in items])  # fmt: skip
    return Outcome(figures={**figures, "specificity": None, "fluency": None}, details={"k": settings.k})
