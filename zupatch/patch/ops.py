"""Operations on patches: build from edits, run on tensors, invert, stack.

The one place weights are computed is :class:`ChainRunner`: it applies the
chain of entries touching a tensor to row blocks of its bits, in order, with
the canonical arithmetic of :mod:`zupatch.patch.numerics`. Checkpoint apply,
in-memory apply and patch building all go through it, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from zupatch.errors import NonFiniteError, PatchFormatError, ZupatchError
from zupatch.patch import fastpath
from zupatch.patch import numerics as nm
from zupatch.patch.correction import Correction
from zupatch.patch.format import Entry, Patch, Step, StoredCorrection, check_tensor_name, validate_chain

BLOCK_ELEMENTS = 1 << 18  # ~2 MiB of float64 per working array: fits in L2/L3


def rows_per_block(cols: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


def sha256_hex(bits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(bits).view(np.uint8).data).hexdigest()


# --------------------------------------------------------------------------- running


def entry_diff(entry: Entry) -> Correction | None:
    """What a ``bits`` entry adds to the bit patterns in its direction (None for other kinds)."""
    if entry.diff is None:
        return None
    diff = entry.diff.decode(entry.numel, entry.float_dtype)
    return diff if entry.direction == "forward" else diff.negated()


def compute_entry_block(entry: Entry, bits: np.ndarray, r0: int, fix: Correction | None,
                        product: np.ndarray | None = None, diff: Correction | None = None) -> np.ndarray:  # fmt: skip
    """Canonical result of ``entry`` on rows ``[r0, r0 + len(bits))`` (bits in, bits out).

    ``product``: the block's ``U @ B`` (lowrank), when already computed for the other direction.
    ``diff``: a ``bits`` entry's decoded difference in its direction (:func:`entry_diff`).
    """
    dt = entry.float_dtype
    r1 = r0 + bits.shape[0]
    if entry.kind == "bits":
        if diff is None:
            raise ValueError(f"{entry.name}: a bits entry needs its decoded diff")
        out = bits.copy()  # bits in, bits out: no arithmetic, no rounding, NaN payloads kept
        diff.apply(out, start=r0 * entry.cols)
    elif entry.kind == "lowrank":
        assert entry.U is not None and entry.B is not None
        # BLAS product plus a per-element error bound; provably the canonical bits (see fastpath)
        out = fastpath.lowrank_rounded(bits, dt, entry.scale, entry.U[r0:r1], entry.B, entry.direction, product)
    else:
        assert entry.delta is not None
        fn = nm.dense_forward if entry.direction == "forward" else nm.dense_inverse
        out = nm.round_to(fn(nm.decode(bits, dt), entry.delta[r0:r1]), dt)
    if fix is not None:
        fix.apply(out, start=r0 * entry.cols)
    return out


@dataclass
class ChainRunner:
    """Applies a chain of entries on one tensor, block by block, hashing every stage.

    ``run`` takes the base bits block by block (in row order) and yields the
    final bits of each block. Three kinds of work overlap: the caller's thread
    reads and writes, a compute pool runs the arithmetic, and one hashing
    thread digests the base and every stage in row order. Afterwards
    ``base_hash`` and ``hashes`` hold the sha256 of the base and after each
    entry; :meth:`check` compares them with the patch.

    With ``prove_inverse``, every block of every stage is also run back
    through its entry's inverse (with ``inverse_fix``) and must give the bits
    it came from: a patch whose undo would fail is refused before its result
    is used. With ``allow_nonfinite=False``, a NaN or Inf where the stage's
    input held a finite value is refused (docs/format.md, "Limits").
    """

    chain: Sequence[Entry]
    source: str | None = None  # the patch file, named in errors
    prove_inverse: bool = False
    allow_nonfinite: bool = True
    measure_change: bool = False  # per entry: relative change and largest fix (float64), see change_report
    # one compute worker beside the I/O thread; more measured no faster on 2 cores
    threads: int = field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) - 1)))

    def __post_init__(self) -> None:
        first = self.chain[0]
        self.rows, self.cols, self.dtype = first.rows, first.cols, first.float_dtype
        self.block = rows_per_block(self.cols)
        try:
            self._fixes = [e.fix.decode(e.numel, e.float_dtype) if e.fix else None for e in self.chain]
            self._diffs = [entry_diff(e) for e in self.chain]
            self._inverses = [
                (e.inverted(), e.inverse_fix.decode(e.numel, e.float_dtype) if e.inverse_fix else None,
                 None if diff is None else diff.negated())
                for e, diff in zip(self.chain, self._diffs)
            ] if self.prove_inverse else []  # fmt: skip
        except ValueError as exc:
            raise PatchFormatError(f"the correction of tensor {first.name!r} is unusable: {exc}", self.source) from None
        self._base_hasher = hashlib.sha256()
        self._hashers = [hashlib.sha256() for _ in self.chain]
        # r0 -> one row per entry: the block's findings (compute threads write disjoint keys)
        self._found: dict[int, np.ndarray] = {}

    def blocks(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.block, self.rows)) for r in range(0, self.rows, self.block)]

    def _compute(self, r0: int, bits: np.ndarray) -> list[np.ndarray]:
        stages = []
        found = np.zeros((len(self.chain), len(_FOUND)))
        for k, (entry, fix, diff) in enumerate(zip(self.chain, self._fixes, self._diffs)):
            before = bits
            product = None
            if self.prove_inverse and entry.kind == "lowrank" and entry.U is not None and entry.B is not None:
                product = fastpath.block_product(entry.U[r0 : r0 + bits.shape[0]], entry.B)  # shared by both ways
            bits = compute_entry_block(entry, before, r0, None if self.measure_change else fix, product, diff)
            if self.measure_change:
                bits, found[k, _FOUND["fix_max"]] = _fixed(bits, fix, r0 * entry.cols, self.dtype)
                with np.errstate(all="ignore"):
                    old = nm.decode(before, self.dtype)
                    found[k, _FOUND["change_sq"]] = np.square(nm.decode(bits, self.dtype) - old).sum()
                    found[k, _FOUND["before_sq"]] = np.square(old).sum()
            if not self.allow_nonfinite:
                new = nm.nonfinite(bits, self.dtype) & ~nm.nonfinite(before, self.dtype)
                found[k, _FOUND["new_nonfinite"]] = np.count_nonzero(new)
            if self.prove_inverse:
                inverse, inverse_fix, inverse_diff = self._inverses[k]
                back = compute_entry_block(inverse, bits, r0, None if self.measure_change else inverse_fix, product,
                                           inverse_diff)  # fmt: skip
                if self.measure_change:
                    back, found[k, _FOUND["inverse_fix_max"]] = _fixed(back, inverse_fix, r0 * entry.cols, self.dtype)
                found[k, _FOUND["not_undone"]] = not np.array_equal(back, before)
            stages.append(bits)
        self._found[r0] = found
        return stages

    def _digest(self, base: np.ndarray | None, stages: list[np.ndarray]) -> None:
        if base is not None:
            self._base_hasher.update(np.ascontiguousarray(base).view(np.uint8).data)
        for hasher, bits in zip(self._hashers, stages):
            hasher.update(np.ascontiguousarray(bits).view(np.uint8).data)

    def run(self, read: Callable[[int, int], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(r0, final bits)`` per block, in order; ``read(r0, r1)`` gives base bits."""
        # A one-thread executor runs its tasks in submission order: the digests stay sequential.
        with ThreadPoolExecutor(max_workers=self.threads) as pool, ThreadPoolExecutor(max_workers=1) as hashing:
            window = 2 * self.threads
            pending: list[tuple[int, Any]] = []
            digests: list[Any] = []

            def finish(r0: int, future: Any) -> tuple[int, np.ndarray]:
                stages = future.result()
                digests.append(hashing.submit(self._digest, None, stages))
                return r0, stages[-1]

            for r0, r1 in self.blocks():
                base = read(r0, r1)
                digests.append(hashing.submit(self._digest, base, []))
                pending.append((r0, pool.submit(self._compute, r0, base)))
                if len(pending) > window:
                    yield finish(*pending.pop(0))
            while pending:
                yield finish(*pending.pop(0))
            for d in digests:
                d.result()

    def _total(self, column: str, how: Callable = np.sum) -> np.ndarray:
        blocks = list(self._found.values()) or [np.zeros((len(self.chain), len(_FOUND)))]
        return how(np.stack(blocks)[:, :, _FOUND[column]], axis=0)

    def change_report(self) -> list[dict[str, float]]:
        """Per entry (needs ``measure_change``; the inverse fix also needs ``prove_inverse``).

        ``relative_change``: ``|W' - W|_F / |W|_F``. ``fix_max`` and
        ``inverse_fix_max``: the largest value change any one correction
        makes, over the RMS of the tensor before the entry; a rounding fix is
        about one ulp of a value (~0.4% of it in bf16), a fix far above that
        writes values the entry's arithmetic does not explain.
        """
        change, before = self._total("change_sq"), self._total("before_sq")
        fix_max, inverse_fix_max = self._total("fix_max", np.max), self._total("inverse_fix_max", np.max)
        numel = self.rows * self.cols
        out = []
        for k in range(len(self.chain)):
            rms = np.sqrt(before[k] / numel)
            with np.errstate(all="ignore"):
                out.append({
                    "relative_change": float(np.sqrt(change[k] / before[k])) if before[k] > 0 else
                    (0.0 if change[k] == 0 else float("inf")),
                    "fix_max": float(fix_max[k] / rms) if rms > 0 else 0.0,
                    "inverse_fix_max": float(inverse_fix_max[k] / rms) if rms > 0 else 0.0,
                })  # fmt: skip
        return out

    @property
    def base_hash(self) -> str:
        return self._base_hasher.hexdigest()

    @property
    def hashes(self) -> list[str]:
        return [h.hexdigest() for h in self._hashers]

    def check(self) -> None:
        """Raise if any stage's hash differs from what the patch promises, or a requested proof failed."""
        not_undone, new_nonfinite = self._total("not_undone"), self._total("new_nonfinite")
        for k, (entry, got) in enumerate(zip(self.chain, self.hashes)):
            if got != entry.sha256_after:
                raise PatchFormatError(
                    f"entry {k} on tensor {entry.name!r} does not produce the result hash the patch promises; "
                    "the patch is corrupt or was not made by a conforming implementation",
                    self.source,
                )
            if not_undone[k]:
                raise PatchFormatError(
                    f"entry {k} on tensor {entry.name!r} cannot be undone: its inverse (with its inverse_fix) "
                    "does not give back the bits it started from; refusing a patch whose undo would fail",
                    self.source,
                )
            if new_nonfinite[k]:
                raise NonFiniteError(
                    f"entry {k} writes {int(new_nonfinite[k])} NaN/Inf value(s) into tensor {entry.name!r} where it "
                    "held finite values (pass --allow-nonfinite to apply it anyway)",
                    self.source,
                )


_FOUND = {name: i for i, name in enumerate(
    ("change_sq", "before_sq", "fix_max", "inverse_fix_max", "new_nonfinite", "not_undone"))}  # fmt: skip


def _fixed(bits: np.ndarray, fix: Correction | None, start: int, dtype: nm.DType) -> tuple[np.ndarray, float]:
    """``bits`` with ``fix`` applied, and the largest absolute value change the fix made there."""
    if fix is None:
        return bits, 0.0
    fixed = bits.copy()
    fix.apply(fixed, start=start)
    with np.errstate(all="ignore"):
        moved = np.abs(nm.decode(fixed, dtype) - nm.decode(bits, dtype))
    moved = moved[np.isfinite(moved)]
    return fixed, float(moved.max()) if moved.size else 0.0


def run_chain_in_memory(
    chain: Sequence[Entry],
    bits: np.ndarray,
    source: str | None = None,
    *,
    prove_inverse: bool = False,
    allow_nonfinite: bool = True,
) -> np.ndarray:
    """Apply a chain to a whole tensor held in memory; checks every hash (and the proofs asked for)."""
    runner = ChainRunner(chain, source, prove_inverse=prove_inverse, allow_nonfinite=allow_nonfinite)
    mat = bits.reshape(runner.rows, runner.cols)
    out = np.empty_like(mat)
    for r0, block in runner.run(lambda a, b: mat[a:b]):
        out[r0 : r0 + block.shape[0]] = block
    runner.check()
    return out.reshape(bits.shape)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class LowRankEdit:
    """``W' = scale * W + U @ B`` for the tensor ``name`` (in its stored layout)."""

    name: str
    scale: float
    U: Any  # rows x r, array-like (numpy or torch)
    B: Any  # r x cols


@dataclass(frozen=True)
class DenseEdit:
    """``W' = W + delta`` for the tensor ``name``."""

    name: str
    delta: Any


Edit = LowRankEdit | DenseEdit


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().to("cpu")
        if str(a.dtype) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


#: How an edit is stored: "auto" (the smaller of its arithmetic and a bits entry), "arithmetic"
#: (its factors or delta: what a LoRA export needs), "bits" (a bits entry whenever it changes something).
ENCODINGS = ("auto", "arithmetic", "bits")


def build_entry(edit: Edit, base_bits: np.ndarray, dtype: nm.DType, codec: str = "lzma",
                encoding: str = "arithmetic") -> Entry:  # fmt: skip
    """Make the forward entry for ``edit`` on a base tensor given as bits.

    Computes the canonical result, both hashes and the inverse correction:
    the base is needed here, and only here. ``encoding`` (:data:`ENCODINGS`)
    may store the result instead as a ``bits`` entry, the difference of its
    bit patterns from the base's: exact both ways with no inverse correction,
    and smaller than the factors when the update has high rank (about 60% of
    the touched bf16 bytes at 1000 requests, against 280% for full-rank
    float32 factors; docs/format.md).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    check_tensor_name(edit.name)
    shape = tuple(int(s) for s in base_bits.shape)
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    store = nm.FACTOR_DTYPES[nm.factor_dtype_for(dtype)]
    if isinstance(edit, LowRankEdit):
        if len(shape) != 2:
            raise ValueError(f"{edit.name}: a low-rank edit needs a 2-D tensor, got shape {shape}")
        U = _as_numpy(edit.U).astype(np.float64).astype(store)
        B = _as_numpy(edit.B).astype(np.float64).astype(store)
        if U.ndim != 2 or B.ndim != 2 or U.shape[0] != rows or B.shape != (U.shape[1], cols):
            raise ValueError(f"{edit.name}: factors of shapes {U.shape} and {B.shape} do not fit a {rows}x{cols} tensor")
        scale = float(edit.scale)
        if not np.isfinite(scale) or scale == 0:
            raise ValueError(f"{edit.name}: scale must be finite and non-zero, got {scale}")
        parts: dict[str, Any] = dict(kind="lowrank", scale=scale, U=np.ascontiguousarray(U), B=np.ascontiguousarray(B))
    else:
        delta = _as_numpy(edit.delta).astype(np.float64).astype(store)
        if delta.size != rows * cols:
            raise ValueError(f"{edit.name}: delta of shape {delta.shape} does not fit a tensor of shape {shape}")
        parts = dict(kind="dense", delta=np.ascontiguousarray(delta.reshape(rows, cols)))
    entry = Entry(
        name=edit.name, dtype=dtype.name, shape=shape, direction="forward",
        sha256_before=sha256_hex(base_bits), sha256_after="0" * 64, **parts,
    )  # fmt: skip
    base = base_bits.reshape(rows, cols)
    after = np.concatenate([compute_entry_block(entry, base[a:b], a, None) for a, b in _blocks(rows, cols)])
    back_entry = replace(entry, direction="inverse")
    back = np.concatenate([compute_entry_block(back_entry, after[a:b], a, None) for a, b in _blocks(rows, cols)])
    inverse_fix = StoredCorrection.make(Correction.between(back, base), rows * cols, codec)
    entry = replace(entry, sha256_after=sha256_hex(after), inverse_fix=inverse_fix)
    if encoding == "arithmetic":
        return entry
    diff = Correction.between(base, after)
    if diff.count == 0 or (encoding == "auto" and _estimated_bytes(diff, rows * cols) > 1.5 * entry.stored_bytes()):
        return entry
    stored = StoredCorrection.make(diff, rows * cols, codec)
    bits_entry = replace(entry, kind="bits", scale=1.0, U=None, B=None, delta=None, diff=stored, fix=None,
                         inverse_fix=None)  # fmt: skip
    if encoding == "auto" and bits_entry.stored_bytes() >= entry.stored_bytes():
        return entry
    return bits_entry


def _estimated_bytes(diff: Correction, numel: int) -> float:
    """A quick guess of a correction's encoded size: the order-0 entropy of its gaps and deltas.

    Lets ``auto`` skip compressing a difference that cannot beat the factors
    (a low-rank edit changes most entries too, by an ulp or two, so its bits
    entry is many times its factors' size).
    """

    def entropy_bits(values: np.ndarray) -> float:
        _, counts = np.unique(values, return_counts=True)
        p = counts / counts.sum()
        return float(-(p * np.log2(p)).sum())

    step = max(1, diff.count >> 20)  # a million samples estimate it as well as all (an 8B tensor has 58M)
    gaps = np.diff(diff.positions, prepend=-1)[::step] - 1
    per_entry = entropy_bits(np.minimum(gaps, 1 << 16)) + entropy_bits(diff.delta[::step])
    return max(per_entry, 0.1) * diff.count / 8


def _blocks(rows: int, cols: int) -> Iterable[tuple[int, int]]:
    step = rows_per_block(cols)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def build_patch(
    edits: Sequence[Edit],
    base: Mapping[str, tuple[np.ndarray, nm.DType]],
    *,
    encoding: str = "arithmetic",
    method: str = "manual",
    hyperparameters: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    requests: Mapping[str, Any] | None = None,
) -> Patch:
    """A one-step patch from edits and the base tensors they apply to.

    ``base`` maps tensor names to ``(bits, dtype)`` (see
    :func:`zupatch.patch.module.bits_of` to get them from torch tensors).
    ``encoding``: how each edit is stored (:func:`build_entry`); ``create``
    passes "auto", the builder's default keeps the edits' own arithmetic.
    """
    if not edits:
        raise ValueError("no edits to build a patch from")
    names = [e.name for e in edits]
    if len(set(names)) != len(names):
        raise ValueError("two edits name the same tensor")
    nm.check_ieee_environment()
    for edit in edits:
        if edit.name not in base:
            raise ValueError(f"base has no tensor {edit.name!r}")
    # one thread per tensor: lzma and numpy release the GIL, and compressing a bits entry
    # takes about a second per 5 MB of difference
    with ThreadPoolExecutor(max_workers=max(1, min(len(edits), os.cpu_count() or 1))) as pool:
        entries = list(pool.map(lambda edit: build_entry(edit, *base[edit.name], encoding=encoding), edits))
    step = Step(
        entries=entries,
        method=method,
        hyperparameters=dict(hyperparameters or {}),
        base_model=base_model,
        base_revision=base_revision,
        requests=dict(requests or {}),
    )
    return Patch(steps=[step])


# --------------------------------------------------------------------------- algebra


def invert(patch: Patch) -> Patch:
    """The patch that restores the base from the result, bit for bit.

    Steps run in reverse order, each entry in the opposite direction with the
    correction that was made for that direction.
    """
    steps = [
        replace(s, entries=[e.inverted() for e in s.entries], inverted=not s.inverted)
        for s in reversed(patch.steps)
    ]
    return Patch(steps=steps, extra=dict(patch.extra))


def stack(patches: Sequence[Patch]) -> Patch:
    """One patch equal to applying ``patches`` in order (their steps, chained).

    Steps keep their own fields, unknown ones included. Unknown top-level
    fields are kept when every patch that has one gives it the same value;
    two different values for one field are refused (docs/format.md).
    """
    if not patches:
        raise ValueError("nothing to stack")
    steps = [s for p in patches for s in p.steps]
    extra: dict = {}
    for p in patches:
        for key, value in p.extra.items():
            if key in extra and extra[key] != value:
                raise ZupatchError(f"these patches do not stack: they disagree on the top-level field {key!r}")
            extra[key] = value
    out = Patch(steps=steps, extra=extra)
    try:
        validate_chain(out)
    except ValueError as exc:
        hint = ""
        if "hash chain broken" in str(exc):
            hint = ("; a patch made on the same base as the one before it does not stack: make it on that "
                    "patch's output with `zupatch create --on PATCH`")  # fmt: skip
        raise ZupatchError(f"these patches do not stack: {exc}{hint}") from None
    return out
