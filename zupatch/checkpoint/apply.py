"""Apply a patch to a checkpoint folder without loading the model.

Only the touched tensors are read. A touched shard keeps its header and byte
layout (dtype and shape never change): its untouched byte ranges are copied by
the kernel (``copy_file_range``) in a background thread while the touched
tensors are computed in row blocks and written into their ranges. Untouched
files are hard-linked (or copied). Everything goes into a hidden temporary
folder beside the output, renamed into place only when every hash checked
out, so an interrupted or failed apply leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zupatch.checkpoint.folder import Checkpoint
from zupatch.io.safetensors_file import TensorInfo
from zupatch.errors import BaseMismatchError, CheckpointError, OutputExistsError, ZupatchError
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import ChainRunner

# progress(stage, done, total): stage names are "hash", "copy", "compute"
ProgressFn = Callable[[str, int, int], None]
COPY_CHUNK = 64 << 20


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
    """Hash every touched tensor and place it in the patch's hash chain."""
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
    linked_files: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _link_or_copy(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link ``src`` (resolved through symlinks) to ``dst``; copy if that fails."""
    real = src.resolve()
    if link:
        try:
            os.link(real, dst)
            return True
        except OSError:
            pass
    shutil.copyfile(real, dst)
    return False


def _copy_ranges(src: Path, dst_fd: int, ranges: list[tuple[int, int]]) -> None:
    """Copy byte ranges of ``src`` to the same offsets of ``dst_fd`` (kernel-side when possible)."""
    with open(src, "rb") as fh:
        src_fd = fh.fileno()
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(COPY_CHUNK, end - pos)
                try:
                    done = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
                except (AttributeError, OSError):
                    done = os.pwrite(dst_fd, os.pread(src_fd, n, pos), pos)
                if done <= 0:
                    raise CheckpointError("file ended early while copying", src)
                pos += done


def _untouched_ranges(size: int, touched: list[TensorInfo]) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    for info in sorted(touched, key=lambda t: t.start):
        if info.start > pos:
            ranges.append((pos, info.start))
        pos = max(pos, info.end)
    if pos < size:
        ranges.append((pos, size))
    return ranges


def _write_shard(patch: Patch, ckpt: Checkpoint, filename: str, names: list[str], dst: Path, progress: ProgressFn,
                 done_rows: list[int], total_rows: int) -> None:  # fmt: skip
    """Write one touched shard: untouched bytes copied in the background, touched tensors computed."""
    st = ckpt.file(filename)
    infos = [st.tensors[n] for n in names]
    size = st.path.stat().st_size
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        errors: list[BaseException] = []

        def copy() -> None:
            try:
                _copy_ranges(st.path, fd, _untouched_ranges(size, infos))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        with open(st.path, "rb") as src:
            for name, info in zip(names, infos):
                runner = ChainRunner(patch.chain(name), patch.source)
                dt = runner.dtype
                row_bytes = runner.cols * dt.itemsize

                def read(r0: int, r1: int, info: TensorInfo = info, row_bytes: int = row_bytes, dt: nm.DType = dt):
                    data = os.pread(src.fileno(), (r1 - r0) * row_bytes, info.start + r0 * row_bytes)
                    if len(data) != (r1 - r0) * row_bytes:
                        raise CheckpointError(f"tensor {info.name!r} is truncated", st.path)
                    return np.frombuffer(data, dtype=dt.bits).reshape(r1 - r0, -1)

                for r0, block in runner.run(read):
                    os.pwrite(fd, block.tobytes(), info.start + r0 * row_bytes)
                    done_rows[0] += block.shape[0]
                    progress("compute", done_rows[0], total_rows)
                _require_base_hash(patch, name, runner.base_hash, ckpt.path)
                runner.check()
        copier.join()
        if errors:
            raise errors[0]
    finally:
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


def apply_to_checkpoint(
    patch: Patch,
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    link: bool = True,
    progress: ProgressFn = _no_progress,
) -> ApplyReport:
    """Write ``output``: the checkpoint folder ``model`` with ``patch`` applied.

    Checks the base hash of every touched tensor on the bytes it streams
    through, and every result hash; on any failure (or interruption) nothing is
    left at ``output``. Files are not fsync'ed: the atomic rename protects
    against an interrupted process, like ``save_pretrained`` and ``cp`` do.
    """
    started = time.perf_counter()
    nm.check_ieee_environment()
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise OutputExistsError("already exists; choose a new output folder", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ZupatchError("parent folder does not exist", parent)
    ckpt = Checkpoint(model)
    ckpt.validate()  # every shard's header, not only the touched ones: they are all handed on
    if out.resolve() == ckpt.path.resolve():
        raise ZupatchError("the output must be a new folder, not the model itself", out)
    check_fits(patch, ckpt)

    by_file: dict[str, list[str]] = {}
    for name in patch.tensor_names:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    report = ApplyReport(output=out, tensors=patch.tensor_names, touched_files=sorted(by_file))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zupatch-partial-", dir=parent))
    except PermissionError:
        raise ZupatchError("cannot write here: permission denied", parent) from None
    except OSError as exc:
        raise ZupatchError(f"cannot write here: {exc.strerror}", parent) from None
    try:
        for src in sorted(ckpt.path.rglob("*")):
            rel = src.relative_to(ckpt.path)
            if rel.parts[0].startswith(".") or src.is_dir():
                continue  # .cache/ of huggingface_hub local_dir downloads, .git, editor files
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if str(rel) in by_file:
                continue
            (report.linked_files if _link_or_copy(src, dst, link) else report.copied_files).append(str(rel))
        total_rows = sum(patch.chain(n)[0].rows for n in patch.tensor_names)
        done_rows = [0]
        for filename, names in by_file.items():
            _write_shard(patch, ckpt, filename, names, tmp / filename, progress, done_rows, total_rows)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            raise OutputExistsError("appeared while applying; nothing was written", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - started
    return report
