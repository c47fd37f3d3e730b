"""``npo``: negative preference optimisation (Zhang et al. 2024), a fine-tuning baseline.

Same layers, settings and training loop as :mod:`.ga`; the loss is NPO's,
whose gradient fades as an answer becomes unlikely (``baseline.beta``).
With ``--retain``: NPO+RT.
"""

from __future__ import annotations

from zupatch.engine.baselines import trainer
from zupatch.engine.methods.base import Method

METHOD = Method(
    name="npo",
    summary="negative preference optimisation against the unedited model (baseline)",
    settings=("baseline",),
    train=trainer("npo"),
)
