"""ZeroUnlearn solvers: the pure-maths layer (float64, device-agnostic).

Everything here works on plain tensors, in float64, on whatever device the
inputs live on (CPU or CUDA; nothing is moved and no device is hard-coded).
The weight is in *math layout*: ``W`` is ``d×f`` and the layer computes
``v = W k``. An edit is returned as :class:`Factors` ``(c, U, B)`` meaning

    W' = c·W + U·B,      U: d×r,  B: r×f,

which is exactly what a patch stores. The derivations are in ``docs/maths.md``.

Closed form (ZeroUnlearn, docs/maths.md "The closed form"): :func:`closed_form` with
:class:`ClosedFormParams`; three places the projection ``P`` can act
(``"everywhere"`` as in the paper, ``"forget"``, ``"off"``).
Gradient variant (ZeroUnlearn-GD): :func:`gd_adam` (the paper's Adam loop) and
:func:`gd_exact` (the exact minimiser of the same quadratic objective).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from zupatch.errors import ZupatchError

__all__ = [
    "PROJECTIONS",
    "ClosedFormParams",
    "Factors",
    "GDParams",
    "LowRankUpdate",
    "OrdinaryBudget",
    "ParameterError",
    "Projection",
    "RowReader",
    "SecondMoment",
    "SingularSystemError",
    "SolverError",
    "closed_form",
    "closed_form_objective",
    "closed_form_update",
    "forget_directions",
    "gd_adam",
    "gd_exact",
    "gd_objective",
    "moment_root",
    "null_space_basis",
    "orthonormal_basis",
    "reduce_rank",
]

Projection = Literal["everywhere", "forget", "off"]
PROJECTIONS: tuple[str, ...] = ("everywhere", "forget", "off")

_F64 = torch.float64
_EPS64 = torch.finfo(torch.float64).eps


# --------------------------------------------------------------------------- errors


class SolverError(ZupatchError):
    """The inputs cannot give an edit (non-finite statistics, singular system)."""


class SingularSystemError(SolverError):
    """The d×d system ``G + λ_f·Y·Yᵀ`` of the closed form is singular."""


class ParameterError(SolverError, ValueError):
    """A hyperparameter is out of its valid range."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ClosedFormParams:
    """Hyperparameters of the closed-form edit (defaults: the paper's values).

    ``projection`` says where ``P = (1+ε)I − QQᵀ`` acts: ``"everywhere"`` (the
    paper: retain, forget and regulariser targets), ``"forget"`` (forget
    target only) or ``"off"`` (``P = I``). ``"everywhere"`` shrinks every
    output along the forget outputs' span, which overlaps the layer's dominant
    output direction: it costs retain accuracy (docs/maths.md, "What the
    modes mean").

    ``max_ordinary_change``: when > 0, the caller (``create``) bounds each edit
    with an :class:`OrdinaryBudget` of this limit: λ_f is lowered, layer by
    layer, just enough that the edit moves the layer's output on ordinary text
    by at most this fraction (docs/maths.md, "A bound on ordinary text"); 0: no
    bound. It applies with ``projection`` "off" or "forget" (c = 1) and is
    ignored with "everywhere", which scales every output by design.

    ``rank_tolerance``: when > 0 (with "off" or "forget"), the edit keeps only
    the fewest output directions that carry all but this fraction (RMS) of
    its change on the forget keys (:func:`forget_directions`): the change on
    every other input can only shrink, and the patch stores those few
    directions. 0 keeps every direction; 0.05 cut a 1000-request patch from 61%
    to 9.5% of the touched bytes at the same forgetting (docs/create.md, "Few
    directions").
    """

    lambda_retain: float = 15000.0
    lambda_forget: float = 50.0
    lambda_reg: float = 1.0
    epsilon: float = 0.01
    projection: Projection = "everywhere"
    max_ordinary_change: float = 0.0
    rank_tolerance: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lambda_retain", "lambda_forget", "lambda_reg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ParameterError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.epsilon) and 1.0 + self.epsilon > 0):
            # c = 1 + ε must stay > 0 so that the patch can be inverted.
            raise ParameterError(f"epsilon must be finite and > -1, got {self.epsilon!r}")
        if self.projection not in PROJECTIONS:
            raise ParameterError(
                f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}"
            )
        bound = self.max_ordinary_change
        if not (math.isfinite(bound) and bound >= 0):
            raise ParameterError(f"max_ordinary_change must be a finite number >= 0, got {bound!r}")
        if not (math.isfinite(self.rank_tolerance) and 0 <= self.rank_tolerance < 1):
            raise ParameterError(f"rank_tolerance must be a number in [0, 1), got {self.rank_tolerance!r}")

    @property
    def ordinary_bound(self) -> float | None:
        """The bound on ordinary text that applies: ``max_ordinary_change``, or None
        when it is 0 or the projection is "everywhere"."""
        return self.max_ordinary_change if self.max_ordinary_change > 0 and self.projection != "everywhere" else None


@dataclass(frozen=True)
class GDParams:
    """Hyperparameters of ZeroUnlearn-GD (α, β from the paper).

    ``lr`` is not given by the paper; ``null_threshold`` is the eigenvalue
    cut-off for :func:`null_space_basis` (absolute, in the units of C), kept
    here so it is recorded with the other hyperparameters.
    ``relative_beta``: when set, the method takes β per layer as
    ``relative_beta · α · ‖U0ᵀK_f‖²/n`` (the mean squared null-space part of
    a forget key) instead of ``beta``, so that the same setting means the same
    shrinkage on models whose keys differ in scale (docs/maths.md).
    """

    alpha: float = 100.0
    beta: float = 0.1
    steps: int = 500
    lr: float = 0.1
    null_threshold: float = 1e-2
    relative_beta: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ParameterError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            # β > 0 makes the objective strictly convex: one minimiser.
            raise ParameterError(f"beta must be a finite number > 0, got {self.beta!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ParameterError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ParameterError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not math.isfinite(self.null_threshold):
            raise ParameterError(f"null_threshold must be finite, got {self.null_threshold!r}")
        if self.relative_beta is not None and not (math.isfinite(self.relative_beta) and self.relative_beta > 0):
            raise ParameterError(f"relative_beta must be a finite number > 0 or None, got {self.relative_beta!r}")


# --------------------------------------------------------------------------- factor types


@dataclass(frozen=True, eq=False)
class Factors:
    """An edit of one weight: ``W' = scale·W + U·B`` (U: d×r, B: r×f).

    ``W`` is in math layout (``v = W k``). For a weight stored transposed use
    :meth:`transposed`. ``scale`` must be non-zero so the edit is invertible:
    ``W = (W' − U·B) / scale``.
    """

    scale: float
    U: Tensor
    B: Tensor

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"scale must be finite and non-zero, got {self.scale!r}")
        if self.U.ndim != 2 or self.B.ndim != 2 or self.U.shape[1] != self.B.shape[0]:
            raise ValueError(
                f"U (d×r) and B (r×f) do not fit: {tuple(self.U.shape)} and {tuple(self.B.shape)}"
            )
        if self.U.device != self.B.device:
            raise ValueError(f"U is on {self.U.device} but B is on {self.B.device}")

    @property
    def rank(self) -> int:
        """Number of stored factor columns r (an upper bound on rank(U·B))."""
        return int(self.U.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the weight the factors apply to."""
        return int(self.U.shape[0]), int(self.B.shape[1])

    def transposed(self) -> Factors:
        """Factors for the same edit of ``Wᵀ`` (e.g. GPT-2 Conv1D stores W as f×d).

        ``stored' = c·stored + Bᵀ·Uᵀ``.
        """
        return Factors(self.scale, self.B.mT.contiguous(), self.U.mT.contiguous())

    def low_rank(self) -> Tensor:
        """The dense product ``U·B`` in float64 (d×f)."""
        return self.U.to(_F64) @ self.B.to(_F64)

    def apply(self, W: Tensor, dtype: torch.dtype | None = None, block_elements: int = 1 << 22) -> Tensor:
        """``c·W + U·B`` computed in float64 with a BLAS matmul, a block of rows
        at a time, returned in float64 or ``dtype`` (rounded once).

        No d×f float64 temporary: on a 1B model's down projection that would
        be 128 MiB each. A convenience for maths and the in-memory edit;
        *not* the canonical bit-exact application defined by the patch format.
        """
        d, f = self.shape
        if tuple(W.shape) != (d, f):
            raise ValueError(f"factors of shape {d}×{f} cannot apply to a weight of shape {tuple(W.shape)}")
        out = torch.empty(d, f, dtype=dtype or _F64, device=W.device)
        U, B = self.U.to(device=W.device, dtype=_F64), self.B.to(device=W.device, dtype=_F64)
        step = max(1, block_elements // max(1, f))
        for start in range(0, d, step):
            rows = slice(start, start + step)
            out[rows] = (self.scale * W[rows].to(_F64)).add_(U[rows] @ B)
        return out

    def delta(self, W: Tensor) -> Tensor:
        """The additive change ``W' − W = (c − 1)·W + U·B`` in float64."""
        return (self.scale - 1.0) * W.to(_F64) + self.low_rank()

    def then(self, other: Factors) -> Factors:
        """The edit ``self`` followed by ``other``: ``c1c2·W + [c2U1, U2][B1; B2]``."""
        if self.shape != other.shape:
            raise ValueError(f"cannot compose edits of shapes {self.shape} and {other.shape}")
        U = torch.cat([other.scale * self.U, other.U], dim=1)
        B = torch.cat([self.B, other.B], dim=0)
        return Factors(self.scale * other.scale, U, B)

    def compressed(self, rtol: float | None = None) -> Factors:
        """Same edit with ``r`` reduced to the numerical rank of ``U·B``."""
        return reduce_rank(self, rtol)


@dataclass(frozen=True, eq=False)
class LowRankUpdate:
    """A left multiplier ``D = scale·I + U·Vᵀ`` (U, V: d×r), with ``W' = D·W``."""

    scale: float
    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.U.shape != self.V.shape:
            raise ValueError(
                f"U and V must both be d×r, got {tuple(self.U.shape)} and {tuple(self.V.shape)}"
            )

    def factors(self, W: Tensor, *, reduce: bool = True, rtol: float | None = None) -> Factors:
        """Patch factors for ``W' = D·W``: ``(scale, U, B = Vᵀ·W)`` in float64."""
        B = self.V.to(_F64).mT @ W.to(_F64)
        out = Factors(self.scale, self.U.to(_F64), B)
        return reduce_rank(out, rtol) if reduce else out

    def dense(self) -> Tensor:
        """``D`` as a d×d float64 matrix (tests and small problems only)."""
        d = self.U.shape[0]
        eye = torch.eye(d, dtype=_F64, device=self.U.device)
        return self.scale * eye + self.U.to(_F64) @ self.V.to(_F64).mT


def reduce_rank(factors: Factors, rtol: float | None = None) -> Factors:
    """Rewrite ``U·B`` with as few columns as its numerical rank.

    Thin QR of U and Bᵀ, SVD of the small r×r core; singular values below
    ``rtol·σ_max`` (default ``max(d, f)·eps``, as ``matrix_rank``) are dropped.
    The result has orthonormal rows in B and the singular values folded
    into U (``‖U[:, i]‖ = σ_i``). Never forms the d×f product.
    """
    U, B = factors.U, factors.B
    d, f = factors.shape
    if factors.rank == 0:
        return factors
    if rtol is None:
        rtol = max(d, f) * torch.finfo(U.dtype).eps
    qu, ru = torch.linalg.qr(U)
    qb, rb = torch.linalg.qr(B.mT)
    a, s, zh = torch.linalg.svd(ru @ rb.mT, full_matrices=False)
    smax = float(s[0]) if s.numel() else 0.0
    k = int((s > rtol * smax).sum()) if smax > 0 else 0
    U_new = qu @ (a[:, :k] * s[:k])
    B_new = zh[:k] @ qb.mT
    return Factors(factors.scale, U_new.contiguous(), B_new.contiguous())


# --------------------------------------------------------------------------- helpers


def _f64(x: Tensor, name: str, device: torch.device, shape: tuple[int | None, ...]) -> Tensor:
    """Detached float64 copy of an input, checked for device, shape and finiteness."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of W)")
    if x.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, x.shape)):
        want = "×".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    x = x.detach().to(_F64)
    if not _all_finite(x):
        raise SolverError(f"{name} contains NaN or Inf")
    return x


def _all_finite(x: Tensor, elements: int = 1 << 22) -> bool:
    """``torch.isfinite(x).all()`` over slices of about ``elements`` each: on the whole
    matrix, isfinite's temporaries (|x| among them) cost 700 MiB for a 1B model's f×f C."""
    rows = x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1)
    step = max(1, elements // max(1, rows.shape[1]))
    return all(bool(torch.isfinite(part).all()) for part in rows.split(step))


def orthonormal_basis(O: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis Q (d×q, q ≤ n) of span(O) by thin SVD.

    Directions with singular value ≤ ``rtol·σ_max`` (default ``max(d, n)·eps``)
    are dropped, so near-parallel columns of O do not give a spurious axis.
    """
    O = O.to(_F64)
    d, n = O.shape
    if n == 0:
        return O.new_zeros(d, 0)
    u, s, _ = torch.linalg.svd(O, full_matrices=False)
    if rtol is None:
        rtol = max(d, n) * _EPS64
    smax = float(s[0])
    q = int((s > rtol * smax).sum()) if smax > 0 else 0
    return u[:, :q].contiguous()


def _spd_solve(H: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``H X = rhs`` for symmetric positive (semi)definite H, in float64.

    Cholesky first; if it fails, LU. Either way a pivot ratio below
    ``d·eps`` is reported as :class:`SingularSystemError` instead of
    returning garbage.
    """
    d = H.shape[0]
    H = 0.5 * (H + H.mT)
    tol = d * _EPS64
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        diag = L.diagonal()
        rcond = float((diag.min() / diag.max()) ** 2)
        if rcond > tol:
            return torch.cholesky_solve(rhs, L)
    LU, pivots, info = torch.linalg.lu_factor_ex(H)
    piv = LU.diagonal().abs()
    rcond = float(piv.min() / piv.max()) if float(piv.max()) > 0 else 0.0
    if int(info) != 0 or not rcond > tol:
        raise SingularSystemError(
            f"the closed-form system G + λ_f·Y·Yᵀ ({d}×{d}) is singular (pivot ratio "
            f"{rcond:.1e}): W has rank < {d}, or lambda_reg = 0 with rank-deficient retain "
            f"statistics; use lambda_reg > 0 or collect more retain keys"
        )
    return torch.linalg.lu_solve(LU, pivots, rhs)


def _project(Q: Tensor, X: Tensor, epsilon: float) -> Tensor:
    """``P·X = (1+ε)X − Q(QᵀX)`` without forming P."""
    return (1.0 + epsilon) * X - Q @ (Q.mT @ X)


# --------------------------------------------------------------------------- retain statistics

#: ``read(start, stop)``: rows ``[start, stop)`` of an f×f matrix, as a tensor of any float dtype.
RowReader = Callable[[int, int], Tensor]


def moment_root(keys: Tensor) -> Tensor:
    """Columns ``L`` with ``L·Lᵀ = K·Kᵀ`` and no more columns than rows: ``keys`` itself
    when it has no more columns than rows, else ``Rᵀ`` of the QR decomposition of
    ``Kᵀ`` (f×f, float64; exact up to float64 rounding).

    The retain term only ever needs ``K·Kᵀ``, so many retain keys need not be held:
    1000 requests' protection is 10,906 key columns of 1536 on SmolLM2 (67 MB a
    layer in float32, 19 MB as its root), and the solve's products shrink with it.
    """
    if keys.ndim != 2:
        raise ValueError(f"keys must be f×m, got shape {tuple(keys.shape)}")
    f, m = keys.shape
    if m <= f:
        return keys
    # f columns at a time, each QR of the root so far stacked on them: float64 working
    # memory of 2f×f instead of a float64 copy of all m keys (109 MB for 1000 requests)
    root = None
    for begin in range(0, m, f):
        part = keys[:, begin : begin + f].mT.to(_F64)
        root = torch.linalg.qr(part if root is None else torch.cat([root.mT, part]), mode="r").R.mT
    return root


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """The retain second moment ``C = S + weight·R·Rᵀ``, kept in its two parts.

    ``S`` (f×f, the key statistics) is only ever read in blocks of rows
    through ``read``: from a tensor (:meth:`of`, the blocks are views) or
    from a file, so that a solve never holds S whole (512 MiB in float64 for
    a 1B model's f = 8192). ``R`` (f×m, the retain keys) stays a low-rank
    term. The closed form needs only ``W·C·Wᵀ`` (:meth:`sandwich`);
    :meth:`dense` builds the f×f matrix for those that need it (the GD
    variant's null space).
    """

    size: int
    read: RowReader
    keys: Tensor | None = None
    weight: float = 0.0
    block_elements: int = 1 << 22  # elements of S per block: 32 MiB in float64

    @classmethod
    def of(cls, S: Tensor, keys: Tensor | None = None, weight: float = 0.0) -> SecondMoment:
        """A second moment held in memory (never changed here)."""
        if S.ndim != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"C must have shape f×f, got {tuple(S.shape)}")
        return cls(int(S.shape[0]), lambda start, stop: S[start:stop], keys, weight)

    def blocks(self, device: torch.device) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows of S)`` in float64 on ``device``, each checked finite."""
        step = max(1, self.block_elements // max(1, self.size))
        for start in range(0, self.size, step):
            stop = min(self.size, start + step)
            block = self.read(start, stop).to(device=device, dtype=_F64)
            if block.shape != (stop - start, self.size):
                raise ValueError(f"C must have shape {self.size}×{self.size}, read rows of shape {tuple(block.shape)}")
            if not _all_finite(block):
                raise SolverError("C contains NaN or Inf")
            yield start, block

    def _keys(self, device: torch.device) -> Tensor | None:
        if self.keys is None or self.keys.shape[1] == 0 or self.weight == 0:
            return None
        R = self.keys.detach().to(device=device, dtype=_F64)
        if R.shape[0] != self.size:
            raise ValueError(f"the retain keys must have {self.size} rows, got {tuple(R.shape)}")
        if not _all_finite(R):
            raise SolverError("the retain keys contain NaN or Inf")
        return R

    def sandwich(self, W: Tensor, statistics_part: Tensor | None = None) -> Tensor:
        """``W·C·Wᵀ`` (d×d, float64) for W of d×f: ``Σ W[:, b]·(S[b]·Wᵀ) + weight·(WR)(WR)ᵀ``,
        block by block, with no f×f or d×f temporary. ``statistics_part``: ``W·S·Wᵀ``
        when the caller has it already (S is then not read)."""
        W = W.to(_F64)
        if W.ndim != 2 or W.shape[1] != self.size:
            raise ValueError(f"C must have shape f×f for W of {tuple(W.shape)}, got {self.size}×{self.size}")
        if statistics_part is not None:
            out = statistics_part.to(W.device, _F64).clone()
        else:
            out = W.new_zeros(W.shape[0], W.shape[0])
            for start, block in self.blocks(W.device):
                out.addmm_(W[:, start : start + block.shape[0]], block @ W.mT)
        R = self._keys(W.device)
        if R is not None:
            WR = W @ R
            out.addmm_(WR, WR.mT, alpha=self.weight)
        return out

    def dense(self, device: torch.device | None = None) -> Tensor:
        """C as one f×f float64 matrix (a new one; S is not changed)."""
        device = device if device is not None else torch.device("cpu")
        C = torch.empty(self.size, self.size, dtype=_F64, device=device)
        for start, block in self.blocks(device):
            C[start : start + block.shape[0]] = block
        R = self._keys(device)
        return C.addmm_(R, R.mT, alpha=self.weight) if R is not None else C


@dataclass(eq=False)
class OrdinaryBudget:
    """A bound on how far an edit moves a layer's output on ordinary text.

    The figure is ``sqrt(tr(ΔW·S·ΔWᵀ) / tr(W0·S·W0ᵀ))``, ΔW from the original
    weight W0 to the edited one and S the key statistics: the RMS change of the
    layer's output on the statistics' text, relative to the output. For an
    update ``W' = (I + M)·W`` of the weight W as it is now (after earlier
    passes) it needs only ``now = W·S·Wᵀ``, ``cross = W·S·W0ᵀ`` and
    ``tr(W0·S·W0ᵀ)``: one sandwich of S with W and W0 stacked (:meth:`measure`),
    whose ``now`` the solve reuses. :func:`closed_form_update` lowers λ_f until
    the edit stays within ``limit`` and records the factor it used in
    ``forget_scale``, and the figure after its edit in ``after``
    (docs/maths.md, "A bound on ordinary text").
    """

    limit: float
    now: Tensor
    cross: Tensor
    base: float
    forget_scale: float = 1.0  # set by the solve: the factor λ_f was scaled by
    after: float = float("nan")  # set by the solve: the figure after its edit

    @classmethod
    def measure(cls, statistics: SecondMoment, W: Tensor, W0: Tensor, limit: float) -> OrdinaryBudget:
        """The budget of W (d×f, now) against W0 (d×f, original), from the statistics
        alone (``statistics``' retain keys, if any, are left out)."""
        d = W.shape[0]
        bare = replace(statistics, keys=None, weight=0.0)
        both = bare.sandwich(torch.cat([W.to(_F64), W0.to(W.device, _F64)]))
        return cls(limit, both[:d, :d].clone(), both[:d, d:].clone(), float(torch.trace(both[d:, d:])))

    def _moved(self) -> tuple[Tensor, float]:
        """``W·S·(W − W0)ᵀ`` and ``tr((W − W0)·S·(W − W0)ᵀ)``: what earlier passes moved."""
        held = self.now - self.cross
        return held, float(torch.trace(held) - torch.trace(self.cross)) + self.base

    def _terms(self, M: Tensor, held: Tensor) -> tuple[float, float]:
        """``2·tr(M·held)`` and ``tr(M·now·Mᵀ)``: with them, ``tr(ΔW·S·ΔWᵀ)`` of
        ``(I + t·M)·W`` is ``moved + t·first + t²·second``."""
        return 2 * float((M * held.mT).sum()), float(((M @ self.now) * M).sum())

    def change(self, M: Tensor | None = None) -> float:
        """The figure for ``W' = (I + M)·W`` (M: d×d; None: W itself)."""
        held, moved = self._moved()
        if M is not None:
            moved += sum(self._terms(M, held))
        return math.sqrt(max(moved, 0.0) / self.base) if self.base > 0 else float("nan")

    def largest_factor(self, M: Tensor) -> float:
        """The largest t in [0, 1] with ``change(t·M) ≤ limit``: the figure squared is
        a quadratic in t, positive at its leading coefficient, below the limit at 0."""
        held, moved = self._moved()
        linear, quadratic = self._terms(M, held)
        room = self.limit**2 * self.base - moved
        if quadratic + linear <= room:
            return 1.0
        if room <= 0:
            return 0.0
        if quadratic <= 0:
            return room / linear
        return (-linear + math.sqrt(linear * linear + 4 * quadratic * room)) / (2 * quadratic)

    def largest_scale(self, G: Tensor, Y: Tensor, A: Tensor, lambda_forget: float) -> float:
        """The largest t in [0, 1] with ``change(M(t)) ≤ limit``, where
        ``M(t) = t·λ_f·A·S(t)ᵀ`` and ``S(t) = (G + t·λ_f·Y·Yᵀ)⁻¹·Y``.

        One Cholesky ``G = L·Lᵀ`` and one eigendecomposition ``L⁻¹Y(L⁻¹Y)ᵀ = QΛQᵀ``
        make ``M(t) = F·diag(w)·H`` with ``w = tλ_f/(1 + tλ_fΛ)``, F and H fixed, so
        each trial t costs O(d²): bisection on log t, 60 steps."""
        L, info = torch.linalg.cholesky_ex(0.5 * (G + G.mT))
        if int(info) != 0:
            raise SingularSystemError("the closed-form system G is not positive definite; use lambda_reg > 0")
        Yw = torch.linalg.solve_triangular(L, Y, upper=False)
        lam, Q = torch.linalg.eigh(Yw @ Yw.mT)
        lam = lam.clamp_min(0)
        F = A @ (Yw.mT @ Q)  # M(t) = F · diag(w) · H
        H = torch.linalg.solve_triangular(L.mT, Q, upper=True).mT  # Qᵀ L⁻¹
        held, moved = self._moved()
        cross_terms = torch.einsum("kd,de,ek->k", H, held, F)  # diag(H · held · F): tr(M·held) = w · this
        quadratic = (H @ self.now @ H.mT) * (F.mT @ F)  # tr(M·now·Mᵀ) = wᵀ (this) w

        def figure_squared(t: float) -> float:
            w = t * lambda_forget / (1 + t * lambda_forget * lam)
            return (moved + float(2 * (w @ cross_terms) + w @ quadratic @ w)) / self.base

        if self.base <= 0 or figure_squared(1.0) <= self.limit**2:
            return 1.0
        if moved / self.base >= self.limit**2:  # earlier passes used it all
            return 0.0
        low, high = -12.0, 0.0  # log10 t: below 1e-12 the edit is nothing
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if figure_squared(10**middle) <= self.limit**2 else (low, middle)
        return 10**low


def _second_moment(C: Tensor | SecondMoment, device: torch.device, f: int) -> SecondMoment:
    """C as a :class:`SecondMoment` of size f (a tensor must be on ``device``)."""
    if isinstance(C, SecondMoment):
        if C.size != f:
            raise ValueError(f"C must have shape {f}×{f}, got {C.size}×{C.size}")
        return C
    if not isinstance(C, Tensor):
        raise TypeError(f"C must be a torch.Tensor or a SecondMoment, got {type(C).__name__}")
    if C.device != device:
        raise ValueError(f"C is on {C.device}, expected {device} (the device of W)")
    if C.shape != (f, f):
        raise ValueError(f"C must have shape {f}×{f}, got {tuple(C.shape)}")
    return SecondMoment.of(C.detach())


# --------------------------------------------------------------------------- closed form


def _forget_inputs(W: Tensor, K_f: Tensor, V_star: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W (d×f), K_f (f×n, n ≥ 1) and V* (d×n) in float64 on W's device, shapes checked."""
    if W.ndim != 2:
        raise ValueError(f"W must be a d×f matrix, got shape {tuple(W.shape)}")
    d, f = W.shape
    dev = W.device
    W = _f64(W, "W", dev, (d, f))
    K = _f64(K_f, "K_f", dev, (f, None))
    if K.shape[1] == 0:
        raise ValueError("K_f has no columns: there is nothing to forget")
    return W, K, _f64(V_star, "V_star", dev, (d, K.shape[1]))


def closed_form_update(
    W: Tensor,
    C: Tensor | SecondMoment,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor | None,
    hp: ClosedFormParams = ClosedFormParams(),
    budget: OrdinaryBudget | None = None,
) -> LowRankUpdate:
    """The optimal left multiplier ``D = c·I + U·Vᵀ`` of the closed form.

    W: d×f weight (math layout), C: f×f retain second moment ``E[k kᵀ]``
    (a tensor, or a :class:`SecondMoment` read in blocks), K_f: f×n forget keys, V_star: d×n targets, O: d×n original
    representations (unused, may be None, when ``projection="off"``).
    With ``G = W(λ_r C + λI)Wᵀ``, ``Y = W K_f``, ``R = V* − Y`` and one
    solve ``S = (G + λ_f Y Yᵀ)⁻¹ Y``:

    - everywhere: ``c = 1+ε``, ``U = [−Q, λ_f P R]``, ``V = [Q, S]``
    - forget:     ``c = 1``,   ``U = λ_f (P V* − Y)``, ``V = S``
    - off:        ``c = 1``,   ``U = λ_f R``,          ``V = S``

    With ``budget`` ("off" and "forget" only), λ_f is first scaled by the
    largest t ≤ 1 that keeps the edit within the bound
    (:meth:`OrdinaryBudget.largest_scale`); ``budget`` records t and the
    figure after the edit.
    """
    W, K, Vs = _forget_inputs(W, K_f, V_star)
    (d, f), dev = W.shape, W.device
    moment = _second_moment(C, dev, f)
    lr_, lf, lg, eps = hp.lambda_retain, hp.lambda_forget, hp.lambda_reg, hp.epsilon
    if budget is not None and hp.projection == "everywhere":
        raise ParameterError('an ordinary-text bound needs projection "off" or "forget"')

    # G = W(λ_r C + λI)Wᵀ; W·C·Wᵀ block by block, so neither C whole nor W·C is held.
    G = moment.sandwich(W, budget.now if budget is not None else None).mul_(lr_).addmm_(W, W.mT, alpha=lg)
    Y = W @ K
    R = Vs - Y
    Q = None
    if hp.projection != "off":
        if O is None:
            raise ValueError(f"O is required when projection={hp.projection!r}")
        Q = orthonormal_basis(_f64(O, "O", dev, (d, None)))
    A = R if Q is None else _project(Q, Vs, eps) - Y  # U = λ_f·A ("off", "forget")
    if budget is not None:
        budget.forget_scale = budget.largest_scale(G, Y, A, lf)
        lf = lf * budget.forget_scale
        if lf == 0:
            budget.after = budget.change()
            return LowRankUpdate(1.0, W.new_zeros(d, 0), W.new_zeros(d, 0))
    S = _spd_solve(G + lf * (Y @ Y.mT), Y)
    if hp.projection != "everywhere":
        U = lf * A
        if hp.rank_tolerance > 0:  # M = P·U·Sᵀ, P onto the directions kept: every output change shrinks
            kept = forget_directions(U, S.mT @ Y, hp.rank_tolerance)
            U, S = kept, S @ (U.mT @ kept)
            if budget is not None:  # the bound holds for the new edit alone, not always beside earlier passes
                factor = budget.largest_factor(U @ S.mT)
                S, budget.forget_scale = S * factor, budget.forget_scale * factor
        if budget is not None:
            budget.after = budget.change(U @ S.mT)
        return LowRankUpdate(1.0, U, S)
    U = torch.cat([-Q, lf * _project(Q, R, eps)], dim=1)
    V = torch.cat([Q, S], dim=1)
    return LowRankUpdate(1.0 + eps, U, V)


def forget_directions(U: Tensor, T: Tensor, tolerance: float) -> Tensor:
    """An orthonormal d×r basis of the fewest output directions of ``E = U·T`` (d×n,
    the edit's change on the n forget keys) whose projection of E keeps all but
    ``tolerance`` of ‖E‖ (Frobenius): E's leading left singular vectors.

    A many-request edit that sends every request to the same neutral answer
    changes them along a few shared directions (docs/maths.md, "Few directions")."""
    E = U @ T
    d, n = E.shape
    if n > d:  # E·Eᵀ is the smaller matrix
        energy, vectors = torch.linalg.eigh(E @ E.mT)
        energy, vectors = energy.flip(0).clamp_min(0), vectors.flip(1)
    else:
        vectors, singular, _ = torch.linalg.svd(E, full_matrices=False)
        energy = singular**2
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i]: the energy of directions i and after
    kept = int((tail > tolerance**2 * float(tail[0])).sum()) if energy.numel() else 0
    return vectors[:, :kept].contiguous()


def closed_form(
    W: Tensor,
    C: Tensor | SecondMoment,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor | None,
    hp: ClosedFormParams = ClosedFormParams(),
    *,
    reduce: bool = True,
    budget: OrdinaryBudget | None = None,
) -> Factors:
    """Patch factors ``(c, U, B)`` of the closed-form ZeroUnlearn edit of W.

    ``W' = c·W + U·B`` with rank r ≤ 2n (``"everywhere"``) or r ≤ n
    (``"forget"``, ``"off"``); ``reduce`` drops numerically-zero directions
    (see :func:`reduce_rank`). Arguments as :func:`closed_form_update`.
    """
    update = closed_form_update(W, C, K_f, V_star, O, hp, budget)
    return update.factors(W, reduce=reduce)


def closed_form_objective(
    W_new: Tensor | Factors,
    W: Tensor,
    C: Tensor,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor | None,
    hp: ClosedFormParams = ClosedFormParams(),
) -> Tensor:
    """The objective of ``hp.projection`` at ``W' = W_new`` (scalar, float64).

    ``λ_r‖(W' − T)C^{1/2}‖² + λ_f‖W'K_f − T_f‖² + λ‖W' − T‖²`` with
    ``T = PW`` (everywhere) or ``W``, and ``T_f = PV*`` (everywhere, forget)
    or ``V*`` (off). Differentiable in ``W_new`` when it is a tensor, so
    ``W_new = D @ W`` gives the objective as a function of D.
    """
    dev = W.device
    W = W.detach().to(_F64)
    C, K, Vs = (x.detach().to(dev, _F64) for x in (C, K_f, V_star))
    Wn = W_new.apply(W) if isinstance(W_new, Factors) else W_new.to(_F64)
    T, Tf = W, Vs
    if hp.projection != "off":
        if O is None:
            raise ValueError(f"O is required when projection={hp.projection!r}")
        Q = orthonormal_basis(O.detach().to(dev, _F64))
        Tf = _project(Q, Vs, hp.epsilon)
        if hp.projection == "everywhere":
            T = _project(Q, W, hp.epsilon)
    E = Wn - T
    retain = ((E @ C) * E).sum()
    forget = ((Wn @ K - Tf) ** 2).sum()
    return hp.lambda_retain * retain + hp.lambda_forget * forget + hp.lambda_reg * (E**2).sum()


# --------------------------------------------------------------------------- gradient variant


def null_space_basis(C: Tensor, threshold: float = 1e-2) -> Tensor:
    """Orthonormal eigenvectors U0 (f×m) of C with eigenvalue ≤ ``threshold``.

    float64 ``eigh`` of the symmetrised C; the threshold is absolute (units
    of C). These are key directions the retain corpus (almost) never uses.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square, got shape {tuple(C.shape)}")
    C = _f64(C, "C", C.device, (C.shape[0], C.shape[0]))
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.mT))
    return evecs[:, evals <= threshold].contiguous()


@dataclass(frozen=True, eq=False)
class _GDProblem:
    """Float64 pieces of the GD objective: Y = W K_f, A = U0ᵀ K_f, Q."""

    Y: Tensor
    A: Tensor
    Vs: Tensor
    Q: Tensor
    U0: Tensor


def _gd_problem(W: Tensor, U0: Tensor, K_f: Tensor, V_star: Tensor, O: Tensor) -> _GDProblem:
    W, K, Vs = _forget_inputs(W, K_f, V_star)
    (d, f), dev = W.shape, W.device
    U0 = _f64(U0, "U0", dev, (f, None))
    Q = orthonormal_basis(_f64(O, "O", dev, (d, None)))
    return _GDProblem(Y=W @ K, A=U0.mT @ K, Vs=Vs, Q=Q, U0=U0)


def _zero_edit(p: _GDProblem) -> Factors:
    """No null space (m = 0): the only admissible ΔW is zero."""
    return Factors(1.0, p.Y.new_zeros(p.Y.shape[0], 0), p.U0.new_zeros(0, p.U0.shape[0]))


def _right_basis(A: Tensor) -> Tensor:
    """Ψ1 (m×k, k = min(m, n)): orthonormal basis of range(A) ⊇ the row space of X."""
    psi, _, _ = torch.linalg.svd(A, full_matrices=False)
    return psi


def gd_exact(
    W: Tensor,
    U0: Tensor,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor,
    hp: GDParams = GDParams(),
    *,
    reduce: bool = True,
) -> Factors:
    """Exact minimiser of the ZeroUnlearn-GD objective, as factors with c = 1.

    Minimises ``‖Qᵀ(W+ΔW)K_f‖² + α‖(W+ΔW)K_f − V*‖² + β‖ΔW‖²`` over
    ``ΔW = X U0ᵀ``. The normal equation ``M X N + βX = −(QQᵀY + α(Y−V*))Aᵀ``
    (``A = U0ᵀK_f``, ``M = QQᵀ + αI``, ``N = AAᵀ``) is diagonal in the
    eigenbases of M (span Q ⊕ its complement; eigenvalues 1+α, α) and N
    (thin SVD of A), so X is found without any d×d or m×m solve; X vanishes
    on null(N), hence ``rank ΔW ≤ n``. ``U = X Ψ1``, ``B = (U0 Ψ1)ᵀ``.
    """
    p = _gd_problem(W, U0, K_f, V_star, O)
    if p.A.shape[0] == 0:
        return _zero_edit(p)
    alpha, beta = hp.alpha, hp.beta
    psi, sig, zh = torch.linalg.svd(p.A, full_matrices=False)  # A = Ψ1 Σ Zᵀ
    E = p.Q @ (p.Q.mT @ p.Y) + alpha * (p.Y - p.Vs)
    F1 = -(E @ zh.mT) * sig  # F Ψ1 = −E Aᵀ Ψ1 = −E Z Σ
    s = sig**2  # eigenvalues of N on range(A)
    QF = p.Q @ (p.Q.mT @ F1)
    X1 = QF / ((1.0 + alpha) * s + beta) + (F1 - QF) / (alpha * s + beta)
    out = Factors(1.0, X1, (p.U0 @ psi).mT.contiguous())
    return reduce_rank(out) if reduce else out


def gd_adam(
    W: Tensor,
    U0: Tensor,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor,
    hp: GDParams = GDParams(),
    *,
    project: bool = True,
    reduce: bool = True,
) -> Factors:
    """The paper's ZeroUnlearn-GD: Adam on X (d×m) from zero, in float64.

    Same objective as :func:`gd_exact`, minimised with ``hp.steps`` Adam steps
    (torch's defaults: betas 0.9/0.999, eps 1e-8) using the analytic
    gradient, so no autograd state is involved. With ``project`` the result
    is projected onto the row space ``range(A)``: this never raises the
    objective (the fit terms see only ``X A`` and ``‖X Ψ1Ψ1ᵀ‖ ≤ ‖X‖``) and
    makes ``rank ΔW ≤ n``. Without it the rank may reach ``min(d, m)``.
    """
    p = _gd_problem(W, U0, K_f, V_star, O)
    if p.A.shape[0] == 0:
        return _zero_edit(p)
    alpha, beta = hp.alpha, hp.beta
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    X = p.Y.new_zeros(p.Y.shape[0], p.A.shape[0])
    m1 = torch.zeros_like(X)
    m2 = torch.zeros_like(X)
    for t in range(1, int(hp.steps) + 1):
        Z = p.Y + X @ p.A
        grad = 2.0 * ((p.Q @ (p.Q.mT @ Z) + alpha * (Z - p.Vs)) @ p.A.mT + beta * X)
        m1.mul_(b1).add_(grad, alpha=1 - b1)
        m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (m2.sqrt() / math.sqrt(1 - b2**t)).add_(adam_eps)
        X.addcdiv_(m1, denom, value=-hp.lr / (1 - b1**t))
    if project:
        psi = _right_basis(p.A)
        out = Factors(1.0, X @ psi, (p.U0 @ psi).mT.contiguous())
    else:
        out = Factors(1.0, X, p.U0.mT.contiguous())
    return reduce_rank(out) if reduce else out


def gd_objective(
    delta: Tensor | Factors,
    W: Tensor,
    K_f: Tensor,
    V_star: Tensor,
    O: Tensor,
    hp: GDParams = GDParams(),
) -> Tensor:
    """``‖Qᵀ(W+ΔW)K_f‖² + α‖(W+ΔW)K_f − V*‖² + β‖ΔW‖²`` (scalar, float64).

    ``delta`` is ΔW as a d×f tensor (differentiable) or as :class:`Factors`
    (then ΔW = (c−1)W + U·B; with c = 1 nothing d×f is formed).
    """
    dev = W.device
    W = W.detach().to(_F64)
    K, Vs, O = (x.detach().to(dev, _F64) for x in (K_f, V_star, O))
    Q = orthonormal_basis(O)
    Y = W @ K
    if isinstance(delta, Factors) and delta.scale == 1.0:
        U, B = delta.U.to(_F64), delta.B.to(_F64)
        Z = Y + U @ (B @ K)
        reg = ((U.mT @ U) * (B @ B.mT)).sum()  # ‖UB‖² = tr(UᵀU·BBᵀ)
    else:
        D = delta.delta(W) if isinstance(delta, Factors) else delta.to(_F64)
        Z = Y + D @ K
        reg = (D**2).sum()
    return ((Q.mT @ Z) ** 2).sum() + hp.alpha * ((Z - Vs) ** 2).sum() + hp.beta * reg
