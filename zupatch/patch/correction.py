"""Sparse bit corrections: what makes an inverted patch restore the base exactly.

Rounding ``(W' - UB) / c`` back into bf16 misses the original weight in a few
percent of entries: the information was lost when ``W'`` was rounded. A
correction stores, for those entries only, the flat position and the
difference of the wanted bit pattern from the computed one, modulo 2^w for a
dtype of w bits (mostly ±1 ulp, so it compresses well). It is made when the
base is at hand (at ``create`` time) and added after the canonical computation.

Encoding (docs/format.md, "Corrections"): positions as gaps
``g0 = p0, gi = pi - p(i-1) - 1`` in little-endian unsigned integers of
``index_width`` bytes, then the differences, each read as a signed w-bit
integer d and stored zigzag-encoded ``(d << 1) ^ (d >> (w - 1))``. Each of the
two arrays is byte-shuffled (all first bytes, then all second bytes, ...) and
their concatenation is compressed with the named codec.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass

import numpy as np

CODECS = ("lzma", "zlib")
_MAX_DECODED = 1 << 34  # refuse corrections that claim to decode to > 16 GiB


@dataclass(frozen=True)
class Correction:
    """Positions (sorted flat indices) and bit-pattern differences for one tensor."""

    positions: np.ndarray  # int64, strictly increasing
    delta: np.ndarray  # unsigned, the tensor's bit width: wanted - computed (mod 2^w)

    @property
    def count(self) -> int:
        return int(self.positions.size)

    @staticmethod
    def between(computed: np.ndarray, wanted: np.ndarray) -> "Correction":
        """The correction that turns ``computed`` bits into ``wanted`` bits."""
        computed, wanted = computed.reshape(-1), wanted.reshape(-1)
        positions = np.flatnonzero(computed != wanted).astype(np.int64)
        return Correction(positions, wanted[positions] - computed[positions])

    def negated(self) -> "Correction":
        """The correction that takes back what this one adds (modulo 2^w)."""
        return Correction(self.positions, (0 - self.delta).astype(self.delta.dtype))

    def apply(self, bits: np.ndarray, start: int = 0) -> None:
        """Add the correction (modulo 2^w) into ``bits`` in place; ``bits`` holds
        the flat elements ``[start, start + bits.size)`` of the tensor."""
        flat = bits.reshape(-1)
        lo, hi = np.searchsorted(self.positions, [start, start + flat.size])
        if hi > lo:
            idx = self.positions[lo:hi] - start
            flat[idx] += self.delta[lo:hi]


def index_width_for(numel: int) -> int:
    """Bytes per stored gap: 4 unless the tensor has more than 2^32 - 1 elements."""
    return 4 if numel <= 0xFFFFFFFF else 8


def _shuffle(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(-1, a.itemsize).T.tobytes()


def _unshuffle(raw: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, count)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(count)


def _zigzag(delta: np.ndarray) -> np.ndarray:
    """Unsigned modular difference -> zigzag code of its signed reading."""
    size = delta.dtype.itemsize
    signed = delta.astype(np.dtype(f"<u{size}")).view(np.dtype(f"<i{size}"))
    code = (signed << 1) ^ (signed >> (8 * size - 1))
    return code.view(np.dtype(f"<u{size}"))


def _unzigzag(code: np.ndarray) -> np.ndarray:
    size = code.dtype.itemsize
    one = code.dtype.type(1)
    half = (code >> one).view(np.dtype(f"<i{size}"))
    sign = -(code & one).view(np.dtype(f"<i{size}"))
    return (half ^ sign).view(np.dtype(f"<u{size}"))


def encode(correction: Correction, numel: int, codec: str = "lzma") -> bytes:
    """Serialise a correction for a tensor of ``numel`` elements."""
    width = index_width_for(numel)
    gaps = (np.diff(correction.positions, prepend=-1) - 1).astype(np.dtype(f"<u{width}"))
    payload = _shuffle(gaps) + _shuffle(_zigzag(correction.delta))
    if codec == "lzma":
        return lzma.compress(payload, preset=6)
    if codec == "zlib":
        return zlib.compress(payload, 9)
    raise ValueError(f"unknown correction codec {codec!r}")


def decode(blob: bytes, *, count: int, numel: int, index_width: int, bits_dtype: np.dtype, codec: str) -> Correction:
    """Inverse of :func:`encode`; raises ``ValueError`` on anything inconsistent."""
    if codec not in CODECS:
        raise ValueError(f"unknown correction codec {codec!r}")
    if index_width not in (4, 8):
        raise ValueError(f"correction index_width must be 4 or 8, not {index_width}")
    if not 0 <= count <= numel:
        raise ValueError(f"correction count {count} is outside 0..{numel}")
    expected = count * (index_width + bits_dtype.itemsize)
    if expected > _MAX_DECODED:
        raise ValueError("correction is implausibly large")
    try:
        if codec == "lzma":
            lz = lzma.LZMADecompressor()
            raw = lz.decompress(blob, max_length=expected + 1)
            complete = lz.eof and not lz.unused_data
        else:
            zl = zlib.decompressobj()
            raw = zl.decompress(blob, expected + 1)
            complete = zl.eof and not zl.unused_data
    except (lzma.LZMAError, zlib.error) as exc:
        raise ValueError(f"correction data is corrupt ({exc})") from None
    if not complete or len(raw) != expected:
        raise ValueError("correction data has the wrong length")
    split = count * index_width
    gaps = _unshuffle(raw[:split], np.dtype(f"<u{index_width}"), count)
    # the last position is sum(gaps) + count - 1: check it before summing in int64
    if count and float(gaps.sum(dtype=np.float64)) + count > numel:
        raise ValueError("correction positions fall outside the tensor")
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    delta = _unzigzag(_unshuffle(raw[split:], np.dtype(f"<u{bits_dtype.itemsize}"), count)).astype(bits_dtype)
    if np.any(delta == 0):
        raise ValueError("correction has empty entries")
    return Correction(positions, delta)
