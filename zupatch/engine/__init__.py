"""Computation of ZeroUnlearn edits (maths, statistics, targets).

Entry points: :func:`create` (a loaded model -> a patch), :class:`CreateConfig`,
:class:`ForgetRequest` and :func:`load_requests`.
"""

from zupatch.engine.api import CreateReport, check_requests, create, create_from_checkpoint
from zupatch.engine.create import CreateConfig, EditResult, compute_edit
from zupatch.engine.precheck import TargetCheck, TargetNotGivenError, TargetNotGivenWarning, TargetStillGivenError, TargetStillGivenWarning
from zupatch.engine.requests import ForgetRequest, load_requests

from zupatch.engine.solvers import (
    PROJECTIONS,
    ClosedFormParams,
    Factors,
    GDParams,
    LowRankUpdate,
    ParameterError,
    SingularSystemError,
    SolverError,
    closed_form,
    closed_form_objective,
    closed_form_update,
    gd_adam,
    gd_exact,
    gd_objective,
    null_space_basis,
    orthonormal_basis,
    reduce_rank,
)

__all__ = [
    "CreateConfig",
    "CreateReport",
    "EditResult",
    "ForgetRequest",
    "TargetCheck",
    "TargetNotGivenError",
    "TargetNotGivenWarning",
    "TargetStillGivenError",
    "TargetStillGivenWarning",
    "check_requests",
    "compute_edit",
    "create",
    "create_from_checkpoint",
    "load_requests",
    "PROJECTIONS",
    "ClosedFormParams",
    "Factors",
    "GDParams",
    "LowRankUpdate",
    "ParameterError",
    "SingularSystemError",
    "SolverError",
    "closed_form",
    "closed_form_objective",
    "closed_form_update",
    "gd_adam",
    "gd_exact",
    "gd_objective",
    "null_space_basis",
    "orthonormal_basis",
    "reduce_rank",
]
