"""What a method plugin is: a name, its settings and one entry point.

The ZeroUnlearn methods share the layer loop of :mod:`zupatch.engine.create`
(neutral targets, keys, statistics, passes) and differ in how one layer is
solved, so their entry point is ``solve``: one layer's factors
``W' = c·W + U·B`` from the keys and the outputs to reach. The fine-tuning
baselines train every edited layer at once, so theirs is ``train``: dense
deltas (:class:`~zupatch.engine.baselines.BaselineRun`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config names the method; the method only reads the config
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.solvers import Factors

#: ``solve(W, C, K_f, V_star, O, config)``, all float64 in math layout (docs/maths.md);
#: C is a :class:`~zupatch.engine.solvers.SecondMoment` (statistics and retain keys).
SolveFn = Callable[..., "Factors"]
#: ``train(model, tokenizer, spec, layers, requests, config, *, retain_requests, storage_dtypes, progress)``.
TrainFn = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    """One registered unlearning method.

    ``settings``: the :class:`~zupatch.engine.create.CreateConfig` fields that
    hold its own settings (``--set closed_form.lambda_retain=...``).
    ``same_kind``: whether the layer loop adds the same-kind protection
    (similar subjects, phrasings) and refinement passes (docs/create.md);
    they were measured for the closed form only. ``needs_original``: whether
    a layer's solve needs the vectors that give the true answers (O).
    ``bounded``: whether ``solve`` takes ``budget`` (an
    :class:`~zupatch.engine.solvers.OrdinaryBudget`), the bound on how far
    ordinary text moves (``closed_form.max_ordinary_change``).
    """

    name: str
    summary: str
    settings: tuple[str, ...]
    solve: SolveFn | None = None
    train: TrainFn | None = None
    same_kind: bool = False
    needs_original: Callable[[CreateConfig], bool] = lambda config: False
    bounded: bool = False

    def __post_init__(self) -> None:
        if (self.solve is None) == (self.train is None):
            raise ValueError(f"method {self.name!r} needs exactly one entry point: solve or train")

    @property
    def is_baseline(self) -> bool:
        """A fine-tuning baseline rather than a ZeroUnlearn layer solve."""
        return self.train is not None
