"""A Hugging Face checkpoint folder, read lazily.

``model.safetensors`` or shards listed by ``model.safetensors.index.json``;
each shard's header is parsed on first use, tensor data only when asked for.
"""

from __future__ import annotations

import hashlib
import os
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


class Checkpoint:
    """The safetensors weights of one checkpoint folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError("no such folder", self.path)
        if not self.path.is_dir():
            raise CheckpointError("is not a folder (expected a checkpoint folder with safetensors weights)", self.path)
        self._files: dict[str, SafetensorsFile] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
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
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in self.file(SINGLE_FILE).tensors}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError("has only pickle weights (*.bin); zupatch reads safetensors checkpoints", self.path)
        raise CheckpointError(f"has no {SINGLE_FILE} or {INDEX_FILE}", self.path)

    def file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            self._files[filename] = SafetensorsFile(self.path / filename)
        return self._files[filename]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def validate(self) -> None:
        """Parse every weight file's header (cheap: no tensor data is read)."""
        for filename in self.files:
            self.file(filename)

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
