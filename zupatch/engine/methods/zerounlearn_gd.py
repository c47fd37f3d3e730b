"""``zerounlearn-gd``: the paper's gradient variant, meant for many samples.

The update lives in the null space of the key statistics (eigenvalues below
``gd.null_threshold``) and minimises the paper's objective with α, β
(:class:`~zupatch.engine.solvers.GDParams`). ``gd_solver`` "exact" takes the
quadratic's minimiser directly; "adam" runs the paper's Adam loop
(docs/maths.md). It keeps one solve on the prompts: no same-kind protection
and no refinement passes (measured on the tiny test model, docs/create.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from zupatch.engine import solvers
from zupatch.engine.methods.base import Method
from zupatch.engine.solvers import Factors, SecondMoment

if TYPE_CHECKING:
    from zupatch.engine.create import CreateConfig

GD_SOLVERS: tuple[str, ...] = ("exact", "adam")


def solve(
    W: Tensor, C: Tensor | SecondMoment, K_f: Tensor, V_star: Tensor, O: Tensor | None, config: CreateConfig
) -> Factors:
    """One layer's GD factors (math layout); ``O`` is required. The null space
    needs C whole: one f×f matrix is built here."""
    if isinstance(C, SecondMoment):
        C = C.dense(W.device)
    null_basis = solvers.null_space_basis(C, config.gd.null_threshold)
    run = solvers.gd_exact if config.gd_solver == "exact" else solvers.gd_adam
    return run(W, null_basis, K_f, V_star, O, config.gd)


METHOD = Method(
    name="zerounlearn-gd",
    summary="gradient variant in the key statistics' null space (many samples)",
    settings=("gd", "gd_solver"),
    solve=solve,
    needs_original=lambda config: True,
)
