"""Before an edit: does the model give the targets it is asked to forget?

First, :func:`check_lengths`: every request must fit the model's context
(``max_position_embeddings``) with the context prefix the edit puts before
it; a longer one is refused, naming the request, before the model is loaded.

A forget request whose target the model does not produce now has nothing to
forget: the edit would spend capacity (and risk collateral damage) on an
answer that is not there, and a later evaluation would report it "forgotten"
for free. Usually the request is wrong (a typo, another model's answer, a
prompt phrased differently from how the model answers).

:func:`check_targets` asks, for every request at once, whether greedy
decoding after the bare prompt reproduces the whole target: teacher-forced,
each target token must be the top-1 token given the prompt and the target
tokens before it. It uses the same encoding as the engine's own target NLL
(:func:`zupatch.engine.targets.target_nll`), so "given" means exactly the
tokens the edit would act on. Messages name requests by a caller's label
(``forget.jsonl:3``) and never include their text unless the label does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zupatch.engine.requests import ForgetRequest
from zupatch.engine.stats import model_device, pad_right, pad_token_id
from zupatch.engine.targets import ContextConfig, _logits_at, _PreparedModel, encode_prompts
from zupatch.errors import ZupatchError

#: How many requests one forward pass holds (bounds memory on long request files).
BATCH_REQUESTS = 64
#: How many requests a one-line error names before "and N more".
LISTED = 8


@dataclass(frozen=True)
class TargetCheck:
    """How the model ranks each token of request ``index``'s target (0-based), teacher-forced.

    ``ranks[j]`` is 1 when token j is the greedy choice after the prompt and
    tokens ``< j`` (ties broken as ``argmax`` breaks them), 12 when 11 tokens
    come before it. ``nll`` is the target's mean token NLL (nats), the same
    figure as :func:`zupatch.engine.targets.target_nll`, from the same logits.
    """

    index: int
    ranks: tuple[int, ...]
    nll: float = float("nan")

    @property
    def given(self) -> bool:
        """Whether greedy decoding reproduces the whole target."""
        return all(rank == 1 for rank in self.ranks)

    def reason(self) -> str:
        """Which target token is not the greedy choice, and its rank (numbers only)."""
        missed = next((j for j, rank in enumerate(self.ranks) if rank != 1), None)
        if missed is None:
            return "every target token is the greedy choice"
        if missed == 0:
            return f"its first target token is ranked {ordinal(self.ranks[0])}"
        return f"token {missed + 1} of its {len(self.ranks)} target tokens is ranked {ordinal(self.ranks[missed])}"


class TargetNotGivenError(ZupatchError):
    """Strict mode: some forget requests ask for targets the model does not give (one line)."""


class TargetNotGivenWarning(UserWarning):
    """A forget request asks for a target the model does not give now (nothing to forget)."""


class TargetStillGivenWarning(UserWarning):
    """The edited model still gives a forget request's target (greedy, whole answer)."""


class TargetStillGivenError(ZupatchError):
    """Strict mode: the edited model still gives some forget requests' targets (one line)."""


#: Where a still-given message sends the reader.
STILL_GIVEN_DOC = "docs/create.md, 'Still given after the edit'"


def still_given_message(name: str) -> str:
    """One line naming the request (never its text): the edit did not remove its answer."""
    return f"{name}: the patched model still gives this target ({STILL_GIVEN_DOC})"


def still_given_error(indices: Sequence[int], names: Sequence[str] | None = None) -> TargetStillGivenError | None:
    """Strict mode's one-line error for requests (0-based) whose target the edited model
    still gives, naming the first; None when there are none."""
    if not indices:
        return None
    more = f" (and {len(indices) - 1} more)" if len(indices) > 1 else ""
    return TargetStillGivenError(
        f"{request_label(indices[0], names)}: the patched model still gives this target{more}; "
        f"strict: no patch made ({STILL_GIVEN_DOC})"
    )


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: Config fields holding a model's context length (positions it was trained on), in the order tried.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(config: Any) -> tuple[int, str] | None:
    """The model's context length and the config field it comes from, or None when the config states none."""
    if config is None:
        return None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def prefix_budget(tokenizer: Any, contexts: ContextConfig) -> int:
    """At most how many tokens of context prefix the edit puts before a prompt (0 without prefixes).

    A prefix is a start word, ``prefix_tokens`` generated tokens and ". ";
    two tokens of slack cover the text being tokenized again.
    """
    if not contexts.starts:
        return 0
    starts = tokenizer(list(contexts.starts), add_special_tokens=False)["input_ids"]
    return max(len(ids) for ids in starts) + contexts.prefix_tokens + 2


def check_lengths(
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    context: tuple[int, str] | None,
    *,
    prefix_tokens: int = 0,
    neutral_target: str | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Refuse a request that does not fit the model's context, naming it and the lengths (one line).

    What the edit reads for a request is a context prefix (up to
    ``prefix_tokens``), the prompt (or a paraphrase, or a neighbour prompt)
    and the target (the answer, or the neutral target when longer). Past the
    context the model runs on positions it never saw: slow, and the edit would
    be computed on meaningless activations. Only tokenizes; call it before
    loading the model. ``context`` is :func:`context_length`'s answer (None:
    nothing to check).
    """
    if context is None or not requests:
        return
    with _quiet_length_warning():  # transformers' "longer than the maximum" would be a second line
        _check_lengths(tokenizer, requests, context, prefix_tokens, neutral_target, names)


@contextmanager
def _quiet_length_warning() -> Iterator[None]:
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_lengths(
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    context: tuple[int, str],
    prefix_tokens: int,
    neutral_target: str | None,
    names: Sequence[str] | None,
) -> None:
    limit, field = context
    neutral = len(tokenizer(neutral_target, add_special_tokens=False)["input_ids"]) if neutral_target else 1
    texts, ends, targets, owners = [], [], [], []
    for i, r in enumerate(requests):
        variants = [("prompt", r.text, r.fact_char_end(), r.target)]
        variants += [(f"paraphrase {j + 1}", text, len(text), r.target) for j, text in enumerate(r.paraphrase_texts())]
        variants += [(f"neighbour {j + 1}", text, len(text), None) for j, text in enumerate(r.neighbours)]
        for what, text, end, target in variants:
            texts.append(text)
            ends.append(end)
            targets.append(target or None)
            owners.append((i, what))
    for (i, what), target, encoded in zip(owners, targets, encode_prompts(tokenizer, texts, ends, targets)):
        answer = max(len(encoded.target_ids), neutral) - 1 if target else 0  # its last token is never read
        needed = prefix_tokens + len(encoded.prompt_ids) + answer
        if needed > limit:
            tokens = len(encoded.prompt_ids) + len(encoded.target_ids)
            both = f"{what} and target are" if encoded.target_ids else f"{what} is"
            prefix = f" with the context prefix the edit adds (up to {prefix_tokens} tokens)" if prefix_tokens else ""
            raise ZupatchError(
                f"{both} {tokens} tokens; the model would read {needed}{prefix}, more than its context of "
                f"{limit} tokens ({field}): shorten it",
                request_label(i, names),
            )


@torch.no_grad()
def check_targets(model: nn.Module, tokenizer: Any, requests: Sequence[ForgetRequest]) -> list[TargetCheck]:
    """One :class:`TargetCheck` per request: the rank of each target token after the bare prompt.

    The model is used as it is (device, dtype, weights) and left unchanged.
    """
    checks: list[TargetCheck] = []
    with _PreparedModel(model):
        for start in range(0, len(requests), BATCH_REQUESTS):
            batch = requests[start : start + BATCH_REQUESTS]
            checks += [
                TargetCheck(start + i, ranks, nll)
                for i, (ranks, nll) in enumerate(_target_ranks(model, tokenizer, batch))
            ]
    return checks


def _target_ranks(
    model: nn.Module, tokenizer: Any, requests: Sequence[ForgetRequest]
) -> list[tuple[tuple[int, ...], float]]:
    """Teacher-forced rank of every target token and the mean token NLL, per request."""
    device = model_device(model)
    encoded = encode_prompts(
        tokenizer, [r.text for r in requests], [r.fact_char_end() for r in requests], [r.target for r in requests]
    )
    ids, mask = pad_right([e.input_ids for e in encoded], pad_token_id(tokenizer), device)
    rows = torch.tensor([row for row, e in enumerate(encoded) for _ in e.target_ids], device=device)
    positions = torch.tensor([p for e in encoded for p in e.target_positions], device=device)
    targets = torch.tensor([t for e in encoded for t in e.target_ids], device=device)
    logits = _logits_at(model, ids, mask, rows, positions)
    own = logits.gather(1, targets[:, None])
    before = torch.arange(logits.shape[1], device=device)[None, :] < targets[:, None]
    ranks = 1 + (logits > own).sum(dim=1) + ((logits == own) & before).sum(dim=1)  # argmax keeps the first maximum
    token_nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    result, start = [], 0
    flat = ranks.tolist()
    for e in encoded:
        end = start + len(e.target_ids)
        result.append((tuple(int(r) for r in flat[start:end]), float(token_nll[start:end].mean())))
        start = end
    return result


def request_label(index: int, names: Sequence[str] | None) -> str:
    """How messages name request ``index`` (0-based): the caller's name, else "request N"."""
    return names[index] if names is not None else f"request {index + 1}"


def not_given_message(check: TargetCheck, label: str) -> str:
    """The one-line warning for a request whose target the model does not give."""
    return f"{label}: the model does not give this target now (nothing to forget); {check.reason()}"


def strict_error(checks: Sequence[TargetCheck], names: Sequence[str] | None = None) -> TargetNotGivenError | None:
    """The one-line error for strict mode, or None when every target is given."""
    missing = [c for c in checks if not c.given]
    if not missing:
        return None
    if len(missing) == 1:
        only = missing[0]
        message = not_given_message(only, request_label(only.index, names))
        return TargetNotGivenError(f"{message}; strict: no patch made")
    listed = "; ".join(f"{request_label(c.index, names)} ({c.reason()})" for c in missing[:LISTED])
    more = f"; and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
    return TargetNotGivenError(
        f"the model does not give {len(missing)} of the {len(checks)} targets now (nothing to forget): "
        f"{listed}{more}; strict: no patch made"
    )
