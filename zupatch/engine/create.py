"""The ZeroUnlearn edit of a loaded model: the layer loop of docs/maths.md.

:func:`compute_edit` takes a model, its tokenizer and forget requests and
returns an :class:`EditResult`: per edited layer the factors ``(c, U, B)`` of
``stored' = c·stored + U·B`` in the layout of the checkpoint tensor, plus the
hyperparameters, timings and convergence diagnostics. It writes no files (the
patch layer turns the result into a patch) and never records request text.

The loop, for layers l_1 < ... < l_m (L = l_m):

1. Z: block-L outputs at the fact tokens that make the model emit the neutral
   target (once, on the unedited model);
2. for the j-th layer l (j = 0..m-1), on the model edited so far:
   K_f (keys at l, averaged over context prefixes and phrasings), H_L
   (current block-L outputs), O (only when the projection or the GD variant
   needs it), ``R = (Z - H_L)/(m - j)``, ``V* = W K_f + R``; solve with the
   key statistics plus the retain keys; write ``W' = c W + U B``. Where the
   MLP output passes a norm N before the residual add (Gemma 2/3, OLMo 2/3), V* is the
   output whose N is closest to ``N(W K_f) + R`` (:mod:`zupatch.engine.norms`);
3. while a request's answer is still given, another pass over the layers
   moves only those requests (``refine``); each layer's factors compose.

Retain keys, which the edit must leave alone, come from ``--retain``, the
requests' own neighbours, subjects the model proposes, and the vocabulary
words most similar to each subject in the requests' templates and in a
built-in set of other factual templates: this is what makes the edit
specific without a retain file (docs/create.md).

The method is a plugin (:mod:`zupatch.engine.methods`): the ZeroUnlearn
methods give the loop its per-layer solve; a fine-tuning baseline ("ga",
"npo") trains the same layers instead, and its layer edits are dense deltas
rather than factors.

Defaults are the settings measured best on SmolLM2-135M (docs/create.md and
:data:`~zupatch.engine.methods.zerounlearn.MEASURED_CLOSED_FORM`): no
projection, λ_r = 5000, step size relative to the hidden-state norm with
early stopping. :meth:`CreateConfig.paper` is the paper's recipe. After the
loop the answers' NLL on the bare prompts and the same-pattern probes are
measured again (``diagnostics["verification"]``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zupatch.engine.architectures import (
    DEFAULT_RELATIVE_DEPTH,
    LAST_TOKEN_RELATIVE_DEPTH,
    ArchitectureOverrides,
    ArchitectureSpec,
    check_layers,
    decoder_layers,
    default_layers,
    down_proj_module,
    down_proj_weight_math,
    down_proj_weight_name,
    num_layers,
    resolve_architecture,
)
from zupatch.engine.baselines import BaselineParams
from zupatch.engine.hooks import LayerInputCache
from zupatch.engine.methods import METHODS, Method, get_method
from zupatch.engine.methods.zerounlearn import MEASURED_CLOSED_FORM
from zupatch.engine.methods.zerounlearn_gd import GD_SOLVERS, MEASURED_GD
from zupatch.engine.norms import check_residual_paths, outputs_for_residual, post_mlp_norm_gains, rms_normalise
from zupatch.engine.placement import placement_problem, require_editable
from zupatch.engine.precheck import check_targets
from zupatch.engine.probes import derive_probe_prompts, next_token_ids, top1_unchanged
from zupatch.engine.requests import ForgetRequest, at_last_token, last_token_phrasings, text_problem
from zupatch.engine.subjects import (
    GENERIC_TEMPLATES,
    PhrasingConfig,
    answered_template_phrasings,
    phrasing_variants,
    similar_requests,
    template_requests,
)
from zupatch.engine.solvers import ClosedFormParams, Factors, GDParams, OrdinaryBudget, SecondMoment, moment_root
from zupatch.engine.shared_stats import StatsFolder
from zupatch.engine.stats import (
    Corpus,
    KeyStatistics,
    LazyKeyStatistics,
    ProgressCallback,
    StatsCache,
    StatsConfig,
    compute_key_statistics,
    model_device,
)
from zupatch.engine.targets import (
    CURRENT_OUTPUTS,
    PAPER_OPTIMISATION,
    ContextConfig,
    NeighbourConfig,
    OptimisationConfig,
    fact_activations,
    generate_context_prefixes,
    neighbour_requests,
    optimise_representations,
    propose_neighbour_subjects,
    target_nll,
)
from zupatch.errors import ZupatchError

MethodName = Literal["zerounlearn", "zerounlearn-gd", "ga", "npo"]
FactToken = Literal["subject", "last"]
FACT_TOKENS: tuple[str, ...] = ("subject", "last")  # where the keys are read: docs/create.md


@dataclass(frozen=True)
class RefineConfig:
    """Passes over the layers until every request is forgotten.

    After a pass, a request still counts as answered when greedy decoding
    still gives its whole answer after the bare prompt, or the answer's mean
    token NLL is below ``forgotten_nll`` (nats; 3.0 is a geometric-mean token
    probability of 5%; 2.0 until 2026-12-02, when 3.0 kept the facts forgotten
    in chat more often at about the same specificity: docs/create.md, "A
    deeper stop for the passes"). The next pass moves only those requests further
    towards their neutral targets and keeps the others' outputs where they
    are, so a pass adds collateral only where it is needed. The layer edits of
    all passes compose into one identity-plus-low-rank factor per layer (rank
    up to 2n per pass). ``max_passes = 1`` is the single pass of the paper.
    The closed form only: ``zerounlearn-gd`` always solves once.
    """

    max_passes: int = 3
    forgotten_nll: float = 3.0

    def __post_init__(self) -> None:
        if self.max_passes < 1:
            raise ZupatchError("refine.max_passes must be at least 1")


def neutral_target_problem(target: Any) -> str | None:
    """Why ``target`` cannot be a neutral target (what the model should say instead), or None.

    None means the tokenizer's EOS token; otherwise it is text the model is
    taught to say, so it needs at least one character: an empty target has no
    token to aim at.
    """
    if target is None:
        return None
    if not isinstance(target, str):
        return f"must be text, got {target!r}"
    if not target:
        return ("is empty: give the text the model should say instead (e.g. \"I don't know.\"), "
                "or leave it out to use the EOS token")  # fmt: skip
    return text_problem(target)


#: ``--preset fast``: the first two of the default context starts.
FAST_CONTEXT_STARTS = ContextConfig().starts[:2]


@dataclass
class CreateConfig:
    """Everything :func:`compute_edit` needs besides model, tokenizer and requests.

    ``layers=None`` picks :func:`default_layers` (see :meth:`layers_for`).
    ``fact_token``: where each prompt's key is read, "subject" (the subject's
    last token, the paper's) or "last" (the prompt's last token, where the
    answer is about to be said, in any phrasing); None: :attr:`keys_at`.
    ``neutral_target=None`` uses
    the tokenizer's EOS token. ``retain_key_weight``: each retain key (from
    ``retain_requests``, the requests' ``neighbours`` and the neighbour
    subjects the model proposes, see ``neighbours``) is protected as strongly
    as ``retain_key_weight`` forget keys are pushed; 0 disables.
    ``device``: "auto" (an accelerator when torch sees one, else CPU), "cpu",
    "cuda", "cuda:N" or "mps". ``dtype``: "auto" (float32 on CPU, bfloat16 on
    an accelerator), "float32", "bfloat16", "float16". ``method`` "ga" / "npo"
    are the fine-tuning baselines (settings in ``baseline``); they use only
    ``layers``, ``baseline``, ``overrides``, ``device`` and ``dtype``.
    ``device_map`` ("auto", "balanced", "balanced_low_0", "sequential"):
    loading spreads the layers over the GPUs and CPU RAM present
    (:mod:`zupatch.engine.placement`), capped per device by ``max_memory``
    ("0=70GiB,cpu=120GiB"); ``device`` then only picks the dtype.
    ``layer_cache_mb``: memory (MiB) for the hidden states entering the first
    edited layer, so that the loop's repeated forwards of the same prompts
    skip the layers the edit does not change (:class:`LayerInputCache`);
    ``None``: a quarter of the model's bytes, at least 1 GiB; 0: off.
    """

    layers: tuple[int, ...] | None = None
    method: MethodName = "zerounlearn"
    fact_token: FactToken | None = None
    neutral_target: str | None = None
    closed_form: ClosedFormParams = MEASURED_CLOSED_FORM
    gd: GDParams = MEASURED_GD
    gd_solver: Literal["exact", "adam"] = "exact"
    baseline: BaselineParams = field(default_factory=BaselineParams)
    contexts: ContextConfig = field(default_factory=ContextConfig)
    original: OptimisationConfig = CURRENT_OUTPUTS
    neutral: OptimisationConfig = field(default_factory=OptimisationConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    retain_key_weight: float = 1.0
    phrasings: PhrasingConfig = field(default_factory=PhrasingConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    probes: int = 16
    use_neighbours: bool = True
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    overrides: ArchitectureOverrides = field(default_factory=ArchitectureOverrides)
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    layer_cache_mb: int | None = None

    def __post_init__(self) -> None:
        if self.layer_cache_mb is not None and (
            not isinstance(self.layer_cache_mb, int) or isinstance(self.layer_cache_mb, bool) or self.layer_cache_mb < 0
        ):
            raise ZupatchError("layer_cache_mb must be a whole number of MiB >= 0 (0 turns the cache off)")
        get_method(self.method)  # a one-line error for an unknown name
        problem = placement_problem(self.device_map, self.max_memory)
        if problem:
            raise ZupatchError(problem)
        problem = neutral_target_problem(self.neutral_target)
        if problem:
            raise ZupatchError(f"neutral_target {problem}")
        if self.gd_solver not in GD_SOLVERS:
            raise ZupatchError(f"unknown GD solver {self.gd_solver!r}; choose {' or '.join(GD_SOLVERS)}")
        if self.retain_key_weight < 0:
            raise ZupatchError("retain key weight must be >= 0")
        if self.fact_token is not None and self.fact_token not in FACT_TOKENS:
            raise ZupatchError(f"unknown fact_token {self.fact_token!r}; choose {' or '.join(FACT_TOKENS)}")

    @classmethod
    def paper(cls, **changes: Any) -> CreateConfig:
        """The paper's recipe (docs/maths.md): projection everywhere, λ_r 15000,
        25 absolute-lr steps, no retain keys, bare prompts and one pass."""
        settings: dict[str, Any] = dict(
            closed_form=ClosedFormParams(),
            gd=GDParams(),
            original=PAPER_OPTIMISATION,
            neutral=PAPER_OPTIMISATION,
            retain_key_weight=0.0,
            use_neighbours=False,
            neighbours=NeighbourConfig(subjects=0, similar=0),
            phrasings=PhrasingConfig(weight=0.0),
            refine=RefineConfig(max_passes=1),
            fact_token="subject",
        )
        settings.update(changes)
        return cls(**settings)

    @classmethod
    def robust(cls, **changes: Any) -> CreateConfig:
        """The defaults with one key column per context prefix and λ_f 7 per column: the
        facts stay forgotten in chat and after text naming the subject, for some
        specificity (docs/create.md, "One key per context")."""
        settings: dict[str, Any] = dict(
            contexts=ContextConfig(separate_keys=True),
            closed_form=replace(MEASURED_CLOSED_FORM, lambda_forget=7.0),
        )
        settings.update(changes)
        return cls(**settings)

    @classmethod
    def fast(cls, **changes: Any) -> CreateConfig:
        """The defaults with larger neutral-target steps, an earlier stop and two context
        prefixes instead of five: for long deletion lists, about four times less time
        in the neutral targets, at some cost in specificity or depth depending on the
        model (docs/create.md, "Many requests: --preset fast")."""
        settings: dict[str, Any] = dict(
            contexts=ContextConfig(starts=FAST_CONTEXT_STARTS),
            neutral=OptimisationConfig(lr=0.3, converged_nll=0.1),
        )
        settings.update(changes)
        return cls(**settings)

    def layers_for(self, total_layers: int) -> tuple[int, ...]:
        """The layers to edit in a model of ``total_layers``: ``layers``, else by relative
        depth, deeper when the keys are read at the last token (:func:`default_layers`;
        the baselines train the subject-token layers, where they were measured)."""
        last = self.keys_at == "last"
        depth = LAST_TOKEN_RELATIVE_DEPTH if last else DEFAULT_RELATIVE_DEPTH
        chosen = self.layers if self.layers is not None else default_layers(total_layers, relative_depth=depth)
        return check_layers(chosen, total_layers)

    @property
    def keys_at(self) -> FactToken:
        """Where the keys are read: ``fact_token``, else (None) the prompt's last token
        for the closed form and the subject's last token for ZeroUnlearn-GD and the
        baselines, as each was measured (docs/create.md, "Keys at the last token")."""
        if self.is_baseline:
            return "subject"
        if self.fact_token is not None:
            return self.fact_token
        return "last" if self.method_plugin.same_kind else "subject"

    @property
    def method_plugin(self) -> Method:
        """The registered method (:mod:`zupatch.engine.methods`) this config runs."""
        return METHODS[self.method]

    @property
    def is_baseline(self) -> bool:
        """A fine-tuning baseline (GA, NPO) rather than a ZeroUnlearn method."""
        return self.method_plugin.is_baseline

    def needs_original_representations(self) -> bool:
        return self.method_plugin.needs_original(self)

    def hyperparameters(self) -> dict[str, Any]:
        """The settings the method uses, as plain JSON-ready values (for the patch
        metadata): every ZeroUnlearn setting, or the few a baseline reads."""
        settings = asdict(self)
        if self.is_baseline:
            used = ("method", "layers", *self.method_plugin.settings, "overrides", "device", "dtype")
            return _plain({key: settings[key] for key in used})
        settings.pop("baseline")
        settings = _plain(settings)
        # templates are named, not written out: a user's own may say what was forgotten
        templates = self.neighbours.templates
        settings["neighbours"]["templates"] = (
            "built-in"
            if templates == GENERIC_TEMPLATES
            else {"count": len(templates), "sha256": hashlib.sha256(json.dumps(list(templates)).encode()).hexdigest()}
        )
        return settings


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


@dataclass
class LayerEdit:
    """The edit of one layer's down projection, in the checkpoint tensor's layout.

    Exactly one of ``factors`` (ZeroUnlearn: ``stored' = scale·stored + U·B``)
    and ``delta`` (the baselines: ``stored' = stored + delta``) is set, both
    float64 on CPU.
    """

    layer: int
    tensor_name: str  # name in model.state_dict() (see architectures.checkpoint_tensor_name)
    factors: Factors | None
    weight_transposed: bool
    shape: tuple[int, int]  # of the stored tensor
    dtype: torch.dtype
    diagnostics: dict[str, Any]
    delta: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.factors is None) == (self.delta is None):
            raise ValueError("a layer edit has either factors or a dense delta")
        if self.delta is not None and tuple(self.delta.shape) != tuple(self.shape):
            raise ValueError(f"delta of shape {tuple(self.delta.shape)} does not fit a tensor of shape {self.shape}")

    @property
    def kind(self) -> Literal["lowrank", "dense"]:
        """The edit's arithmetic: "lowrank" (factors) or "dense" (delta). The patch stores it
        so, or as a ``bits`` entry where that is smaller (``encoding``, docs/format.md)."""
        return "lowrank" if self.factors is not None else "dense"


@dataclass
class EditResult:
    """What :func:`compute_edit` found; numbers only, no request text."""

    architecture: str
    method: str
    layers: list[LayerEdit]
    hyperparameters: dict[str, Any]
    timings: dict[str, float]
    diagnostics: dict[str, Any]
    request_count: int
    original_weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def tensor_names(self) -> list[str]:
        return [edit.tensor_name for edit in self.layers]

    @property
    def still_given(self) -> list[int]:
        """0-based indices of the requests whose target the edited model still gives."""
        return list(self.diagnostics.get("verification", {}).get("still_given", []))


# --------------------------------------------------------------------------- device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" -> the accelerator torch sees (CUDA, then MPS), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ZupatchError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ZupatchError(f"device {name!r} requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ZupatchError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" -> float32 on CPU (bf16 matmuls there are slow and coarse), bfloat16 elsewhere."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ZupatchError(f"unknown dtype {name!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# --------------------------------------------------------------------------- the edit


def _no_progress(stage: str, done: int, total: int) -> None:
    """The ``progress`` callback when the caller gives none."""


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``seconds[phase]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def _retain_prompts(
    requests: Sequence[ForgetRequest], retain: Sequence[ForgetRequest], use_neighbours: bool
) -> list[ForgetRequest]:
    prompts = list(retain)
    if use_neighbours:
        prompts += [ForgetRequest(p, "", "") for r in requests for p in r.neighbours]
    return prompts


def compute_edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    retain_requests: Sequence[ForgetRequest] = (),
    corpus: Corpus | None = None,
    stats_cache: StatsCache | None = None,
    model_identity: str | None = None,
    key_statistics: Mapping[int, KeyStatistics] | None = None,
    shared_statistics: StatsFolder | None = None,
    storage_dtypes: Mapping[str, torch.dtype] | None = None,
) -> EditResult:
    """Compute the ZeroUnlearn edit of ``model`` for ``requests``, editing it in place.

    ``model`` ends up edited (the result's ``original_weights`` restore it,
    see :func:`restore_weights`), on the device and dtype the config resolves
    to. Statistics come from ``key_statistics`` if given, else from
    ``shared_statistics`` (``create --stats``: checked against the model and
    layers first, :meth:`~zupatch.engine.shared_stats.StatsFolder.check`),
    else from ``corpus`` (default: sampled from the model) through ``stats_cache``.
    For the baselines ("ga", "npo") only ``retain_requests`` and
    ``storage_dtypes`` matter: the dtype each edited weight is stored in where
    the patch will apply, by state-dict name (default: the model's dtype
    before this call), which the trained weights are rounded to.
    """
    config = config if config is not None else CreateConfig()
    if not requests:
        raise ZupatchError("no forget requests")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    stored_dtypes = {name: p.dtype for name, p in model.named_parameters()}  # before any conversion
    if not hasattr(model, "hf_device_map") and (  # a device map placed the layers: they stay where they are
        model_device(model) != device or next(model.parameters()).dtype != dtype
    ):
        model.to(device=device, dtype=dtype)
    device = model_device(model)
    spec = resolve_architecture(model, config.overrides)
    total_layers = num_layers(model, spec)
    layers = config.layers_for(total_layers)
    require_editable([(layer, down_proj_module(model, spec, layer)) for layer in layers])  # a device map's offloads
    if config.is_baseline:
        storage = {**stored_dtypes, **(storage_dtypes or {})}
        return _baseline_edit(model, tokenizer, requests, config, progress, retain_requests, storage, started)
    solve_device = device if device.type == "cuda" else torch.device("cpu")  # MPS lacks float64
    last_layer = layers[-1]
    if key_statistics is None and shared_statistics is not None:  # refused before any work if they do not fit
        key_statistics = shared_statistics.statistics_for(model, spec, layers, model_identity)
    norm_gains = post_mlp_norm_gains(model, spec, layers)  # Gemma 2/3, OLMo 2/3; a norm of another kind fails here
    check_residual_paths(model, spec, layers, norm_gains)
    neutral_target = config.neutral_target if config.neutral_target is not None else tokenizer.eos_token
    if not neutral_target:
        raise ZupatchError('the tokenizer has no EOS token; give a neutral target (e.g. "I don\'t know.")')
    n = len(requests)
    retain = _retain_prompts(requests, retain_requests, config.use_neighbours) if config.retain_key_weight > 0 else []

    report = progress or _no_progress
    with _timed(timings, "contexts"):
        report("preparing", 0, 3)
        prefixes = generate_context_prefixes(model, tokenizer, config.contexts)
        report("preparing", 1, 3)
        proposed: list[str] = []  # the model's own list of other subjects: protected, never probed
        if config.retain_key_weight > 0 and config.neighbours.subjects > 0:
            proposed = propose_neighbour_subjects(model, tokenizer, requests, config.neighbours)
            retain += neighbour_requests(requests, proposed)
        report("preparing", 2, 3)
        # Phrasings, similar subjects and refinement were measured for the closed form; ZeroUnlearn-GD
        # keeps its single solve on the prompts (with them, the fact model forgot 16 of 20 requests
        # instead of 18 and kept 23 of 28 other facts instead of 28: docs/create.md).
        same_kind = config.method_plugin.same_kind
        at_last = config.keys_at == "last"
        variants, owners = [], []
        found: list[ForgetRequest] = []  # the model's own other words for a request's fact
        if same_kind and config.phrasings.weight > 0:
            variants, owners = (last_token_phrasings(requests) if at_last
                                else phrasing_variants(requests, config.phrasings.derived))  # fmt: skip
            if at_last and config.phrasings.templates:
                found, found_owners = answered_template_phrasings(model, tokenizer, requests, config.neighbours.templates)
                variants, owners = [*variants, *found], [*owners, *found_owners]
        use_similar = same_kind and config.retain_key_weight > 0
        similar = similar_requests(model, tokenizer, requests, config.neighbours.similar) if use_similar else []
        other_templates: list[ForgetRequest] = []  # measured at the last token only
        if use_similar and at_last and config.neighbours.template_weight > 0:
            other_templates = template_requests(
                model, tokenizer, requests, config.neighbours.templates, config.neighbours.template_subjects,
                config.neighbours.template_rows, skip=(r.text for r in similar),
            )  # fmt: skip
        subject_requests = requests  # the probes fill the templates with other subjects
        if at_last:  # every key at the prompt's last token; the subjects chose the neighbours
            requests = [at_last_token(r) for r in requests]
            retain, similar = [at_last_token(r) for r in retain], [at_last_token(r) for r in similar]
            other_templates = [at_last_token(r) for r in other_templates]
        report("preparing", 3, 3)
    with _timed(timings, "statistics"):  # from the cache, a layer's f×f matrix is read when it is solved
        statistics = (
            key_statistics  # read, never changed: a lazy mapping stays lazy
            if key_statistics is not None
            else compute_key_statistics(
                model, tokenizer, spec, layers, corpus, config.stats, stats_cache, model_identity, progress,
                lazy=True,
            )
        )
    missing = [layer for layer in layers if layer not in statistics]
    if missing:
        raise ZupatchError(f"no key statistics for layer(s) {missing}")
    with _timed(timings, "neutral_targets"):
        neutral = optimise_representations(
            model,
            tokenizer,
            spec,
            requests,
            [neutral_target] * n,
            site="block",
            layer=last_layer,
            prefixes=prefixes,
            config=config.neutral,
            progress=progress,
            phase="neutral targets",
        )
    Z = neutral.vectors.to(torch.float64)
    answers = [r.target for r in requests]
    answer_nll_before = target_nll(model, tokenizer, requests, answers)
    with _timed(timings, "probes"):
        report("probes", 0, 2)
        probes = _Probes.before(model, tokenizer, subject_requests, config, proposed)
        report("probes", 1, 2)

    factors_of: dict[int, Factors] = {}
    ordinary: dict[int, float] = {}  # per layer: ordinary_text_change of the edit so far
    original_weights: dict[str, torch.Tensor] = {}
    layer_diagnostics: list[dict[str, Any]] = []
    answer_nll_after = answer_nll_before
    similar_keys: dict[int, torch.Tensor] = {}  # the similar subjects' and the other templates' keys (a root)
    similar_contexts = prefixes[: config.neighbours.similar_contexts]
    similar_rows = [0, len(similar) * len(similar_contexts) + len(other_templates)]  # read once for every layer

    def similar_read(rows: int) -> None:
        similar_rows[0] += rows
        report("similar keys", similar_rows[0], similar_rows[1])

    layer_cache = LayerInputCache(model, decoder_layers(model, spec), layers[0], _layer_cache_bytes(model, config))
    separate = config.contexts.separate_keys and same_kind  # measured for the closed form only, as phrasings
    bound = config.closed_form.ordinary_bound if config.method_plugin.bounded else None
    passes = 0
    pending = torch.ones(n, dtype=torch.bool)  # requests the next pass moves towards Z
    max_passes = config.refine.max_passes if same_kind else 1

    def used_up(layer: int) -> bool:  # the bound is reached (figures are rounded to 4 places)
        return bound is not None and ordinary.get(layer, 0.0) >= bound - 1e-4

    while passes < max_passes:
        if passes and all(used_up(layer) for layer in layers):
            break  # another pass could change no layer
        passes += 1
        for j, layer in enumerate(layers):
            if used_up(layer):  # this pass would leave it as it is: no keys read for it
                report("layers", 3 * j + 3, 3 * len(layers))
                continue
            with _timed(timings, "keys"):
                activations = fact_activations(
                    model, tokenizer, spec, [*requests, *retain], prefixes, layer, last_layer, layer_cache=layer_cache,
                    per_context=separate,
                )  # fmt: skip
            report("layers", 3 * j + 1, 3 * len(layers))  # three updates a layer: keys, other keys, solve
            H_L = activations.block_outputs[:, :n]
            if separate:  # f × n × contexts; the retain keys stay averaged
                keys, retain_keys = activations.keys[:, :n], activations.keys[:, n:].mean(dim=2)
            else:
                keys, retain_keys = activations.keys[:, :n], activations.keys[:, n:]
            retain_columns = retain_keys.shape[1]  # reported: the keys protected, not their root's columns
            if similar or other_templates:
                if layer not in similar_keys:  # first pass, every layer at once; later passes protect the same outputs
                    with _timed(timings, "keys"):
                        similar_keys.update(_similar_keys(  # held to the last pass: at most f columns each
                            model, tokenizer, spec, layers[j:], layer_cache, similar_read,
                            (similar, similar_contexts, 1.0), (other_templates, [""], config.neighbours.template_weight),
                        ))  # fmt: skip
                retain_columns += len(similar) + len(other_templates)  # one key per prompt
                retain_keys = torch.cat([retain_keys, similar_keys[layer].to(retain_keys.dtype)], dim=1)
            if variants:
                with _timed(timings, "keys"):
                    variant_keys = fact_activations(
                        model, tokenizer, spec, variants, prefixes, layer, layer_cache=layer_cache,
                        per_context=separate,
                    ).keys  # fmt: skip
                keys = _mean_over_variants(keys, variant_keys, owners, config.phrasings.weight)
            if separate:  # request-major columns: request i in context k is column i * contexts + k
                keys = keys.reshape(keys.shape[0], -1)
            report("layers", 3 * j + 2, 3 * len(layers))
            O = None
            original_summary = None
            if config.needs_original_representations() and config.original.max_steps == 0:
                # O as the model computes it now: the down projection's output W·k at each bare
                # prompt's fact token, without the forward through the answer that steps need.
                with _timed(timings, "original_representations"):
                    bare = fact_activations(model, tokenizer, spec, requests, [""], layer, layer_cache=layer_cache)
                    W_now = down_proj_weight_math(down_proj_module(model, spec, layer), spec).detach()
                    O = W_now.to(solve_device, torch.float64) @ bare.keys.to(solve_device, torch.float64)
            elif config.needs_original_representations():
                with _timed(timings, "original_representations"):
                    original = optimise_representations(
                        model,
                        tokenizer,
                        spec,
                        requests,
                        [r.target for r in requests],
                        site="down_proj",
                        layer=layer,
                        prefixes=prefixes,
                        config=config.original,
                        progress=progress,
                        phase=f"original representations (layer {layer})",
                    )
                O = original.vectors.to(solve_device, torch.float64)
                original_summary = original.summary()

            with _timed(timings, "solve"):
                module = down_proj_module(model, spec, layer)
                W = down_proj_weight_math(module, spec).detach().to(solve_device, torch.float64)
                K_f = keys.to(solve_device)
                residual = (Z - H_L) / (len(layers) - j)  # this layer's share of the way to Z
                residual = (residual * pending.to(residual.dtype)).to(solve_device)  # the rest: keep as they are
                asked = residual  # per key column
                if separate:  # the same change asked in every context
                    asked = residual.repeat_interleave(len(prefixes), dim=1)
                    O = O.repeat_interleave(len(prefixes), dim=1) if O is not None else None
                C = _retain_moment(statistics, layer, retain_keys, config)  # from a file: read as the solve goes
                gain = norm_gains.get(layer)
                Y = W @ K_f
                V_star = Y + asked if gain is None else outputs_for_residual(Y, asked, gain.to(solve_device))
                name = down_proj_weight_name(spec, layer)
                budget = None
                if bound is not None:
                    W0 = original_weights.get(name)  # saved by the first pass's apply
                    W0 = W if W0 is None else (W0.T if spec.weight_transposed else W0).to(solve_device)
                    budget = OrdinaryBudget.measure(C, W, W0, bound)
                    del W0
                    factors = config.method_plugin.solve(W, C, K_f, V_star, O, config, budget=budget)
                else:
                    factors = config.method_plugin.solve(W, C, K_f, V_star, O, config)
                achieved = _residual_achieved(factors, W, K_f, asked, gain, n)
                factors = factors.transposed() if spec.weight_transposed else factors
                factors = Factors(factors.scale, factors.U.cpu(), factors.B.cpu())
                # for how far ordinary text moves, when no bound gives the figure
                statistics_only = replace(C, keys=None, weight=0.0) if budget is None else None
                del C, W, K_f, Y, V_star, asked  # before the next layer's keys and statistics

            with _timed(timings, "apply"):
                stored = module.weight
                original_weights.setdefault(name, stored.detach().cpu().clone())
                with torch.no_grad():
                    stored.copy_(factors.apply(stored.detach().cpu(), stored.dtype).to(stored.device))
                # Passes compose: ranks add up, so the sum is brought back to its numerical rank
                # (at most min(d, f)), which keeps a many-request patch from outgrowing the tensor.
                factors_of[layer] = factors_of[layer].then(factors).compressed() if layer in factors_of else factors
            with _timed(timings, "solve"):  # the change so far, on ordinary text (the last pass's is the patch's)
                if budget is not None:  # the bound's own figure: no further read of the statistics
                    ordinary[layer] = round(budget.after, 4)
                else:
                    before = original_weights[name].to(solve_device)
                    ordinary[layer] = round(ordinary_text_change(
                        down_proj_weight_math(module, spec).detach().to(solve_device),
                        before.T if spec.weight_transposed else before, statistics_only,
                    ), 4)  # fmt: skip
                    del before
                del statistics_only
            diagnostics = {
                "layer": layer,
                "pass": passes,
                "residual_norm": _rounded(residual.norm(dim=0).cpu()),
                "residual_achieved": achieved,
                "rank": factors.rank,
                "scale": factors.scale,
                "forget_scale": budget.forget_scale if budget is not None else 1.0,
                "ordinary_change": ordinary[layer],
                "retain_keys": int(retain_columns),
                "statistics_tokens": _token_count(statistics, layer),
            }
            if original_summary is not None:
                diagnostics["original_representations"] = original_summary
            layer_diagnostics.append(diagnostics)
            report("layers", 3 * j + 3, 3 * len(layers))
        checks = check_targets(model, tokenizer, requests)  # one forward: greedy answers and their NLL
        answer_nll_after = [check.nll for check in checks]
        pending = torch.tensor([c.given or c.nll < config.refine.forgotten_nll for c in checks])
        if not pending.any():
            break

    edits = []
    for layer in layers:
        stored = down_proj_module(model, spec, layer).weight
        if passes > 1:  # the model as the composed factors define it, not as rounded pass by pass
            name = down_proj_weight_name(spec, layer)
            with torch.no_grad():
                stored.copy_(factors_of[layer].apply(original_weights[name], stored.dtype).to(stored.device))
        last = [d for d in layer_diagnostics if d["layer"] == layer][-1]
        edits.append(LayerEdit(layer, down_proj_weight_name(spec, layer), factors_of[layer], spec.weight_transposed,
                               tuple(stored.shape), stored.dtype,
                               {**last, "rank": factors_of[layer].rank, "ordinary_change": ordinary[layer]}))  # fmt: skip

    verification = {  # bare prompts, before and after: numbers only
        "answer_nll_before": _rounded(answer_nll_before),
        "answer_nll_after": _rounded(answer_nll_after),
        "neutral_nll_after": _rounded(target_nll(model, tokenizer, requests, [neutral_target] * n)),
        "passes": passes,
        "still_given": [c.index for c in checks if c.given],  # greedy still gives the whole target
    }
    with _timed(timings, "probes"):
        verification["probes"] = probes.after(model, tokenizer)
        report("probes", 2, 2)
    timings["total"] = time.perf_counter() - started
    hyperparameters = config.hyperparameters()
    hyperparameters.update(layers=list(layers), neutral_target=neutral_target, context_prefixes=len(prefixes))
    return EditResult(
        architecture=spec.name,
        method=config.method,
        layers=edits,
        hyperparameters=hyperparameters,
        timings={k: round(v, 3) for k, v in timings.items()},
        diagnostics={
            "neutral_targets": neutral.summary(),
            "phrasings": {"variants": len(variants), "found": len(found)},  # counts only, as below
            "protection": {  # counts only: the prompts hold the requests' templates
                "similar_prompts": len(similar),
                "similar_contexts": len(similar_contexts),
                "template_prompts": len(other_templates),
            },
            "layers": layer_diagnostics,
            "ordinary_change": [ordinary[layer] for layer in layers],
            "ordinary_bound": bound,
            "verification": verification,
        },
        request_count=n,
        original_weights=original_weights,
    )


def _baseline_edit(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ForgetRequest],
    config: CreateConfig,
    progress: ProgressCallback | None,
    retain_requests: Sequence[ForgetRequest],
    storage_dtypes: Mapping[str, torch.dtype],
    started: float,
) -> EditResult:
    """GA or NPO on the layers ZeroUnlearn would edit, as dense layer edits."""
    spec = resolve_architecture(model, config.overrides)
    total_layers = num_layers(model, spec)
    layers = config.layers_for(total_layers)
    answers = [r.target for r in requests]
    answer_nll_before = target_nll(model, tokenizer, requests, answers)
    probes = _Probes.before(model, tokenizer, requests, config)
    run = config.method_plugin.train(
        model, tokenizer, spec, layers, requests, config,
        retain_requests=retain_requests, storage_dtypes=storage_dtypes, progress=progress,
    )  # fmt: skip
    edits = []
    for layer in layers:
        name = down_proj_weight_name(spec, layer)
        stored = down_proj_module(model, spec, layer).weight
        edits.append(LayerEdit(layer, name, None, spec.weight_transposed, tuple(stored.shape), stored.dtype,
                               run.layer_diagnostics[layer], delta=run.deltas[layer]))  # fmt: skip
    diagnostics = dict(run.diagnostics)
    diagnostics["layers"] = [{"layer": layer, **run.layer_diagnostics[layer]} for layer in layers]
    checks = check_targets(model, tokenizer, requests)  # one forward: greedy answers and their NLL
    diagnostics["verification"] = {
        "answer_nll_before": _rounded(answer_nll_before),
        "answer_nll_after": _rounded([check.nll for check in checks]),
        "still_given": [c.index for c in checks if c.given],
    }
    diagnostics["verification"]["probes"] = probes.after(model, tokenizer)
    timings = dict(run.timings)
    timings["total"] = time.perf_counter() - started
    hyperparameters = config.hyperparameters()
    hyperparameters.update(layers=list(layers), retain_term=diagnostics["retain_requests"] > 0)
    return EditResult(
        architecture=spec.name,
        method=config.method,
        layers=edits,
        hyperparameters=hyperparameters,
        timings={k: round(v, 3) for k, v in timings.items()},
        diagnostics=diagnostics,
        request_count=len(requests),
        original_weights=run.original_weights,
    )


def _similar_keys(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    layer_cache: LayerInputCache,
    on_batch: Callable[[int], None],
    *groups: tuple[Sequence[ForgetRequest], Sequence[str], float],
) -> dict[int, torch.Tensor]:
    """Per layer, the keys of each group of (prompts, context prefixes, weight) side by side,
    each scaled by the square root of its weight (the weight of its columns in the retain moment).

    Every layer is read in the same forwards, before any of them is edited: the deeper
    layers' keys no longer wait for the edits above them (their prompts' outputs are
    what the edits keep), and the protection's rows run once instead of once per layer.
    Returned as their :func:`~zupatch.engine.solvers.moment_root` (at most f columns,
    taken group by group so that one group's keys are held at a time): the keys in
    float32, the precision the model computed them in, or their root in float64."""
    roots: dict[int, torch.Tensor] = {}
    for prompts, contexts, weight in groups:
        if not prompts:
            continue
        read = fact_activations(model, tokenizer, spec, prompts, contexts, layers[0], layer_cache=layer_cache,
                                on_batch=on_batch, more_layers=layers[1:], sum_dtype=torch.float32)  # fmt: skip
        keys_at = {layers[0]: read.keys, **read.more_keys}
        del read
        for layer in layers:  # a group's keys go as soon as their root is taken
            root = moment_root(keys_at.pop(layer).mul_(weight**0.5))
            roots[layer] = root if layer not in roots else moment_root(
                torch.cat([roots[layer].to(torch.float64), root.to(torch.float64)], dim=1))  # fmt: skip
    return roots


def _mean_over_variants(keys: torch.Tensor, variant_keys: torch.Tensor, owners: Sequence[int], weight: float) -> torch.Tensor:
    """Per request, the weighted mean of its own key (weight 1) and its variants' keys
    (``weight`` each). Keys are f × requests, or f × requests × contexts (context by context)."""
    total = keys.clone()
    count = torch.ones(keys.shape[1], dtype=keys.dtype)
    for column, owner in enumerate(owners):
        total[:, owner] += weight * variant_keys[:, column]
        count[owner] += weight
    return total / count.reshape(-1, *[1] * (keys.dim() - 2))


@dataclass
class _Probes:
    """Same-pattern probes (:mod:`zupatch.engine.probes`) and the unedited model's
    top-1 next token on each, to report how many an edit changed. Subjects
    are never among those the edit protects."""

    prompts: list[str]
    tokens: list[int]

    @classmethod
    def before(
        cls,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[ForgetRequest],
        config: CreateConfig,
        protected: Sequence[str] | None = None,
    ) -> _Probes:
        """``protected``: the subjects create had the model list and protects (never
        probed); None (the baselines): the list it would make, made here."""
        if config.probes <= 0:
            return cls([], [])
        prompts = derive_probe_prompts(
            model, tokenizer, requests, proposed=config.probes, vocabulary=config.probes,
            skip_proposed=config.neighbours.subjects, protected=protected,
        )  # fmt: skip
        return cls(prompts, next_token_ids(model, tokenizer, prompts) if prompts else [])

    def after(self, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
        """``{"n", "unchanged"}`` on the model as it is now."""
        return top1_unchanged(self.tokens, next_token_ids(model, tokenizer, self.prompts) if self.prompts else [])


def _layer_cache_bytes(model: nn.Module, config: CreateConfig) -> int:
    if config.layer_cache_mb is not None:
        return config.layer_cache_mb << 20
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # At least 1 GiB: 1000 requests' protection prompts need about 0.5 GB on SmolLM2-135M,
    # and a prompt not held runs all the layers again for every edited layer (docs/benchmarks.md).
    return max(1 << 30, model_bytes // 4)


def _token_count(statistics: Mapping[int, KeyStatistics], layer: int) -> int:
    """The tokens behind a layer's statistics, without reading a cached matrix."""
    if isinstance(statistics, LazyKeyStatistics):
        return statistics.token_count(layer)
    return statistics[layer].token_count


#: Above this RMS change of a down projection's output on the statistics' text (a share of the
#: output), ``create`` warns that ordinary text moves too: measured 0.05-0.13 with 4 facts forgotten
#: (perplexity +1.4%), 0.23-0.25 with 1000 invented requests (+18%), up to 1.31 with 1000 known facts
#: (x34): docs/create.md.
ORDINARY_CHANGE_WARNING = 0.2


def ordinary_text_change(after: torch.Tensor, before: torch.Tensor, moment: SecondMoment, rows: int = 256) -> float:
    """How much an edit moves the down projection's output on ordinary text:
    ``sqrt(tr(ΔW·S·ΔWᵀ) / tr(W·S·Wᵀ))`` with ΔW = ``after - before`` (the weights as
    stored, d×f as the model computes with them), S the key statistics (the keys'
    second moment over the statistics' text), on up to ``rows`` evenly spaced output
    rows (both traces on the same rows), in float64. S is read once: statistics from the
    cache are read from their file at each pass over them."""
    d = before.shape[0]
    pick = torch.linspace(0, d - 1, min(rows, d)).round().long().unique().to(before.device)
    W_rows = before[pick].to(torch.float64)
    both = moment.sandwich(torch.cat([W_rows, after[pick].to(torch.float64) - W_rows]))
    k = len(pick)
    norm, moved = torch.trace(both[:k, :k]), torch.trace(both[k:, k:])
    return float((moved.clamp_min(0) / norm).sqrt()) if norm > 0 else float("nan")


def _retain_moment(
    statistics: Mapping[int, KeyStatistics], layer: int, retain_keys: torch.Tensor, config: CreateConfig
) -> SecondMoment:
    """The layer's key statistics plus the retain keys' ``k kᵀ``, weighted so that
    in the objective each retain key counts ``retain_key_weight`` times as much
    as a forget key (λ_r · w λ_f/λ_r = w λ_f). Both stay apart
    (:class:`~zupatch.engine.solvers.SecondMoment`): statistics from the cache
    are read a block of rows at a time by the solve, and given ones are never
    changed."""
    if isinstance(statistics, LazyKeyStatistics):
        moment = statistics.second_moment(layer)
    else:
        moment = SecondMoment.of(statistics[layer].second_moment)
    weight = config.retain_key_weight * config.closed_form.lambda_forget / max(config.closed_form.lambda_retain, 1e-12)
    return replace(moment, keys=retain_keys, weight=weight)


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


def _residual_achieved(
    factors: Factors, W: torch.Tensor, K_f: torch.Tensor, residual: torch.Tensor, gain: torch.Tensor | None = None,
    requests: int | None = None,
) -> list[float]:
    """Per request, the share of the wanted residual change R the edit delivers: Δ·R / ‖R‖², with
    Δ = ΔW k, or the change of N(W k) behind a post-MLP norm N. With ``requests`` and several
    key columns per request (request-major), the mean over each request's columns."""
    Y = W @ K_f
    change = (factors.scale - 1.0) * Y + factors.U @ (factors.B @ K_f)
    if gain is not None:
        g = gain.to(Y)
        change = (rms_normalise((Y + change).T, g) - rms_normalise(Y.T, g)).T
    share = (change * residual).sum(dim=0) / residual.pow(2).sum(dim=0).clamp_min(1e-30)
    if requests is not None:
        share = share.reshape(requests, -1).mean(dim=1)
    return _rounded(share.cpu())


def restore_weights(model: nn.Module, result: EditResult) -> None:
    """Put back the weights :func:`compute_edit` changed in ``model``."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in result.original_weights.items():
            parameters[name].copy_(weight.to(parameters[name].device))


__all__ = [
    "CreateConfig",
    "EditResult",
    "LayerEdit",
    "METHODS",
    "compute_edit",
    "resolve_device",
    "resolve_dtype",
    "restore_weights",
]
