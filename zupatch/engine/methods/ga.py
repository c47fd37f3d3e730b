"""``ga``: gradient ascent on the answers, a fine-tuning baseline.

Trains only the down projections ZeroUnlearn would edit, with the
``baseline`` settings (:class:`~zupatch.engine.baselines.BaselineParams`);
with ``--retain``, ``retain_weight × NLL`` of the retain answers is added
(GradDiff). The training itself is :func:`~zupatch.engine.baselines.run_baseline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zupatch.engine.baselines import BaselineRun, run_baseline
from zupatch.engine.methods.base import Method
from zupatch.engine.requests import ForgetRequest

if TYPE_CHECKING:
    from torch import nn

    from zupatch.engine.architectures import ArchitectureSpec
    from zupatch.engine.create import CreateConfig


def train(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    requests: Sequence[ForgetRequest],
    config: CreateConfig,
    **options: Any,
) -> BaselineRun:
    """Train ``layers``' down projections with GA (``options``: those of :func:`run_baseline`)."""
    return run_baseline(model, tokenizer, spec, layers, "ga", requests, config.baseline, **options)


METHOD = Method(
    name="ga",
    summary="gradient ascent on the answers' log-probability (baseline)",
    settings=("baseline",),
    train=train,
)
