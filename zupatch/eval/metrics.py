"""Does the model still know an answer? Teacher-forced scores and perplexity.

One forward pass over ``BOS + prompt + " " + answer`` (BOS only when the
tokenizer adds one; the separator ``create`` uses) scores every answer token:
whether the first one is the model's top-1 continuation, whether greedy
decoding would reproduce the whole answer (every answer token top-1 given the
ones before), the answer's mean token probability and its probability as a
whole (the product). Multi-token answers are scored on all their tokens.
The top-1 next token of unanswered prompts is
:func:`zupatch.engine.probes.next_token_ids`, re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zupatch.engine.placement import model_device
from zupatch.engine.probes import next_token_ids
from zupatch.engine.stats import special_prefix_ids
from zupatch.engine.targets import target_separator

#: The top-1 next token after each prompt, encoded as :func:`score_answers` encodes
#: prompts (one implementation, in the engine, where ``create`` can use it too).
next_tokens = next_token_ids


@dataclass(frozen=True)
class AnswerScore:
    """How a model treats one (prompt, answer) pair."""

    first_token_top1: bool  # the answer's first token is the argmax after the prompt
    greedy: bool  # greedy decoding reproduces every answer token
    mean_probability: float  # mean over answer tokens of p(token | prefix)
    probability: float  # p(whole answer | prompt): the product over answer tokens


def answer_ids(tokenizer: Any, prompt: str, answer: str, prefix: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (after the tokenizer's own ``prefix``, e.g. BOS) and of the answer.

    The answer's tokens are those of ``prompt + separator + answer`` after the
    prompt's tokens, the separator being the space ``create`` puts there too
    (BPE merges across the boundary are handled by tokenising the whole text
    and checking that the prompt's tokens are a prefix).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    separator = target_separator(prompt, answer, tokenizer)
    full_ids = tokenizer(prompt + separator + answer, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        full_ids = prompt_ids + tokenizer(separator + answer, add_special_tokens=False)["input_ids"]
    return list(prefix) + prompt_ids, full_ids[len(prompt_ids) :]


@torch.no_grad()
def score_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> list[AnswerScore]:
    """Score ``answers[i]`` as the continuation of ``prompts[i]``, batched (right padding)."""
    scores: list[AnswerScore] = []
    prefix = special_prefix_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in range(0, len(prompts), batch_size):
        pairs = [answer_ids(tokenizer, p, a, prefix) for p, a in zip(prompts[start : start + batch_size],
                                                              answers[start : start + batch_size])]  # fmt: skip
        ids, mask = _padded_batch([p + a for p, a in pairs], pad)
        logits = model(input_ids=ids.to(model_device(model)), attention_mask=mask.to(model_device(model))).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for i, (p, a) in enumerate(pairs):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(a))  # logits predicting each answer token
            targets = torch.tensor(a)
            predicted = logprobs[i, positions].argmax(dim=-1).cpu()
            hits = predicted == targets
            probs = logprobs[i, positions, targets].exp().cpu()
            joint = float(logprobs[i, positions, targets].double().sum().exp())
            scores.append(AnswerScore(bool(hits[0]), bool(hits.all()), float(probs.mean()), joint))
    return scores


def _padded_batch(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def token_perplexity(model: nn.Module, windows: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token NLL) over token windows (each scored on its own)."""
    total_nll, total_tokens = 0.0, 0
    for window in windows:
        if len(window) < 2:
            continue
        x = torch.tensor([list(window)], device=model_device(model))
        logits = model(input_ids=x).logits.float()
        total_nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        total_tokens += len(window) - 1
    if total_tokens == 0:
        raise ValueError("no text to measure perplexity on")
    return math.exp(total_nll / total_tokens)


def text_windows(tokenizer: Any, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
    """Token ids of each text after the tokens the tokenizer puts before any text (BOS, if
    any: Gemma is lost without it), cut at ``max_length``."""
    prefix = special_prefix_ids(tokenizer)
    room = max(max_length - len(prefix), 1)
    return [
        prefix + list(tokenizer(t, add_special_tokens=False, truncation=True, max_length=room)["input_ids"])
        for t in texts
    ]


def perplexity(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 512) -> float:
    """exp(mean next-token NLL) over the tokens of ``texts`` (each scored on its own)."""
    return token_perplexity(model, text_windows(tokenizer, texts, max_length))
