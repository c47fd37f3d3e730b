"""``chat``: does the model still give the answer when asked as a chat user?

A chat model is mostly used through its chat template, and the plain-prompt
edit may not reach a question asked there. The attack asks each fact as a
user message through the tokenizer's chat template (with the template's
own default system prompt, if any), lets the model answer greedily, and
counts a hit when the answer contains the target.

- The question: the record's ``question`` field (``{}`` = subject) when
  given, for forget and retain records alike; otherwise derived from the
  prompt: a prompt that ends with "?" is asked as it is, any other is asked
  as ``Complete this sentence: PROMPT``. Paraphrases are asked the derived way.
- A hit: the target appears in the answer as a whole word sequence after
  normalisation (Unicode NFKC, case folded, runs of white space made one
  space), i.e. not inside a longer word ("Rome" is not found in "Romeo").
- ``specificity``: the retain facts (``--retain`` and labelled neighbours)
  asked the same way: ``answered``, and ``kept``, the share the model still
  answers among those the base answers in chat. Without retain facts: None.

Without a chat template (a base model, the test models), or with one that
fails on a lone user message, the attack does not apply: it is reported as
skipped, with the reason, and ``--attack all`` goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from zupatch.engine.stats import model_device, pad_token_id
from zupatch.eval.attacks.base import NoParameterSettings, Outcome, Subject, contains_answer, hit_figures, share
from zupatch.eval.data import Item


@dataclass(frozen=True)
class ChatSettings(NoParameterSettings):
    """``chat`` takes no parameter; ``new_tokens`` is the length of each answer."""

    name: ClassVar[str] = "chat"
    new_tokens: int = 32


def question_for(item: Item) -> str:
    """The record's question if it has one, else the prompt as a question (see the module doc)."""
    if item.question:
        return item.question
    prompt = item.prompt.strip()
    return prompt if prompt.endswith("?") else f"Complete this sentence: {prompt}"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@torch.no_grad()
def chat_replies(
    model: torch.nn.Module, tokenizer: Any, questions: Sequence[str], new_tokens: int, batch_size: int = 16
) -> list[str]:
    """The model's greedy reply to each question, asked alone as one user message.

    Questions of similar length are generated together, ``batch_size`` at a
    time, left-padded (masked, positions counted from each row's first real
    token), and each reply is cut at its first end-of-sequence token: the
    replies one-at-a-time generation gives, about 3x faster on a CPU
    (docs/benchmarks.md, "Does the forgetting hold?").
    """
    from transformers import GenerationConfig

    pad = pad_token_id(tokenizer)
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    encoded = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    device = model_device(model)
    replies = [""] * len(questions)
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start : start + max(1, batch_size)]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device)
        output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
        for row, i in enumerate(rows):
            tokens = output[row, width:].tolist()
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return replies


def _hits(subject: Subject, items: Sequence[Item], settings: ChatSettings) -> list[bool]:
    replies = chat_replies(subject.model, subject.tokenizer, [question_for(i) for i in items], settings.new_tokens,
                           subject.batch_size)  # fmt: skip
    return [contains_answer(reply, item.answer) for reply, item in zip(replies, items)]


def _template_problem(tokenizer: Any) -> str | None:
    """Why the chat template cannot be used (None when a user question renders)."""
    if not has_chat_template(tokenizer):
        return "the tokenizer has no chat template"
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True, tokenize=False)
    except Exception as error:  # noqa: BLE001 - templates raise whatever Jinja or the template author raises
        return f"the chat template fails on a user message ({type(error).__name__})"
    return None


def run(settings: ChatSettings, subject: Subject, base: Outcome | None) -> Outcome:
    problem = _template_problem(subject.tokenizer)
    if problem:
        return Outcome(skipped=problem)
    data = subject.data
    retain = _hits(subject, data.retain, settings)
    known = [i for i, hit in enumerate(base.raw if base else retain) if hit]
    specificity = None
    if retain:
        specificity = {**hit_figures(retain), "kept": share([retain[i] for i in known])}
    figures = {
        "efficacy": hit_figures(_hits(subject, data.forget, settings), [i.line for i in data.forget]),
        "generalization": hit_figures(_hits(subject, data.paraphrases, settings), [i.line for i in data.paraphrases]),
        "specificity": specificity,
        "fluency": None,
    }
    questions = sum(1 for item in data.forget if item.question)
    details = {"new_tokens": settings.new_tokens, "questions_given": questions,
               "questions_derived": len(data.forget) - questions}  # fmt: skip
    return Outcome(figures=figures, details=details, raw=retain)
