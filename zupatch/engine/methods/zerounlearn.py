"""``zerounlearn``: the closed-form edit of the paper (the default method).

Each edited layer gets one float64 solve of size d_ff or n, whichever is
cheaper (docs/maths.md, "The closed form"). Settings: ``closed_form``
(:class:`~zupatch.engine.solvers.ClosedFormParams`), defaulting to
:data:`MEASURED_CLOSED_FORM`. The layer loop adds the same-kind protection
and the refinement passes for it (docs/create.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from zupatch.engine import solvers
from zupatch.engine.methods.base import Method
from zupatch.engine.solvers import ClosedFormParams, Factors, OrdinaryBudget, SecondMoment

if TYPE_CHECKING:
    from zupatch.engine.create import CreateConfig

#: Best measured on SmolLM2-135M (4 capitals forgotten, layers 17-19, see the report
#: in docs): no projection (docs/create.md), λ_r 5000 (2000: 82% kept, 5000: 91%,
#: 10000: 86%, 15000: 82%, at λ_f 50), λ_f 20 (forgetting 2 capitals and a
#: chemical symbol with a retain file: λ_f 50 kept 40/47 other facts, λ_f 20 45/47).
#: With one key column per context (``--preset robust``) λ_f 7 per column measured best.
#: Ordinary text moves at most 20% per layer (the line ``create`` warns at): 4 and 10 facts
#: stay under it (5-13%); 300 facts the model knows went to 45% without it, perplexity +43%
#: (docs/create.md, "A bound on ordinary text").
MEASURED_CLOSED_FORM = ClosedFormParams(
    lambda_retain=5000.0, lambda_forget=20.0, projection="off", max_ordinary_change=0.2
)


def solve(
    W: Tensor,
    C: Tensor | SecondMoment,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor | None,
    config: CreateConfig,
    budget: OrdinaryBudget | None = None,
) -> Factors:
    """One layer's closed-form factors (math layout); C is read a block of rows at a time.
    ``budget``: the bound on ordinary text (``closed_form.max_ordinary_change``)."""
    return solvers.closed_form(W, C, K_f, V_star, O, config.closed_form, budget=budget)


METHOD = Method(
    name="zerounlearn",
    summary="closed-form edit of the down projections (the paper's ZeroUnlearn)",
    settings=("closed_form", "refine", "phrasings"),
    solve=solve,
    same_kind=True,
    needs_original=lambda config: config.closed_form.projection != "off",
    bounded=True,
)
