"""Helpers for tests that need patches on real checkpoints (not a test module)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from zupatch.checkpoint.folder import Checkpoint
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import DenseEdit, LowRankEdit, build_patch


def base_tensors(ckpt_dir: Path, names: list[str]) -> dict[str, tuple[np.ndarray, nm.DType]]:
    """Bits and dtype of some tensors of a checkpoint folder."""
    ckpt = Checkpoint(ckpt_dir)
    out = {}
    for name in names:
        _, info = ckpt.locate(name)
        dtype = nm.FLOAT_DTYPES[info.dtype]
        out[name] = (ckpt.read_bits(name, dtype.bits), dtype)
    return out


def random_patch(ckpt_dir: Path, names: list[str], *, seed: int = 0, rank: int = 4, scale: float = 1.01,
                 dense: list[str] = (), method: str = "test", encoding: str = "arithmetic") -> Patch:  # fmt: skip
    """A patch with random low-rank edits on ``names`` and dense deltas on ``dense``
    (stored as ``encoding`` says, see :func:`zupatch.patch.ops.build_entry`)."""
    rng = np.random.default_rng(seed)
    base = base_tensors(ckpt_dir, list(names) + list(dense))
    edits: list[LowRankEdit | DenseEdit] = []
    for name in names:
        rows, cols = base[name][0].shape
        edits.append(LowRankEdit(name, scale, rng.standard_normal((rows, rank)) * 0.05,
                                 rng.standard_normal((rank, cols)) * 0.05))  # fmt: skip
    for name in dense:
        edits.append(DenseEdit(name, rng.standard_normal(base[name][0].shape) * 1e-3))
    return build_patch(edits, base, method=method, base_model=str(ckpt_dir.name), encoding=encoding)


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path -> digest)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def same_inode(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino
