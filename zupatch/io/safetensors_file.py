"""A small, strict, lazy reader of the safetensors format.

It parses and validates the header only, then reads byte ranges on demand, so
a patch or a multi-gigabyte shard costs a few kilobytes of memory until a
tensor is asked for. Every malformed or hostile header (lying lengths,
overlapping or out-of-range offsets, unknown dtypes, shapes that disagree with
byte counts) is reported as one line naming the file.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zupatch.errors import ZupatchError
from zupatch.io import jsondoc

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ZupatchError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_shape(self) -> tuple[int, int]:
        """(rows, elements per row): the tensor seen as a matrix of its first axis."""
        if not self.shape:
            return (1, 1)
        rows = self.shape[0]
        return rows, (self.numel // rows if rows else 0)


class SafetensorsFile:
    """Header of a safetensors file plus on-demand reads of its tensors."""

    def __init__(self, path: str | os.PathLike, *, data: bytes | None = None):
        """Read ``path``; or, with ``data``, parse those bytes (``path`` then only names them)."""
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._data = data
        self._parse()

    def _fail(self, problem: str) -> SafetensorsError:
        return SafetensorsError(f"not a valid safetensors file: {problem}", self.path)

    def _parse(self) -> None:
        try:
            size = len(self._data) if self._data is not None else self.path.stat().st_size
            head = self._read_at(0, 8)
            if len(head) < 8:
                raise self._fail("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise self._fail(f"header length {n} exceeds the file ({size} bytes)")
            raw = self._read_at(8, n)
        except FileNotFoundError:
            raise ZupatchError("file not found", self.path) from None
        except IsADirectoryError:
            raise ZupatchError("is a folder, expected a file", self.path) from None
        except PermissionError:
            raise ZupatchError("permission denied", self.path) from None
        try:
            header = jsondoc.loads(raw)
        except jsondoc.JSONDocumentError as exc:
            raise self._fail(f"header: {exc}") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        meta = header.pop("__metadata__", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._fail("__metadata__ must map strings to strings")
        self.metadata = meta
        spans = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_start, data_len)
            self.tensors[name] = info
            spans.append((info.start, info.end, name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0 and e1 > s1 and e0 > s0:
                raise self._fail(f"tensors {n0!r} and {n1!r} overlap")

    def _entry(self, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZE:
            raise self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise self._fail(f"tensor {name!r} has data offsets {offsets!r} outside the data ({data_len} bytes)")
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != expected:
            raise self._fail(
                f"tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes, "
                f"its offsets span {offsets[1] - offsets[0]}"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    # ------------------------------------------------------------------ reads

    def _read_at(self, offset: int, length: int) -> bytes:
        if self._data is not None:
            return self._data[offset : offset + length]
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ZupatchError(f"has no tensor {name!r}", self.path) from None

    def read_bytes(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        """Raw bytes ``[start, stop)`` of a tensor's data (relative to the tensor)."""
        info = self.info(name)
        stop = info.nbytes if stop is None else stop
        data = self._read_at(info.start + start, stop - start)
        if len(data) != stop - start:
            raise self._fail(f"tensor {name!r} is truncated")
        return data

    def read_array(self, name: str, dtype: np.dtype) -> np.ndarray:
        """A whole tensor as a numpy array of ``dtype`` (same item size), shaped."""
        info = self.info(name)
        return np.frombuffer(self.read_bytes(name), dtype=dtype).reshape(info.shape).copy()

    def read_rows(self, name: str, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """Rows ``[start, stop)`` of a tensor seen as (rows, elements per row), read
        straight into the returned array (no second copy of the bytes)."""
        info = self.info(name)
        rows, per_row = info.row_shape
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows {start}:{stop} of a tensor with {rows}")
        out = np.empty((stop - start, per_row), dtype=dtype)
        if out.nbytes != (stop - start) * per_row * info.nbytes // max(info.numel, 1):
            raise ValueError(f"dtype {np.dtype(dtype)} does not match the tensor's {info.dtype}")
        if not out.size:
            return out
        view = memoryview(out).cast("B")
        offset = info.start + start * (info.nbytes // max(rows, 1))
        if self._data is not None:
            got = len(self._data[offset : offset + out.nbytes])
            view[:got] = self._data[offset : offset + got]
        else:
            got = 0
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                while got < out.nbytes:
                    count = fh.readinto(view[got:])
                    if not count:
                        break
                    got += count
        if got != out.nbytes:
            raise self._fail(f"tensor {name!r} is truncated")
        return out
