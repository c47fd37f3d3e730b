"""Forget keys and target representations (the ROME "v*" recipe), batched.

For each forget request i the edit needs, at its *fact token* (the subject's
last token, or the prompt's last token without a subject):

* ``K_f[:, i]`` - the down-proj input at layer l, averaged over context
  prefixes (the bare prompt plus a few short generated prefixes), so the edit
  fires whatever text precedes the prompt (:func:`fact_activations`);
* ``O[:, i]`` - a down-proj output at layer l that makes the model produce the
  true answer ``a_i`` (:func:`optimise_representations`, site ``"down_proj"``);
* ``Z[:, i]`` - an output of the last edited block L that makes the model emit
  the neutral target t instead (same function, site ``"block"``);
* ``H_L[:, i]`` - the current block-L output there (:func:`fact_activations`).

Optimisation: a vector ``delta_i`` is added to the site's output at the fact
token of every row (prompt in every context) of request i, and minimised:
mean target-token NLL + KL of "{subject} is a" against the unedited model +
weight decay ‖δ‖²/‖init‖², with Adam, ‖δ_i‖ clamped to a fraction of
‖init_i‖. All requests and contexts run in one batch (one forward/backward
per step); the per-request losses are summed, and Adam is done by hand per
request, so each δ_i follows exactly the path it would alone and stops on its
own once its NLL is below ``converged_nll``. Step size is relative to the RMS
of the initial vector by default (docs/create.md: block outputs have norms of
hundreds, where lr 0.1 in absolute units does not converge in 25 steps).

Token positions come from the tokenizer's character offsets on the full text
(right padding, no re-tokenising of pieces), which is right for byte-level
BPE and SentencePiece alike. Targets are tokenized *with* the prompt, so a
multi-token target is split as the model sees it; BOS appears only at the
start; the loss covers every target token.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from zupatch.engine.architectures import (
    ArchitectureSpec,
    decoder_layers,
    down_proj_bias,
    down_proj_module,
)
from zupatch.engine.hooks import FrozenStarts, LayerInputCache, by_width, edit_output
from zupatch.engine.requests import SUBJECT_PLACEHOLDER, ForgetRequest
from zupatch.engine.stats import (
    ProgressCallback,
    document_start_ids,
    model_device,
    pad_right,
    pad_token_id,
    special_prefix_ids,
)
from zupatch.engine.subjects import GENERIC_TEMPLATES
from zupatch.errors import ZupatchError

Site = Literal["down_proj", "block"]


@dataclass(frozen=True)
class ContextConfig:
    """Context prefixes put before each prompt: bare prompt + one per start word.

    Each start word is continued greedily by the model (deterministic, batched)
    for ``prefix_tokens`` tokens, then joined to the prompt with ". ".

    ``separate_keys``: each context's forget key is its own column of the
    closed form, all asked for the same change, instead of one key per request
    averaged over the contexts (the change then reaches every context, not
    only their mean). The closed form only: ZeroUnlearn-GD keeps averaged keys
    (with one column per context it kept 19 of 28 other facts of the tiny fact
    model instead of 28).
    """

    starts: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    prefix_tokens: int = 10
    separate_keys: bool = False


@dataclass(frozen=True)
class OptimisationConfig:
    """The v* optimisation. ``lr`` is relative to the RMS of the initial vector
    when ``relative_lr`` (a step of ``lr·‖init‖`` at most per step), absolute
    otherwise (the paper). Stops per request once NLL < ``converged_nll``.

    ``patience``: a request whose NLL has not fallen by 10% within that many
    steps gets its weight decay multiplied by ``decay_fade`` (0 disables).
    With a constant decay the optimum of NLL + decay can lie above
    ``converged_nll``; whether Adam's oscillation then dips below the
    threshold depends on float summation order, i.e. on the machine.

    ``warm_start``: when every request asks for the same target (the neutral
    target) and there are more than this many, the first ``warm_start`` are
    optimised from zero and every later one starts from their mean change,
    relative to each vector's norm (0 disables). The vectors asked for the
    same token move in a shared direction (docs/create.md), so the later
    requests need fewer steps; fewer requests than that are not affected.
    """

    max_steps: int = 150
    lr: float = 0.1
    relative_lr: bool = True
    clamp_norm_factor: float = 0.75
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    converged_nll: float = 0.05
    patience: int = 3
    decay_fade: float = 0.5
    max_batch_rows: int = 256  # rows per forward; larger batches are split (same result)
    warm_start: int = 32

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.lr <= 0 or self.clamp_norm_factor <= 0 or self.max_batch_rows < 1:
            raise ZupatchError("invalid optimisation settings: steps >= 0, lr > 0, clamp > 0 required")
        if self.warm_start < 0:
            raise ZupatchError("invalid optimisation settings: warm_start >= 0 required")
        if self.patience < 0 or not 0 <= self.decay_fade <= 1:
            raise ZupatchError("invalid optimisation settings: patience >= 0 and 0 <= decay_fade <= 1 required")


#: The paper's settings (ROME defaults): 25 steps, absolute lr 0.1, constant weight decay.
PAPER_OPTIMISATION = OptimisationConfig(max_steps=25, lr=0.1, relative_lr=False, patience=0, warm_start=0)

#: The original representations O as the model computes them now (no steps): create
#: checks that the model gives the answers, and O enters ZeroUnlearn-GD only through
#: its span, weighted 1 against the fit's α = 100. Measured (docs/create.md, "Every
#: setting"): the same eval figures as 150 steps, for a fraction of the time.
CURRENT_OUTPUTS = OptimisationConfig(max_steps=0)


@dataclass
class RepresentationResult:
    """Optimised vectors (d×n, float32) and how the optimisation went, per request."""

    vectors: torch.Tensor
    initial: torch.Tensor
    initial_nll: list[float]
    final_nll: list[float]
    final_loss: list[float]
    steps: list[int]
    converged: list[bool]

    def summary(self) -> dict[str, Any]:
        """Diagnostics as plain numbers (no request text)."""
        return {
            "initial_nll": [round(x, 4) for x in self.initial_nll],
            "final_nll": [round(x, 4) for x in self.final_nll],
            "final_loss": [round(x, 4) for x in self.final_loss],
            "steps": list(self.steps),
            "converged": list(self.converged),
            "relative_change": [
                round(float(d), 4)
                for d in (self.vectors - self.initial).norm(dim=0) / self.initial.norm(dim=0).clamp_min(1e-12)
            ],
        }


@dataclass
class FactActivations:
    """Keys (f×n averaged over contexts, or f×n×contexts) and block outputs (d×n, bare prompt), float64
    unless asked otherwise.

    ``more_keys``: layer -> the keys read at that layer in the same forwards (f×n)."""

    keys: torch.Tensor
    block_outputs: torch.Tensor | None
    more_keys: dict[int, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- tokens


@dataclass
class EncodedPrompt:
    """A prompt as token ids (BOS included), its fact token, and target ids."""

    prompt_ids: list[int]
    fact_index: int
    target_ids: list[int] = field(default_factory=list)

    @property
    def input_ids(self) -> list[int]:
        """What the model reads: the prompt and all target tokens but the last."""
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def target_positions(self) -> list[int]:
        """Positions whose next-token logits should predict ``target_ids``."""
        start = len(self.prompt_ids) - 1
        return list(range(start, start + len(self.target_ids)))


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ZupatchError("zupatch needs a fast tokenizer (tokenizer.json) to locate subject tokens")


def target_separator(prompt: str, target: str, tokenizer: Any) -> str:
    """ " " between prompt and target unless either side already has the space or
    the target is a special token such as EOS."""
    if not target or target[0].isspace() or (prompt and prompt[-1].isspace()):
        return ""
    if target in set(getattr(tokenizer, "all_special_tokens", ())):
        return ""
    return " "


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    fact_char_ends: Sequence[int],
    targets: Sequence[str | None] | None = None,
) -> list[EncodedPrompt]:
    """Tokenize prompts (with optional targets) and locate each fact token.

    The fact token is the last token starting before ``fact_char_end``, i.e.
    the one holding the subject's last character. With a target, text and
    target are tokenized together; tokens ending within the prompt are the
    prompt, the rest the target.
    """
    _require_fast(tokenizer)
    targets = list(targets) if targets is not None else [None] * len(texts)
    prefix = special_prefix_ids(tokenizer)
    joined = [text + (target_separator(text, t, tokenizer) + t if t else "") for text, t in zip(texts, targets)]
    encoded = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
    prompts = []
    for text, fact_end, target, ids, offsets in zip(
        texts, fact_char_ends, targets, encoded["input_ids"], encoded["offset_mapping"]
    ):
        prompt_count = 0
        while prompt_count < len(offsets) and offsets[prompt_count][1] <= len(text):
            prompt_count += 1
        fact_index = sum(1 for start, _ in offsets[:prompt_count] if start < fact_end) - 1
        if fact_index < 0:
            raise ZupatchError("cannot locate the fact token: the prompt tokenizes to nothing")
        target_ids = list(ids[prompt_count:])
        if target and not target_ids:
            raise ZupatchError("a target tokenizes to no tokens")
        prompts.append(EncodedPrompt(prefix + list(ids[:prompt_count]), len(prefix) + fact_index, target_ids))
    return prompts


# --------------------------------------------------------------------------- model plumbing


def _logits_at(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """float32 next-token logits at (rows, positions) only, without the full B×T×V tensor."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[rows, positions]).float()


class _PreparedModel:
    """eval mode and frozen parameters for the duration of a ``with`` block."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.requires_grad = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for parameter, flag in zip(self.model.parameters(), self.requires_grad):
            parameter.requires_grad_(flag)
        self.model.train(self.training)


# --------------------------------------------------------------------------- contexts


def generate_context_prefixes(model: nn.Module, tokenizer: Any, config: ContextConfig = ContextConfig()) -> list[str]:
    """``[""]`` (bare prompt) plus one greedy continuation per start word, each ending in ". "."""
    if not config.starts:
        return [""]
    prefixes = [""]
    continuations = greedy_continuations(model, tokenizer, list(config.starts), config.prefix_tokens, batched=True)
    for start, continuation in zip(config.starts, continuations):
        text = " ".join((start + continuation).replace("{", " ").replace("}", " ").split())
        prefixes.append(f"{text}. ")
    return prefixes


def _contextual(request: ForgetRequest, prefix: str) -> tuple[str, int]:
    return prefix + request.text, len(prefix) + request.fact_char_end()


# --------------------------------------------------------------------------- neighbours


@dataclass(frozen=True)
class NeighbourConfig:
    """Other subjects whose keys protect facts that share a forget prompt's pattern.

    ``subjects``: how many the model lists itself after "Examples: <forget
    subjects>," (:func:`propose_neighbour_subjects`), 0 disables.
    ``similar``: per request, how many vocabulary words closest to its subject
    (input-embedding cosine, the protect half of the vocabulary:
    :func:`zupatch.engine.subjects.similar_subjects`) fill its templates;
    "France" brings Belgium, Portugal, Greece..., so the edit has to act on
    what is specific to France rather than on what all countries share.
    ``similar_contexts``: how many of the context prefixes (the bare prompt
    first) their keys are averaged over, like the forget keys; None: all of
    them. Each one fewer runs every similar prompt once less (2 of 6 took a
    third of the time and kept as many tuning facts, but 5 points fewer
    held-out facts: docs/create.md).
    ``templates``: other factual templates (default: a built-in set, places,
    languages, currencies...), each filled with the ``template_subjects``
    words closest to each request's subject, bare prompts only, their keys
    counting ``template_weight`` times a forget key's (keys at the prompt's
    last token only): forgetting Italy's official language leaves the
    language spoken in Spain, and Spain's capital, where they were. At most
    ``template_rows`` prompts (every request's nearest word first), so a long
    deletion list costs bounded time and memory.
    """

    subjects: int = 8
    new_tokens: int = 48
    similar: int = 64
    similar_contexts: int | None = None
    templates: tuple[str, ...] = GENERIC_TEMPLATES
    template_subjects: int = 16
    template_weight: float = 0.25
    template_rows: int = 2048

    def __post_init__(self) -> None:
        count = self.similar_contexts
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ZupatchError("neighbours.similar_contexts must be a whole number >= 1 (1: bare prompts only)")
        if min(self.template_subjects, self.template_weight, self.template_rows) < 0:
            raise ZupatchError("neighbours.template_subjects, template_weight and template_rows must be >= 0")
        bad = [t for t in self.templates if t.count(SUBJECT_PLACEHOLDER) != 1]
        if bad:
            raise ZupatchError(f"each neighbours.templates entry needs exactly one '{{}}': {bad[0]!r}")


def greedy_continuations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    new_tokens: int,
    stop_at: Sequence[str] = (),
    stop_when: Callable[[str], bool] | None = None,
    batched: bool = False,
) -> list[str]:
    """Greedy continuations (text only) of ``texts``, each as a fresh document.

    For a few short prompts (context prefixes, neighbour lists): each runs on
    its own through ``generate`` (KV cache, no padding to get right). With
    ``stop_at``, a continuation ends at the first token after which its text
    holds one of those strings (what comes before it is the same as without);
    with ``stop_when``, at the first token after which ``stop_when(text)`` is true.
    ``batched``: all texts in one left-padded ``generate`` call instead, about
    as fast as one text on a CPU (each step reads the weights once), and the
    same tokens up to float rounding; no stop strings then.
    """
    if batched:
        if stop_at or stop_when:
            raise ValueError("batched continuations take no stop condition")
        return _batched_continuations(model, tokenizer, texts, new_tokens)
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            text = tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
            done = any(stop in text for stop in stop_at) or (stop_when is not None and stop_when(text))
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    device = model_device(model)
    prefix = document_start_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    continuations = []
    with _PreparedModel(model), torch.no_grad():
        for text in texts:
            prompt = prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([prompt], device=device)
            stopping = StoppingCriteriaList([StopAfter(len(prompt))] if stop_at or stop_when else [])
            output = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation,
                stopping_criteria=stopping,
            )  # fmt: skip
            continuations.append(_new_text(tokenizer, output[0].tolist(), len(prefix), len(prompt)))
    return continuations


def _batched_continuations(model: nn.Module, tokenizer: Any, texts: Sequence[str], new_tokens: int) -> list[str]:
    """:func:`greedy_continuations` of all ``texts`` in one left-padded ``generate`` call."""
    from transformers import GenerationConfig

    if not texts:
        return []
    device = model_device(model)
    prefix = document_start_ids(tokenizer)
    pad_id = pad_token_id(tokenizer)
    prompts = [prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
    )
    with _PreparedModel(model), torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    continuations = []
    for row, prompt in enumerate(prompts):
        new = output[row, width:].tolist()
        if tokenizer.eos_token_id in new:  # what follows a finished row is padding
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        continuations.append(_new_text(tokenizer, prompt + new, len(prefix), len(prompt)))
    return continuations


def _new_text(tokenizer: Any, sequence: list[int], prefix: int, prompt: int) -> str:
    """The text of ``sequence[prompt:]``, the generated part of a sequence whose first
    ``prefix`` tokens are the document start and the rest up to ``prompt`` the prompt.
    Decoded whole and cut, so SentencePiece keeps the space before the first new word."""
    prompt_text = tokenizer.decode(sequence[prefix:prompt], skip_special_tokens=True)
    return tokenizer.decode(sequence[prefix:], skip_special_tokens=True)[len(prompt_text) :]


#: Where a listed-subjects continuation ends: the first line break, or sentence end.
_LIST_ENDS = ("\n", ". ")


def propose_neighbour_subjects(
    model: nn.Module, tokenizer: Any, requests: Sequence[ForgetRequest], config: NeighbourConfig = NeighbourConfig()
) -> list[str]:
    """Other subjects of the same kind as the forget subjects, as the model lists them.

    The model continues ``"Examples: <subjects>,"``; the list is read up to the
    first line break or sentence end; items of more than four words, with
    digits, or equal to a forget subject are dropped.
    """
    subjects = list(dict.fromkeys(r.subject for r in requests if r.subject))
    if not subjects or config.subjects <= 0:
        return []
    prompt = "Examples: " + ", ".join(subjects) + ","

    def enough(text: str) -> bool:
        """The list cannot change any more: ``config.subjects`` items are complete, or
        the model repeats itself (the last few complete items were all listed before)."""
        items, repeats = _listed_subjects(text, subjects, config.subjects, complete_only=True)
        return len(items) == config.subjects or repeats >= _LIST_REPEATS

    # Only the first line's first sentence is read: generating past it would be wasted.
    (continuation,) = greedy_continuations(
        model, tokenizer, [prompt], config.new_tokens, stop_at=_LIST_ENDS, stop_when=enough
    )
    return _listed_subjects(continuation, subjects, config.subjects)[0]


#: A parenthesis in a listing, read up to its first ")" or to the end (dropped whole).
_PARENTHESIS = re.compile(r"\([^)]*\)?")

#: A listing whose last this many complete items were all listed before has gone into a
#: loop ("Croatia, Croatia, Croatia, Croatia"): small models rarely leave one, so generation stops.
_LIST_REPEATS = 4


def _listed_subjects(
    continuation: str, subjects: Sequence[str], limit: int, complete_only: bool = False
) -> tuple[list[str], int]:
    """The new subjects a listing continuation names (at most ``limit``), and how many of
    its last items in a row were repeats. ``complete_only``: read only what generation
    can no longer change: up to the last comma, semicolon or colon outside an
    unclosed parenthesis (whose closing would remove what it holds)."""
    text = continuation.split(_LIST_ENDS[0])[0].split(_LIST_ENDS[1])[0]
    if complete_only:  # separators inside a parenthesis do not count: it is dropped whole
        outside = _PARENTHESIS.sub(lambda group: " " * len(group[0]), text)
        text = text[: max(outside.rfind(","), outside.rfind(";"), outside.rfind(":"), 0)]
    text = _PARENTHESIS.sub(" ", text)
    pieces = re.split(r"[,;:]|\band\b|\bor\b", text)
    proposed: list[str] = []
    taken = {s.casefold() for s in subjects}
    repeats = 0
    for item in pieces:
        item = re.sub(r"^(the|a|an)\s+", "", item.strip(" .)\"'"), flags=re.IGNORECASE)
        if not item or len(item.split()) > 4 or re.search(r"\d", item):
            continue
        if item.casefold() in taken:
            repeats += 1
            continue
        repeats = 0
        taken.add(item.casefold())
        proposed.append(item)
        if len(proposed) == limit:
            break
    return proposed, repeats


def neighbour_requests(requests: Sequence[ForgetRequest], subjects: Sequence[str]) -> list[ForgetRequest]:
    """Each forget prompt with ``{}`` filled by each proposed subject (answers unknown)."""
    templates = list(dict.fromkeys(r.prompt for r in requests if r.subject and "{}" in r.prompt))
    return [ForgetRequest(template, subject, "") for template in templates for subject in subjects]


# --------------------------------------------------------------------------- keys and block outputs


#: Rows of one template and prefix that run their shared start on their own (fewer join
#: the prefix's other rows): :func:`fact_activations`.
_MIN_TEMPLATE_ROWS = 16
#: Rows read per call of :meth:`LayerInputCache.last_token_states` (their states are kept until summed).
_KEY_ROWS = 4096


def fact_activations(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    requests: Sequence[ForgetRequest],
    prefixes: Sequence[str],
    key_layer: int,
    block_layer: int | None = None,
    batch_rows: int = 256,
    layer_cache: LayerInputCache | None = None,
    on_batch: Callable[[int], None] | None = None,
    per_context: bool = False,
    more_layers: Sequence[int] = (),
    sum_dtype: torch.dtype = torch.float64,
) -> FactActivations:
    """Down-proj inputs at ``key_layer`` (averaged over ``prefixes``) and, optionally,
    outputs of block ``block_layer`` for the bare prompt, at each fact token.
    ``more_layers``: deeper layers whose keys the same forwards read too
    (``more_keys``; not with ``per_context``). ``sum_dtype``: what the keys are
    averaged in (float32 for the protection's many rows, held for several layers).

    Rows (one per request and prefix) end at the fact token and run in
    forwards stopped after the deepest site; rows of one prefix
    and template run their shared start once (:class:`LayerInputCache`,
    which with ``layer_cache`` also skips the layers before its start for
    prompts it holds). ``on_batch(rows)`` after each forward of at most
    ``batch_rows`` rows. ``per_context``: the keys of every request in every
    prefix, f × requests × prefixes, instead of their mean per request.
    """
    if block_layer is not None and block_layer < key_layer:
        raise ValueError("block_layer must not precede key_layer")
    if not requests or not prefixes:
        raise ValueError("no prompts to read keys from")
    if more_layers and (per_context or min(more_layers) <= key_layer):
        raise ValueError("more_layers must follow key_layer, and not per context")
    texts, ends, owners = [], [], []
    for index, request in enumerate(requests):
        for prefix in prefixes:
            text, end = _contextual(request, prefix)
            texts.append(text)
            ends.append(end)
            owners.append(index)
    # Up to the fact token: what comes after it cannot change what is read there.
    rows = [e.prompt_ids[: e.fact_index + 1] for e in encode_prompts(tokenizer, texts, ends)]
    # Rows in one context prefix and one template share their start up to the subject; a
    # template with few rows joins its prefix's other rows (sharing the prefix), as a
    # forward of a few rows costs about as much as one of many.
    groups: list[tuple[int, str | None]] = []
    for k, owner in enumerate(owners):
        request = requests[owner]
        groups.append((k % len(prefixes), request.prompt.split("{}")[0] if request.subject else request.prompt))
    sizes = Counter(groups)
    groups = [g if sizes[g] >= _MIN_TEMPLATE_ROWS else (g[0], None) for g in groups]
    # in forward order: a layer's down projection runs before the layer's output
    placed = [(key_layer, 0, "keys", down_proj_module(model, spec, key_layer), True)]
    placed += [(layer, 0, f"keys{layer}", down_proj_module(model, spec, layer), True) for layer in more_layers]
    if block_layer is not None:
        placed.append((block_layer, 1, "block", decoder_layers(model, spec)[block_layer], False))
    sites = {name: (module, is_input) for _, _, name, module, is_input in sorted(placed, key=lambda p: p[:2])}
    if layer_cache is None:  # shared starts still run once; nothing is held
        layer_cache = LayerInputCache(model, decoder_layers(model, spec), 0, 0)
    n = len(requests)
    sums = {name: torch.zeros(0, dtype=torch.float64) for name in sites if name.startswith("keys")}
    context_keys: list[torch.Tensor] = []
    blocks: list[torch.Tensor] = []
    bare = prefixes.index("")
    with _PreparedModel(model):
        # Requests a few thousand rows at a time: memory stays bounded whatever their number.
        step = max(1, _KEY_ROWS // len(prefixes)) * len(prefixes)
        for begin in range(0, len(rows), step):
            states = layer_cache.last_token_states(
                model, rows[begin : begin + step], groups[begin : begin + step], sites, pad_token_id(tokenizer),
                batch_rows, on_batch,
            )  # fmt: skip
            if per_context:
                context_keys.append(states["keys"].to(torch.float64).cpu())
            else:
                for name, total in sums.items():
                    if not total.numel():
                        total = sums[name] = torch.zeros(n, states[name].shape[1], dtype=sum_dtype)
                    total.index_add_(0, torch.tensor(owners[begin : begin + step]), states[name].to(sum_dtype).cpu())
            if block_layer is not None:
                blocks.append(states["block"][bare :: len(prefixes)].to(torch.float64).cpu())
    block_outputs = torch.cat(blocks).T if blocks else None
    if per_context:  # rows are request-major: request i in prefix k is row i * len(prefixes) + k
        return FactActivations(torch.cat(context_keys).T.reshape(-1, n, len(prefixes)), block_outputs)
    more = {layer: sums.pop(f"keys{layer}").div_(len(prefixes)).T for layer in more_layers}
    return FactActivations(sums.pop("keys").div_(len(prefixes)).T.cpu(), block_outputs, more)


def target_nll(
    model: nn.Module, tokenizer: Any, requests: Sequence[ForgetRequest], targets: Sequence[str]
) -> list[float]:
    """Mean NLL per token of ``targets[i]`` right after each bare prompt: how
    strongly the model (as it is now) gives that answer."""
    device = model_device(model)
    encoded = encode_prompts(tokenizer, [r.text for r in requests], [r.fact_char_end() for r in requests], targets)
    ids, mask = pad_right([e.input_ids for e in encoded], pad_token_id(tokenizer), device)
    rows = [row for row, e in enumerate(encoded) for _ in e.target_ids]
    positions = [p for e in encoded for p in e.target_positions]
    with _PreparedModel(model), torch.no_grad():
        logits = _logits_at(model, ids, mask, torch.tensor(rows, device=device), torch.tensor(positions, device=device))
    token_nll = -torch.log_softmax(logits, dim=-1).gather(
        1, torch.tensor([t for e in encoded for t in e.target_ids], device=device)[:, None]
    )[:, 0]
    result, start = [], 0
    for e in encoded:
        result.append(float(token_nll[start : start + len(e.target_ids)].mean()))
        start += len(e.target_ids)
    return result


# --------------------------------------------------------------------------- v* optimisation


@dataclass
class _Rows:
    """The batch of one optimisation: every (request, context) row plus KL rows."""

    encoded: list[EncodedPrompt]
    owner: list[int]  # request index of each row
    is_kl: list[bool]
    bare_row: list[int]  # per request, its bare-prompt row
    kl_row: list[int | None]  # per request, its "{subject} is a" row


def _build_rows(
    tokenizer: Any, requests: Sequence[ForgetRequest], targets: Sequence[str], prefixes: Sequence[str]
) -> _Rows:
    texts, ends, row_targets, owner, is_kl = [], [], [], [], []
    bare_row: list[int] = []
    kl_row: list[int | None] = []
    for index, (request, target) in enumerate(zip(requests, targets)):
        for prefix in prefixes:
            if prefix == "":
                bare_row.append(len(texts))
            text, end = _contextual(request, prefix)
            texts.append(text)
            ends.append(end)
            row_targets.append(target)
            owner.append(index)
            is_kl.append(False)
    for index, request in enumerate(requests):
        if request.subject and not request.fact_at_end:  # the change is kept off the subject's own token
            kl_row.append(len(texts))
            texts.append(f"{request.subject} is a")
            ends.append(len(request.subject))
            row_targets.append(None)
            owner.append(index)
            is_kl.append(True)
        else:
            kl_row.append(None)
    encoded = encode_prompts(tokenizer, texts, ends, row_targets)
    # A KL row is read at its fact token only: the tokens after it need not run.
    encoded = [EncodedPrompt(e.prompt_ids[: e.fact_index + 1], e.fact_index) if kl else e
               for e, kl in zip(encoded, is_kl)]  # fmt: skip
    return _Rows(encoded, owner, is_kl, bare_row, kl_row)


class _PerRequestAdam:
    """Adam on the rows of ``delta`` (one per request), each with its own step
    count, step size and norm clamp, so a row moves exactly as it would if
    optimised alone, and stops when its request has converged."""

    def __init__(self, delta: torch.Tensor, step_size: torch.Tensor, max_norm: torch.Tensor):
        self.delta, self.step_size, self.max_norm = delta, step_size, max_norm
        self.moment1 = torch.zeros_like(delta, requires_grad=False)
        self.moment2 = torch.zeros_like(delta, requires_grad=False)
        self.steps = [0] * delta.shape[0]

    @torch.no_grad()
    def step(self, rows: list[int], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        index = torch.tensor(rows, device=self.delta.device)
        grad = self.delta.grad[index]
        self.moment1[index] = beta1 * self.moment1[index] + (1 - beta1) * grad
        self.moment2[index] = beta2 * self.moment2[index] + (1 - beta2) * grad * grad
        for row in rows:
            self.steps[row] += 1
        count = torch.tensor([self.steps[row] for row in rows], device=index.device, dtype=torch.float32)[:, None]
        corrected1 = self.moment1[index] / (1 - beta1**count)
        corrected2 = self.moment2[index] / (1 - beta2**count)
        updated = self.delta[index] - self.step_size[index, None] * corrected1 / (corrected2.sqrt() + eps)
        shrink = (self.max_norm[index, None] / updated.norm(dim=1, keepdim=True)).clamp(max=1.0)
        self.delta[index] = updated * shrink  # back inside the L2 ball


def _site_module(model: nn.Module, spec: ArchitectureSpec, site: Site, layer: int) -> nn.Module:
    if site == "down_proj":
        return down_proj_module(model, spec, layer)
    if site == "block":
        return decoder_layers(model, spec)[layer]
    raise ValueError(f"unknown site {site!r}")


def optimise_representations(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    requests: Sequence[ForgetRequest],
    targets: Sequence[str],
    *,
    site: Site,
    layer: int,
    prefixes: Sequence[str] = ("",),
    config: OptimisationConfig = OptimisationConfig(),
    progress: ProgressCallback | None = None,
    phase: str = "target optimisation",
    reuse_starts: bool = True,
) -> RepresentationResult:
    """Vectors at ``site`` of ``layer`` (fact token) that make the model say ``targets[i]``.

    ``site="down_proj"``: the down-proj output without bias (O, the true
    answers). ``site="block"``: the decoder block's output (Z, the neutral
    target). Returns init + optimised delta, d×n, float32, and diagnostics.

    Requests are optimised in groups of at most ``config.max_batch_rows``
    rows, one group after the other (requests are independent, so the
    result is the same; the ``config.warm_start`` first requests form groups
    of their own, so the later ones' start does not depend on the split).
    With ``reuse_starts`` the tokens before each fact token and the layers
    before ``layer`` run once per group (:class:`FrozenStarts`); without it
    every step runs every row whole.
    """
    if len(requests) != len(targets):
        raise ValueError("one target per request")
    if "" not in prefixes:
        raise ValueError("prefixes must include the bare prompt ''")
    n = len(requests)
    device = model_device(model)
    module = _site_module(model, spec, site, layer)
    bias = down_proj_bias(module) if site == "down_proj" else None
    batch = _build_rows(tokenizer, requests, targets, prefixes)
    pad_id = pad_token_id(tokenizer)
    layers = decoder_layers(model, spec)
    # A block's output is the next layer's input: added there, the block itself need not run again.
    next_input = site == "block" and reuse_starts and layer + 1 < len(layers)
    skip = (layer + 1 if next_input else layer) if reuse_starts else 0
    rows_of: list[list[int]] = [[] for _ in range(n)]
    for r, o in enumerate(batch.owner):
        rows_of[o].append(r)
    nll_rows_of = [[r for r in rows_of[i] if not batch.is_kl[r]] for i in range(n)]
    pilot = config.warm_start if 0 < config.warm_start < n and len(set(targets)) == 1 else 0
    groups: list[list[int]] = []
    size = 0
    for i in range(n):
        if not groups or size + len(rows_of[i]) > config.max_batch_rows or (pilot and i == pilot):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(rows_of[i])

    initial: list[torch.Tensor] = [torch.empty(0)] * n  # with bias if any, until the end
    deltas: list[torch.Tensor] = [torch.empty(0)] * n
    relative: list[torch.Tensor] = []  # the pilot requests' changes, each divided by its vector's norm
    initial_nll, final_nll, final_loss = [0.0] * n, [0.0] * n, [0.0] * n
    converged, steps = [False] * n, [0] * n
    with _PreparedModel(model):
        for number, group in enumerate(groups):
            row_ids = [r for i in group for r in rows_of[i]]
            local = {r: k for k, r in enumerate(row_ids)}
            at = {i: k for k, i in enumerate(group)}  # a request's row in this group's delta
            encoded = [batch.encoded[r] for r in row_ids]
            frozen = FrozenStarts(
                model, layers, [e.input_ids for e in encoded],
                [e.fact_index if reuse_starts else 0 for e in encoded], pad_id, skip=skip,
            )  # fmt: skip

            def run(
                requests_now: list[int], delta: torch.Tensor | None, reference: dict[int, torch.Tensor] | None
            ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
                """Forward the rows of ``requests_now``; per request: NLL, KL against
                ``reference`` (without one: the log-probs to compare with later), init vector."""
                rows = [local[r] for i in requests_now for r in rows_of[i]]
                place = {k: j for j, k in enumerate(rows)}
                cuts = [frozen.cuts[k] for k in rows]
                facts = torch.tensor([encoded[k].fact_index - cut for k, cut in zip(rows, cuts)], device=device)
                row_index = torch.arange(len(rows), device=device)
                owners = torch.tensor([at[batch.owner[row_ids[k]]] for k in rows], device=device)
                seen: dict[str, torch.Tensor] = {}

                def add_delta(hidden: torch.Tensor) -> torch.Tensor:
                    seen["site"] = hidden[row_index, facts].detach()
                    if delta is None:
                        return hidden
                    return hidden.index_put((row_index, facts), delta[owners].to(hidden.dtype), accumulate=True)

                # Logits: every target position of NLL rows, the fact position of KL rows.
                gather_rows, gather_pos, spans = [], [], {}
                for k, cut in zip(rows, cuts):
                    e = encoded[k]
                    positions = [e.fact_index] if batch.is_kl[row_ids[k]] else e.target_positions
                    spans[k] = (len(gather_pos), len(gather_pos) + len(positions))
                    gather_rows += [place[k]] * len(positions)
                    gather_pos += [p - cut for p in positions]
                if next_input:
                    hidden = frozen.forward(rows, edit_input=(layer + 1, add_delta))
                else:
                    with edit_output(module, add_delta):
                        hidden = frozen.forward(rows)
                logits = model.get_output_embeddings()(
                    hidden[torch.tensor(gather_rows, device=device), torch.tensor(gather_pos, device=device)]
                ).float()
                log_probs = torch.log_softmax(logits, dim=-1)
                # One gather and one sum by index for all NLLs: a slice of log_probs per row
                # would cost a zero tensor of its full size per slice in the backward pass.
                at_token, targets_now, slot_of_token, weight = [], [], [], []
                kl_at, kl_requests = [], []
                for slot, i in enumerate(requests_now):
                    for r in nll_rows_of[i]:
                        start, end = spans[local[r]]
                        at_token += range(start, end)
                        targets_now += batch.encoded[r].target_ids
                        slot_of_token += [slot] * (end - start)
                        weight += [1.0 / ((end - start) * len(nll_rows_of[i]))] * (end - start)
                    if batch.kl_row[i] is not None:
                        kl_at.append(spans[local[batch.kl_row[i]]][0])
                        kl_requests.append(i)
                token_nll = -log_probs[torch.tensor(at_token, device=device), torch.tensor(targets_now, device=device)]
                per_request = torch.zeros(len(requests_now), device=device).index_add(
                    0, torch.tensor(slot_of_token, device=device), token_nll * torch.tensor(weight, device=device)
                )
                nll = {i: per_request[slot] for slot, i in enumerate(requests_now)}
                kl: dict[int, torch.Tensor] = {}
                if kl_at:
                    current = log_probs[torch.tensor(kl_at, device=device)]
                    if reference is None:
                        kl = {i: current[j].detach() for j, i in enumerate(kl_requests)}
                    else:
                        before = torch.stack([reference[i] for i in kl_requests])
                        divergence = (current.exp() * (current - before)).sum(dim=-1)  # KL(now ‖ before)
                        kl = {i: divergence[j] for j, i in enumerate(kl_requests)}
                init = {i: seen["site"][place[local[batch.bare_row[i]]]].float() for i in requests_now}
                return nll, kl, init

            width = {i: max(int(frozen.lengths[local[r]]) for r in rows_of[i]) for i in group}

            def runs(
                requests_now: list[int], delta: torch.Tensor | None, reference: dict[int, torch.Tensor] | None = None
            ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
                """:func:`run` in a few forwards of rows of about the same width."""
                merged: tuple[dict, dict, dict] = ({}, {}, {})
                for part in by_width(requests_now, width, {i: len(rows_of[i]) for i in requests_now}):
                    for into, values in zip(merged, run(part, delta, reference)):
                        into.update(values)
                return merged

            # Initial pass: the vectors to start from, the KL reference, the initial NLL.
            with torch.no_grad():
                nll, kl_reference, init = runs(group, None)  # without a reference: detached log-probs
            start_vectors = torch.stack([init[i] for i in group])  # with bias if any
            for k, i in enumerate(group):
                initial[i], initial_nll[i] = start_vectors[k], float(nll[i])
            if bias is not None:
                start_vectors = start_vectors - bias.detach().float()
            d = start_vectors.shape[1]
            initial_norm = start_vectors.norm(dim=1).clamp_min(1e-12)
            rms = initial_norm / math.sqrt(d)
            step_size = config.lr * (rms if config.relative_lr else torch.ones_like(initial_norm))
            delta = torch.zeros(len(group), d, device=device)
            if pilot and group[0] >= pilot:  # a warm start (see OptimisationConfig)
                delta += torch.stack(relative).mean(dim=0) * initial_norm[:, None]
            delta.requires_grad_(True)
            adam = _PerRequestAdam(delta, step_size, config.clamp_norm_factor * initial_norm)
            active = list(group)
            decay_scale = {i: 1.0 for i in group}  # faded per request when its NLL stalls
            best_nll = {i: initial_nll[i] for i in group}
            stalled = {i: 0 for i in group}
            for i in group:
                final_nll[i] = final_loss[i] = initial_nll[i]
                converged[i] = initial_nll[i] < config.converged_nll
            # No steps: the initial pass already gave everything (a zero delta adds no
            # decay and no KL), so the first step's forward and backward are skipped.
            for iteration in range(config.max_steps + 1 if config.max_steps else 0):
                if not active:
                    break
                delta.grad = None
                with torch.enable_grad():
                    nll, kl, _ = runs(active, delta, kl_reference)
                    total = 0.0
                    for i in active:
                        k = at[i]
                        decay = decay_scale[i] * config.weight_decay * delta[k].pow(2).sum() / initial_norm[k] ** 2
                        loss = nll[i] + decay
                        if i in kl:
                            loss = loss + config.kl_factor * kl[i]
                        final_nll[i] = float(nll[i].detach())
                        final_loss[i] = float(loss.detach())
                        converged[i] = final_nll[i] < config.converged_nll
                        if final_nll[i] < 0.9 * best_nll[i]:
                            best_nll[i], stalled[i] = final_nll[i], 0
                        elif config.patience:
                            stalled[i] += 1
                            if stalled[i] >= config.patience:
                                decay_scale[i] *= config.decay_fade
                                stalled[i] = 0
                        total = total + loss
                    total.backward()
                active = [i for i in active if not converged[i]]
                if iteration == config.max_steps or not active:
                    break
                adam.step([at[i] for i in active])
                if progress:
                    progress(phase, number * config.max_steps + iteration + 1, len(groups) * config.max_steps)
            for k, i in enumerate(group):
                deltas[i], steps[i] = delta[k].detach(), adam.steps[k]
                if i < pilot:
                    relative.append(deltas[i] / initial_norm[k])
    if progress and config.max_steps:  # no steps: nothing to show a bar for
        progress(phase, len(groups) * config.max_steps, len(groups) * config.max_steps)
    start_vectors = torch.stack(initial)
    if bias is not None:
        start_vectors = start_vectors - bias.detach().float()
    vectors = (start_vectors + torch.stack(deltas)).T.contiguous().cpu()
    return RepresentationResult(
        vectors=vectors,
        initial=start_vectors.T.contiguous().cpu(),
        initial_nll=initial_nll,
        final_nll=final_nll,
        final_loss=final_loss,
        steps=steps,
        converged=converged,
    )
