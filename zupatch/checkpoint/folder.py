"""A Hugging Face checkpoint folder, read lazily.

``model.safetensors`` or shards listed by ``model.safetensors.index.json``;
each shard's header is parsed on first use, tensor data only when asked for.

A folder is read only where its meaning is certain (docs/cli.md,
``zupatch apply``): a folder holding both layouts, or a tensor stored in two shards,
is refused, because transformers would load a different copy than the one
zupatch patches and checks. Symbolic links are followed only to files inside
the folder, or, for a Hugging Face cache snapshot, inside its repo's
``blobs/``; a link elsewhere (a secret, ``/dev/zero``), a link loop or a
file that is not a regular file is refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

import numpy as np

from zupatch.io.safetensors_file import SafetensorsFile, TensorInfo
from zupatch.io import jsondoc
from zupatch.errors import CheckpointError, ZupatchError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HASH_CHUNK = 16 << 20


def check_relative_name(name: object, where: Path) -> str:
    """A file name read from a checkpoint must stay inside its folder."""
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(("/", "\\"))
        or ".." in Path(name).parts
        or "\\" in name
        or os.path.isabs(name)
        or "\x00" in name
    ):
        raise CheckpointError(f"refers to {name!r}, which is not a file name inside the checkpoint", where)
    return name


def readable_roots(folder: Path) -> list[Path]:
    """Where links in ``folder`` may point: the folder, and a cache snapshot's ``blobs/``."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(real.parent.parent / "blobs")
    return roots


class Checkpoint:
    """The safetensors weights of one checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError("no such folder", self.path)
        if not self.path.is_dir():
            raise CheckpointError("is not a folder (expected a checkpoint folder with safetensors weights)", self.path)
        self._roots = readable_roots(self.path)
        self._files: dict[str, SafetensorsFile] = {}
        self.weight_map = self._weight_map()

    def real_file(self, rel: str | os.PathLike) -> Path:
        """The file ``rel`` of the folder, links resolved; refused if it leads outside or is not a regular file."""
        path = self.path / rel
        try:
            real = Path(os.path.realpath(path, strict=True))
            mode = os.stat(real).st_mode
        except OSError as exc:
            problem = "is a link loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror})"
            raise CheckpointError(problem, path) from None
        if not any(real.is_relative_to(root) for root in self._roots):
            raise CheckpointError(f"is a link to {real}, outside the model folder; zupatch does not follow it", path)
        if not stat.S_ISREG(mode):
            raise CheckpointError("is not a regular file", path)
        return real

    def all_files(self) -> dict[str, Path]:
        """Every file of the folder (relative name -> real path), hidden top-level entries skipped.

        Hidden entries (``.git``, the ``.cache`` of ``local_dir`` downloads,
        editor files) are not part of a checkpoint. A link to a folder is
        refused: zupatch does not walk outside the tree it was given.
        """
        files: dict[str, Path] = {}
        for here, dirs, names in os.walk(self.path, followlinks=False, onerror=self._walk_error):
            rel_dir = Path(here).relative_to(self.path)
            if rel_dir == Path("."):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                names = [n for n in names if not n.startswith(".")]
            for d in dirs:
                if os.path.islink(os.path.join(here, d)):
                    raise CheckpointError("is a link to a folder; zupatch does not follow it", Path(here) / d)
            for name in names:
                rel = (rel_dir / name).as_posix()
                files[rel] = self.real_file(rel)
        return dict(sorted(files.items()))

    @staticmethod
    def _walk_error(exc: OSError) -> None:
        raise CheckpointError(f"cannot be read ({exc.strerror})", exc.filename)

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if (index.exists() or index.is_symlink()) and (single.exists() or single.is_symlink()):
            raise CheckpointError(
                f"holds both {SINGLE_FILE} and {INDEX_FILE}; transformers would load {SINGLE_FILE}, so which "
                "weights the checkpoint has is ambiguous; remove one of them",
                self.path,
            )
        if index.exists() or index.is_symlink():
            self.real_file(INDEX_FILE)
            try:
                doc = jsondoc.loads(index.read_bytes())
            except jsondoc.JSONDocumentError as exc:
                raise CheckpointError(str(exc), index) from None
            wm = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError("has no 'weight_map' object", index)
            for tensor, file in wm.items():
                check_relative_name(file, index)
                if not isinstance(tensor, str):
                    raise CheckpointError("weight_map keys must be tensor names", index)
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"lists shard {missing[0]!r}, which is missing from the folder", index)
            return dict(wm)
        if single.exists() or single.is_symlink():
            return {name: SINGLE_FILE for name in self.file(SINGLE_FILE).tensors}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError("has only pickle weights (*.bin); zupatch reads safetensors checkpoints", self.path)
        raise CheckpointError(f"has no {SINGLE_FILE} or {INDEX_FILE}", self.path)

    def file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self.real_file(filename)
            self._files[filename] = SafetensorsFile(self.path / filename)
        return self._files[filename]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def validate(self) -> None:
        """Parse every weight file's header (cheap: no tensor data is read) and check the layout.

        Every tensor must be stored once, in the file the index names: a
        tensor found in two shards is refused (transformers loads every
        tensor of every listed shard, so the copy it keeps is not the one
        the index promises).
        """
        seen: dict[str, str] = {}
        for filename in self.files:
            for name in self.file(filename).tensors:
                if name in seen:
                    raise CheckpointError(
                        f"tensor {name!r} is stored in both {seen[name]} and {filename}; which copy a loader "
                        "uses is ambiguous",
                        self.path,
                    )
                seen[name] = filename
        for name, filename in self.weight_map.items():
            if seen.get(name) != filename:
                raise CheckpointError(
                    f"the index puts tensor {name!r} in {filename}, but it is not there", self.path / INDEX_FILE
                )

    def locate(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        """The file holding tensor ``name`` and where in it."""
        filename = self.weight_map.get(name)
        if filename is None:
            raise ZupatchError(f"the checkpoint has no tensor {name!r}", self.path)
        st = self.file(filename)
        if name not in st.tensors:
            raise CheckpointError(f"the index puts tensor {name!r} in this file, but it is not there", st.path)
        return st, st.tensors[name]

    def sha256(self, name: str) -> str:
        """sha256 of a tensor's stored bytes, read in chunks."""
        st, info = self.locate(name)
        h = hashlib.sha256()
        with open(st.path, "rb") as fh:
            fh.seek(info.start)
            left = info.nbytes
            while left:
                chunk = fh.read(min(HASH_CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"tensor {name!r} is truncated", st.path)
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()

    def read_bits(self, name: str, bits_dtype: np.dtype) -> np.ndarray:
        st, info = self.locate(name)
        return np.frombuffer(st.read_bytes(name), dtype=bits_dtype).reshape(info.shape).copy()
