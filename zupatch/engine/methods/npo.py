"""``npo``: negative preference optimisation (Zhang et al. 2024), a fine-tuning baseline.

Same layers, settings and training loop as :mod:`.ga`; the loss is NPO's,
whose gradient fades as an answer becomes unlikely (``baseline.beta``).
With ``--retain``: NPO+RT.
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
    """Train ``layers``' down projections with NPO (``options``: those of :func:`run_baseline`)."""
    return run_baseline(model, tokenizer, spec, layers, "npo", requests, config.baseline, **options)


METHOD = Method(
    name="npo",
    summary="negative preference optimisation against the unedited model (baseline)",
    settings=("baseline",),
    train=train,
)
