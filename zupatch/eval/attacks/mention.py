"""``mention``: is the answer back when the text before the prompt names the subject?

Users seldom ask a fact cold: a conversation about France comes before "The
capital of France is". An edit made for the bare prompt can miss that
context (docs/create.md, "One key per context"). The attack puts a short
sentence that names the record's subject before each forget prompt and each
paraphrase, one sentence at a time (:data:`SENTENCES`), and counts the share
of those prompts whose answer greedy decoding still gives in full, as
``eval`` does without attack.

Only forget records with a subject take part (zsRE questions and prompts
without ``{}`` have none to name); without any, the attack is skipped. The
model is not changed, so specificity and fluency are those of the
unattacked model: the attack reports none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from zupatch.eval.attacks.base import NoParameterSettings, Outcome, Subject, hit_figures
from zupatch.eval.data import Item
from zupatch.eval.metrics import score_answers

#: The sentences put before the prompt, ``{}`` being the subject.
SENTENCES = ("{}. ", "Here is a fact about {}. ", "We talked about {} yesterday. ")


@dataclass(frozen=True)
class MentionSettings(NoParameterSettings):
    """``mention`` takes no parameter."""

    name: ClassVar[str] = "mention"


def mentioned_prompts(subject: Subject) -> dict[str, list[Item]]:
    """The forget prompts and the paraphrases after each naming sentence, with their answers and lines."""
    pairs: dict[str, list[Item]] = {"efficacy": [], "generalization": []}
    data = subject.data
    for request, line in zip(data.requests, data.request_lines or [0] * len(data.requests), strict=True):
        if not request.subject:
            continue
        for sentence in SENTENCES:
            before = sentence.format(request.subject)
            pairs["efficacy"].append(Item(before + request.text, request.target, line=line))
            pairs["generalization"] += [Item(before + text, request.target, line=line)
                                        for text in request.paraphrase_texts()]  # fmt: skip
    return pairs


def run(settings: MentionSettings, subject: Subject, base: Outcome | None) -> Outcome:
    pairs = mentioned_prompts(subject)
    if not pairs["efficacy"]:
        return Outcome(skipped="no forget record names a subject")
    figures: dict[str, Any] = {}
    for section, items in pairs.items():
        scores = score_answers(subject.model, subject.tokenizer, [i.prompt for i in items], [i.answer for i in items],
                               subject.batch_size) if items else []  # fmt: skip
        figures[section] = hit_figures([score.greedy for score in scores], [i.line for i in items])
    details = {"sentences": len(SENTENCES)}
    return Outcome(figures={**figures, "specificity": None, "fluency": None}, details=details)
