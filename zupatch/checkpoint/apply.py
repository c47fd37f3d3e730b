"""Apply a patch to a checkpoint folder without loading the model.

Only the touched tensors are read. A touched shard keeps its header and byte
layout (dtype and shape never change): its untouched byte ranges are copied by
the kernel (``copy_file_range``) in a background thread while the touched
tensors are computed in row blocks and written into their ranges. Untouched
files are reflinked or copied (hard links only on request: they would share
the input's inodes). Everything goes into a hidden temporary folder beside
the output, renamed into place only when every hash, the inverse proof and
the non-finite check passed, so an interrupted or failed apply leaves nothing
under the output's name; a killed run's folder is removed by the next run.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no reflinks, no lock-based clean-up of killed runs
    fcntl = None  # type: ignore[assignment]

from zupatch.checkpoint.folder import Checkpoint
from zupatch.io.safetensors_file import TensorInfo
from zupatch.errors import BaseMismatchError, CheckpointError, OutputExistsError, ZupatchError
from zupatch.io.files import current_umask
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import ChainRunner

# progress(stage, done, total): stage names are "hash", "copy", "compute"
ProgressFn = Callable[[str, int, int], None]
COPY_CHUNK = 64 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # reported against the output, not the input


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# --------------------------------------------------------------------------- state


@dataclass
class TensorState:
    """Where one touched tensor of a checkpoint stands in a patch's chain."""

    name: str
    sha256: str
    position: int | None  # 0 = base, k = after k entries of its chain, None = unknown
    chain_length: int


@dataclass
class CheckpointState:
    """How a checkpoint relates to a patch: its base, its result, or neither."""

    tensors: list[TensorState]

    @property
    def status(self) -> str:
        if all(t.position == 0 for t in self.tensors):
            return "base"
        if all(t.position == t.chain_length for t in self.tensors):
            return "applied"
        if all(t.position is not None for t in self.tensors):
            return "partial"
        return "mismatch"

    @property
    def mismatched(self) -> list[str]:
        return [t.name for t in self.tensors if t.position is None]


def check_fits(patch: Patch, ckpt: Checkpoint) -> None:
    """Every touched tensor exists with the dtype and shape the patch expects."""
    missing = [n for n in patch.tensor_names if n not in ckpt.weight_map]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ZupatchError(f"the checkpoint has no tensor {missing[0]!r}{more}, which the patch changes", ckpt.path)
    for name in patch.tensor_names:
        first = patch.chain(name)[0]
        _, info = ckpt.locate(name)
        if (info.dtype, info.shape) != (first.dtype, first.shape):
            raise ZupatchError(
                f"tensor {name!r} is {info.dtype} {list(info.shape)} here, the patch expects "
                f"{first.dtype} {list(first.shape)}",
                ckpt.path,
            )


def checkpoint_state(patch: Patch, ckpt: Checkpoint, progress: ProgressFn = _no_progress) -> CheckpointState:
    """Hash every touched tensor and place it in the patch's hash chain.

    The layout is validated first (one format, every tensor stored once), so
    the hashes are those of the weights transformers would load.
    """
    ckpt.validate()
    check_fits(patch, ckpt)
    states = []
    names = patch.tensor_names
    for i, name in enumerate(names):
        chain = patch.chain(name)
        chain_hashes = [chain[0].sha256_before] + [e.sha256_after for e in chain]
        digest = ckpt.sha256(name)
        position = chain_hashes.index(digest) if digest in chain_hashes else None
        states.append(TensorState(name, digest, position, len(chain)))
        progress("hash", i + 1, len(names))
    return CheckpointState(states)


def measure_changes(patch: Patch, ckpt: Checkpoint) -> dict[str, list[dict[str, float]]]:
    """Per touched tensor, per entry of its chain, what it changes on this checkpoint (its base).

    See :meth:`~zupatch.patch.ops.ChainRunner.change_report`. Streams each
    tensor through the chain like apply does (inverse proof included),
    writing nothing; the checkpoint must be the patch's base.
    """
    ckpt.validate()
    check_fits(patch, ckpt)
    out: dict[str, list[float]] = {}
    for name in patch.tensor_names:
        st, info = ckpt.locate(name)
        runner = ChainRunner(patch.chain(name), patch.source, measure_change=True, prove_inverse=True)
        row_bytes = runner.cols * runner.dtype.itemsize
        with open(st.path, "rb") as src:
            for _ in runner.run(_row_reader(src.fileno(), info, row_bytes, runner.dtype, st.path)):
                pass
        _require_base_hash(patch, name, runner.base_hash, ckpt.path)
        runner.check()
        out[name] = runner.change_report()
    return out


def _row_reader(fd: int, info: TensorInfo, row_bytes: int, dt: nm.DType, where: Path) -> Callable:
    """``read(r0, r1)``: rows of one tensor of an open safetensors file, as bits."""

    def read(r0: int, r1: int) -> np.ndarray:
        data = os.pread(fd, (r1 - r0) * row_bytes, info.start + r0 * row_bytes)
        if len(data) != (r1 - r0) * row_bytes:
            raise CheckpointError(f"tensor {info.name!r} is truncated", where)
        return np.frombuffer(data, dtype=dt.bits).reshape(r1 - r0, -1)

    return read


def require_base(patch: Patch, state: CheckpointState, where: Path) -> None:
    """Raise a clear :class:`BaseMismatchError` unless ``state`` is the patch's base."""
    if state.status == "base":
        return
    expected = patch.base_model or "the model it was made from"
    if patch.base_revision:
        expected += f" (revision {patch.base_revision[:12]})"
    if state.status == "applied":
        raise BaseMismatchError("this checkpoint already has the patch applied", where)
    bad = state.mismatched or [t.name for t in state.tensors if t.position != 0]
    listed = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise BaseMismatchError(f"not the base this patch was made for ({expected}): tensor {listed} differs", where)


# --------------------------------------------------------------------------- apply


@dataclass
class ApplyReport:
    output: Path
    tensors: list[str]
    touched_files: list[str]
    linked_files: list[str] = field(default_factory=list)  # hard links (opt-in): share the input's inode
    cloned_files: list[str] = field(default_factory=list)  # reflinks: share blocks copy-on-write
    copied_files: list[str] = field(default_factory=list)
    removed_partials: list[str] = field(default_factory=list)  # stale folders of killed runs, removed
    seconds: float = 0.0


# --------------------------------------------------------------------------- untouched files


FICLONE = 0x40049409  # Linux ioctl: share blocks copy-on-write (btrfs, XFS, bcachefs, ...)


def _place_file(src: Path, dst: Path, link: bool, copied: Callable[[int], None] = lambda n: None) -> str:
    """Put a copy of ``src`` at ``dst``: "linked", "cloned" or "copied".

    The default never shares an inode with the input (or the Hugging Face
    cache behind it): a later in-place write into the output, such as
    ``tokenizer.save_pretrained(out)``, would silently change the input. A
    reflink shares blocks copy-on-write, so writes stay private; else the
    kernel copies the bytes, reporting each chunk to ``copied``. ``link``
    opts in to hard links.
    """
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        if fcntl is not None:
            try:
                fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
                return "cloned"
            except OSError:
                pass
        size = os.fstat(fin.fileno()).st_size
        _copy_ranges(fin.fileno(), fout.fileno(), [(0, size)], threading.Event(), src, copied)
    return "copied"


def _copy_ranges(src_fd: int, dst_fd: int, ranges: list[tuple[int, int]], stop: threading.Event, src: Path,
                 copied: Callable[[int], None] = lambda n: None) -> None:  # fmt: skip
    """Copy byte ranges of ``src`` to the same offsets of ``dst_fd`` (kernel-side when possible).

    Stops early when ``stop`` is set, so a failing apply never leaves a
    thread writing into a descriptor that the caller is about to close (and
    the process may reuse for another file).
    """
    for start, end in ranges:
        pos = start
        while pos < end:
            if stop.is_set():
                return
            n = min(COPY_CHUNK, end - pos)
            try:
                done = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                    raise
                done = os.pwrite(dst_fd, os.pread(src_fd, n, pos), pos)
            if done <= 0:
                raise CheckpointError("file ended early while copying", src)
            pos += done
            copied(done)


def _untouched_ranges(size: int, touched: list[TensorInfo]) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    for info in sorted(touched, key=lambda t: t.start):
        if info.start > pos:
            ranges.append((pos, info.start))
        pos = max(pos, info.end)
    if pos < size:
        ranges.append((pos, size))
    return ranges


# --------------------------------------------------------------------------- touched shards


@dataclass(frozen=True)
class ApplyChecks:
    """What apply proves on every touched tensor besides the hashes (docs/format.md, "Limits")."""

    prove_inverse: bool = True  # the stored inverse must give back the base bits
    allow_nonfinite: bool = False  # NaN/Inf where the base was finite


def _write_shard(patch: Patch, ckpt: Checkpoint, filename: str, names: list[str], dst: Path, progress: ProgressFn,
                 done_rows: list[int], total_rows: int, checks: ApplyChecks) -> None:  # fmt: skip
    """Write one touched shard: untouched bytes copied in the background, touched tensors computed."""
    st = ckpt.file(filename)
    infos = [st.tensors[n] for n in names]
    size = st.path.stat().st_size
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    stop = threading.Event()
    copier: threading.Thread | None = None
    try:
        os.ftruncate(fd, size)
        errors: list[BaseException] = []

        def copy() -> None:
            # The copier holds its own descriptors: an interrupt that lands inside
            # ``start()`` leaves a thread that cannot be joined, and it must never
            # write through a descriptor number the caller has closed and reused.
            try:
                with open(st.path, "rb") as fh, open(dst, "r+b", buffering=0) as out:
                    _copy_ranges(fh.fileno(), out.fileno(), _untouched_ranges(size, infos), stop, st.path)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        copier = threading.Thread(target=copy, name="zupatch-copy", daemon=True)
        copier.start()
        with open(st.path, "rb") as src:
            for name, info in zip(names, infos):
                runner = ChainRunner(patch.chain(name), patch.source, prove_inverse=checks.prove_inverse,
                                     allow_nonfinite=checks.allow_nonfinite)  # fmt: skip
                row_bytes = runner.cols * runner.dtype.itemsize
                for r0, block in runner.run(_row_reader(src.fileno(), info, row_bytes, runner.dtype, st.path)):
                    os.pwrite(fd, block.tobytes(), info.start + r0 * row_bytes)
                    done_rows[0] += block.shape[0]
                    progress("compute", done_rows[0], total_rows)
                _require_base_hash(patch, name, runner.base_hash, ckpt.path)
                runner.check()
        copier.join()
        if errors:
            raise errors[0]
    except BaseException:
        stop.set()
        raise
    finally:
        if copier is not None:
            try:
                copier.join()  # a failed shard is not reported while its copy still runs
            except RuntimeError:
                pass  # start() itself was interrupted; the thread, if any, sees ``stop``
        os.close(fd)


def _require_base_hash(patch: Patch, name: str, digest: str, where: Path) -> None:
    """The base check of ``apply``, made on the bytes it streamed through."""
    chain = patch.chain(name)
    if digest == chain[0].sha256_before:
        return
    if digest == chain[-1].sha256_after:
        raise BaseMismatchError("this checkpoint already has the patch applied", where)
    state = CheckpointState([TensorState(name, digest, None, len(chain))])
    require_base(patch, state, where)


# --------------------------------------------------------------------------- partial folders

PARTIAL_INFIX = ".zupatch-partial-"
LOCK_NAME = ".zupatch-lock"  # held (flock) by the apply writing the partial folder
STALE_UNLOCKED_SECONDS = 60  # a partial folder without a lock file is left alone this long


def _partial_prefix(out: Path) -> str:
    return f".{out.name}{PARTIAL_INFIX}"


def _lock(folder: Path) -> int | None:
    """Create and hold the lock file of a partial folder; released when the process dies."""
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove partial folders left beside ``out`` by killed runs on the same output.

    A folder is stale when nobody holds its lock (a killed process releases
    it); a folder another apply is writing right now is left alone.
    """
    if fcntl is None:
        return []
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    for folder in parent.glob(glob.escape(_partial_prefix(out)) + "*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:  # killed before it took the lock, or just after it let go
            if time.time() - folder.lstat().st_mtime > STALE_UNLOCKED_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # another apply is writing it now
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(folder)
    return removed


# --------------------------------------------------------------------------- apply


def check_output(out: Path, model: Path) -> Path:
    """The output must be a new folder, in an existing folder, outside the model folder."""
    if out.exists() or out.is_symlink():
        raise OutputExistsError("already exists; choose a new output folder", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ZupatchError("parent folder does not exist", parent)
    real_out, real_model = parent.resolve() / out.name, model.resolve()
    if real_out == real_model or real_out.is_relative_to(real_model):
        raise ZupatchError("the output must be a new folder outside the model folder", out)
    return parent


def apply_to_checkpoint(
    patch: Patch,
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    link: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressFn = _no_progress,
    checks: ApplyChecks | None = None,
) -> ApplyReport:
    """Write ``output``: the checkpoint folder ``model`` with ``patch`` applied.

    Checks the base hash of every touched tensor on the bytes it streams
    through, every result hash, and that the patch's stored inverse gives
    back the base bits; refuses new NaN/Inf values unless ``allow_nonfinite``.
    On any failure (or interruption) nothing is left at ``output``; the
    hidden partial folder of a killed run is removed by the next run on the
    same output. Untouched files are reflinked or copied, hard-linked only
    with ``link`` (the output then shares inodes with the input). ``checks``
    overrides the proofs (benchmarks measure their cost). Files are not
    fsync'ed: the atomic rename protects against an interrupted process,
    like ``save_pretrained`` and ``cp`` do.
    """
    started = time.perf_counter()
    nm.check_ieee_environment()
    out = Path(output)
    ckpt = Checkpoint(model)
    parent = check_output(out, ckpt.path)
    ckpt.validate()  # every shard's header, not only the touched ones: they are all handed on
    files = ckpt.all_files()  # symlinks resolved and checked
    check_fits(patch, ckpt)

    by_file: dict[str, list[str]] = {}
    for name in patch.tensor_names:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    report = ApplyReport(output=out, tensors=patch.tensor_names, touched_files=sorted(by_file))
    report.removed_partials = [str(p) for p in remove_stale_partials(out)]
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), dir=parent))
    except PermissionError:
        raise ZupatchError("cannot write here: permission denied", parent) from None
    except OSError as exc:
        raise ZupatchError(f"cannot write here: {exc.strerror}", parent) from None
    lock = None
    try:
        lock = _lock(tmp)
        to_copy = {rel: real for rel, real in files.items() if rel not in by_file}
        total_bytes, done_bytes = sum(real.stat().st_size for real in to_copy.values()), [0]

        def copied(n: int) -> None:
            done_bytes[0] += n
            progress("copy", done_bytes[0] >> 20, total_bytes >> 20)

        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        for rel, real in to_copy.items():
            how = _place_file(real, tmp / rel, link, copied)
            {"linked": report.linked_files, "cloned": report.cloned_files, "copied": report.copied_files}[how].append(rel)
        total_rows = sum(patch.chain(n)[0].rows for n in patch.tensor_names)
        done_rows = [0]
        checks = checks or ApplyChecks(allow_nonfinite=allow_nonfinite)
        for filename, names in by_file.items():
            _write_shard(patch, ckpt, filename, names, tmp / filename, progress, done_rows, total_rows, checks)
        os.chmod(tmp, 0o777 & ~current_umask())
        (tmp / LOCK_NAME).unlink(missing_ok=True)
        try:
            os.rename(tmp, out)
        except OSError:
            raise OutputExistsError("appeared while applying; nothing was written", out) from None
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _DISK_FULL:
            raise ZupatchError(f"{exc.strerror} while writing the output; nothing was written", out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    report.seconds = time.perf_counter() - started
    return report

