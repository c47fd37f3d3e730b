"""``ga``: gradient ascent on the answers, a fine-tuning baseline.

Trains only the down projections ZeroUnlearn would edit, with the
``baseline`` settings (:class:`~zupatch.engine.baselines.BaselineParams`);
with ``--retain``, ``retain_weight × NLL`` of the retain answers is added
(GradDiff). The training itself is :func:`~zupatch.engine.baselines.run_baseline`.
"""

from __future__ import annotations

from zupatch.engine.baselines import trainer
from zupatch.engine.methods.base import Method

METHOD = Method(
    name="ga",
    summary="gradient ascent on the answers' log-probability (baseline)",
    settings=("baseline",),
    train=trainer("ga"),
)
