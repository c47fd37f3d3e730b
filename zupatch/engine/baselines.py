"""Baseline unlearning methods on the same layers: gradient ascent (GA) and NPO.

Researchers compare ZeroUnlearn with the usual fine-tuning baselines on the
same requests, layers and metrics. These train ONLY the MLP down-projection
weights of the layers ZeroUnlearn would edit (``CreateConfig.layers`` or
:func:`default_layers`) on the forget requests' answers:

* ``ga`` - gradient ascent: minimise the mean log-probability of the answer
  tokens given the prompt (i.e. maximise their NLL);
* ``npo`` - negative preference optimisation (Zhang et al. 2024):
  ``-(2/β)·mean_i log σ(-β·(log π_θ(y_i|x_i) - log π_ref(y_i|x_i)))`` with
  ``log π`` the summed log-probability of answer i's tokens and ``π_ref`` the
  unedited model (at the first step the gradient equals GA's on summed
  log-probabilities; it fades as an answer becomes unlikely).

With retain requests (``--retain``) and ``retain_weight > 0``,
``retain_weight × NLL`` of their answers is added (GradDiff / NPO+RT).
Training is full-batch (every request in one forward), deterministic, on the
model's own device. The trained weights are float32 master copies (whatever
the model's dtype) spliced into the forward by a hook, so gradients and the
optimiser state are float32; the model's stored weights only change at the
end, to the masters rounded to their dtype. By default training stops as soon
as no forget answer is greedily produced any more (each has lost top-1 on at
least one of its tokens), which makes "equal efficacy" comparisons easy.

The result is dense: ``ΔW = W_trained − W_original`` per layer in the stored
tensor's layout (float64, CPU). :func:`zupatch.engine.create.compute_edit`
wraps it into an ``EditResult``; no request text is ever recorded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zupatch.engine.architectures import (
    ArchitectureSpec,
    down_proj_bias,
    down_proj_module,
    down_proj_weight_math,
    down_proj_weight_name,
)
from zupatch.engine.hooks import hidden_of
from zupatch.engine.requests import ForgetRequest
from zupatch.engine.stats import ProgressCallback, model_device, pad_right, pad_token_id
from zupatch.engine.targets import _logits_at, _PreparedModel, encode_prompts
from zupatch.errors import ZupatchError

BaselineMethod = Literal["ga", "npo"]
BASELINE_METHODS: tuple[str, ...] = ("ga", "npo")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
#: Names shown on progress bars.
PHASES = {"ga": "gradient ascent", "npo": "NPO"}


@dataclass(frozen=True)
class BaselineParams:
    """Hyperparameters of the GA and NPO baselines.

    Defaults measured on the trained tiny Llama of the tests (36-38 steps to
    forget 2 facts) and on SmolLM2-135M-Instruct editing 3 down projections
    (about 10 steps for 3 facts; smaller rates cost no fewer other facts,
    docs/create.md): Adam at ``learning_rate`` 1e-4.
    ``steps`` is the maximum number of optimiser steps; with
    ``stop_when_forgotten`` training ends as soon as no forget answer is
    greedily produced. ``beta`` is NPO's inverse temperature.
    ``retain_weight`` scales the retain NLL term (only used when retain
    requests are given; 0 disables it). ``grad_clip`` is the maximum global
    gradient norm (0: no clipping). ``seed`` seeds torch's RNG for the run
    (the loss itself has no randomness: full batch, model in eval mode).
    """

    learning_rate: float = 1e-4
    steps: int = 200
    beta: float = 0.1
    retain_weight: float = 1.0
    optimizer: Literal["adam", "sgd"] = "adam"
    stop_when_forgotten: bool = True
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ZupatchError(f"baseline.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.steps < 1:
            raise ZupatchError(f"baseline.steps must be >= 1, got {self.steps!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ZupatchError(f"baseline.beta must be > 0, got {self.beta!r}")
        if not (math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ZupatchError(f"baseline.retain_weight must be >= 0, got {self.retain_weight!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ZupatchError(f"unknown baseline.optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ZupatchError(f"baseline.grad_clip must be >= 0 (0: off), got {self.grad_clip!r}")


@dataclass
class BaselineRun:
    """What :func:`run_baseline` did: dense deltas and numbers, no request text.

    ``deltas[layer]`` is ``stored_after − stored_before`` (float64, CPU, the
    stored tensor's layout); ``original_weights`` maps state-dict names to the
    stored tensors before the run (to restore the model).
    """

    deltas: dict[int, torch.Tensor]
    original_weights: dict[str, torch.Tensor]
    layer_diagnostics: dict[int, dict[str, Any]]
    diagnostics: dict[str, Any]
    timings: dict[str, float]


# --------------------------------------------------------------------------- batches


@dataclass
class _AnswerBatch:
    """Prompts with their answers, right-padded; which logits predict which token."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # per answer token: its batch row
    positions: torch.Tensor  # per answer token: the position whose logits predict it
    targets: torch.Tensor  # per answer token: its id
    owner: torch.Tensor  # per answer token: its request index (forget first, then retain)
    is_forget: torch.Tensor  # per answer token: bool
    forget_count: int
    retain_count: int

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        forget: Sequence[ForgetRequest],
        retain: Sequence[ForgetRequest],
        device: torch.device,
    ) -> _AnswerBatch:
        requests = [*forget, *retain]
        encoded = encode_prompts(
            tokenizer, [r.text for r in requests], [r.fact_char_end() for r in requests], [r.target for r in requests]
        )
        ids, mask = pad_right([e.input_ids for e in encoded], pad_token_id(tokenizer), device)
        rows = [row for row, e in enumerate(encoded) for _ in e.target_ids]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            ids=ids,
            mask=mask,
            rows=tensor(rows),
            positions=tensor([p for e in encoded for p in e.target_positions]),
            targets=tensor([t for e in encoded for t in e.target_ids]),
            owner=tensor(rows),
            is_forget=tensor(rows) < len(forget),
            forget_count=len(forget),
            retain_count=len(retain),
        )

    def token_log_probs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 log-probability of each answer token, and whether it is the top-1 token."""
        logits = _logits_at(model, self.ids, self.mask, self.rows, self.positions)
        log_probs = torch.log_softmax(logits, dim=-1)
        top1 = log_probs.argmax(dim=-1) == self.targets
        return log_probs.gather(1, self.targets[:, None])[:, 0], top1

    def per_request_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-token ``values`` per request (forget requests first)."""
        total = torch.zeros(self.forget_count + self.retain_count, dtype=values.dtype, device=values.device)
        return total.index_add(0, self.owner, values)

    def answered(self, top1: torch.Tensor) -> torch.Tensor:
        """Per forget request: is its whole answer the greedy continuation (top-1 at every token)?"""
        missed = self.per_request_sum((~top1).to(torch.float32))[: self.forget_count]
        return missed == 0


# --------------------------------------------------------------------------- master weights


def _as_stored(master: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """The master weight as it will be stored (rounded to ``storage``), in float32;
    gradients pass straight through the rounding to the master."""
    if storage == master.dtype or torch.finfo(storage).bits > torch.finfo(master.dtype).bits:
        return master
    return master + (master.detach().to(storage).to(master.dtype) - master.detach())


@contextmanager
def _master_weights(
    modules: Sequence[nn.Module], masters: Sequence[torch.Tensor], storage: Sequence[torch.dtype]
) -> Iterator[None]:
    """Each module's output computed with its float32 master weight (math layout d×f),
    rounded to the dtype it will be stored in.

    The input is upcast, the product and bias taken in float32, and the output
    cast back to the model's dtype, so the weight's gradient is float32 even in
    a bf16 model. The module's own (frozen) weight is not used for the output.
    The forward sees the weights the patch will hold (a bf16 checkpoint rounds
    small updates away), so "forgotten" means forgotten after applying.
    """

    def make_hook(master: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
            weight = _as_stored(master, dtype)
            out = F.linear(args[0].to(master.dtype), weight, None if bias is None else bias.to(master.dtype))
            return out.to(hidden_of(output).dtype)

        return hook

    with ExitStack() as stack:
        for module, master, dtype in zip(modules, masters, storage):
            bias = down_proj_bias(module)
            stack.callback(module.register_forward_hook(make_hook(master, bias, dtype)).remove)
        yield


# --------------------------------------------------------------------------- losses


def _forget_loss(
    method: str, token_log_probs: torch.Tensor, batch: _AnswerBatch, reference: torch.Tensor, beta: float
) -> torch.Tensor:
    """GA: mean log-probability of the forget answer tokens. NPO: Zhang et al.'s loss
    on summed answer log-probabilities against ``reference`` (the unedited model)."""
    if method == "ga":
        return token_log_probs[batch.is_forget].mean()
    summed = batch.per_request_sum(token_log_probs)[: batch.forget_count]
    return -(2.0 / beta) * F.logsigmoid(-beta * (summed - reference)).mean()


def _retain_nll(token_log_probs: torch.Tensor, batch: _AnswerBatch) -> torch.Tensor | None:
    if batch.retain_count == 0:
        return None
    return -token_log_probs[~batch.is_forget].mean()


# --------------------------------------------------------------------------- the run


def run_baseline(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    method: str,
    requests: Sequence[ForgetRequest],
    params: BaselineParams = BaselineParams(),
    *,
    retain_requests: Sequence[ForgetRequest] = (),
    storage_dtypes: Mapping[str, torch.dtype] | None = None,
    progress: ProgressCallback | None = None,
) -> BaselineRun:
    """Train the down projections of ``layers`` with ``method`` ("ga" or "npo").

    ``storage_dtypes`` (state-dict name -> dtype) says in which dtype each
    weight will be stored by the patch (the checkpoint's; default: the
    model's): training sees the trained weights rounded to it, and the deltas
    are ``round(trained) − original``. ``model`` ends up holding those weights;
    the result's ``original_weights`` restore it. Runs on the model's device.
    """
    if method not in BASELINE_METHODS:
        raise ZupatchError(f"unknown baseline method {method!r}; choose one of {', '.join(BASELINE_METHODS)}")
    if not requests:
        raise ZupatchError("no forget requests")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = model_device(model)
    retain = list(retain_requests) if params.retain_weight > 0 else []
    batch = _AnswerBatch.build(tokenizer, requests, retain, device)
    modules = [down_proj_module(model, spec, layer) for layer in layers]
    names = [down_proj_weight_name(spec, layer) for layer in layers]
    original_weights = {name: module.weight.detach().cpu().clone() for name, module in zip(names, modules)}
    storage = [(storage_dtypes or {}).get(name, module.weight.dtype) for name, module in zip(names, modules)]
    masters = [
        down_proj_weight_math(module, spec).detach().to(torch.float32).clone().requires_grad_(True)
        for module in modules
    ]
    optimiser: torch.optim.Optimizer = (
        torch.optim.Adam(masters, lr=params.learning_rate)
        if params.optimizer == "adam"
        else torch.optim.SGD(masters, lr=params.learning_rate)
    )
    phase = PHASES[method]
    reference = torch.zeros(len(requests), device=device)
    losses: list[float] = []
    retain_losses: list[float] = []
    answered_counts: list[int] = []
    stopped_forgotten = False
    steps_run = 0
    train_start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _PreparedModel(model), _master_weights(modules, masters, storage):
        torch.manual_seed(params.seed)
        for step in range(params.steps + 1):
            training = step < params.steps
            with torch.set_grad_enabled(training):
                token_log_probs, top1 = batch.token_log_probs(model)
                if step == 0:  # masters == stored weights: the reference model
                    reference = batch.per_request_sum(token_log_probs.detach())[: batch.forget_count]
                forget_loss = _forget_loss(method, token_log_probs, batch, reference, params.beta)
                retain_nll = _retain_nll(token_log_probs, batch)
                loss = forget_loss if retain_nll is None else forget_loss + params.retain_weight * retain_nll
            answered = batch.answered(top1)
            losses.append(float(forget_loss.detach()))
            if retain_nll is not None:
                retain_losses.append(float(retain_nll.detach()))
            answered_counts.append(int(answered.sum()))
            if params.stop_when_forgotten and not bool(answered.any()):
                stopped_forgotten = True
                break
            if not training:
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(masters, params.grad_clip)
            optimiser.step()
            steps_run += 1
            if progress:
                progress(phase, steps_run, params.steps)
    if progress and steps_run < params.steps:
        progress(phase, params.steps, params.steps)  # stopped early: finish the bar
    timings["train"] = time.perf_counter() - train_start

    deltas: dict[int, torch.Tensor] = {}
    layer_diagnostics: dict[int, dict[str, Any]] = {}
    with torch.no_grad():
        for layer, name, module, master, dtype in zip(layers, names, modules, masters, storage):
            stored = module.weight
            trained = _as_stored(master.detach(), dtype)
            trained = (trained.T if spec.weight_transposed else trained).cpu().to(torch.float64)
            before = original_weights[name].to(torch.float64)
            delta = trained - before
            stored.copy_(trained.to(stored.dtype).to(stored.device))
            deltas[layer] = delta
            layer_diagnostics[layer] = {
                "delta_norm": round(float(delta.norm()), 6),
                "relative_change": round(float(delta.norm() / before.norm().clamp_min(1e-30)), 6),
                "changed_elements": int((delta != 0).sum()),
            }
        with _PreparedModel(model):  # the stored (rounded) weights, no hook
            _, top1 = batch.token_log_probs(model)
            answered_after = int(batch.answered(top1).sum())

    timings["total"] = time.perf_counter() - started
    diagnostics: dict[str, Any] = {
        "steps": steps_run,
        "stopped_forgotten": stopped_forgotten,
        "initial_forget_loss": round(losses[0], 6),
        "final_forget_loss": round(losses[-1], 6),
        "answered_before": answered_counts[0],
        "answered_after": answered_after,
        "retain_requests": len(retain),
    }
    if retain_losses:
        diagnostics["initial_retain_nll"] = round(retain_losses[0], 6)
        diagnostics["final_retain_nll"] = round(retain_losses[-1], 6)
    return BaselineRun(deltas, original_weights, layer_diagnostics, diagnostics, timings)


def trainer(method: str) -> Callable[..., BaselineRun]:
    """The ``train`` entry point of a baseline method plugin (:mod:`zupatch.engine.methods`):
    ``train(model, tokenizer, spec, layers, requests, config, **options)`` runs
    :func:`run_baseline` with ``method`` and ``config.baseline``."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline method {method!r}")

    def train(
        model: nn.Module, tokenizer: Any, spec: ArchitectureSpec, layers: Sequence[int],
        requests: Sequence[ForgetRequest], config: Any, **options: Any,
    ) -> BaselineRun:  # fmt: skip
        return run_baseline(model, tokenizer, spec, layers, method, requests, config.baseline, **options)

    return train


__all__ = [
    "BASELINE_METHODS",
    "BaselineMethod",
    "BaselineParams",
    "BaselineRun",
    "OPTIMIZERS",
    "run_baseline",
    "trainer",
]
