"""From forget requests to a patch: the library entry points behind ``zupatch create``.

:func:`create` works on a model already loaded (a notebook): the patch's base
is the model's own weights as they were before the call, and the model is
left exactly as it was. :func:`create_from_checkpoint` loads a checkpoint
folder and makes the patch against the bytes on disk, which is what ``apply``
will later check.

Both first check that the model gives each target it is asked to forget
(:mod:`zupatch.engine.precheck`): a request whose target it does not give has
nothing to forget. They report such requests (``strict=True``: refuse them)
before computing anything.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import nn

from zupatch.checkpoint.folder import Checkpoint
from zupatch.engine.architectures import (
    checkpoint_tensor_name,
    decoder_layers,
    down_proj_weight_name,
    num_layers,
    resolve_architecture,
    stored_tensor_name,
)
from zupatch.engine.create import CreateConfig, EditResult, compute_edit
from zupatch.engine.placement import (
    device_map_options,
    layers_per_device,
    placement_problem,
    require_written_on_device,
)
from zupatch.engine.precheck import (
    TargetCheck,
    TargetNotGivenWarning,
    TargetStillGivenWarning,
    check_lengths,
    check_targets,
    context_length,
    not_given_message,
    prefix_budget,
    request_label,
    still_given_error,
    still_given_message,
    strict_error,
)
from zupatch.engine.requests import ForgetRequest, new_salt, request_digests
from zupatch.errors import ZupatchError
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.module import bits_of, write_bits
from zupatch.patch.ops import ENCODINGS, DenseEdit, LowRankEdit, build_patch

Base = Mapping[str, tuple[np.ndarray, nm.DType]]
ProgressFn = Callable[[str, int, int], None]


@dataclass
class CreateReport:
    """What ``create`` did, for summaries: numbers only, no request text.

    ``target_checks`` says, per request, whether the model gave its target
    before the edit (:func:`zupatch.engine.precheck.check_targets`).
    """

    patch: Patch
    edit: EditResult
    seconds: dict[str, float] = field(default_factory=dict)
    target_checks: list[TargetCheck] = field(default_factory=list)
    placement: dict[str, int] | None = None  # decoder layers per device, with a device map

    @property
    def targets_not_given(self) -> list[int]:
        """1-based indices of the requests whose target the model did not give (nothing to forget)."""
        return [c.index + 1 for c in self.target_checks if not c.given]

    @property
    def targets_still_given(self) -> list[int]:
        """1-based indices of the requests whose target the edited model still gives (greedy, whole answer)."""
        return [i + 1 for i in self.edit.still_given]

    def summary(self) -> dict[str, Any]:
        entries = self.patch.steps[0].entries
        return {
            "method": self.edit.method,
            "architecture": self.edit.architecture,
            "requests": self.edit.request_count,
            "targets_not_given": self.targets_not_given,
            "targets_still_given": self.targets_still_given,
            "layers": [e.layer for e in self.edit.layers],
            "ranks": [e.factors.rank if e.factors is not None else 0 for e in self.edit.layers],  # of the update
            "kinds": [e.kind for e in entries],
            "tensors": [e.name for e in entries],
            "patch_bytes": len(self.patch.to_bytes()),
            "touched_bytes": self.patch.touched_bytes(),
            "timings": {**self.edit.timings, **{k: round(v, 3) for k, v in self.seconds.items()}},
            "diagnostics": self.edit.diagnostics,
            **({"placement": self.placement} if self.placement else {}),
        }


def _refuse_if_still_given(edit: EditResult, strict: bool, request_names: Sequence[str] | None) -> None:
    """Strict mode: no patch when the edited model still gives some target."""
    if strict and (error := still_given_error(edit.still_given, request_names)):
        raise error


def _target_layers(model: nn.Module, config: CreateConfig) -> list[str]:
    spec = resolve_architecture(model, config.overrides)
    total = num_layers(model, spec)
    return [down_proj_weight_name(spec, layer) for layer in config.layers_for(total)]


def _requests_audit(requests: Sequence[ForgetRequest], include_text: bool) -> dict[str, Any]:
    """Count and salted digests; the text only on explicit opt-in."""
    salt = new_salt()
    audit: dict[str, Any] = {"count": len(requests), "salt": salt, "sha256": request_digests(requests, salt)}
    if include_text:
        audit["text"] = [{"prompt": r.prompt, "subject": r.subject, "target": r.target} for r in requests]
    return audit


def check_encoding(encoding: str) -> None:
    """Refuse an unknown patch encoding before anything is computed."""
    if encoding not in ENCODINGS:
        raise ZupatchError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")


def patch_from_edit(
    edit: EditResult,
    base: Base,
    requests: Sequence[ForgetRequest],
    *,
    base_model: str | None = None,
    base_revision: str | None = None,
    include_request_text: bool = False,
    tensor_names: Mapping[str, str] | None = None,
    encoding: str = "auto",
) -> Patch:
    """Turn computed layer edits into a patch against ``base`` (tensor name -> bits, dtype).

    Factors become low-rank entries, the baselines' deltas dense entries;
    with ``encoding="auto"`` an entry is stored as the difference of its
    result's bits from the base's instead where that is smaller (a
    high-rank update: many requests, or a baseline's dense delta; see
    :func:`zupatch.patch.ops.build_entry`).
    ``tensor_names`` maps the model's parameter names to the checkpoint's where
    they differ.
    """
    names = tensor_names or {}
    edits: list[LowRankEdit | DenseEdit] = []
    for e in edit.layers:
        name = names.get(e.tensor_name, e.tensor_name)
        if e.factors is not None:
            edits.append(LowRankEdit(name, e.factors.scale, e.factors.U, e.factors.B))
        else:
            assert e.delta is not None  # LayerEdit holds one or the other
            edits.append(DenseEdit(name, e.delta))
    return build_patch(
        edits,
        base,
        encoding=encoding,
        method=edit.method,
        hyperparameters=edit.hyperparameters,
        base_model=base_model,
        base_revision=base_revision,
        requests=_requests_audit(requests, include_request_text),
    )


def check_request_lengths(
    tokenizer: Any,
    model_config: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig,
    *,
    request_names: Sequence[str] | None = None,
    retain_requests: Sequence[ForgetRequest] = (),
) -> None:
    """Refuse requests (forget and retain) longer than the model's context (one line naming the request).

    Needs only the tokenizer and the model's config, so it runs before the model is loaded.
    """
    context = context_length(model_config)
    prefix = 0 if config.is_baseline else prefix_budget(tokenizer, config.contexts)
    neutral = None if config.is_baseline else config.neutral_target
    check_lengths(tokenizer, requests, context, prefix_tokens=prefix, neutral_target=neutral, names=request_names)
    check_lengths(tokenizer, retain_requests, context, prefix_tokens=prefix,
                  names=[f"retain request {i + 1}" for i in range(len(retain_requests))])  # fmt: skip


def check_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    *,
    strict: bool = False,
    request_names: Sequence[str] | None = None,
) -> list[TargetCheck]:
    """Whether the model gives each target now; ``strict``: raise if any is not given.

    Raises :class:`zupatch.engine.precheck.TargetNotGivenError` (one line,
    naming requests by ``request_names``, default "request N").
    """
    if request_names is not None and len(request_names) != len(requests):
        raise ValueError("one name per request")
    checks = check_targets(model, tokenizer, requests)
    error = strict_error(checks, request_names) if strict else None
    if error is not None:
        raise error
    return checks


@overload
def create(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig | None = None,
    *,
    strict: bool = False,
    request_names: Sequence[str] | None = None,
    return_report: Literal[False] = False,
    base_model: str | None = None,
    base_revision: str | None = None,
    include_request_text: bool = False,
    encoding: str = "auto",
    progress: ProgressFn | None = None,
    **compute_options: Any,
) -> Patch: ...


@overload
def create(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig | None = None,
    *,
    strict: bool = False,
    request_names: Sequence[str] | None = None,
    return_report: Literal[True],
    base_model: str | None = None,
    base_revision: str | None = None,
    include_request_text: bool = False,
    encoding: str = "auto",
    progress: ProgressFn | None = None,
    **compute_options: Any,
) -> CreateReport: ...


def create(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig | None = None,
    *,
    strict: bool = False,
    request_names: Sequence[str] | None = None,
    return_report: bool = False,
    base_model: str | None = None,
    base_revision: str | None = None,
    include_request_text: bool = False,
    encoding: str = "auto",
    progress: ProgressFn | None = None,
    **compute_options: Any,
) -> Patch | CreateReport:
    """Compute a patch (ZeroUnlearn, or a baseline) on a loaded model; the model is left unchanged.

    The patch's base is ``model``'s current weights (in their current dtype),
    so ``zupatch.applied(patch, model)`` shows the edited model. Extra keyword
    arguments go to :func:`zupatch.engine.create.compute_edit` (``corpus``,
    ``retain_requests``, ``stats_cache``, ``key_statistics``...). Key
    statistics are cached as the CLI caches them (``$ZUPATCH_CACHE/stats``,
    keyed by a hash of the weights they depend on); ``stats_cache=None``
    turns the cache off.

    First, each request whose target the model does not give now (nothing to
    forget) gets a :class:`~zupatch.engine.precheck.TargetNotGivenWarning`
    naming it by ``request_names`` (default "request N", never its text);
    ``strict=True`` raises :class:`~zupatch.engine.precheck.TargetNotGivenError`
    instead, before anything is computed. After the edit, each request whose
    target the patched model still gives gets a
    :class:`~zupatch.engine.precheck.TargetStillGivenWarning`
    (``report.targets_still_given``); with ``strict=True``,
    :class:`~zupatch.engine.precheck.TargetStillGivenError` instead and no
    patch. ``return_report=True`` returns a
    :class:`CreateReport` (the patch, the edit's diagnostics, the checks:
    ``report.targets_not_given``) instead of the bare patch. ``encoding``:
    how the entries are stored (:func:`patch_from_edit`).
    """
    config = config or CreateConfig()
    check_encoding(encoding)
    started = time.perf_counter()
    if "stats_cache" not in compute_options and "key_statistics" not in compute_options:
        from zupatch.engine.stats import StatsCache

        compute_options["stats_cache"] = StatsCache()  # the CLI's cache, same keys
    check_request_lengths(tokenizer, getattr(model, "config", None), requests, config, request_names=request_names,
                          retain_requests=compute_options.get("retain_requests", ()))  # fmt: skip
    params = dict(model.named_parameters())
    names = _target_layers(model, config)
    checks = check_requests(model, tokenizer, requests, strict=strict, request_names=request_names)
    for check in checks:
        if not check.given:
            message = not_given_message(check, request_label(check.index, request_names))
            warnings.warn(TargetNotGivenWarning(message), stacklevel=2)
    base = {n: bits_of(params[n]) for n in names}  # before compute_edit may change the dtype
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    try:
        edit = compute_edit(model, tokenizer, requests, config, progress, **compute_options)
    finally:
        model.to(device=device, dtype=dtype)
        params = dict(model.named_parameters())
        for name, (bits, _) in base.items():
            write_bits(params[name], bits)
    _refuse_if_still_given(edit, strict, request_names)
    for index in edit.still_given:
        warnings.warn(TargetStillGivenWarning(still_given_message(request_label(index, request_names))), stacklevel=2)
    missing = [e.tensor_name for e in edit.layers if e.tensor_name not in base]
    if missing:
        raise ZupatchError(f"the edit touched unexpected tensors: {missing}")
    # the patch names tensors as the model's checkpoint files do (multimodal Gemma 3:
    # language_model.model.layers...), so it applies to the folder as well as to the model
    spec = resolve_architecture(model, config.overrides)
    stored = {name: stored_tensor_name(spec, name) for name in base}
    patch = patch_from_edit(edit, {stored[n]: bits for n, bits in base.items()}, requests, base_model=base_model,
                            base_revision=base_revision, include_request_text=include_request_text,
                            tensor_names=stored, encoding=encoding)  # fmt: skip
    if not return_report:
        return patch
    return CreateReport(patch=patch, edit=edit, seconds={"total": time.perf_counter() - started}, target_checks=checks)


def load_tokenizer_and_config(folder: Path) -> tuple[Any, Any]:
    """Tokenizer and model config of a checkpoint folder (no weights read), with one-line errors."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # zupatch draws its own progress; library code stays quiet

    if not (folder / "config.json").is_file():
        raise ZupatchError("has no config.json: not a Hugging Face model folder", folder)
    Checkpoint(folder)  # clear errors for missing or broken weights before transformers tries
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise ZupatchError(f"cannot load the tokenizer ({exc.__class__.__name__}: {str(exc)[:200]})", folder) from None
    try:
        model_config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001
        raise ZupatchError(f"cannot load the model ({exc.__class__.__name__}: {str(exc)[:200]})", folder) from None
    return tokenizer, model_config


def load_model(
    folder: Path,
    dtype: torch.dtype | str = "auto",
    device: str = "auto",
    *,
    tokenizer: Any = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> tuple[nn.Module, Any]:
    """Model and tokenizer of a checkpoint folder, with one-line errors (``tokenizer``: one already loaded).

    With ``device_map`` the layers are spread over the GPUs and CPU RAM present
    by accelerate (:mod:`zupatch.engine.placement`, ``max_memory`` caps each
    device) instead of all going to ``device``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from zupatch.engine.create import resolve_device, resolve_dtype

    problem = placement_problem(device_map, max_memory)
    if problem:
        raise ZupatchError(problem)
    placement = device_map_options(device_map, max_memory)
    if tokenizer is None:
        tokenizer, _ = load_tokenizer_and_config(folder)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target) if isinstance(dtype, str) else dtype
    try:
        # A multimodal Gemma 3 config (model_type "gemma3") gives Gemma3ForConditionalGeneration here,
        # as AutoModelForImageTextToText would (transformers 5): its language model runs on text alone.
        # What a device map offloaded is in create's summary ("placement"), not a library warning.
        verbosity, accelerate_log = hf_logging.get_verbosity(), logging.getLogger("accelerate")
        level = accelerate_log.level
        if placement:
            hf_logging.set_verbosity_error()
            accelerate_log.setLevel(logging.ERROR)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **placement)
        finally:
            hf_logging.set_verbosity(verbosity)
            accelerate_log.setLevel(level)
    except Exception as exc:  # noqa: BLE001
        raise ZupatchError(f"cannot load the model ({exc.__class__.__name__}: {str(exc)[:200]})", folder) from None
    return (model if placement else model.to(target)).eval(), tokenizer


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _storage_dtypes(model: nn.Module, config: CreateConfig, ckpt: Checkpoint) -> dict[str, torch.dtype]:
    """dtype in the checkpoint's files of each tensor the edit will touch, by state-dict name."""
    dtypes = {}
    for name in _target_layers(model, config):
        _, info = ckpt.locate(checkpoint_tensor_name(model, name, ckpt.weight_map))
        if info.dtype in _TORCH_DTYPES:  # others are refused when the patch is built
            dtypes[name] = _TORCH_DTYPES[info.dtype]
    return dtypes


def _results_of(on: Patch, ckpt: Checkpoint, folder: Path) -> dict[str, tuple[np.ndarray, nm.DType]]:
    """The bits of every tensor ``on`` touches, after ``on``, read from ``folder`` (its base)."""
    from zupatch.checkpoint.apply import checkpoint_state, require_base
    from zupatch.patch.ops import run_chain_in_memory

    require_base(on, checkpoint_state(on, ckpt), folder)
    results = {}
    for name in on.tensor_names:
        dtype = nm.FLOAT_DTYPES[on.chain(name)[0].dtype]
        results[name] = (run_chain_in_memory(on.chain(name), ckpt.read_bits(name, dtype.bits), on.source), dtype)
    return results


def _write_results(model: nn.Module, results: dict[str, tuple[np.ndarray, nm.DType]]) -> None:
    """Put patched bits into the loaded model's parameters (converted to its compute dtype)."""
    from zupatch.patch.module import find_parameter, tensor_of

    with torch.no_grad():
        for name, (bits, dtype) in results.items():
            parameter = find_parameter(model, name)
            require_written_on_device(name, parameter, "the earlier patch")
            parameter.copy_(tensor_of(bits, dtype).to(parameter.device, parameter.dtype))


def create_from_checkpoint(
    folder: Path,
    requests: Sequence[ForgetRequest],
    config: CreateConfig | None = None,
    *,
    strict: bool = False,
    request_names: Sequence[str] | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    include_request_text: bool = False,
    encoding: str = "auto",
    progress: ProgressFn | None = None,
    on: Patch | None = None,
    **compute_options: Any,
) -> CreateReport:
    """Load ``folder``, compute the edit, and build the patch against the files' own bits.

    With ``on`` (a patch whose base is ``folder``), the edit is computed on
    the model with ``on`` applied, against ``on``'s result bits: the new
    patch starts where ``on`` ends, so ``stack(on, new)`` is valid.

    Before the edit, checks that the model gives each request's target
    (:func:`check_requests`): the report's ``target_checks`` and summary
    (``targets_not_given``, 1-based) say which it does not; ``strict=True``
    raises :class:`~zupatch.engine.precheck.TargetNotGivenError` instead,
    naming requests by ``request_names`` (the CLI passes ``FILE:LINE``).
    After the edit, ``targets_still_given`` lists the requests whose target
    the edited model still gives; ``strict=True`` raises
    :class:`~zupatch.engine.precheck.TargetStillGivenError` for them.
    Before the model is even loaded, a request longer than the model's context
    is refused (:func:`check_request_lengths`). ``encoding``: how the
    entries are stored (:func:`patch_from_edit`).
    """
    config = config or CreateConfig()
    check_encoding(encoding)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer, model_config = load_tokenizer_and_config(folder)
    check_request_lengths(tokenizer, model_config, requests, config, request_names=request_names,
                          retain_requests=compute_options.get("retain_requests", ()))  # fmt: skip
    ckpt = Checkpoint(folder)
    on_results = _results_of(on, ckpt, folder) if on is not None else {}
    model, tokenizer = load_model(folder, config.dtype, config.device, tokenizer=tokenizer,
                                  device_map=config.device_map, max_memory=config.max_memory)  # fmt: skip
    _write_results(model, on_results)
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    _target_layers(model, config)  # a wrong --layers is reported as such, before the check
    checks = check_requests(model, tokenizer, requests, strict=strict, request_names=request_names)
    seconds["check"] = time.perf_counter() - t
    if config.is_baseline:  # trained weights are rounded to the dtype the checkpoint stores them in
        compute_options.setdefault("storage_dtypes", _storage_dtypes(model, config, ckpt))
    edit = compute_edit(model, tokenizer, requests, config, progress, **compute_options)
    _refuse_if_still_given(edit, strict, request_names)
    t = time.perf_counter()
    names = {e.tensor_name: checkpoint_tensor_name(model, e.tensor_name, ckpt.weight_map) for e in edit.layers}
    placement = layers_per_device(model, decoder_layers(model, resolve_architecture(model, config.overrides)))
    del model  # the patch is built from the files' bits: the model's memory goes before the base tensors come
    base: dict[str, tuple[np.ndarray, nm.DType]] = {}
    for name in names.values():
        _, info = ckpt.locate(name)
        if info.dtype not in nm.FLOAT_DTYPES:
            raise ZupatchError(f"tensor {name!r} has dtype {info.dtype}, which zupatch cannot patch", folder)
        dtype = nm.FLOAT_DTYPES[info.dtype]
        base[name] = on_results.get(name) or (ckpt.read_bits(name, dtype.bits), dtype)
    patch = patch_from_edit(edit, base, requests, base_model=base_model, base_revision=base_revision,
                            include_request_text=include_request_text, tensor_names=names,
                            encoding=encoding)  # fmt: skip
    seconds["patch"] = time.perf_counter() - t
    return CreateReport(patch=patch, edit=edit, seconds=seconds, target_checks=checks, placement=placement)
