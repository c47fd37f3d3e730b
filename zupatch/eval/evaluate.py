"""``zupatch eval``: the base model and each patched variant, scored side by side.

For the base and for every patch (applied in memory from the checkpoint's own
stored bits, then restored; nothing is written) it measures:

- efficacy: on the forget prompts, the share whose true answer the model still
  gives (greedy reproduces every answer token) and the answer's mean
  probability (product over its tokens);
- generalization: the same on paraphrases (for both, each fact's answer
  probability too, in the data's order: ``eval --plot`` draws them);
- specificity: on retain and labelled neighbour prompts, the share answered,
  and ``kept``: among those the base answered, the share still answered; on
  unlabelled neighbours, the share whose top-1 next token is unchanged; and
  the same on *same-pattern probes*: the forget templates filled with other
  subjects (:mod:`zupatch.engine.probes`), derived once from the base model
  before any patch is applied, so collateral damage shows without retain data
  and every patch is compared on identical prompts;
- fluency: perplexity on ordinary text (``texts``, else a data-free sample of
  the base model's own text with a fixed seed, different from the statistics'
  seed) and greedy generations for the first few forget prompts;
- attacks (``config.attacks``, :mod:`zupatch.eval.attacks`): each one is
  applied to the base and to every patched variant and scored with the same
  measures (quantization, chat questions, top-K candidates, logit lens, a
  short fine-tune), so the report shows whether the forgetting survives what
  users do to a published model, and what the patch costs after it.

The report (:meth:`EvalReport.to_dict`) is the documented ``--json`` format
(docs/eval.md); its ``version`` changes if a field changes meaning.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zupatch.checkpoint.folder import Checkpoint
from zupatch.engine.placement import model_device, placement_problem, require_written_on_device
from zupatch.engine.probes import derive_probes, next_token_ids, top1_unchanged
from zupatch.errors import BaseMismatchError, ZupatchError
from zupatch.eval import REPORT_FORMAT, REPORT_VERSION
from zupatch.eval.attacks import Outcome, Subject, attack_of, parse_attacks
from zupatch.eval.attacks.base import answered_lines
from zupatch.eval.data import EvalData, Item
from zupatch.eval.metrics import AnswerScore, score_answers, text_windows, token_perplexity
from zupatch.hub.card import layers_of
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.module import find_parameter, tensor_of
from zupatch.patch.ops import run_chain_in_memory, sha256_hex

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalConfig:
    """How to run an evaluation; every field is in the report's ``settings``."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None  # spread over GPUs and CPU RAM (docs/create.md, "Devices and dtypes")
    max_memory: str | None = None  # with device_map: "0=70GiB,cpu=120GiB"
    batch_size: int = 16
    generations: int = 3  # forget prompts shown with their greedy continuation (0: none)
    new_tokens: int = 12  # length of those continuations
    text_tokens: int = 2048  # data-free fluency text: tokens sampled from the base model
    text_seed: int = 1234  # not the statistics' seed, so the edit never saw this text
    max_text_length: int = 512  # tokens per --text line
    probes: int = 16  # same-pattern probe subjects per source (model-proposed, vocabulary); 0: none
    attacks: tuple[str, ...] = ()  # NAME[:PARAM] (zupatch.eval.attacks); made canonical, "all" expanded

    def __post_init__(self) -> None:
        from zupatch.eval.attacks import parse_attacks

        object.__setattr__(self, "attacks", tuple(a.label for a in parse_attacks(self.attacks)))
        for name in ("batch_size", "new_tokens", "text_tokens", "max_text_length"):
            if getattr(self, name) < 1:
                raise ZupatchError(f"{name.replace('_', ' ')} must be at least 1")
        for name in ("generations", "probes"):
            if getattr(self, name) < 0:
                raise ZupatchError(f"{name} must be >= 0")
        problem = placement_problem(self.device_map, self.max_memory)
        if problem:
            raise ZupatchError(problem)


@dataclass
class ModelScores:
    """The metrics of one model variant (the base, or the base with one patch)."""

    name: str
    patch: dict[str, Any] | None  # ref, method, base model and file size of the patch; None for the base
    efficacy: dict[str, Any]
    generalization: dict[str, Any]
    specificity: dict[str, Any]
    fluency: dict[str, Any]
    generations: list[dict[str, str]]
    seconds: float
    attacks: list[dict[str, Any]] = field(default_factory=list)  # one entry per attack, in the report's order

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "patch": self.patch,
            "efficacy": self.efficacy,
            "generalization": self.generalization,
            "specificity": self.specificity,
            "fluency": self.fluency,
            "generations": self.generations,
            "seconds": round(self.seconds, 3),
            "attacks": self.attacks,
        }


@dataclass
class EvalReport:
    """Everything ``zupatch eval`` found; :meth:`to_dict` is the ``--json`` output."""

    model: str
    data: dict[str, Any]
    settings: dict[str, Any]
    models: list[ModelScores] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)  # name, attack, settings of each attack run

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "attacks": self.attacks,
            "models": [m.to_dict() for m in self.models],
        }


# --------------------------------------------------------------------------- patches in memory


class InMemoryPatcher:
    """Applies patches to a loaded model, computed from the checkpoint's stored bits.

    The model may run in another dtype than the checkpoint stores (float32 on
    CPU for a bf16 checkpoint): the patch's canonical result is computed on the
    stored bits, exactly as ``zupatch apply`` would write them, then cast like
    ``from_pretrained`` would. The stored bits read for the hash check are
    kept for the lifetime of this object (one evaluation).
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        self.model = model
        self.checkpoint = checkpoint
        self._stored: dict[str, np.ndarray] = {}

    def _stored_bits(self, name: str, dtype: nm.DType) -> np.ndarray:
        if name not in self._stored:
            self._stored[name] = self.checkpoint.read_bits(name, dtype.bits)
        return self._stored[name]

    def check(self, patch: Patch, label: str) -> None:
        """Raise a one-line error unless ``patch`` was made for this checkpoint."""
        for name in patch.tensor_names:
            first = patch.chain(name)[0]
            try:
                _, info = self.checkpoint.locate(name)
            except ZupatchError:
                raise BaseMismatchError(f"{label}: the model has no tensor {name!r}; the patch is for another model") from None
            if info.dtype != first.dtype or tuple(info.shape) != tuple(first.shape):
                raise BaseMismatchError(
                    f"{label}: tensor {name!r} is {info.dtype} {list(info.shape)} here, "
                    f"the patch expects {first.dtype} {list(first.shape)}"
                )
            bits = self._stored_bits(name, nm.FLOAT_DTYPES[first.dtype])
            if sha256_hex(bits) != first.sha256_before:
                raise BaseMismatchError(
                    f"{label}: the model is not this patch's base ({patch.base_model or 'unknown base'}): "
                    f"tensor {name!r} differs (already patched? see `zupatch verify`)"
                )
            require_written_on_device(name, find_parameter(self.model, name), "the patch", label)

    @contextmanager
    def patched(self, patch: Patch, label: str) -> Iterator[nn.Module]:
        """The model with ``patch`` applied inside the block, restored afterwards."""
        self.check(patch, label)
        originals: dict[str, torch.Tensor] = {}
        try:
            for name in patch.tensor_names:
                chain = patch.chain(name)
                dtype = nm.FLOAT_DTYPES[chain[0].dtype]
                result = run_chain_in_memory(chain, self._stored_bits(name, dtype), patch.source)
                parameter = find_parameter(self.model, name)
                originals[name] = parameter.detach().clone()
                with torch.no_grad():
                    parameter.copy_(tensor_of(result, dtype).to(parameter.device, parameter.dtype))
            yield self.model
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    find_parameter(self.model, name).copy_(original)


# --------------------------------------------------------------------------- metrics


def _share(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 6) if values else None


def _significant(value: float) -> float:
    """``value`` to 6 significant digits: a forgotten answer's 3e-9 stays visible on a log scale."""
    return float(f"{value:.6g}")


def _answer_metrics(
    scores: Sequence[AnswerScore], per_fact: bool = False, lines: Sequence[int] | None = None
) -> dict[str, Any]:
    """Shares and mean probability of ``scores``; with ``lines`` (each prompt's line in the
    evaluation file) the lines still answered, and with ``per_fact`` each probability."""
    metrics: dict[str, Any] = {
        "n": len(scores),
        "answered": _share([s.greedy for s in scores]),
        "first_token": _share([s.first_token_top1 for s in scores]),
        "probability": _mean([s.probability for s in scores]),
    }
    if lines is not None:
        metrics["answered_lines"] = answered_lines([s.greedy for s in scores], lines)
    if per_fact:  # in the data's order: what `eval --plot` draws
        metrics["probabilities"] = [_significant(s.probability) for s in scores]
    return metrics


@dataclass
class _Scored:
    """Per-item results of one model, kept for the comparisons with the base."""

    forget: list[AnswerScore]
    paraphrases: list[AnswerScore]
    retain: list[AnswerScore]
    neighbour_tokens: list[int]
    probe_tokens: list[int]
    perplexity: float | None
    generations: list[str]


def _score(
    model: nn.Module,
    tokenizer: Any,
    data: EvalData,
    probes: Sequence[str],
    windows: list[list[int]],
    config: EvalConfig,
) -> _Scored:
    from zupatch.engine.targets import greedy_continuations

    def answers(items: Sequence[Item]) -> list[AnswerScore]:
        if not items:
            return []
        return score_answers(model, tokenizer, [i.prompt for i in items], [i.answer for i in items], config.batch_size)

    shown = [item.prompt for item in data.forget[: config.generations]]
    return _Scored(
        forget=answers(data.forget),
        paraphrases=answers(data.paraphrases),
        retain=answers(data.retain),
        neighbour_tokens=next_token_ids(model, tokenizer, data.unlabelled_neighbours, config.batch_size),
        probe_tokens=next_token_ids(model, tokenizer, probes, config.batch_size),
        perplexity=token_perplexity(model, windows) if windows else None,
        generations=greedy_continuations(model, tokenizer, shown, config.new_tokens, batched=True) if shown else [],
    )


def _patch_info(label: str, patch: Patch) -> dict[str, Any]:
    source = Path(patch.source) if patch.source else None
    data = source.read_bytes() if source and source.is_file() else patch.to_bytes()
    return {
        "ref": label,
        "method": "+".join(step.method for step in patch.steps),
        "base_model": patch.base_model,
        "tensors": len(patch.tensor_names),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),  # of the file: `push --eval-report` finds the patch by it
    }


def _model_scores(
    name: str,
    patch: dict[str, Any] | None,
    scored: _Scored,
    base: _Scored,
    data: EvalData,
    seconds: float,
    per_fact: bool = True,
) -> ModelScores:
    known = [i for i, s in enumerate(base.retain) if s.greedy]
    specificity = _answer_metrics(scored.retain)
    specificity["kept"] = _share([scored.retain[i].greedy for i in known])
    neighbours = top1_unchanged(base.neighbour_tokens, scored.neighbour_tokens)
    specificity["unlabelled_n"], specificity["unchanged"] = neighbours["n"], neighbours["unchanged"]
    probes = top1_unchanged(base.probe_tokens, scored.probe_tokens)
    specificity["derived_n"], specificity["derived_unchanged"] = probes["n"], probes["unchanged"]
    fluency: dict[str, Any] = {"perplexity": None if scored.perplexity is None else round(scored.perplexity, 4)}
    fluency["perplexity_change"] = (
        round(scored.perplexity / base.perplexity - 1, 4) if scored.perplexity and base.perplexity else None
    )
    return ModelScores(
        name=name,
        patch=patch,
        efficacy=_answer_metrics(scored.forget, per_fact, [i.line for i in data.forget]),
        generalization=_answer_metrics(scored.paraphrases, per_fact, [i.line for i in data.paraphrases]),
        specificity=specificity,
        fluency=fluency,
        generations=[{"prompt": item.prompt, "continuation": text}
                     for item, text in zip(data.forget, scored.generations)],  # fmt: skip
        seconds=seconds,
    )


def fluency_windows(
    model: nn.Module, tokenizer: Any, texts: Sequence[str] | None, config: EvalConfig,
    checkpoint: Checkpoint | None = None,
) -> tuple[list[list[int]], str]:
    """Token windows for perplexity and where they came from ("text" or "self-sampled").

    Self-sampled windows of a ``checkpoint`` are cached (``$ZUPATCH_CACHE/eval-text``)
    under a key naming the weight files (names, sizes, modification times),
    the device, the dtype and the sampling settings, so a second eval of the
    same model does not sample again. They are the model's own text, never
    request text.
    """
    if texts is not None:
        windows = [w for w in text_windows(tokenizer, texts, config.max_text_length) if len(w) >= 2]
        if not windows:
            raise ZupatchError("the --text file has no line of two or more tokens")
        return windows, "text"
    from zupatch.engine.stats import StatsConfig, sample_windows

    sampling = StatsConfig(sampled_token_budget=config.text_tokens, seed=config.text_seed)
    path = _sampled_text_path(model, checkpoint, config) if checkpoint is not None else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, list) and all(isinstance(w, list) for w in cached):
                return cached, "self-sampled"
        except (OSError, ValueError):
            pass  # a damaged cache file is a miss
    windows = sample_windows(model, tokenizer, sampling)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".tmp{os.getpid()}")
            temporary.write_text(json.dumps(windows))
            os.replace(temporary, path)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return windows, "self-sampled"


def _sampled_text_path(model: nn.Module, checkpoint: Checkpoint, config: EvalConfig) -> Path:
    from zupatch.models.smollm2 import default_cache_dir

    stats = {name: (checkpoint.path / name).stat() for name in checkpoint.files}
    files = [(name, st.st_size, st.st_mtime_ns) for name, st in stats.items()]
    parameter = next(model.parameters())
    key = json.dumps({"format": 1, "folder": str(checkpoint.path.resolve()), "files": files,
                      "device": parameter.device.type, "dtype": str(parameter.dtype),
                      "tokens": config.text_tokens, "seed": config.text_seed}, sort_keys=True)  # fmt: skip
    return default_cache_dir() / "eval-text" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def evaluate(
    model_dir: Path,
    patches: Sequence[tuple[str, Patch]],
    data: EvalData,
    config: EvalConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    model_label: str | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Score the model in ``model_dir`` and, for each ``(label, patch)``, the patched model.

    Every patch is checked against the checkpoint's tensor hashes before any
    model is scored, so a wrong patch fails in seconds. Same-pattern probes
    (``config.probes`` subjects per source) are derived from the base model
    before any patch is applied.
    """
    from zupatch.engine.api import load_model

    config = config or EvalConfig()
    checkpoint = Checkpoint(model_dir)
    model, tokenizer = load_model(model_dir, config.dtype, config.device, device_map=config.device_map,
                                  max_memory=config.max_memory)  # fmt: skip
    patcher = InMemoryPatcher(model, checkpoint)
    for label, patch in patches:
        patcher.check(patch, label)
    probes = derive_probes(model, tokenizer, data.requests, proposed=config.probes, vocabulary=config.probes)
    prompts = probes.prompts
    windows, text_source = fluency_windows(model, tokenizer, texts, config, checkpoint)
    report = EvalReport(
        model=model_label or str(model_dir),
        data={
            **data.counts(),
            "derived_probes": len(prompts),
            "derived_templates": len(probes.templates) if prompts else 0,
            "derived_subjects_proposed": len(probes.proposed),
            "derived_subjects_vocabulary": len(probes.vocabulary),
            "text": text_source,
            "text_tokens": sum(len(w) for w in windows),
        },
        settings={
            **{k: getattr(config, k) for k in config.__dataclass_fields__},
            "device": str(model_device(model)),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    )
    attacks = [(settings, attack_of(settings)) for settings in parse_attacks(config.attacks)]
    report.attacks = [{"name": s.label, "attack": a.name, "settings": asdict(s)} for s, a in attacks]
    first_layer = min((min(layers_of(p.tensor_names), default=0) for _, p in patches), default=0)
    total = (1 + len(patches)) * (1 + len(attacks))
    stage = "models and attacks" if attacks else "models"
    done = 1
    started = time.perf_counter()
    base = _score(model, tokenizer, data, prompts, windows, config)
    report.models.append(_model_scores("base", None, base, base, data, time.perf_counter() - started))
    if progress:
        progress(stage, done, total)

    def attack_score(attacked: nn.Module, base_raw: _Scored | None) -> tuple[dict[str, Any], _Scored]:
        scored = _score(attacked, tokenizer, data, prompts, windows, replace(config, generations=0))
        scores = _model_scores("", None, scored, base_raw or scored, data, 0.0, per_fact=False)
        fluency: dict[str, Any] = {"perplexity": scores.fluency["perplexity"], "perplexity_change": None}
        if scored.perplexity and base.perplexity:  # relative to the base without attack
            fluency["perplexity_change"] = round(scored.perplexity / base.perplexity - 1, 4)
        figures = {"efficacy": scores.efficacy, "generalization": scores.generalization,
                   "specificity": scores.specificity, "fluency": fluency}  # fmt: skip
        return figures, scored

    def run_attacks(bases: list[Outcome] | None) -> tuple[list[dict[str, Any]], list[Outcome]]:
        nonlocal done
        entries, outcomes = [], []
        subject = Subject(model, tokenizer, data, config.batch_size, first_layer, attack_score)
        for index, (settings, attack) in enumerate(attacks):
            started = time.perf_counter()
            outcome = attack.run(settings, subject, bases[index] if bases else None)
            outcomes.append(outcome)
            entries.append(_attack_entry(settings.label, outcome, time.perf_counter() - started))
            done += 1
            if progress:
                progress(stage, done, total)
        return entries, outcomes

    report.models[0].attacks, base_outcomes = run_attacks(None)
    for label, patch in patches:
        started = time.perf_counter()
        with patcher.patched(patch, label):
            scored = _score(model, tokenizer, data, prompts, windows, config)
            seconds = time.perf_counter() - started
            done += 1
            if progress:
                progress(stage, done, total)
            entries, _ = run_attacks(base_outcomes)
        scores = _model_scores(label, _patch_info(label, patch), scored, base, data, seconds)
        scores.attacks = entries
        report.models.append(scores)
    return report


def _attack_entry(name: str, outcome: Outcome, seconds: float) -> dict[str, Any]:
    """One model's result under one attack, as the report writes it."""
    figures = outcome.figures
    return {
        "name": name,
        "skipped": outcome.skipped,
        **{section: figures.get(section) for section in ("efficacy", "generalization", "specificity", "fluency")},
        "details": outcome.details,
        "seconds": round(seconds, 3),
    }
