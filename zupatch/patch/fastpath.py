"""Low-rank apply through BLAS, with a proof that every output bit is canonical.

The canonical value of element (i, j) (docs/format.md §3) is, in binary64 with
round-to-nearest-even (``fl``), ``u = 2^-53``, ``P_k = U[i,k] B[k,j]`` (exact)::

    acc_c = fl(...fl(fl(+0 + fl(P_0)) + fl(P_1))... + fl(P_{r-1}))
    v_c   = fl(fl(s w) + acc_c)          forward
    v_c   = fl(fl(w - acc_c) / s)        inverse

then ``round_T(v_c)`` (RNE into the target T, NaN canonical). This module
computes ``acc_f = U @ B`` with BLAS in any order, ``v_f`` from it with the
same final operations, rounds ``v_f``, and proves per element that
``round_T(v_f) = round_T(v_c)``; the elements it cannot prove are recomputed
with the canonical formula. No result bit depends on the BLAS, its summation
order, FMA use, threads or flush-to-zero mode; only speed does.

Bound on the product. Let ``T = sum_k |P_k|``. Each term of a sum of r
products, in any order, with or without FMA, meets at most r roundings (one
product, at most r-1 additions), so ``|acc - sum P_k| <= gamma_r T`` with
``gamma_r = r u / (1 - r u)`` -- for float32 factors the products are exact in
binary64 (24+24 bits, no under/overflow) and the bound holds a fortiori, for
float64 factors the product rounding is the r-th rounding. Underflow adds at
most ``2^-1074`` per operation; flush-to-zero or denormals-are-zero inside the
BLAS at most ``2^-1022 (1 + max|other factor|)`` per term. Both
computations obey this, so::

    |acc_f - acc_c| <= 2 gamma_r T + 2^-1020 (2r + sum_k (cu_k + cb_k)) =: E_acc

with ``cu_k = max_i |U[i,k]|`` over the rows given, ``cb_k = max_j |B[k,j]|``
(maxima are exact) and ``T <= T_max = sum_k cu_k cb_k``. We compute
``K T_up`` with ``K = r 2^-51 >= 2 gamma_r (1 + 2^-10)`` (r <= 2^20) and
``T_up = fl(T_max)(1 + 2^-30) + 2^-1000``; each float operation of this scalar
arithmetic is covered by a further ``(1 + 2^-30)`` factor. Non-finite factors
or ``T_up > 2^1000`` (possible overflow of some partial sum) send the whole
call to the canonical path.

Bound on the value. ``fl(s w)`` (or ``w``) is computed identically on both
paths. A correctly rounded op gives ``fl(x) = x (1 + e) + d``, ``|e| <= u``,
``|d| <= 2^-1075``. Forward::

    |v_f - v_c| <= (1 + u) E_acc + 2u(1 + 2u)|v_f| + 2^-1073
               <= E_eff + 2^-50 |v_f|,   E_eff = E_acc (1 + 2^-30) + 2^-1000.

Inverse (subtract, then divide by s)::

    |v_f - v_c| <= (1 + u)^2 E_acc / |s| + 4u(1 + 4u)|v_f| + 2^-1072 (1 + 1/|s|)
               <= E_eff + 2^-50 |v_f|,   E_eff = E_acc/|s| (1 + 2^-30) + 2^-1000 (1 + 1/|s|).

Call ``Delta = E_eff + 2^-50 |v_f|``. RNE is monotone, so if no rounding
boundary of T (a midpoint between adjacent T values; all are binary32 numbers
for BF16/F16 and binary64 numbers for F32) lies in ``[v_f - Delta, v_f + Delta]``
both values round alike. The tests, all on bit patterns:

BF16 / F16 (via ``y = RNE32(v_f)``, ``q`` = distance in binary32 patterns from
y to the midpoint pattern of its own binade, i.e. ``|low bits - half|``):
safe iff ``2^(emin+1) <= |y| < 2^emax`` (not the lowest normal binade nor the
top one; zero, subnormals, Inf, NaN excluded), ``|y| >= tau = 2^25 E_eff`` and
``q >= 2``. Proof: ``|v_f - y| <= ulp32(y)/2`` and ``Delta <= 2^-25|y| + 2^-49.9|y|
< 2^-24 |y| < ulp32(y)``, so ``|v_c - y| < 1.5 ulp32(y)``; the nearest
midpoint is ``q ulp32(y) >= 2 ulp32(y)`` away (any other one is >= 2^11 ulp32(y)
away, also across a binade edge), so y, v_f, v_c lie in one open rounding cell
and all round to ``round_half_up(y)`` (y is no tie), which stays finite and
normal. This also makes the cheap binary32 -> 16-bit rounding exact.

F32 (``d`` = the 29 dropped bits of v_f, ``m`` = the midpoint of v_f's
binade with the same upper bits): safe iff ``2^-125 <= |RNE32(v_f)| < 2^127``
(so v_f is a normal binary64 number far from binary32's subnormals and
overflow), ``|d - 2^28| >= 32`` and ``|v_f - m| >= 4 E_eff``. Proof: every
midpoint is at least ``|v_f - m| / 2`` away (the one below a binade edge sits at
half spacing),
and ``Delta < |v_f - m|/4 + 8 ulp64(v_f) <= |v_f - m|/2`` because
``2^-50 |v_f| < 8 ulp64(v_f)`` and ``|v_f - m| >= 32 ulp64(v_f)``.

Zero, Inf and NaN results never pass the range tests, so signed zeros and NaN
canonicalisation are always the canonical path's. F64 targets: nothing is
provable (no rounding cell to hide in), all canonical. Everything not proven
safe is recomputed canonically, only those elements (their rows of U, columns
of B), with exactly the operations of :mod:`zupatch.patch.numerics`.

Assumption about the BLAS: it computes ``U @ B`` with binary64 multiplications,
additions or FMAs (any order, any blocking, flush-to-zero tolerated, extended
intermediates tolerated by the slack in K); no Strassen-like algorithms and no
reduced precision. The canonical path must run with IEEE semantics, which
zupatch already checks (``numerics.check_ieee_environment``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from zupatch.patch import numerics as nm

__all__ = ["lowrank_rounded", "lowrank_rounded_stats", "lowrank_unsafe_count", "canonical_rounded"]

_SLACK = 1.0 + 2.0**-30
_TINY = 2.0**-1000
_MAX_RANK = 1 << 20
# m*n*k per BLAS call: below OpenBLAS's threading threshold. Its threads made a
# 32 x 20 x 8192 product 50x slower on a busy 2-core machine; tiles also stay in cache.
_TILE = 1 << 18

# 16-bit targets through binary32 patterns: (dropped bits, lowest safe |y|, first unsafe |y|)
_NARROW32 = {"BF16": (16, 2.0**-125, 2.0**127), "F16": (13, 2.0**-13, 2.0**15)}


def _f32_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def _f64_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float64).view(np.uint64)[0])


def _f32_bits_up(x: float) -> int:
    """Pattern of the smallest binary32 value >= x (x >= 0; Inf if too large)."""
    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return int(np.array([y], dtype=np.float32).view(np.uint32)[0])


def _quiet(fn):
    """NaN, Inf and overflow are ordinary inputs here: no floating-point warnings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- canonical


def canonical_rounded(w_bits: np.ndarray, dtype: nm.DType, scale: float, U: np.ndarray, B: np.ndarray,
                      direction: str) -> np.ndarray:
    """The canonical result, by :mod:`numerics` itself (the reference and the fallback)."""
    w = nm.decode(np.ascontiguousarray(w_bits), dtype)
    fn = nm.lowrank_forward if direction == "forward" else nm.lowrank_inverse
    return nm.round_to(fn(w, scale, U, B), dtype)


@_quiet
def _canonical_at(flat_idx: np.ndarray, w_bits: np.ndarray, dtype: nm.DType, scale: float,
                  U64: np.ndarray, B64: np.ndarray, direction: str) -> np.ndarray:
    """Canonical bits of the elements ``flat_idx`` only: the same binary64 operations
    as ``numerics.lowrank_product`` / ``lowrank_forward`` / ``lowrank_inverse``."""
    cols = w_bits.shape[1]
    ri, ci = np.divmod(flat_idx, cols)
    Ug = U64[ri]  # (n, r)
    Bg = B64[:, ci]  # (r, n)
    acc = np.zeros(flat_idx.shape[0], dtype=np.float64)
    for k in range(U64.shape[1]):
        np.add(acc, np.multiply(Ug[:, k], Bg[k]), out=acc)
    w = nm.decode(w_bits.reshape(-1)[flat_idx], dtype)
    if direction == "forward":
        v = np.multiply(w, np.float64(scale))
        np.add(v, acc, out=v)
    else:
        v = np.subtract(w, acc)
        np.divide(v, np.float64(scale), out=v)
    return nm.round_to(v, dtype)


# --------------------------------------------------------------------------- bound


def _error_bound(U: np.ndarray, B: np.ndarray, scale: float, direction: str) -> float | None:
    """``E_eff`` of the module docstring, or None when nothing can be proven."""
    rank = U.shape[1]
    if rank > _MAX_RANK:
        return None
    if rank == 0:
        cu = cb = np.zeros(0)
    else:
        # max |x| as max(max x, -min x): exact, NaN propagates
        cu = np.maximum(U.max(axis=0), -U.min(axis=0)) if U.shape[0] else np.zeros(rank)
        cb = np.maximum(B.max(axis=1), -B.min(axis=1)) if B.shape[1] else np.zeros(rank)
    if not (np.isfinite(cu).all() and np.isfinite(cb).all()):
        return None
    cu_l = [float(x) for x in cu]
    cb_l = [float(x) for x in cb]
    t_up = math.fsum(a * b for a, b in zip(cu_l, cb_l)) * _SLACK + _TINY
    if not t_up <= 2.0**1000:
        return None
    junk = 2.0**-1020 * (2 * rank + math.fsum(cu_l) + math.fsum(cb_l))
    e_acc = (rank * 2.0**-51 * t_up + junk) * _SLACK
    if direction == "forward":
        e_eff = e_acc * _SLACK + _TINY
    else:
        inv = 1.0 / abs(scale)
        e_eff = e_acc * inv * _SLACK + _TINY * (1.0 + inv)
    return e_eff if math.isfinite(e_eff) else None


# --------------------------------------------------------------------------- fast path


def _product(U64: np.ndarray, B64: np.ndarray, out: np.ndarray) -> None:
    """``out = U64 @ B64`` by BLAS, in tiles small enough to stay single-threaded."""
    rows, rank = U64.shape
    cols = B64.shape[1]
    if rank == 0:
        out.fill(0.0)
        return
    rt = min(rows, 64)
    ct = max(64, (_TILE // (rt * rank)) // 64 * 64)
    for r0 in range(0, rows, rt):
        u = U64[r0 : r0 + rt]
        for c0 in range(0, cols, ct):
            np.matmul(u, B64[:, c0 : c0 + ct], out=out[r0 : r0 + rt, c0 : c0 + ct])


def block_product(U: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``U @ B`` in float64 by BLAS: computed once, it serves both directions of an entry."""
    out = np.empty((U.shape[0], B.shape[1]), dtype=np.float64)
    _product(np.ascontiguousarray(U, dtype=np.float64), np.ascontiguousarray(B, dtype=np.float64), out)
    return out


def _values(w_bits: np.ndarray, dtype: nm.DType, scale: float, U64: np.ndarray, B64: np.ndarray,
            direction: str, product: np.ndarray | None = None) -> np.ndarray:
    """``v_f``: the canonical final operations applied to the BLAS product."""
    if product is None:
        v = np.empty(w_bits.shape, dtype=np.float64)
        _product(U64, B64, v)
    else:
        v = product.copy()
    w = nm.decode(w_bits, dtype)
    s = np.float64(scale)
    if direction == "forward":
        if scale != 1.0:  # fl(1 * w) == w
            np.multiply(w, s, out=w)
        np.add(w, v, out=v)
    else:
        np.subtract(w, v, out=v)
        if scale != 1.0:  # fl(x / 1) == x
            np.divide(v, s, out=v)
    return v


def _narrow(v: np.ndarray, dtype: nm.DType, e_eff: float) -> tuple[np.ndarray, np.ndarray] | None:
    """BF16/F16 bits of the safe elements of ``v`` and the unsafe mask (docstring, BF16 / F16)."""
    drop, y_min, y_end = _NARROW32[dtype.name]
    lo = max(_f32_bits(y_min), _f32_bits_up(e_eff * 2.0**25))  # |y| >= tau
    hi = _f32_bits(y_end)
    if lo >= hi:
        return None
    half = 1 << (drop - 1)
    mask = (1 << drop) - 1
    yb = v.astype(np.float32).view(np.uint32)
    t = np.bitwise_and(yb, np.uint32(0x7FFFFFFF))
    np.subtract(t, np.uint32(lo), out=t)  # wraps below lo
    bad = np.greater_equal(t, np.uint32(hi - lo))
    low = yb.astype(np.uint16)  # the low 16 bits hold the dropped ones
    np.subtract(low, np.uint16(half - 1), out=low)
    if mask != 0xFFFF:
        np.bitwise_and(low, np.uint16(mask), out=low)
    bad |= np.less(low, np.uint16(3))  # q = |dropped bits - half| <= 1
    if dtype.name == "BF16":
        np.add(yb, np.uint32(half), out=yb)  # round half up: y is no tie
        yb >>= np.uint32(16)
        return yb.astype(np.uint16), bad
    sign = np.right_shift(yb, np.uint32(16)).astype(np.uint16)
    sign &= np.uint16(0x8000)
    np.bitwise_and(yb, np.uint32(0x7FFFFFFF), out=yb)
    np.add(yb, np.uint32(half), out=yb)
    yb >>= np.uint32(drop)
    np.subtract(yb, np.uint32((127 - 15) << 10), out=yb)  # re-bias the exponent
    out = yb.astype(np.uint16)
    out |= sign
    return out, bad


def _wide(v: np.ndarray, e_eff: float) -> tuple[np.ndarray, np.ndarray]:
    """F32 bits of the safe elements of ``v`` and the unsafe mask (docstring, F32)."""
    yb = v.astype(np.float32).view(np.uint32)
    lo, hi = _f32_bits(2.0**-125), _f32_bits(2.0**127)
    low = np.bitwise_and(yb, np.uint32(0x7FFFFFFF))
    np.subtract(low, np.uint32(lo), out=low)  # wraps below lo
    bad = np.greater_equal(low, np.uint32(hi - lo))
    vb = v.view(np.uint64)
    t = np.subtract(vb, np.uint64((1 << 28) - 31))
    np.bitwise_and(t, np.uint64((1 << 29) - 1), out=t)
    bad |= np.less(t, np.uint64(63))  # |d - 2^28| <= 31
    np.bitwise_and(vb, np.uint64((1 << 64) - (1 << 29)), out=t)
    np.bitwise_or(t, np.uint64(1 << 28), out=t)
    m = t.view(np.float64)
    np.subtract(v, m, out=m)
    np.abs(m, out=m)
    bad |= np.less(m, np.float64(4.0 * e_eff))
    return yb, bad


@_quiet
def lowrank_rounded_stats(w_bits: np.ndarray, dtype: nm.DType, scale: float, U: np.ndarray, B: np.ndarray,
                          direction: str, product: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """:func:`lowrank_rounded` and the number of elements recomputed canonically.

    ``product``: ``block_product(U, B)`` when the caller already has it (any
    BLAS order is fine: the bound covers every summation order).
    """
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction must be 'forward' or 'inverse', not {direction!r}")
    w_bits = np.ascontiguousarray(w_bits, dtype=dtype.bits)
    U, B = np.asarray(U), np.asarray(B)
    if U.dtype not in (np.float32, np.float64):
        U = U.astype(np.float64)
    if B.dtype not in (np.float32, np.float64):
        B = B.astype(np.float64)
    if w_bits.ndim != 2 or U.ndim != 2 or B.ndim != 2 or U.shape != (w_bits.shape[0], B.shape[0]) \
            or B.shape[1] != w_bits.shape[1]:
        raise ValueError(f"shapes do not fit: w {w_bits.shape}, U {U.shape}, B {B.shape}")
    scale = float(scale)
    n = w_bits.size
    U64 = np.ascontiguousarray(U, dtype=np.float64)
    B64 = np.ascontiguousarray(B, dtype=np.float64)
    e_eff = None if dtype.name == "F64" or n == 0 else _error_bound(U, B, scale, direction)
    if e_eff is None:
        return canonical_rounded(w_bits, dtype, scale, U, B, direction), n
    v = _values(w_bits, dtype, scale, U64, B64, direction, product)
    res = _wide(v, e_eff) if dtype.name == "F32" else _narrow(v, dtype, e_eff)
    if res is None:
        return canonical_rounded(w_bits, dtype, scale, U, B, direction), n
    out, bad = res
    idx = np.flatnonzero(bad)
    if idx.size:
        out.reshape(-1)[idx] = _canonical_at(idx, w_bits, dtype, scale, U64, B64, direction)
    return out.reshape(w_bits.shape), int(idx.size)


def lowrank_rounded(w_bits: np.ndarray, dtype: nm.DType, scale: float, U: np.ndarray, B: np.ndarray,
                    direction: str, product: np.ndarray | None = None) -> np.ndarray:
    """Bits equal to ``round_to(lowrank_forward(decode(w_bits), scale, U, B), dtype)``
    (``lowrank_inverse`` for ``direction="inverse"``) for every input, computed
    with one BLAS product plus a proof per element (module docstring).

    ``w_bits``: (rows, cols) bit array of ``dtype``; ``U``: (rows, r) and
    ``B``: (r, cols), float32 or float64.
    """
    return lowrank_rounded_stats(w_bits, dtype, scale, U, B, direction, product)[0]


def lowrank_unsafe_count(w_bits: np.ndarray, dtype: nm.DType, scale: float, U: np.ndarray, B: np.ndarray,
                         direction: str) -> int:
    """How many elements the fast path could not prove and recomputed canonically
    (all of them for F64 targets, non-finite factors or huge products)."""
    return lowrank_rounded_stats(w_bits, dtype, scale, U, B, direction)[1]
