"""The BLAS fast path of low-rank apply gives the canonical bits, always.

Compared bit for bit with the canonical numpy implementation over: random
inputs with specials (zero, subnormal, huge, Inf, NaN factors and weights),
ranks 0..25, heavy cancellation, values steered to within a few float64 ulps
of a rounding midpoint of the target, and an adversarial "BLAS" that returns
the canonical product pushed by the full error bound the proof allows, in
either direction. Plus large realistic tensors, where the fraction of elements
that need the canonical recomputation must be tiny.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from zupatch.patch import fastpath as fp
from zupatch.patch import numerics as nm

BF16, F16, F32, F64 = (nm.FLOAT_DTYPES[n] for n in ("BF16", "F16", "F32", "F64"))
NARROW = [BF16, F16, F32]
SCALES = [1.0, 1.01, 0.99, -1.5, 2.0, 1.0 + 2**-20, 3e-5, 7e4]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL_FACTORS = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 3e38, -3e38, 1e300, 5e-324, -2.2250738585072014e-308,
                   float("inf"), float("-inf"), float("nan")]
SPECIAL_BITS = {
    "BF16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x807F, 0x0080, 0x7F7F],
    "F16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x83FF, 0x0400, 0x7BFF],
    "F32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 1, 0x807FFFFF, 0x7F7FFFFF],
    "F64": [0, 1 << 63, 0x7FF0000000000000, 0x7FF8000000000000, 1, 0x7FEFFFFFFFFFFFFF],
}


def canonical(w_bits, dtype, scale, U, B, direction):
    return fp.canonical_rounded(w_bits, dtype, scale, U, B, direction)


def check(w_bits, dtype, scale, U, B, direction) -> int:
    want = canonical(w_bits, dtype, scale, U, B, direction)
    got, unsafe = fp.lowrank_rounded_stats(w_bits, dtype, scale, U, B, direction)
    assert got.dtype == want.dtype and got.shape == want.shape
    bad = np.flatnonzero(got != want)
    first = bad[:5]
    assert bad.size == 0, f"{bad.size} differ, at {first}: {got.reshape(-1)[first]} != {want.reshape(-1)[first]}"
    assert 0 <= unsafe <= w_bits.size
    return unsafe


def check_noting(*p) -> None:
    """:func:`check` inside a hypothesis test, noting how much was proven
    (``pytest --hypothesis-show-statistics``)."""
    unsafe = check(*p)
    size = p[0].size
    event("all recomputed" if unsafe == size else "some recomputed" if unsafe else "all proven")


def adversarial_product(sign: int, seed: int):
    """A stand-in for BLAS: the canonical product moved by (almost) the full
    bound ``2 gamma_r T`` of the proof, up, down or either way at random. The
    push, ``max(gamma_r, 2 gamma_r - 2.0001 u) T (1 - 2^-20)``, stays within the
    bound after the rounding of the addition that applies it."""

    def product(U64: np.ndarray, B64: np.ndarray, out: np.ndarray) -> None:
        acc = nm.lowrank_product(U64, B64)
        r = U64.shape[1]
        if r == 0:
            out[...] = acc
            return
        u = 2.0**-53
        gamma = r * u / (1 - r * u)
        with np.errstate(all="ignore"):
            dev = max(gamma, 2 * gamma - 2.0001 * u) * (np.abs(U64) @ np.abs(B64)) * (1 - 2.0**-20)
        signs = sign if sign else np.random.default_rng(seed).choice([-1.0, 1.0], size=acc.shape)
        out[...] = acc + signs * dev

    return product


@contextlib.contextmanager
def blas(mode: int, seed: int = 0):
    """mode None: the real BLAS; -1 / +1 / 0: adversarial down / up / random signs."""
    if mode is None:
        yield
    else:
        with mock.patch.object(fp, "_product", adversarial_product(mode, seed)):
            yield


BLAS_MODES = st.sampled_from([None, None, -1, 1, 0])


# --------------------------------------------------------------------------- random inputs with specials


@st.composite
def problem(draw: st.DrawFn):
    dtype = draw(st.sampled_from([BF16, F16, F32, F64]))
    rows, cols, rank = draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(0, 25))
    factor_dtype = draw(st.sampled_from([np.float32, np.float64]))
    specials = draw(st.integers(0, 3)) == 0
    ordinary = st.one_of(st.floats(-1, 1, width=32), st.floats(-1e3, 1e3), st.floats(-1e-3, 1e-3))
    factor = st.one_of(ordinary, st.sampled_from(SPECIAL_FACTORS)) if specials else ordinary
    with np.errstate(all="ignore"):
        U = np.array(draw(st.lists(factor, min_size=rows * rank, max_size=rows * rank)), dtype=factor_dtype)
        B = np.array(draw(st.lists(factor, min_size=rank * cols, max_size=rank * cols)), dtype=factor_dtype)
    width = 8 * dtype.itemsize
    weight = st.one_of(
        st.floats(-4, 4, width=64).map(lambda v: int(nm.round_to(np.array([v]), dtype)[0])),
        st.floats(-4, 4, width=64).map(lambda v: int(nm.round_to(np.array([v]), dtype)[0])),
        st.sampled_from(SPECIAL_BITS[dtype.name]),
        st.integers(0, 2**width - 1),
    )
    w = np.array(draw(st.lists(weight, min_size=rows * cols, max_size=rows * cols)), dtype=dtype.bits)
    scale = draw(st.sampled_from(SCALES))
    direction = draw(st.sampled_from(["forward", "inverse"]))
    return w.reshape(rows, cols), dtype, scale, U.reshape(rows, rank), B.reshape(rank, cols), direction


@settings(SETTINGS, max_examples=150)
@given(problem(), BLAS_MODES, st.integers(0, 2**32 - 1))
def test_random_inputs_match_canonical(p, mode, seed):
    with blas(mode, seed):
        check_noting(*p)


@settings(SETTINGS, max_examples=50)
@given(problem())
def test_elementwise_recomputation_is_canonical(p):
    """The recomputation of unsafe elements alone, applied to every element of
    any input (specials included), is the canonical result."""
    w, dtype, scale, U, B, direction = p
    idx = np.arange(w.size)
    got = fp._canonical_at(idx, w, dtype, scale, U.astype(np.float64), B.astype(np.float64), direction)
    assert np.array_equal(got.reshape(w.shape), canonical(w, dtype, scale, U, B, direction))


# --------------------------------------------------------------------------- near ties


def _midpoint(x: float, dtype: nm.DType, up: bool) -> float:
    """A rounding boundary of ``dtype`` next to ``x``: the midpoint between the
    target value nearest to x and its neighbour above or below (in magnitude)."""
    bits = int(nm.round_to(np.array([x]), dtype)[0])
    sign_bit = 1 << (8 * dtype.itemsize - 1)
    mag = bits & (sign_bit - 1)
    other = (bits & sign_bit) | (mag + 1 if up or mag == 0 else mag - 1)
    a, b = nm.decode(np.array([bits, other], dtype=dtype.bits), dtype)
    return (float(a) + float(b)) / 2  # exact: a few significant bits


def _nudge(x: float, ulps: int) -> float:
    """x moved by ``ulps`` float64 patterns (away from zero when positive)."""
    return float(np.array([np.array([x]).view(np.int64)[0] + ulps], dtype=np.int64).view(np.float64)[0])


def steered(rng, dtype, factor_dtype, rows, cols, rank, direction, scale, magnitude, rel, cancel, up, ulps):
    """Row 0's canonical results put ``ulps`` float64 patterns away from a
    rounding midpoint of ``dtype`` (next to where they would be), by steering
    the last rank-1 term; the other terms are random, optionally with a large
    cancelling pair ``u0 b0 ~ -u1 b1``."""
    w = nm.round_to(rng.normal(0, magnitude, (rows, cols)), dtype)
    sd = (magnitude * rel / rank) ** 0.5
    U = rng.normal(0, sd, (rows, rank))
    B = rng.normal(0, sd, (rank, cols))
    if cancel and rank >= 3:
        U[:, 0], U[:, 1] = magnitude * cancel, -magnitude * cancel
        B[0] = 1.0
        B[1] = 1.0 + rng.normal(0, 1e-7, cols)
    U[:, -1] = 1.0
    B[-1] = rng.normal(0, magnitude * rel, cols)
    w64 = nm.decode(w, dtype)
    fn = nm.lowrank_forward if direction == "forward" else nm.lowrank_inverse
    with np.errstate(all="ignore"):  # huge magnitudes overflow to Inf: fine, an input like any other
        U, B = U.astype(factor_dtype), B.astype(factor_dtype)
        natural = fn(w64[:1], scale, U[:1], B)[0]
        for j in range(cols):
            if not np.isfinite(natural[j]):
                continue
            target = _nudge(_midpoint(float(natural[j]), dtype, up), ulps)
            for _ in range(3):  # a few corrections of the last term
                v = fn(w64[:1, j : j + 1], scale, U[:1], B[:, j : j + 1])[0, 0]
                step = (target - v) if direction == "forward" else -(target - v) * scale
                B[-1, j] = factor_dtype(float(B[-1, j]) + float(step))
    return w, dtype, scale, U, B, direction


ULPS = [0, 1, -1, 2, -3, 5, 64, -700, 1 << 20, -(1 << 26), 1 << 28, (1 << 29) - 3]
# ordinary, in the target's subnormal range, near its overflow threshold
MAGNITUDES = {"BF16": [0.02, 1.0, 3e-4, 100.0, 1e-39, 1e38], "F16": [0.02, 1.0, 3e-4, 100.0, 3e-6, 3e4],
              "F32": [0.02, 1.0, 3e-4, 100.0, 1e-40, 1e38]}


@st.composite
def near_tie(draw: st.DrawFn):
    dtype = draw(st.sampled_from(NARROW))
    return steered(
        np.random.default_rng(draw(st.integers(0, 2**32 - 1))),
        dtype,
        draw(st.sampled_from([np.float32, np.float64])),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 12)),
        draw(st.integers(1, 25)),
        draw(st.sampled_from(["forward", "inverse"])),
        draw(st.sampled_from(SCALES)),
        draw(st.sampled_from(MAGNITUDES[dtype.name])),
        draw(st.sampled_from([1e-2, 1.0, 1e-6])),
        draw(st.sampled_from([0, 0, 1.0, 1e3, 1e8])),
        draw(st.booleans()),
        draw(st.sampled_from(ULPS)),
    )


@SETTINGS
@given(near_tie(), BLAS_MODES, st.integers(0, 2**32 - 1))
def test_near_ties_match_canonical(p, mode, seed):
    with blas(mode, seed):
        check_noting(*p)


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("edge", [0, 1, 2], ids=["ordinary", "subnormal", "overflow"])
@pytest.mark.parametrize("mode", [-1, 1, 0])
def test_near_ties_at_range_edges(dtype, edge, mode):
    """Systematic near ties in the ordinary range, the subnormal range and near
    overflow, against the adversarial BLAS."""
    magnitude = MAGNITUDES[dtype.name][[0, 4, 5][edge]]
    rng = np.random.default_rng(edge)
    for k in range(12):
        p = steered(rng, dtype, [np.float32, np.float64][k % 2], 1, 16, [1, 2, 5, 20][k % 4],
                    ["forward", "inverse"][k // 6], SCALES[k % len(SCALES)], magnitude,
                    [1e-2, 1e-6, 1.0][k % 3], 0, bool(k % 5 % 2), ULPS[k % 6])
        with blas(mode, k):
            check(*p)


def test_near_ties_are_really_near():
    """The steering works: many canonical results land within 2^-40 (relative)
    of a midpoint, and the fast path recomputes them rather than guessing."""
    dtype, scale = BF16, 1.01
    rng = np.random.default_rng(7)
    cols = 64
    w = nm.round_to(rng.normal(0, 0.02, (1, cols)), dtype)
    U = np.array([[1.0, 1.0]])
    B = np.vstack([rng.normal(0, 2e-4, cols), np.zeros(cols)])
    w64 = nm.decode(w, dtype)
    for j in range(cols):
        natural = nm.lowrank_forward(w64, scale, U, B)[0, j]
        target = _nudge(_midpoint(float(natural), dtype, True), int(rng.integers(-3, 4)))
        for _ in range(3):
            v = nm.lowrank_forward(w64[:, j : j + 1], scale, U, B[:, j : j + 1])[0, 0]
            B[1, j] += target - v
    v = nm.lowrank_forward(w64, scale, U, B)[0]
    mids = np.array([_midpoint(float(x), dtype, True) for x in v])
    mids_down = np.array([_midpoint(float(x), dtype, False) for x in v])
    dist = np.minimum(np.abs(v - mids), np.abs(v - mids_down)) / np.abs(v)
    assert (dist < 2.0**-40).sum() >= cols // 2
    unsafe = check(w, dtype, scale, U, B, "forward")
    assert unsafe >= (dist < 2.0**-40).sum()


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("mode", [None, -1, 1])
def test_final_addition_lands_on_a_float64_tie(dtype, direction, mode):
    """``scale * w + acc`` (or ``w - acc``) is exactly halfway between the target
    midpoint m and the next float64: the canonical sum rounds to m (a target tie),
    a product off by one rounding lands on the other side. Only the closeness to
    the midpoint, not the size of the product's error, gives this away."""
    rng = np.random.default_rng(3)
    w = nm.round_to(rng.normal(0, 0.02, (1, 40)), dtype)
    w64 = nm.decode(w, dtype)[0]
    acc = np.empty(40)
    for j, x in enumerate(w64):
        m = _midpoint(float(x), dtype, bool(j % 2))
        half_ulp = (_nudge(m, 1) - m) / 2 * (1 if m > 0 else -1)
        acc[j] = (m + half_ulp - x) if direction == "forward" else (x - m - half_ulp)
    U = np.ones((1, 1))
    B = acc[None, :]
    with blas(mode):
        check(w, dtype, 1.0, U, B, direction)
        check(w, dtype, 1.0, np.ones((1, 3)), np.vstack([np.zeros(40), B, np.zeros(40)]), direction)


# --------------------------------------------------------------------------- cancellation


@st.composite
def cancelling(draw: st.DrawFn):
    """u_i0 b_0j ~ -u_i1 b_1j, large, then small terms: the sum's value rests on
    the order of additions."""
    dtype = draw(st.sampled_from(NARROW))
    factor_dtype = draw(st.sampled_from([np.float32, np.float64]))
    rows, cols, rank = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(2, 25))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    big = draw(st.sampled_from([1.0, 1e4, 1e10, 1e-8]))
    U = rng.normal(0, 0.01, (rows, rank))
    B = rng.normal(0, 0.01, (rank, cols))
    U[:, 0] = big * rng.uniform(0.5, 2, rows)
    U[:, 1] = -U[:, 0] * (1 + rng.normal(0, draw(st.sampled_from([0.0, 2**-40, 2**-20, 1e-3])), rows))
    B[0] = B[1] = rng.uniform(0.5, 2, cols)
    w = nm.round_to(rng.normal(0, draw(st.sampled_from([0.02, 1.0])), (rows, cols)), dtype)
    return (w, dtype, draw(st.sampled_from(SCALES)), U.astype(factor_dtype), B.astype(factor_dtype),
            draw(st.sampled_from(["forward", "inverse"])))


@SETTINGS
@given(cancelling(), BLAS_MODES, st.integers(0, 2**32 - 1))
def test_cancellation_matches_canonical(p, mode, seed):
    with blas(mode, seed):
        check_noting(*p)


@settings(max_examples=60, deadline=None)
@given(cancelling())
def test_bound_holds_for_the_real_blas(p):
    """|v_f - v_c| <= E_eff + 2^-50 |v_f| wherever v_f is finite (the docstring's bound)."""
    w, dtype, scale, U, B, direction = p
    U64, B64 = U.astype(np.float64), B.astype(np.float64)
    e_eff = fp._error_bound(U, B, scale, direction)
    assert e_eff is not None
    v_f = fp._values(w, dtype, scale, U64, B64, direction)
    fn = nm.lowrank_forward if direction == "forward" else nm.lowrank_inverse
    v_c = fn(nm.decode(w, dtype), scale, U, B)
    ok = np.isfinite(v_f)
    assert (np.abs(v_f - v_c)[ok] <= e_eff + 2.0**-50 * np.abs(v_f[ok])).all()


# --------------------------------------------------------------------------- realistic tensors


def realistic(rows, cols, rank, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = nm.round_to(rng.normal(0.0, 0.02, (rows, cols)), dtype)
    factor = np.float32 if dtype.itemsize <= 2 else np.float64
    sd = (0.02 * 0.01 / np.sqrt(rank)) ** 0.5  # U B about 1% of the weights
    return w, rng.normal(0, sd, (rows, rank)).astype(factor), rng.normal(0, sd, (rank, cols)).astype(factor)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_realistic_bf16(direction):
    w, U, B = realistic(512, 2048, 20, BF16)
    if direction == "inverse":
        w = canonical(w, BF16, 1.01, U, B, "forward")
    unsafe = check(w, BF16, 1.01, U, B, direction)
    assert unsafe / w.size < 2e-4  # ~3/65536 from the window around midpoints


@pytest.mark.parametrize("dtype, limit", [(F16, 1e-2), (F32, 1e-4)])
def test_realistic_other_dtypes(dtype, limit):
    w, U, B = realistic(128, 1024, 20, dtype, seed=1)
    for direction in ("forward", "inverse"):
        unsafe = check(w, dtype, 0.99, U, B, direction)
        assert unsafe / w.size < limit  # F16: results below 2^-13 (subnormal band) go canonical


def test_row_blocks_give_the_same_bits():
    w, U, B = realistic(96, 512, 20, BF16, seed=2)
    whole = fp.lowrank_rounded(w, BF16, 1.01, U, B, "forward")
    parts = [fp.lowrank_rounded(w[a : a + 32], BF16, 1.01, U[a : a + 32], B, "forward") for a in range(0, 96, 32)]
    assert np.array_equal(whole, np.concatenate(parts))


# --------------------------------------------------------------------------- edges


def test_f64_is_all_canonical():
    w, U, B = realistic(16, 64, 4, F64)
    assert check(w, F64, 1.01, U, B, "forward") == w.size
    assert fp.lowrank_unsafe_count(w, F64, 1.01, U, B, "inverse") == w.size


def test_non_finite_factors_fall_back_whole():
    w, U, B = realistic(8, 32, 3, BF16)
    U[2, 1] = np.nan
    assert check(w, BF16, 1.0, U, B, "forward") == w.size
    U[2, 1] = np.inf
    B[:, :] = 0  # inf * 0: NaN in canonical, a BLAS might skip the zero
    assert check(w, BF16, 1.0, U, B, "forward") == w.size


def test_rank_zero_and_empty():
    w, _, _ = realistic(4, 8, 1, BF16)
    check(w, BF16, 1.01, np.zeros((4, 0), np.float32), np.zeros((0, 8), np.float32), "forward")
    check(w, BF16, -2.0, np.zeros((4, 0), np.float32), np.zeros((0, 8), np.float32), "inverse")
    empty = np.zeros((0, 8), dtype=BF16.bits)
    assert fp.lowrank_rounded(empty, BF16, 1.0, np.zeros((0, 2)), np.ones((2, 8)), "forward").shape == (0, 8)


def test_bad_arguments():
    w, U, B = realistic(4, 8, 2, BF16)
    with pytest.raises(ValueError):
        fp.lowrank_rounded(w, BF16, 1.0, U, B, "sideways")
    with pytest.raises(ValueError):
        fp.lowrank_rounded(w, BF16, 1.0, U[:3], B, "forward")
