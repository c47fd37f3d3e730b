"""The solvers against dense formulas, autograd optimality and each other.

The dense references are written from each objective's normal equation, with
P formed explicitly and Q from QR (the solvers use SVD), so agreement checks
the derivation in docs/maths.md, not only self-consistency; the autograd
gradient of each objective at the solution being ~0 proves optimality.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zupatch.engine.solvers import (
    PROJECTIONS,
    ClosedFormParams,
    Factors,
    GDParams,
    LowRankUpdate,
    OrdinaryBudget,
    ParameterError,
    SecondMoment,
    SingularSystemError,
    SolverError,
    _all_finite,
    closed_form,
    closed_form_objective,
    closed_form_update,
    forget_directions,
    gd_adam,
    gd_exact,
    gd_objective,
    moment_root,
    null_space_basis,
    orthonormal_basis,
    reduce_rank,
)
from zupatch.errors import ZupatchError

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are tiny: threads only add contention (3x slower on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius distance of a from b."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def problem(d: int, f: int, n: int, seed: int, null_dim: int = 0, device: str = "cpu"):
    """Random W (d×f), C (f×f, with a null space of null_dim), K_f, V*, O."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, f, generator=g, dtype=F64) / math.sqrt(f)
    basis = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=F64))[0][:, : f - null_dim]
    keys = basis @ torch.randn(f - null_dim, 4 * f, generator=g, dtype=F64)
    C = keys @ keys.T / keys.shape[1]
    K_f = torch.randn(f, n, generator=g, dtype=F64)
    V_star = W @ K_f + 0.5 * torch.randn(d, n, generator=g, dtype=F64)
    O = W @ K_f + 0.3 * torch.randn(d, n, generator=g, dtype=F64)
    return tuple(x.to(device) for x in (W, C, K_f, V_star, O))


def dense_D(W, C, K_f, V_star, O, hp: ClosedFormParams) -> torch.Tensor:
    """D from the normal equation D·H = T of each mode's objective, solved densely."""
    d = W.shape[0]
    eye = torch.eye(d, dtype=F64, device=W.device)
    Q = torch.linalg.qr(O)[0]
    P = eye if hp.projection == "off" else (1 + hp.epsilon) * eye - Q @ Q.T
    lr_, lf, lg = hp.lambda_retain, hp.lambda_forget, hp.lambda_reg
    eye_f = torch.eye(W.shape[1], dtype=F64, device=W.device)
    H = W @ (lr_ * C + lf * K_f @ K_f.T + lg * eye_f) @ W.T
    retain_reg = (lr_ * W @ C + lg * W) @ W.T
    forget = lf * V_star @ K_f.T @ W.T
    if hp.projection == "everywhere":
        T = P @ (retain_reg + forget)
    else:  # "forget" and "off" (P = I): P acts on the forget target only
        T = retain_reg + P @ forget
    return torch.linalg.solve(H, T.T).T  # H is symmetric


def grad_ratio_closed_form(D: torch.Tensor, W, C, K_f, V_star, O, hp) -> float:
    """‖∇_D L(D)‖ / ‖∇_D L(0)‖ by autograd in float64."""

    def grad_at(D0: torch.Tensor) -> torch.Tensor:
        D0 = D0.clone().requires_grad_(True)
        closed_form_objective(D0 @ W, W, C, K_f, V_star, O, hp).backward()
        return D0.grad

    return float(torch.linalg.norm(grad_at(D)) / torch.linalg.norm(grad_at(torch.zeros_like(D))))


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_closed_form_matches_dense_normal_equation(projection: str, n: int, device: str) -> None:
    W, C, K_f, V_star, O = problem(24, 40, n, seed=n, device=device)
    hp = ClosedFormParams(projection=projection)
    upd = closed_form_update(W, C, K_f, V_star, O, hp)
    D = dense_D(W, C, K_f, V_star, O, hp)
    c = 1 + hp.epsilon if projection == "everywhere" else 1.0
    max_rank = 2 * n if projection == "everywhere" else n

    assert upd.scale == c
    assert upd.U.shape[1] <= max_rank
    assert rel(upd.dense(), D) < 1e-12
    eye = torch.eye(24, dtype=F64, device=device)
    assert int(torch.linalg.matrix_rank(D - c * eye, rtol=1e-9)) <= max_rank

    fac = closed_form(W, C, K_f, V_star, O, hp)
    assert fac.scale == c and fac.rank <= max_rank
    assert fac.U.device == W.device and fac.U.dtype == F64
    assert rel(fac.low_rank(), (D - c * eye) @ W) < 1e-12
    assert rel(fac.apply(W), D @ W) < 1e-14

    # Optimality: the gradient of the mode's own objective vanishes at D.
    assert grad_ratio_closed_form(upd.dense(), W, C, K_f, V_star, O, hp) < 1e-10
    # ... and the value is below nearby multipliers D + δ and the identity.
    L = closed_form_objective(fac, W, C, K_f, V_star, O, hp)
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        step = 1e-4 * torch.randn(24, 24, generator=g, dtype=F64).to(device)
        assert L < closed_form_objective((D + step) @ W, W, C, K_f, V_star, O, hp)
    assert L < closed_form_objective(W, W, C, K_f, V_star, O, hp)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_closed_form_ill_conditioned(projection: str) -> None:
    """C of rank 10 < d: cond(H) ~ 1e5. Agreement with the dense solve is then
    limited by cond·eps, but our gradient stays at rounding level (≤ dense's)."""
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=40, null_dim=30)
    hp = ClosedFormParams(projection=projection)
    D = dense_D(W, C, K_f, V_star, O, hp)
    upd = closed_form_update(W, C, K_f, V_star, O, hp)
    H = W @ (hp.lambda_retain * C + hp.lambda_forget * K_f @ K_f.T + torch.eye(40, dtype=F64)) @ W.T
    cond = float(torch.linalg.cond(H))
    assert cond > 1e4
    assert rel(upd.dense(), D) < 10 * cond * torch.finfo(F64).eps
    ours = grad_ratio_closed_form(upd.dense(), W, C, K_f, V_star, O, hp)
    assert ours < 1e-14 and ours <= 2 * grad_ratio_closed_form(D, W, C, K_f, V_star, O, hp)


def test_the_three_modes_differ_and_everywhere_is_the_paper_formula() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=7)
    hp = ClosedFormParams()
    # the paper's closed form (docs/maths.md): D = P(G + λ_f V* Yᵀ)(G + λ_f Y Yᵀ)⁻¹
    Y = W @ K_f
    G = W @ (hp.lambda_retain * C + hp.lambda_reg * torch.eye(40, dtype=F64)) @ W.T
    Q = torch.linalg.qr(O)[0]
    P = (1 + hp.epsilon) * torch.eye(24, dtype=F64) - Q @ Q.T
    D = P @ (G + hp.lambda_forget * V_star @ Y.T) @ torch.linalg.inv(G + hp.lambda_forget * Y @ Y.T)
    assert rel(closed_form_update(W, C, K_f, V_star, O, hp).dense(), D) < 1e-12
    outs = [
        closed_form(W, C, K_f, V_star, O, ClosedFormParams(projection=p)).apply(W)
        for p in PROJECTIONS
    ]
    assert rel(outs[0], outs[1]) > 1e-3 and rel(outs[1], outs[2]) > 1e-3


def test_off_mode_needs_no_O() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 2, seed=3)
    hp = ClosedFormParams(projection="off")
    a = closed_form(W, C, K_f, V_star, None, hp).apply(W)
    b = closed_form(W, C, K_f, V_star, O, hp).apply(W)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="O is required"):
        closed_form(W, C, K_f, V_star, None, ClosedFormParams(projection="forget"))


def test_float32_inputs_are_solved_in_float64() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=4)
    inputs32 = [x.float() for x in (W, C, K_f, V_star, O)]
    fac = closed_form(*inputs32)
    assert fac.U.dtype == F64 and fac.B.dtype == F64
    W64, C64, K64, V64, O64 = (x.double() for x in inputs32)
    D = dense_D(W64, C64, K64, V64, O64, ClosedFormParams())
    assert rel(fac.apply(inputs32[0]), D @ W64) < 1e-12


@pytest.mark.parametrize("how", ["rank-deficient W", "no retain and no regulariser"])
def test_singular_system_gives_a_clear_error(how: str) -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=5)
    hp = ClosedFormParams()
    if how == "rank-deficient W":
        W = W[:, :10] @ torch.randn(10, 40, dtype=F64)  # rank 10 < d = 24
        hp = ClosedFormParams(lambda_retain=0.0)
    else:
        C = torch.zeros_like(C)
        hp = ClosedFormParams(lambda_reg=0.0)
    with pytest.raises(SingularSystemError, match="singular") as info:
        closed_form(W, C, K_f, V_star, O, hp)
    assert isinstance(info.value, ZupatchError)
    assert "\n" not in str(info.value) and "lambda_reg" in str(info.value)


def test_rank_deficient_O_and_duplicate_requests() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=6)
    O = torch.cat([O[:, :2], O[:, :1] + O[:, 1:2]], dim=1)  # rank 2
    assert orthonormal_basis(O).shape == (24, 2)
    K_f = torch.cat([K_f[:, :2], K_f[:, :1]], dim=1)  # third request repeats the first
    V_star = torch.cat([V_star[:, :2], V_star[:, :1]], dim=1)
    hp = ClosedFormParams()
    fac = closed_form(W, C, K_f, V_star, O, hp)
    assert fac.rank == 4  # 2 from Q, 2 distinct requests
    D = dense_D(W, C, K_f, V_star, torch.linalg.svd(O, full_matrices=False)[0][:, :2], hp)
    assert rel(fac.apply(W), D @ W) < 1e-13


def test_bad_inputs_are_rejected() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=8)
    with pytest.raises(ParameterError):
        ClosedFormParams(projection="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ParameterError):
        ClosedFormParams(epsilon=-1.0)
    with pytest.raises(ParameterError):
        ClosedFormParams(lambda_forget=-1.0)
    with pytest.raises(ParameterError):
        GDParams(beta=0.0)
    with pytest.raises(ValueError, match="V_star must have shape"):
        closed_form(W, C, K_f, V_star[:, :2], O)
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ZupatchError, match="C contains NaN"):
        closed_form(W, bad, K_f, V_star, O)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_finiteness_is_checked_in_slices_that_cover_every_element(value: float) -> None:
    """The check runs over slices of rows (bounded temporaries); a bad value in any slice,
    the last, partial one included, is found, and a finite matrix passes."""
    x = torch.zeros(37, 11, dtype=torch.float64)
    assert _all_finite(x, elements=40) and _all_finite(x[:, :0], elements=40)
    for row, column in [(0, 0), (18, 5), (36, 10)]:
        bad = x.clone()
        bad[row, column] = value
        assert not _all_finite(bad, elements=40), (row, column)


# --------------------------------------------------------------------------- factors


@pytest.mark.parametrize("block_elements", [1, 7 * 12, 1 << 22])
def test_second_moment_in_blocks_is_the_statistics_plus_the_weighted_retain_keys(block_elements: int) -> None:
    """W·C·Wᵀ and C from S (read a block of rows at a time: one row, 7 rows with a partial
    last block, all at once) and w·R·Rᵀ equal the dense formula; S is never changed; the
    closed form gives the same edit from the parts as from the summed matrix."""
    W, S, K_f, V_star, O = problem(5, 12, 2, seed=3)
    R = torch.randn(12, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    kept, weight = S.clone(), 0.37
    reads = []

    def read(start: int, stop: int) -> torch.Tensor:
        reads.append((start, stop))
        return S[start:stop].float() if block_elements == 1 else S[start:stop]  # any float dtype

    moment = SecondMoment(12, read, R, weight, block_elements=block_elements)
    C = S + weight * R @ R.T
    if block_elements == 1:
        C = S.float().double() + weight * R @ R.T
    assert rel(moment.sandwich(W), W @ C @ W.T) < 1e-13
    assert rel(moment.dense(), C) < 1e-15
    covered = sorted(reads[: len(reads) // 2])
    assert covered[0][0] == 0 and covered[-1][1] == 12 and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert torch.equal(S, kept)
    hp = ClosedFormParams(lambda_retain=100.0, lambda_forget=20.0, projection="off")
    a, b = closed_form(W, moment, K_f, V_star, O, hp), closed_form(W, C, K_f, V_star, O, hp)
    assert rel(a.apply(W), b.apply(W)) < 1e-12
    assert torch.equal(SecondMoment.of(S).dense(), S)  # without keys: S itself, copied


def test_moment_root_keeps_the_retain_term_and_has_at_most_f_columns() -> None:
    """More keys than rows: an f-column root with the same K·Kᵀ, and the closed form gives
    the same edit with it as with the keys; no more keys than rows: the keys themselves."""
    W, S, K_f, V_star, O = problem(5, 12, 2, seed=5)
    many = torch.randn(12, 40, generator=torch.Generator().manual_seed(6)).float()  # float32, as create holds them
    root = moment_root(many)
    assert root.shape == (12, 12) and root.dtype == F64
    assert rel(root @ root.T, many.double() @ many.double().T) < 1e-14
    hp = ClosedFormParams(lambda_retain=100.0, lambda_forget=20.0, projection="forget")
    a = closed_form(W, SecondMoment.of(S, many.double(), 0.3), K_f, V_star, O, hp)
    b = closed_form(W, SecondMoment.of(S, root, 0.3), K_f, V_star, O, hp)
    assert rel(a.apply(W), b.apply(W)) < 1e-12
    few = many[:, :12]
    assert moment_root(few) is few
    with pytest.raises(ValueError, match="f×m"):
        moment_root(many[0])


def ordinary_figure(W_new: torch.Tensor, W0: torch.Tensor, S: torch.Tensor) -> float:
    """sqrt(tr(ΔW S ΔWᵀ) / tr(W0 S W0ᵀ)), densely."""
    E = W_new - W0
    return math.sqrt(float(torch.trace(E @ S @ E.T) / torch.trace(W0 @ S @ W0.T)))


@pytest.mark.parametrize("projection", ["off", "forget"])
def test_the_ordinary_bound_holds_the_edit_at_its_limit_and_no_further(projection: str) -> None:
    """From a weight already moved by an earlier pass: the budget's figure equals the dense
    one, with and without an update; an edit that would move ordinary text by more than the
    limit is the closed form with λ_f scaled down so that it lands on the limit (the largest
    such scale: a bit more and it is over); one within the limit is left as it was."""
    W0, S, K_f, V_star, O = problem(6, 15, 3, seed=11)
    W = W0 + 0.01 * torch.randn(6, 15, generator=torch.Generator().manual_seed(12), dtype=F64)
    V_star = W @ K_f + 4 * (V_star - W0 @ K_f)  # far targets: a large change
    hp = ClosedFormParams(lambda_retain=50.0, lambda_forget=20.0, projection=projection, max_ordinary_change=0.2)
    budget = OrdinaryBudget.measure(SecondMoment.of(S, torch.ones(15, 2, dtype=F64), 3.0), W, W0, 0.2)
    assert budget.change() == pytest.approx(ordinary_figure(W, W0, S), rel=1e-10)
    M = 0.2 * torch.randn(6, 6, generator=torch.Generator().manual_seed(13), dtype=F64)
    assert budget.change(M) == pytest.approx(ordinary_figure(W + M @ W, W0, S), rel=1e-10)

    free = closed_form_update(W, S, K_f, V_star, O, hp)
    assert ordinary_figure(free.dense() @ W, W0, S) > 0.3  # the unbounded edit goes past the limit
    bounded = closed_form_update(W, S, K_f, V_star, O, hp, budget)
    assert 0 < budget.forget_scale < 1
    assert ordinary_figure(bounded.dense() @ W, W0, S) == pytest.approx(0.2, rel=1e-6)
    assert budget.after == pytest.approx(0.2, rel=1e-6)
    scaled = replace(hp, lambda_forget=hp.lambda_forget * budget.forget_scale)
    assert rel(bounded.dense(), closed_form_update(W, S, K_f, V_star, O, scaled).dense()) < 1e-10
    more = replace(hp, lambda_forget=hp.lambda_forget * budget.forget_scale * 1.01)
    assert ordinary_figure(closed_form_update(W, S, K_f, V_star, O, more).dense() @ W, W0, S) > 0.2

    loose = OrdinaryBudget.measure(SecondMoment.of(S), W, W0, 10.0)
    assert rel(closed_form_update(W, S, K_f, V_star, O, hp, loose).dense(), free.dense()) < 1e-12
    assert loose.forget_scale == 1.0


def test_a_used_up_ordinary_budget_gives_no_edit_and_the_paper_mode_has_none() -> None:
    """When earlier passes already moved ordinary text past the limit, the edit is nothing
    (rank 0, the weight as it is); "everywhere" cannot be bounded: the setting is ignored
    there, and a budget given to its solve is refused."""
    W0, S, K_f, V_star, O = problem(5, 11, 2, seed=14)
    W = 1.5 * W0
    budget = OrdinaryBudget.measure(SecondMoment.of(S), W, W0, 0.1)
    hp = ClosedFormParams(projection="off", max_ordinary_change=0.1)
    factors = closed_form(W, S, K_f, V_star, O, hp, budget=budget)
    assert factors.rank == 0 and budget.forget_scale == 0.0
    assert torch.equal(factors.apply(W), W)
    assert budget.after == pytest.approx(0.5, rel=1e-9)
    assert ClosedFormParams(projection="everywhere", max_ordinary_change=0.1).ordinary_bound is None
    assert ClosedFormParams(projection="forget", max_ordinary_change=0.1).ordinary_bound == 0.1
    assert ClosedFormParams(projection="off").ordinary_bound is None
    with pytest.raises(ParameterError, match="max_ordinary_change"):
        ClosedFormParams(projection="off", max_ordinary_change=-1.0)
    with pytest.raises(ParameterError, match='bound needs projection'):
        closed_form_update(W, S, K_f, V_star, O, ClosedFormParams(), budget)


def test_forget_directions_are_the_fewest_leading_ones_within_the_tolerance() -> None:
    """E = U·T with singular values 10, 3, 1, 0.1: a tolerance of 1% of ‖E‖ keeps three
    directions (the fourth holds 0.95% of it), 20% keeps two; the basis is orthonormal and
    spans E's leading left singular vectors, whichever of E·Eᵀ or E's SVD is smaller."""
    g = torch.Generator().manual_seed(21)
    left = torch.linalg.qr(torch.randn(7, 4, generator=g, dtype=F64))[0]
    for n in (5, 12):  # n < d: SVD of E; n > d: E·Eᵀ
        right = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=F64))[0]
        E = left @ torch.diag(torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=F64)) @ right.T
        U = torch.randn(7, 9, generator=g, dtype=F64)
        T = torch.linalg.lstsq(U, E).solution  # U·T = E
        for tolerance, rank in ((0.005, 4), (0.01, 3), (0.2, 2), (0.5, 1)):
            kept = forget_directions(U, T, tolerance)
            assert kept.shape == (7, rank)
            assert torch.allclose(kept.T @ kept, torch.eye(rank, dtype=F64), atol=1e-12)
            assert rel(kept @ kept.T @ left[:, :rank], left[:, :rank]) < 1e-9
            assert rel(kept @ kept.T @ E, E) <= tolerance
    assert forget_directions(torch.zeros(3, 2, dtype=F64), torch.ones(2, 4, dtype=F64), 0.1).shape == (3, 0)


@pytest.mark.parametrize("projection", ["off", "forget"])
def test_a_rank_tolerance_keeps_the_forget_change_and_shrinks_every_other(projection: str) -> None:
    """With ``rank_tolerance`` the edit is the full one projected onto the fewest output
    directions that keep all but that fraction of its change on the forget keys: the change
    on the forget keys is within the tolerance, the change on any other input is no larger
    than the full edit's, and the rank is smaller; 0 gives the full edit."""
    W, S, K_f, V_star, O = problem(12, 30, 10, seed=22)
    shared = torch.randn(12, 1, generator=torch.Generator().manual_seed(23), dtype=F64)
    V_star = W @ K_f + shared + 0.05 * (V_star - W @ K_f)  # every target moved mostly one way
    hp = ClosedFormParams(lambda_retain=50.0, lambda_forget=20.0, projection=projection)
    full = closed_form_update(W, S, K_f, V_star, O, hp).dense() - torch.eye(12, dtype=F64)
    every = closed_form_update(W, S, K_f, V_star, O, replace(hp, rank_tolerance=0.0)).dense()
    assert rel(every - torch.eye(12, dtype=F64), full) < 1e-12
    few = closed_form(W, S, K_f, V_star, O, replace(hp, rank_tolerance=0.05))
    assert 1 <= few.rank < closed_form(W, S, K_f, V_star, O, hp).rank
    change = few.apply(W) - W
    assert rel(change @ K_f, full @ W @ K_f) <= 0.05
    others = torch.randn(30, 50, generator=torch.Generator().manual_seed(24), dtype=F64)
    assert bool(((change @ others).norm(dim=0) <= (full @ W @ others).norm(dim=0) * (1 + 1e-9)).all())
    with pytest.raises(ParameterError, match="rank_tolerance"):
        ClosedFormParams(rank_tolerance=1.0)


def test_a_rank_tolerance_beside_earlier_passes_still_holds_the_ordinary_bound() -> None:
    """Fewer directions never move ordinary text more by themselves, but beside an earlier
    pass's change they can: the kept edit is then scaled to land on the limit
    (:meth:`OrdinaryBudget.largest_factor`, the root of a quadratic), never past it."""
    W0, S, K_f, V_star, O = problem(6, 15, 4, seed=25)
    W = W0 + 0.05 * torch.randn(6, 15, generator=torch.Generator().manual_seed(26), dtype=F64)
    budget = OrdinaryBudget.measure(SecondMoment.of(S), W, W0, 0.3)
    M = torch.randn(6, 6, generator=torch.Generator().manual_seed(27), dtype=F64)
    t = budget.largest_factor(M)
    assert 0 < t < 1 and budget.change(t * M) == pytest.approx(0.3, rel=1e-9)
    assert budget.largest_factor(1e-6 * M) == 1.0
    hp = ClosedFormParams(lambda_retain=50.0, lambda_forget=20.0, projection="off", rank_tolerance=0.2)
    far = W @ K_f + 4 * (V_star - W0 @ K_f)
    for limit in (0.2, 0.5, 10.0):
        budget = OrdinaryBudget.measure(SecondMoment.of(S), W, W0, limit)
        update = closed_form_update(W, S, K_f, far, O, hp, budget)
        assert ordinary_figure(update.dense() @ W, W0, S) <= limit * (1 + 1e-9)
        assert budget.after == pytest.approx(ordinary_figure(update.dense() @ W, W0, S), rel=1e-9)


def test_second_moment_refuses_bad_blocks_and_keys() -> None:
    """A non-finite value in any block (the last one included), rows of the wrong width, or
    non-finite retain keys: a SolverError or ValueError, never an edit."""
    W, S, *_ = problem(4, 9, 1, seed=5)
    bad = S.clone()
    bad[8, 3] = float("inf")
    with pytest.raises(SolverError, match="C contains NaN or Inf"):
        replace(SecondMoment.of(bad), block_elements=9 * 4).sandwich(W)
    with pytest.raises(ValueError, match="shape 9×9"):
        SecondMoment(9, lambda start, stop: S[start:stop, :5]).sandwich(W)
    keys = torch.ones(9, 2, dtype=F64)
    keys[0, 0] = float("nan")
    with pytest.raises(SolverError, match="retain keys"):
        SecondMoment.of(S, keys, 1.0).sandwich(W)
    with pytest.raises(ValueError, match="shape 8×8"):
        closed_form(W[:, :8], SecondMoment.of(S), torch.ones(8, 1, dtype=F64), torch.ones(4, 1, dtype=F64), None)


def test_transposed_factors_reproduce_the_transposed_update() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 3, seed=9)
    fac = closed_form(W, C, K_f, V_star, O)
    t = fac.transposed()
    assert t.shape == (40, 24) and t.rank == fac.rank and t.scale == fac.scale
    assert rel(t.apply(W.T), fac.apply(W).T) < 1e-15
    assert rel(fac.scale * W.T + fac.B.T @ fac.U.T, t.apply(W.T)) == 0.0


def test_reduce_rank_keeps_the_product_and_drops_dependent_columns() -> None:
    g = torch.Generator().manual_seed(10)
    U = torch.randn(24, 3, generator=g, dtype=F64)
    B = torch.randn(3, 40, generator=g, dtype=F64)
    U5 = torch.cat([U, U[:, :1], 2 * U[:, 1:2]], dim=1)
    B5 = torch.cat([B, B[:1], B[1:2]], dim=0)  # = 2·U1B1 + 3·U2B2 + U3B3: rank 3
    f = Factors(1.0, U5, B5)
    r = reduce_rank(f)
    assert r.rank == 3
    assert rel(r.low_rank(), f.low_rank()) < 1e-14
    assert torch.allclose(r.B @ r.B.T, torch.eye(3, dtype=F64), atol=1e-14)  # orthonormal rows
    assert reduce_rank(Factors(1.0, torch.zeros(24, 2, dtype=F64), B[:2])).rank == 0


def test_composition_equals_sequential_application() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 2, seed=11)
    a = closed_form(W, C, K_f, V_star, O)
    W1 = a.apply(W)
    b = closed_form(W1, C, K_f, V_star + 0.1, O)
    ab = a.then(b)
    assert ab.scale == a.scale * b.scale and ab.rank == a.rank + b.rank
    assert rel(ab.apply(W), b.apply(W1)) < 1e-14


def test_low_rank_update_factors() -> None:
    g = torch.Generator().manual_seed(12)
    U, V, W = (torch.randn(*s, generator=g, dtype=F64) for s in ((8, 2), (8, 2), (8, 5)))
    upd = LowRankUpdate(1.5, U, V)
    assert rel(upd.factors(W).apply(W), upd.dense() @ W) < 1e-14


# --------------------------------------------------------------------------- gradient variant


def gd_setup(n: int, seed: int, null_dim: int = 6):
    W, C, K_f, V_star, O = problem(24, 40, n, seed=seed, null_dim=null_dim)
    U0 = null_space_basis(C, threshold=1e-2)
    return W, C, U0, K_f, V_star, O


def test_null_space_basis() -> None:
    W, C, U0, *_ = gd_setup(3, seed=13, null_dim=6)
    assert U0.shape == (40, 6)
    assert torch.allclose(U0.T @ U0, torch.eye(6, dtype=F64), atol=1e-13)
    assert float(torch.linalg.norm(C @ U0)) < 1e-12
    assert null_space_basis(C + torch.eye(40, dtype=F64)).shape == (40, 0)


@pytest.mark.parametrize("n", [1, 3])
def test_gd_exact_solves_the_sylvester_equation_and_is_optimal(n: int) -> None:
    W, C, U0, K_f, V_star, O = gd_setup(n, seed=14 + n)
    hp = GDParams()
    fac = gd_exact(W, U0, K_f, V_star, O, hp)
    assert fac.scale == 1.0 and fac.rank <= n

    # Dense Kronecker solve of M X N + βX = −(QQᵀY + α(Y − V*))Aᵀ (column-major vec).
    d, m = W.shape[0], U0.shape[1]
    Q = torch.linalg.qr(O)[0]
    Y, A = W @ K_f, U0.T @ K_f
    M = Q @ Q.T + hp.alpha * torch.eye(d, dtype=F64)
    N = A @ A.T
    F = -(Q @ Q.T @ Y + hp.alpha * (Y - V_star)) @ A.T
    lhs = torch.kron(N.T.contiguous(), M) + hp.beta * torch.eye(d * m, dtype=F64)
    X = torch.linalg.solve(lhs, F.T.reshape(-1)).reshape(m, d).T
    assert int(torch.linalg.matrix_rank(X, rtol=1e-10)) <= n
    # The Kronecker system (cond ~1e4) is the less accurate of the two: 1e-11.
    assert rel(fac.low_rank(), X @ U0.T) < 1e-11

    # Autograd: the gradient in X of the objective vanishes at our solution.
    def grad_at(X0: torch.Tensor) -> torch.Tensor:
        X0 = X0.clone().requires_grad_(True)
        gd_objective(X0 @ U0.T, W, K_f, V_star, O, hp).backward()
        return X0.grad

    ours = fac.low_rank() @ U0  # X = ΔW·U0 since U0ᵀU0 = I
    ratio = torch.linalg.norm(grad_at(ours)) / torch.linalg.norm(grad_at(torch.zeros_like(X)))
    assert float(ratio) < 1e-13
    # Objective through factors (no d×f product) equals the dense one.
    a = gd_objective(fac, W, K_f, V_star, O, hp)
    b = gd_objective(X @ U0.T, W, K_f, V_star, O, hp)
    assert abs(float(a - b)) <= 1e-12 * float(b)


@pytest.mark.parametrize("n", [1, 3])
def test_gd_exact_is_never_worse_than_adam(n: int) -> None:
    W, C, U0, K_f, V_star, O = gd_setup(n, seed=20 + n)
    hp = GDParams(steps=500)
    exact = gd_exact(W, U0, K_f, V_star, O, hp)
    adam = gd_adam(W, U0, K_f, V_star, O, hp)
    raw = gd_adam(W, U0, K_f, V_star, O, hp, project=False)
    assert adam.scale == 1.0 and adam.rank <= n
    zero = Factors(1.0, W.new_zeros(24, 0), W.new_zeros(0, 40))
    edits = {"exact": exact, "adam": adam, "raw": raw, "zero": zero}
    L = {k: float(gd_objective(v, W, K_f, V_star, O, hp)) for k, v in edits.items()}
    assert L["exact"] <= L["adam"] * (1 + 1e-12)
    assert L["adam"] <= L["raw"] * (1 + 1e-12)  # projecting onto range(A) never hurts
    assert L["adam"] < 0.5 * L["zero"]  # Adam does make progress


def test_gd_adam_matches_torch_optim_adam() -> None:
    W, C, U0, K_f, V_star, O = gd_setup(2, seed=30)
    hp = GDParams(steps=25, lr=0.05)
    ours = gd_adam(W, U0, K_f, V_star, O, hp, project=False, reduce=False).U
    X = torch.zeros(24, U0.shape[1], dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([X], lr=hp.lr)
    for _ in range(hp.steps):
        opt.zero_grad()
        gd_objective(X @ U0.T, W, K_f, V_star, O, hp).backward()
        opt.step()
    assert rel(ours, X.detach()) < 1e-10


def test_gd_without_null_space_is_a_zero_edit() -> None:
    W, C, K_f, V_star, O = problem(24, 40, 2, seed=31)
    U0 = null_space_basis(C + torch.eye(40, dtype=F64))
    for solve in (gd_exact, gd_adam):
        fac = solve(W, U0, K_f, V_star, O)
        assert fac.rank == 0 and fac.shape == (24, 40)


# --------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(2, 10),
    extra=st.integers(2, 12),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    projection=st.sampled_from(PROJECTIONS),
)
def test_property_closed_form_random_shapes(
    d: int, extra: int, n: int, seed: int, projection: str
) -> None:
    f = d + extra
    W, C, K_f, V_star, O = problem(d, f, n, seed=seed)
    O = O if n < d else O[:, : d - 1]  # keep span(O) a proper subspace
    hp = ClosedFormParams(projection=projection)
    fac = closed_form(W, C, K_f, V_star, O, hp)
    D = dense_D(W, C, K_f, V_star, O, hp)
    assert fac.rank <= (2 * n if projection == "everywhere" else n)
    assert rel(fac.apply(W), D @ W) < 1e-10
    upd = closed_form_update(W, C, K_f, V_star, O, hp)
    assert grad_ratio_closed_form(upd.dense(), W, C, K_f, V_star, O, hp) < 1e-8
