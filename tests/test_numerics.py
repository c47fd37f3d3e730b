"""The canonical arithmetic against independent, slow, obviously-correct references."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zupatch.patch import numerics as nm

BF16, F16, F32, F64 = (nm.FLOAT_DTYPES[n] for n in ("BF16", "F16", "F32", "F64"))


# --------------------------------------------------------------------------- references


def ref_round_bf16(v: float) -> int:
    """Round a Python float to bf16 bits with exact rational arithmetic (RNE)."""
    if math.isnan(v):
        return 0x7FC0
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a == 0:
        return sign
    if math.isinf(a):
        return sign | 0x7F80
    e = max(math.frexp(a)[1] - 1, -126)  # a in [2^e, 2^(e+1)), clamped at the subnormal exponent
    ulp = Fraction(2) ** (e - 7)
    q = Fraction(a) / ulp
    n = math.floor(q)
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    val = n * ulp
    if val >= Fraction(2) ** 128 - Fraction(2) ** (127 - 8):  # at or past the overflow threshold
        return sign | 0x7F80
    return sign | (struct.unpack("<I", struct.pack("<f", float(val)))[0] >> 16)


def ref_round(v: float, dtype: nm.DType) -> int:
    """Reference conversion of one float64 value to ``dtype`` bits."""
    if math.isnan(v):
        return dtype.canonical_nan
    if dtype.name == "BF16":
        return ref_round_bf16(v)
    fmt, ifmt = {"F16": ("<e", "<H"), "F32": ("<f", "<I"), "F64": ("<d", "<Q")}[dtype.name]
    try:
        return struct.unpack(ifmt, struct.pack(fmt, v))[0]
    except OverflowError:  # CPython refuses to round finite values to infinity
        return {"F16": 0x7C00, "F32": 0x7F800000}[dtype.name] | (
            {"F16": 0x8000, "F32": 0x80000000}[dtype.name] if v < 0 else 0
        )


def ref_decode(bits: int, dtype: nm.DType) -> float:
    if dtype.name == "BF16":
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    fmt, ifmt = {"F16": ("<e", "<H"), "F32": ("<f", "<I"), "F64": ("<d", "<Q")}[dtype.name]
    return struct.unpack(fmt, struct.pack(ifmt, bits))[0]


# --------------------------------------------------------------------------- strategies

SPECIAL_F64 = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1e-45, 1.4e-45, 9.2e-41, 6e-8, 3e-5,
               65504.0, 65520.0, 3.3895313892515355e38, 3.4028235677973366e38, 1.0 + 2**-8, 1.0 + 2**-9]  # fmt: skip


def values_f64() -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.sampled_from(SPECIAL_F64),
        # values just around bf16 / f16 rounding ties
        st.integers(0, 0xFFFF).map(lambda b: ref_decode(b, BF16) * (1 + 2**-9)),
        st.integers(0, 0x7BFF).map(lambda b: ref_decode(b, F16) + 2**-25),
    )


@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=lambda d: d.name)
@settings(max_examples=400, deadline=None)
@given(values=st.lists(values_f64(), min_size=1, max_size=64))
def test_round_to_matches_exact_reference(dtype: nm.DType, values: list[float]) -> None:
    got = nm.round_to(np.array(values, dtype=np.float64), dtype)
    want = [ref_round(v, dtype) for v in values]
    assert got.tolist() == want


def test_round_to_corrects_double_rounding() -> None:
    # 1 + 2^-8 + 2^-30 lies just above a bf16 tie; rounding through float32 first
    # would land exactly on the tie and then round to even (down). The correct answer is up.
    v = 1.0 + 2**-8 + 2**-30
    assert nm.round_to(np.array([v]), BF16)[0] == ref_round_bf16(v) == 0x3F81


@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64], ids=lambda d: d.name)
def test_decode_is_exact_for_every_16_bit_pattern(dtype: nm.DType) -> None:
    if dtype.itemsize != 2:
        bits = np.random.default_rng(0).integers(0, 2 ** (8 * dtype.itemsize), 4096, dtype=np.uint64).astype(dtype.bits)
    else:
        bits = np.arange(0x10000, dtype=np.uint16)
    got = nm.decode(bits, dtype)
    for b, v in zip(bits.tolist()[::7], got.tolist()[::7]):
        ref = ref_decode(b, dtype)
        assert (math.isnan(ref) and math.isnan(v)) or struct.pack("<d", ref) == struct.pack("<d", v)


def test_decode_then_round_is_identity_except_nan_payloads() -> None:
    for dtype in (BF16, F16):
        bits = np.arange(0x10000, dtype=np.uint16)
        back = nm.round_to(nm.decode(bits, dtype), dtype)
        nan = np.isnan(nm.decode(bits, dtype))
        assert np.array_equal(back[~nan], bits[~nan])
        assert np.all(back[nan] == dtype.canonical_nan)


@settings(max_examples=100, deadline=None)
@given(
    u=st.lists(st.floats(width=32, allow_nan=False), min_size=6, max_size=6),
    b=st.lists(st.floats(width=32, allow_nan=False), min_size=6, max_size=6),
)
def test_lowrank_product_is_the_fixed_order_sum(u: list[float], b: list[float]) -> None:
    """Each element is ((0 + u0*b0) + u1*b1) + ..., rounded after every operation."""
    U = np.array(u, dtype=np.float32).reshape(2, 3)
    B = np.array(b, dtype=np.float32).reshape(3, 2)
    got = nm.lowrank_product(U, B)
    for i in range(2):
        for j in range(2):
            acc = 0.0
            for k in range(3):
                acc = acc + float(U[i, k]) * float(B[k, j])
            assert struct.pack("<d", got[i, j]) == struct.pack("<d", acc) or (math.isnan(acc) and math.isnan(got[i, j]))


def test_ieee_environment_check_passes_here() -> None:
    nm.check_ieee_environment()
