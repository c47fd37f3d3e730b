"""Bit-exactness of apply, invert and stack, over dtypes and special values.

The canonical result is recomputed element by element in plain Python floats
(IEEE double) with the exact rounding references of test_numerics, an
implementation that shares no code with the library's vectorised path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_numerics import ref_decode, ref_round
from zupatch.patch import correction as corr
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch, invert, run_chain_in_memory, stack

DTYPES = [nm.FLOAT_DTYPES[n] for n in ("BF16", "F16", "F32", "F64")]
SPECIAL_BITS = {
    "BF16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFC1, 0x0001, 0x807F, 0x0080, 0x7F7F],
    "F16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x83FF, 0x0400, 0x7BFF],
    "F32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 1, 0x807FFFFF, 0x7F7FFFFF],
    "F64": [0, 1 << 63, 0x7FF0000000000000, 0x7FF8000000000000, 1, 0x7FEFFFFFFFFFFFFF],
}


@st.composite
def base_tensor(draw: st.DrawFn, dtype: nm.DType) -> np.ndarray:
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(1, 7))
    width = 8 * dtype.itemsize
    ordinary = st.floats(-4, 4, allow_nan=False, width=64).map(
        lambda v: ref_round(v, dtype)
    )
    element = st.one_of(ordinary, ordinary, st.sampled_from(SPECIAL_BITS[dtype.name]), st.integers(0, 2**width - 1))
    values = draw(st.lists(element, min_size=rows * cols, max_size=rows * cols))
    return np.array(values, dtype=dtype.bits).reshape(rows, cols)


@st.composite
def edit_for(draw: st.DrawFn, name: str, shape: tuple[int, int]) -> LowRankEdit | DenseEdit:
    rows, cols = shape
    factor = st.one_of(
        st.floats(-1, 1, width=32),
        st.sampled_from([0.0, -0.0, 1e-30, 3e38, -3e38, float("inf"), 1e-45]),
    )
    if draw(st.booleans()):
        rank = draw(st.integers(0, 3))
        U = np.array(draw(st.lists(factor, min_size=rows * rank, max_size=rows * rank)), dtype=np.float64)
        B = np.array(draw(st.lists(factor, min_size=rank * cols, max_size=rank * cols)), dtype=np.float64)
        scale = draw(st.sampled_from([1.0, 1.01, 0.99, 2.0, 1.0 + 2**-20, -1.5]))
        return LowRankEdit(name, scale, U.reshape(rows, rank), B.reshape(rank, cols))
    delta = np.array(draw(st.lists(factor, min_size=rows * cols, max_size=rows * cols)), dtype=np.float64)
    return DenseEdit(name, delta.reshape(rows, cols))


def reference_forward(edit: LowRankEdit | DenseEdit, bits: np.ndarray, dtype: nm.DType) -> np.ndarray:
    """docs/format.md's canonical computation, one element at a time in Python floats."""
    store = np.float32 if dtype.itemsize <= 2 else np.float64
    rows, cols = bits.shape
    out = np.empty_like(bits)
    for i in range(rows):
        for j in range(cols):
            w = ref_decode(int(bits[i, j]), dtype)
            if isinstance(edit, LowRankEdit):
                acc = 0.0
                for k in range(edit.U.shape[1]):
                    acc = acc + float(store(edit.U[i, k])) * float(store(edit.B[k, j]))
                v = float(edit.scale) * w + acc
            else:
                v = w + float(store(edit.delta[i, j]))
            out[i, j] = ref_round(v, dtype)
    return out


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@SETTINGS
@given(data=st.data())
def test_apply_equals_reference_and_invert_restores(dtype: nm.DType, data: st.DataObject) -> None:
    base = data.draw(base_tensor(dtype))
    edit = data.draw(edit_for("w", base.shape))
    patch = Patch.load_bytes(build_patch([edit], {"w": (base, dtype)}).to_bytes())
    result = run_chain_in_memory(patch.chain("w"), base)
    assert np.array_equal(result, reference_forward(edit, base, dtype))
    restored = run_chain_in_memory(invert(patch).chain("w"), result)
    assert np.array_equal(restored, base)  # NaN payloads, -0.0 and subnormals included


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@SETTINGS
@given(data=st.data())
def test_stack_equals_sequential_and_its_inverse_restores(dtype: nm.DType, data: st.DataObject) -> None:
    base = data.draw(base_tensor(dtype))
    first = build_patch([data.draw(edit_for("w", base.shape))], {"w": (base, dtype)})
    middle = run_chain_in_memory(first.chain("w"), base)
    second = build_patch([data.draw(edit_for("w", base.shape))], {"w": (middle, dtype)})
    sequential = run_chain_in_memory(second.chain("w"), middle)
    stacked = Patch.load_bytes(stack([first, second]).to_bytes())
    assert np.array_equal(run_chain_in_memory(stacked.chain("w"), base), sequential)
    assert np.array_equal(run_chain_in_memory(invert(stacked).chain("w"), sequential), base)
    twice = invert(invert(stacked))
    twice.created = stacked.created  # a new patch gets a new creation time; everything else is equal
    assert twice.to_bytes() == stacked.to_bytes()


def test_hash_chain_links_steps() -> None:
    dtype = nm.FLOAT_DTYPES["BF16"]
    base = nm.round_to(np.random.default_rng(1).standard_normal((8, 8)), dtype)
    a = build_patch([LowRankEdit("w", 1.01, np.ones((8, 1)) * 1e-2, np.ones((1, 8)))], {"w": (base, dtype)})
    mid = run_chain_in_memory(a.chain("w"), base)
    b = build_patch([DenseEdit("w", np.full((8, 8), 1e-2))], {"w": (mid, dtype)})
    assert a.sha256_after("w") == b.sha256_before("w")
    with pytest.raises(Exception, match="hash chain broken"):
        stack([b, a])


@settings(max_examples=200, deadline=None)
@given(
    numel=st.integers(1, 5000),
    data=st.data(),
    width=st.sampled_from([2, 4, 8]),
    codec=st.sampled_from(corr.CODECS),
)
def test_correction_roundtrip(numel: int, data: st.DataObject, width: int, codec: str) -> None:
    positions = sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=min(numel, 200))))
    deltas = data.draw(st.lists(st.integers(1, 2 ** (8 * width) - 1), min_size=len(positions), max_size=len(positions)))
    bits_dtype = np.dtype(f"<u{width}")
    c = corr.Correction(np.array(positions, dtype=np.int64), np.array(deltas, dtype=bits_dtype))
    back = corr.decode(corr.encode(c, numel, codec), count=c.count, numel=numel, index_width=4,
                       bits_dtype=bits_dtype, codec=codec)  # fmt: skip
    assert np.array_equal(back.positions, c.positions) and np.array_equal(back.delta, c.delta)
    # applying to a block in pieces equals applying to the whole
    computed = np.array(data.draw(st.lists(st.integers(0, 2 ** (8 * width) - 1), min_size=numel, max_size=numel)),
                        dtype=bits_dtype)  # fmt: skip
    whole = computed.copy()
    c.apply(whole)
    pieces = computed.copy()
    cut = numel // 2
    c.apply(pieces[:cut], start=0)
    c.apply(pieces[cut:], start=cut)
    assert np.array_equal(whole, pieces)
    assert np.array_equal(corr.Correction.between(computed, whole).positions, c.positions[c.delta != 0])


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"not compressed", "corrupt"),
        (__import__("lzma").compress(b"\x00" * 5), "wrong length"),
        (__import__("lzma").compress(b"\xff\xff\xff\xff\x01\x00"), "outside the tensor"),
    ],
)
def test_corrupt_corrections_are_refused(blob: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        corr.decode(blob, count=1, numel=10, index_width=4, bits_dtype=np.dtype("<u2"), codec="lzma")


def test_nan_results_are_canonical() -> None:
    dtype = nm.FLOAT_DTYPES["BF16"]
    base = np.array([[0x7F80, 0xFF81, 0x3F80]], dtype=np.uint16)  # +inf, a NaN with payload, 1.0
    p = build_patch([LowRankEdit("w", 1.0, np.array([[1.0]]), np.array([[-math.inf, 0.0, 0.0]]))], {"w": (base, dtype)})
    out = run_chain_in_memory(p.chain("w"), base)
    assert out.tolist() == [[0x7FC0, 0x7FC0, 0x3F80]]
    assert run_chain_in_memory(invert(p).chain("w"), out).tolist() == base.tolist()
