"""The patch file: one safetensors file, its metadata document, its entries.

A patch is an ordered chain of *steps* (one per ``create``; ``stack`` joins
chains). A step changes a few named tensors; each change is an *entry*:

- ``lowrank``: forward ``W' = scale * W + U B``, inverse ``W = (W' - U B) / scale``;
- ``dense``:   forward ``W' = W + delta``,        inverse ``W = W' - delta``;
- ``bits``:    forward adds ``diff`` to the bit patterns, inverse subtracts it
  (format version 2: a sparse difference of the result from the base, for
  edits whose factors would outweigh it);

computed as docs/format.md defines, then corrected by an optional sparse
``fix``. Each entry also carries the ``inverse_fix`` that makes the opposite
direction exact, and the sha256 of the tensor before and after. The metadata
is one JSON document under the safetensors metadata key ``"zupatch"``;
arrays (factors, deltas, corrections) are tensors of the same file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from zupatch._version import __version__
from zupatch.io import jsondoc
from zupatch.io.files import current_umask
from zupatch.io.safetensors_file import SafetensorsFile
from zupatch.errors import PatchFormatError, ZupatchError
from zupatch.patch import correction as corr
from zupatch.patch.numerics import FACTOR_DTYPES, FLOAT_DTYPES, DType

FORMAT_NAME = "zupatch"
FORMAT_VERSION = 2  # the newest this reader knows; files are written at the lowest version their kinds need
METADATA_KEY = "zupatch"
KINDS = ("lowrank", "dense", "bits")
KIND_VERSION = {"lowrank": 1, "dense": 1, "bits": 2}  # the format version that introduced each kind
DIRECTIONS = ("forward", "inverse")
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bounds a reader enforces (docs/format.md, "Limits"); the JSON ones are in zupatch.io.jsondoc.
MAX_NDIM = 8
MAX_DIM = 1 << 31  # elements along one axis
MAX_NUMEL = 1 << 40  # elements of one tensor
MAX_RANK = 1 << 16  # columns of U (2 per forget request per tensor for ZeroUnlearn)


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def check_tensor_name(name: object) -> str:
    """A tensor name must look like one: no path separators, no ``..``."""
    if not isinstance(name, str) or not _TENSOR_NAME.match(name) or ".." in name or len(name) > 512:
        raise ValueError(f"invalid tensor name {name!r}")
    return name


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class StoredCorrection:
    """A compressed :class:`~zupatch.patch.correction.Correction` as kept in the file."""

    blob: bytes
    count: int
    codec: str = "lzma"
    index_width: int = 4

    @staticmethod
    def make(c: corr.Correction, numel: int, codec: str = "lzma") -> "StoredCorrection | None":
        if c.count == 0:
            return None
        return StoredCorrection(corr.encode(c, numel, codec), c.count, codec, corr.index_width_for(numel))

    def decode(self, numel: int, dtype: DType) -> corr.Correction:
        return corr.decode(
            self.blob, count=self.count, numel=numel, index_width=self.index_width, bits_dtype=dtype.bits, codec=self.codec
        )


@dataclass(frozen=True)
class Entry:
    """One tensor changed by one step."""

    name: str
    dtype: str  # "BF16" | "F16" | "F32" | "F64"
    shape: tuple[int, ...]
    kind: str  # "lowrank" | "dense" | "bits"
    direction: str  # "forward" | "inverse"
    sha256_before: str
    sha256_after: str
    scale: float = 1.0  # lowrank only
    U: np.ndarray | None = None  # lowrank: rows x r
    B: np.ndarray | None = None  # lowrank: r x cols
    delta: np.ndarray | None = None  # dense: rows x cols
    diff: StoredCorrection | None = None  # bits: after - before on the bit patterns (forward)
    fix: StoredCorrection | None = None
    inverse_fix: StoredCorrection | None = None

    @property
    def float_dtype(self) -> DType:
        return FLOAT_DTYPES[self.dtype]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def rank(self) -> int:
        return 0 if self.U is None else int(self.U.shape[1])

    def inverted(self) -> "Entry":
        """The entry that undoes this one, bit for bit."""
        return replace(
            self,
            direction="inverse" if self.direction == "forward" else "forward",
            sha256_before=self.sha256_after,
            sha256_after=self.sha256_before,
            fix=self.inverse_fix,
            inverse_fix=self.fix,
        )

    def stored_bytes(self) -> int:
        """Bytes this entry adds to the patch file."""
        arrays = [a for a in (self.U, self.B, self.delta) if a is not None]
        fixes = [f for f in (self.diff, self.fix, self.inverse_fix) if f is not None]
        return sum(a.nbytes for a in arrays) + sum(len(f.blob) for f in fixes)


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """What one ``create`` (or one inversion of it) did: provenance plus entries."""

    entries: list[Entry]
    method: str = "manual"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None  # Hub repo id or a local description
    base_revision: str | None = None  # commit sha when known
    requests: dict[str, Any] = field(default_factory=dict)  # count, salt, sha256[], never text by default
    created: str = field(default_factory=utc_now)
    tool_version: str = __version__
    inverted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for forward compatibility

    def to_dict(self, tensor_keys: dict[tuple[int, str], str]) -> dict[str, Any]:
        entries = []
        for j, e in enumerate(self.entries):
            d: dict[str, Any] = {
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "kind": e.kind,
                "direction": e.direction,
                "sha256_before": e.sha256_before,
                "sha256_after": e.sha256_after,
            }
            if e.kind == "lowrank":
                d["scale"] = float(e.scale).hex()
                d["rank"] = e.rank
                d["U"] = tensor_keys[(j, "U")]
                d["B"] = tensor_keys[(j, "B")]
            elif e.kind == "dense":
                d["delta"] = tensor_keys[(j, "delta")]
            for part in ("diff", "fix", "inverse_fix") if e.kind == "bits" else ("fix", "inverse_fix"):
                sc: StoredCorrection | None = getattr(e, part)
                d[part] = None if sc is None else {
                    "tensor": tensor_keys[(j, part)],
                    "count": sc.count,
                    "codec": sc.codec,
                    "index_width": sc.index_width,
                }
            entries.append(d)
        out = {
            **self.extra,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "requests": self.requests,
            "created": self.created,
            "tool_version": self.tool_version,
            "inverted": self.inverted,
            "entries": entries,
        }
        return out


# --------------------------------------------------------------------------- patch


@dataclass
class Patch:
    """An ordered chain of steps; the unit zupatch reads, writes and applies."""

    steps: list[Step]
    created: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False)  # the file it was read from, for messages

    # ---- views

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor the patch touches, in first-touched order."""
        seen: dict[str, None] = {}
        for step in self.steps:
            for e in step.entries:
                seen.setdefault(e.name, None)
        return list(seen)

    def chain(self, name: str) -> list[Entry]:
        """The entries touching ``name``, in application order."""
        return [e for step in self.steps for e in step.entries if e.name == name]

    def sha256_before(self, name: str) -> str:
        return self.chain(name)[0].sha256_before

    def sha256_after(self, name: str) -> str:
        return self.chain(name)[-1].sha256_after

    @property
    def base_model(self) -> str | None:
        return self.steps[0].base_model if self.steps else None

    @property
    def base_revision(self) -> str | None:
        return self.steps[0].base_revision if self.steps else None

    @property
    def request_count(self) -> int:
        """Forget requests over all steps (each step records its count, never the text)."""
        return sum(int(s.requests.get("count", 0) or 0) for s in self.steps if isinstance(s.requests, dict))

    def stored_bytes(self) -> int:
        return sum(e.stored_bytes() for s in self.steps for e in s.entries)

    def touched_bytes(self) -> int:
        """Bytes of the checkpoint tensors this patch touches."""
        first = {n: self.chain(n)[0] for n in self.tensor_names}
        return sum(e.numel * e.float_dtype.itemsize for e in first.values())

    # ---- serialisation

    @property
    def format_version(self) -> int:
        """The lowest format version that has every kind of entry this patch holds:
        a patch without ``bits`` entries stays readable by format-1 readers."""
        return max((KIND_VERSION[e.kind] for s in self.steps for e in s.entries), default=1)

    def metadata(self, tensor_keys: list[dict[tuple[int, str], str]]) -> dict[str, Any]:
        return {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool": {"name": "zupatch", "version": __version__},
            "created": self.created,
            "steps": [s.to_dict(k) for s, k in zip(self.steps, tensor_keys)],
        }

    def _arrays(self) -> tuple[dict[str, np.ndarray], list[dict[tuple[int, str], str]]]:
        arrays: dict[str, np.ndarray] = {}
        keys: list[dict[tuple[int, str], str]] = []
        for i, step in enumerate(self.steps):
            step_keys: dict[tuple[int, str], str] = {}
            for j, e in enumerate(step.entries):
                delta = None if e.delta is None else e.delta.reshape(e.shape)  # stored in the tensor's own shape
                parts: dict[str, np.ndarray | None] = {"U": e.U, "B": e.B, "delta": delta}
                for part in ("diff", "fix", "inverse_fix"):
                    sc = getattr(e, part)
                    parts[part] = None if sc is None else np.frombuffer(sc.blob, dtype=np.uint8)
                for part, arr in parts.items():
                    if arr is None:
                        continue
                    key = f"steps.{i}.entries.{j}.{part}"
                    arrays[key] = np.ascontiguousarray(arr)
                    step_keys[(j, part)] = key
            keys.append(step_keys)
        return arrays, keys

    def to_bytes(self) -> bytes:
        """The patch as safetensors bytes (deterministic for a given patch)."""
        from safetensors.numpy import save

        arrays, keys = self._arrays()
        meta = json.dumps(self.metadata(keys), sort_keys=True, separators=(",", ":"))
        return save(arrays, metadata={METADATA_KEY: meta})

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically: a temporary file beside ``path``, renamed at the end."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ZupatchError("already exists (pass --force to overwrite)", path)
        if not path.parent.is_dir():
            raise ZupatchError("folder does not exist", path.parent)
        data = self.to_bytes()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except PermissionError:
            raise ZupatchError("cannot write here: permission denied", path.parent) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp makes 0600; users expect their umask
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "Patch":
        """Read and validate a patch file; errors name the file and the problem."""
        path = Path(path)
        return _load(path, SafetensorsFile(path))

    @staticmethod
    def load_bytes(data: bytes, name: str = "<bytes>") -> "Patch":
        """Like :meth:`load`, from the bytes of a patch file."""
        return _load(Path(name), SafetensorsFile(name, data=data))


# --------------------------------------------------------------------------- loading


class _Reader:
    """Validates a metadata document against the tensors of its file."""

    def __init__(self, path: Path, st: SafetensorsFile):
        self.path, self.st = path, st
        self.version = FORMAT_VERSION  # the file's, once read: which kinds it may hold
        self.used: set[str] = set()

    def fail(self, where: str, problem: str) -> PatchFormatError:
        return PatchFormatError(f"{where}: {problem}", self.path)

    def get(self, obj: dict, key: str, types: type | tuple, where: str, optional: bool = False) -> Any:
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.fail(where, f"missing {key!r}")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise self.fail(f"{where}.{key}", f"expected {_type_names(types)}, got {type(value).__name__}")
        return value

    def array(self, key: object, where: str, dtypes: dict[str, np.dtype], shape: tuple[int | None, ...]) -> np.ndarray:
        if not isinstance(key, str) or key not in self.st.tensors:
            raise self.fail(where, f"refers to tensor {key!r}, which the file does not contain")
        if key in self.used:
            raise self.fail(where, f"tensor {key!r} is used twice")
        info = self.st.tensors[key]
        if info.dtype not in dtypes:
            raise self.fail(where, f"tensor {key!r} has dtype {info.dtype}, expected one of {', '.join(dtypes)}")
        if len(info.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, info.shape)):
            want = "x".join("?" if s is None else str(s) for s in shape)
            raise self.fail(where, f"tensor {key!r} has shape {list(info.shape)}, expected {want}")
        self.used.add(key)
        return self.st.read_array(key, dtypes[info.dtype])

    def correction(self, obj: object, where: str, numel: int) -> StoredCorrection | None:
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise self.fail(where, "expected an object or null")
        count = self.get(obj, "count", int, where)
        codec = self.get(obj, "codec", str, where)
        width = self.get(obj, "index_width", int, where)
        if codec not in corr.CODECS:
            raise self.fail(where, f"unknown codec {codec!r}")
        if width not in (4, 8) or not 0 < count <= numel:
            raise self.fail(where, f"index_width {width} / count {count} impossible for {numel} elements")
        blob = self.array(obj.get("tensor"), where, {"U8": np.dtype(np.uint8)}, (None,))
        return StoredCorrection(blob.tobytes(), count, codec, width)

    def entry(self, d: object, where: str) -> Entry:
        if not isinstance(d, dict):
            raise self.fail(where, "expected an object")
        name = self.get(d, "name", str, where)
        try:
            check_tensor_name(name)
        except ValueError as exc:
            raise self.fail(f"{where}.name", str(exc)) from None
        dtype = self.get(d, "dtype", str, where)
        if dtype not in FLOAT_DTYPES:
            raise self.fail(f"{where}.dtype", f"unsupported dtype {dtype!r} (supported: {', '.join(FLOAT_DTYPES)})")
        shape = self.get(d, "shape", list, where)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise self.fail(f"{where}.shape", f"expected a list of positive integers, got {shape!r}")
        if len(shape) > MAX_NDIM or max(shape) > MAX_DIM or int(np.prod(shape, dtype=object)) > MAX_NUMEL:
            raise self.fail(f"{where}.shape", f"{shape!r} is out of bounds (at most {MAX_NDIM} axes of {MAX_DIM} "
                                              f"elements and {MAX_NUMEL} elements in all)")  # fmt: skip
        kind = self.get(d, "kind", str, where)
        direction = self.get(d, "direction", str, where)
        if kind not in KINDS:
            raise self.fail(f"{where}.kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if KIND_VERSION[kind] > self.version:
            raise self.fail(f"{where}.kind", f"{kind!r} needs format_version {KIND_VERSION[kind]}, "
                                             f"the file says {self.version}")  # fmt: skip
        if direction not in DIRECTIONS:
            raise self.fail(f"{where}.direction", f"unknown direction {direction!r}")
        hashes = [self.get(d, k, str, where) for k in ("sha256_before", "sha256_after")]
        if not all(_SHA256.match(h) for h in hashes):
            raise self.fail(where, "sha256_before/sha256_after must be 64 lowercase hex digits")
        rows = shape[0]
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        numel = rows * cols
        fields: dict[str, Any] = {}
        if kind == "lowrank":
            if len(shape) != 2:
                raise self.fail(f"{where}.shape", "a lowrank entry needs a 2-D tensor")
            raw_scale = self.get(d, "scale", str, where)
            try:
                scale = float.fromhex(raw_scale) if len(raw_scale) <= 64 else float("nan")
            except ValueError:
                raise self.fail(f"{where}.scale", "not a hexadecimal float") from None
            except OverflowError:
                raise self.fail(f"{where}.scale", "must be finite and non-zero") from None
            if not np.isfinite(scale) or scale == 0:
                raise self.fail(f"{where}.scale", "must be finite and non-zero")
            U = self.array(d.get("U"), f"{where}.U", FACTOR_DTYPES, (rows, None))
            B = self.array(d.get("B"), f"{where}.B", FACTOR_DTYPES, (U.shape[1], cols))
            if U.shape[1] > MAX_RANK:
                raise self.fail(f"{where}.U", f"rank {U.shape[1]} is above the limit of {MAX_RANK}")
            if "rank" in d and d["rank"] != U.shape[1]:
                raise self.fail(f"{where}.rank", f"says {d['rank']}, factors have rank {U.shape[1]}")
            fields.update(scale=scale, U=U, B=B)
        elif kind == "dense":
            delta = self.array(d.get("delta"), f"{where}.delta", FACTOR_DTYPES, tuple(shape))
            fields.update(delta=delta.reshape(rows, cols))
        else:  # bits: the difference is the whole change; nothing is computed, so nothing is fixed
            diff = self.correction(d.get("diff"), f"{where}.diff", numel)
            if diff is None:
                raise self.fail(where, "missing 'diff'")
            for part in ("fix", "inverse_fix"):
                if d.get(part) is not None:
                    raise self.fail(f"{where}.{part}", "must be null for a bits entry (its diff is exact both ways)")
            for part in ("scale", "rank", "U", "B", "delta"):  # arithmetic a bits entry does not do
                if part in d:
                    raise self.fail(f"{where}.{part}", "has no meaning in a bits entry")
            fields.update(diff=diff)
        fix = self.correction(d.get("fix"), f"{where}.fix", numel)
        inverse_fix = self.correction(d.get("inverse_fix"), f"{where}.inverse_fix", numel)
        return Entry(
            name=name, dtype=dtype, shape=tuple(shape), kind=kind, direction=direction,
            sha256_before=hashes[0], sha256_after=hashes[1], fix=fix, inverse_fix=inverse_fix, **fields,
        )  # fmt: skip

    def _method(self, d: dict, where: str) -> str:
        method = self.get(d, "method", str, where)
        if not method.strip() or len(method) > 128:
            raise self.fail(f"{where}.method", "must name the method (1 to 128 characters)")
        return method

    def step(self, d: object, where: str) -> Step:
        if not isinstance(d, dict):
            raise self.fail(where, "expected an object")
        raw_entries = self.get(d, "entries", list, where)
        if not raw_entries:
            raise self.fail(f"{where}.entries", "is empty")
        entries = [self.entry(e, f"{where}.entries[{j}]") for j, e in enumerate(raw_entries)]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise self.fail(f"{where}.entries", "names a tensor twice")
        known = {"method", "hyperparameters", "base_model", "base_revision", "requests", "created",
                 "tool_version", "inverted", "entries"}  # fmt: skip
        return Step(
            entries=entries,
            method=self._method(d, where),
            hyperparameters=self.get(d, "hyperparameters", dict, where, optional=True) or {},
            base_model=self.get(d, "base_model", str, where, optional=True),
            base_revision=self.get(d, "base_revision", str, where, optional=True),
            requests=self.get(d, "requests", dict, where, optional=True) or {},
            created=self.get(d, "created", str, where, optional=True) or "",
            tool_version=self.get(d, "tool_version", str, where, optional=True) or "",
            inverted=bool(self.get(d, "inverted", bool, where, optional=True)),
            extra={k: v for k, v in d.items() if k not in known},
        )


def _as_tuple(types: type | tuple) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true/false", float: "a number"}
    return " or ".join(names.get(t, t.__name__) for t in _as_tuple(types))


def _load(path: Path, st: SafetensorsFile) -> Patch:
    if METADATA_KEY not in st.metadata:
        raise PatchFormatError("not a zupatch patch (no 'zupatch' metadata; is this a model checkpoint?)", path)
    try:
        meta = jsondoc.loads(st.metadata[METADATA_KEY])
    except jsondoc.JSONDocumentError as exc:
        raise PatchFormatError(f"patch metadata: {exc}", path) from None
    r = _Reader(path, st)
    if not isinstance(meta, dict):
        raise r.fail("metadata", "expected a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise r.fail("metadata.format", f"expected {FORMAT_NAME!r}, got {meta.get('format')!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise r.fail("metadata.format_version", "missing or not an integer")
    if version < 1:
        raise r.fail("metadata.format_version", f"{version} is not a format version (versions start at 1)")
    if version > FORMAT_VERSION:
        raise PatchFormatError(
            f"patch format version {version} is newer than this zupatch understands ({FORMAT_VERSION}); upgrade zupatch",
            path,
        )
    r.version = version
    raw_steps = r.get(meta, "steps", list, "metadata")
    if not raw_steps:
        raise r.fail("metadata.steps", "is empty")
    steps = [r.step(s, f"steps[{i}]") for i, s in enumerate(raw_steps)]
    unused = set(st.tensors) - r.used
    if unused:
        raise r.fail("tensors", f"not referenced by the metadata: {', '.join(sorted(unused)[:3])}")
    # The documented contract, checked last: the reader above names most problems more plainly.
    problem = _schema_problem(meta)
    if problem:
        raise r.fail(*problem)
    patch = Patch(
        steps=steps,
        source=str(path),
        created=meta.get("created") if isinstance(meta.get("created"), str) else "",
        extra={k: v for k, v in meta.items() if k not in {"format", "format_version", "tool", "created", "steps"}},
    )
    try:
        validate_chain(patch)
    except ValueError as exc:
        raise PatchFormatError(str(exc), path) from None
    return patch


@functools.cache
def metadata_schema() -> dict[str, Any]:
    """The JSON Schema of the format's metadata (versions 1 and 2), shipped with the package
    (``zupatch/patch/metadata.schema.json``; docs/format.md §8 shows the same)."""
    return json.loads(resources.files("zupatch.patch").joinpath("metadata.schema.json").read_text())


@functools.cache
def _metadata_validator() -> Any:
    import jsonschema  # imported when a patch is first read: --help stays fast

    return jsonschema.Draft202012Validator(metadata_schema())


def _schema_problem(meta: dict[str, Any]) -> tuple[str, str] | None:
    """``(where, problem)`` for the first way ``meta`` breaks the schema (the most
    relevant, by jsonschema's ``best_match``), or None. About 2 ms for a
    three-tensor patch (docs/benchmarks.md)."""
    from jsonschema.exceptions import best_match

    error = best_match(_metadata_validator().iter_errors(meta))
    if error is None:
        return None
    where = "metadata" + error.json_path[1:]
    message = error.message if len(error.message) <= 160 else error.message[:160] + "..."
    return where, f"does not match the format's schema: {message}"


def validate_chain(patch: Patch) -> None:
    """Consecutive entries on one tensor must agree on dtype, shape and hashes."""
    for name in patch.tensor_names:
        chain = patch.chain(name)
        for a, b in zip(chain, chain[1:]):
            if (a.dtype, a.shape) != (b.dtype, b.shape):
                raise ValueError(f"tensor {name!r} changes dtype or shape between steps")
            if a.sha256_after != b.sha256_before:
                raise ValueError(f"tensor {name!r}: a step does not start where the previous one ended (hash chain broken)")
