"""The canonical arithmetic of a patch: same bits on every machine.

Every weight value a patch produces is defined by elementwise IEEE-754
float64 operations in a fixed order followed by one correctly rounded
conversion into the checkpoint's dtype (docs/format.md, "Canonical apply").
Nothing here calls a BLAS routine: a matrix product's summation order depends
on the library, the thread count and the device, and a single different bit
breaks the hash chain.

Tensors are handled as *bit arrays*: unsigned integers of the dtype's width
(``uint16`` for BF16/F16, ``uint32`` for F32, ``uint64`` for F64). Hashes and
corrections work on those bits; arithmetic decodes them to float64 first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

_F = TypeVar("_F", bound=Callable)


def _quiet(fn: _F) -> _F:
    """NaN and Inf are ordinary inputs here: no floating-point warnings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class DType:
    """A checkpoint dtype as safetensors names it, with its bit container."""

    name: str  # safetensors spelling: "BF16", "F16", "F32", "F64"
    bits: np.dtype  # unsigned integer container of the same width
    canonical_nan: int  # the quiet NaN every computed NaN becomes

    @property
    def itemsize(self) -> int:
        return self.bits.itemsize


FLOAT_DTYPES: dict[str, DType] = {
    "BF16": DType("BF16", np.dtype("<u2"), 0x7FC0),
    "F16": DType("F16", np.dtype("<u2"), 0x7E00),
    "F32": DType("F32", np.dtype("<u4"), 0x7FC00000),
    "F64": DType("F64", np.dtype("<u8"), 0x7FF8000000000000),
}

_EXPONENT_MASK = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000, "F64": 0x7FF0000000000000}


def nonfinite(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """Boolean mask of NaN and ±Inf values, read from the bits (all-ones exponent)."""
    mask = dtype.bits.type(_EXPONENT_MASK[dtype.name])
    return (bits & mask) == mask


# Factor and delta tensors are stored in one of these (read exactly into float64).
FACTOR_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


def float_dtype(name: str) -> DType:
    """Look up a supported checkpoint dtype by its safetensors name."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(FLOAT_DTYPES)})") from None


def factor_dtype_for(dtype: DType) -> str:
    """Storage dtype for factors and deltas: F32 for 16-bit bases, F64 otherwise.

    float32 factors keep 16-bit patches small (their rounding error is far below
    a bf16 ulp); 32- and 64-bit bases get float64 factors so the patch does not
    lose precision the base has.
    """
    return "F32" if dtype.itemsize <= 2 else "F64"


# --------------------------------------------------------------------------- decode


@_quiet
def decode(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """Bit array -> float64 values (exact: every supported format fits in float64)."""
    if dtype.name == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if dtype.name == "F16":
        return bits.view(np.float16).astype(np.float64)
    if dtype.name == "F32":
        return bits.view(np.float32).astype(np.float64)
    return bits.view(np.float64).copy()


# --------------------------------------------------------------------------- round


def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 with round-to-odd.

    Rounding to odd in a format with at least two more significand bits than the
    final one, then rounding to nearest-even, equals rounding the float64 value
    to nearest-even directly (Boldo & Melquiond). float32 has 24 significand
    bits over the whole exponent range of bf16 and fp16 (8 and 11 bits), so this
    gives correctly rounded float64 -> bf16/fp16 conversion without double
    rounding errors.
    """
    y = x.astype(np.float32)  # round to nearest even
    inexact = (y.astype(np.float64) != x) & np.isfinite(y) & ~np.isnan(x)
    need = inexact & ((y.view(np.uint32) & np.uint32(1)) == 0)
    if need.any():
        xs = x[need]
        ys = y[need]
        direction = np.where(ys.astype(np.float64) > xs, -np.inf, np.inf).astype(np.float32)
        y[need] = np.nextafter(ys, direction)
    return y


# (significand bits kept, exponent bias) of the 16-bit formats
_NARROW = {"BF16": (7, 127), "F16": (10, 15)}


def _round_narrow_normal(values: np.ndarray, dtype: DType) -> tuple[np.ndarray, np.ndarray]:
    """Fast path of float64 -> BF16/F16 for values in the target's normal range.

    There, round-to-nearest-even is integer arithmetic on the float64 bit
    pattern: add half an ulp minus one plus the kept lsb, shift, re-bias the
    exponent. A carry out of the significand lands in the exponent, and a carry
    into the all-ones exponent yields exactly the Inf pattern (IEEE overflow
    under round-to-nearest). Returns the bits and a mask of the elements this
    does not cover (zeros, subnormals, overflow, Inf, NaN).
    """
    keep, bias = _NARROW[dtype.name]
    drop = 52 - keep
    u = values.view(np.uint64)
    magnitude = u & np.uint64(0x7FFFFFFFFFFFFFFF)
    exponent = magnitude >> np.uint64(52)
    lowest = 1023 - bias + 1  # the target's smallest normal exponent, float64-biased
    other = (exponent < np.uint64(lowest)) | (exponent > np.uint64(1023 + bias))
    lsb = (magnitude >> np.uint64(drop)) & np.uint64(1)
    magnitude += np.uint64((1 << (drop - 1)) - 1)
    magnitude += lsb
    magnitude >>= np.uint64(drop)
    magnitude -= np.uint64((1023 - bias) << keep)
    out = magnitude.astype(np.uint16)
    out |= (u >> np.uint64(48)).astype(np.uint16) & np.uint16(0x8000)
    return out, other


def _round_narrow_general(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float64 -> BF16/F16 for any value, via round-to-odd float32."""
    y = _round_to_odd_f32(values)
    if dtype.name == "F16":
        return y.astype(np.float16).view(np.uint16)
    b = y.view(np.uint32)  # BF16: round the float32 bits to their upper half, ties to even
    lsb = (b >> np.uint32(16)) & np.uint32(1)
    return ((b + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)


@_quiet
def round_to(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float64 values -> bit array of ``dtype``, round-to-nearest-even.

    Overflow gives ±Inf, underflow keeps subnormals (IEEE 754 convertFormat).
    Every NaN becomes the dtype's canonical quiet NaN, because NaN payload
    propagation through arithmetic differs between processors.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    if dtype.name == "F64":
        out = values.view(np.uint64).copy()
    elif dtype.name == "F32":
        out = values.astype(np.float32).view(np.uint32)
    else:
        out, other = _round_narrow_normal(values, dtype)
        if other.any():
            out[other] = _round_narrow_general(values[other], dtype)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = dtype.canonical_nan
    return out


def check_ieee_environment() -> None:
    """Refuse to compute if this process flushes subnormals to zero.

    Some native libraries switch on flush-to-zero / denormals-are-zero for the
    whole process; canonical results would then differ from other machines.
    """
    tiny32 = np.array([1e-40], dtype=np.float64).astype(np.float32)
    back = np.array([1e-40], dtype=np.float32).astype(np.float64)
    if tiny32[0] == 0 or back[0] == 0:
        raise RuntimeError(
            "this process flushes subnormal floats to zero (FTZ/DAZ is on); "
            "zupatch cannot guarantee bit-exact results here"
        )


# --------------------------------------------------------------------------- kernels


@_quiet
def lowrank_product(U: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``sum_k U[:, k] * B[k, :]`` in float64, k ascending, starting from +0.0.

    Each product of two float32 (or float64) factors is rounded once to float64
    and added in order; no fused multiply-add, no BLAS.
    """
    rows, rank = U.shape
    acc = np.zeros((rows, B.shape[1]), dtype=np.float64)
    term = np.empty_like(acc)
    U64 = U.astype(np.float64, copy=False)
    B64 = B.astype(np.float64, copy=False)
    for k in range(rank):
        np.multiply(U64[:, k : k + 1], B64[k : k + 1, :], out=term)
        np.add(acc, term, out=acc)
    return acc


@_quiet
def lowrank_forward(w: np.ndarray, scale: float, U: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``scale * w + UB`` in float64, in that order."""
    out = np.multiply(w, np.float64(scale))
    np.add(out, lowrank_product(U, B), out=out)
    return out


@_quiet
def lowrank_inverse(w: np.ndarray, scale: float, U: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``(w - UB) / scale`` in float64, in that order."""
    out = np.subtract(w, lowrank_product(U, B))
    np.divide(out, np.float64(scale), out=out)
    return out


@_quiet
def dense_forward(w: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``w + delta`` in float64."""
    return np.add(w, delta.astype(np.float64, copy=False))


@_quiet
def dense_inverse(w: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``w - delta`` in float64."""
    return np.subtract(w, delta.astype(np.float64, copy=False))
