"""A generated corpus of hostile and broken inputs (not a test module; test_hostile_corpus.py runs it).

Each *family* derives many cases mechanically from one good input, so the
corpus grows with the format instead of being listed by hand:

- ``patch-json``: the metadata document of a good patch, mutated field by
  field (every field removed, retyped, nulled, duplicated; every integer made
  5000 digits long; every string given a lone surrogate; nesting 100,000 deep
  at several places; hostile scales, versions, shapes, enums, hashes);
- ``patch-bytes``: the safetensors container of the patch (header length,
  header JSON, tensor entries, offsets, truncation);
- ``checkpoint``: the model folder (index JSON, shard names, layouts, links,
  special files, shard headers);
- ``requests``: the forget-data file of ``eval``.

A case is a name, a builder that writes the hostile input into a fresh folder
and returns the command line, and the text the one-line error must contain.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEEP = 100_000
HUGE = "9" * 5000


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    build: Callable[[Path], list[str]]  # writes inputs into the folder, returns the CLI arguments
    needle: str  # text the error line must contain (the culprit's file name)

    @property
    def id(self) -> str:
        return f"{self.family}:{self.name}"


# --------------------------------------------------------------------------- raw patch files


def read_parts(patch: Path) -> tuple[dict, dict, bytes]:
    """(safetensors header without metadata, metadata document, data bytes) of a good patch."""
    blob = patch.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["zupatch"])
    return header, meta, blob[8 + n :]


def write_patch(path: Path, header: dict, metadata_text: str, data: bytes) -> Path:
    doc = dict(header)
    doc["__metadata__"] = {"zupatch": metadata_text}
    return write_raw(path, json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass"), data)


def write_raw(path: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> Path:
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)
    return path


# --------------------------------------------------------------------------- metadata mutations


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) of a JSON document, depth first."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _set(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


REQUIRED = {"format", "format_version", "steps", "entries", "method", "name", "dtype", "shape", "kind",
            "direction", "sha256_before", "sha256_after", "scale", "U", "B", "tensor", "count", "codec",
            "index_width", "diff"}  # fmt: skip
SKIP = {"hyperparameters", "requests", "tool", "created", "tool_version", "base_model", "base_revision",
        "inverted", "rank"}  # free-form or optional provenance: any value is acceptable there  # fmt: skip


def _is_free(path: tuple) -> bool:
    return any(isinstance(k, str) and k in SKIP for k in path)


def metadata_mutations(meta: dict) -> Iterator[tuple[str, str]]:
    """(case name, metadata text) for every hostile variant of ``meta``."""
    dumps = json.dumps
    for path, value in _paths(meta):
        if not path or _is_free(path):
            continue
        label = ".".join(map(str, path))
        key = path[-1]
        if isinstance(key, str) and key in REQUIRED:
            yield f"missing-{label}", dumps(_delete(meta, path))
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            yield f"null-{label}", dumps(_set(meta, path, None))
            yield f"list-{label}", dumps(_set(meta, path, [value]))
        if isinstance(value, int) and not isinstance(value, bool):
            yield f"huge-int-{label}", _huge_at(meta, path)
            yield f"negative-{label}", dumps(_set(meta, path, -value - 1))
            yield f"bool-{label}", dumps(_set(meta, path, True))
            yield f"string-{label}", dumps(_set(meta, path, str(value)))
        if isinstance(value, str):
            yield f"int-{label}", dumps(_set(meta, path, 7))
            yield f"surrogate-{label}", dumps(_set(meta, path, value + "\ud800"))
            yield f"empty-{label}", dumps(_set(meta, path, ""))
        if isinstance(value, dict) and isinstance(key, str) and key in ("fix", "inverse_fix", "diff"):
            yield f"string-{label}", dumps(_set(meta, path, "fix"))
        if isinstance(key, str):  # the same key twice, second value different
            yield f"duplicate-{label}", _duplicate_key(meta, path)
    for where in ((), ("steps", 0), ("steps", 0, "entries", 0), ("steps", 0, "hyperparameters")):
        yield f"deep-{'.'.join(map(str, where)) or 'top'}", _deep_at(meta, where)
    e = ("steps", 0, "entries", 0)
    for scale in ("0x1p+1024", "0x0p+0", "-0x0p+0", "nan", "inf", "0x1p-1080", "zz", "0x" + "1" * 5000 + "p+0"):
        yield f"scale-{scale[:16]}", dumps(_set(meta, (*e, "scale"), scale))
    for version in (0, -5, 3, 10**6, 1.0, "1", True):
        yield f"format_version-{version!r}", dumps(_set(meta, ("format_version",), version))
    for shape in ([], [0, 4], [-1, 4], [1] * 9, [2**40, 2**40], [True, 4], [1.5, 4], "64x128"):
        yield f"shape-{json.dumps(shape)[:20]}", dumps(_set(meta, (*e, "shape"), shape))
    for field, values in {"kind": ["sparse", "LOWRANK"], "direction": ["sideways"], "dtype": ["F8_E4M3", "I32", "bf16"],
                          "sha256_before": ["0" * 63, "Z" * 64], "name": ["../x", "a/b", "", "x" * 600, "a..b"]}.items():  # fmt: skip
        for v in values:
            yield f"{field}-{v[:12]!r}", dumps(_set(meta, (*e, field), v))
    yield "steps-empty", dumps(_set(meta, ("steps",), []))
    yield "entries-empty", dumps(_set(meta, ("steps", 0, "entries"), []))
    yield "entry-twice", dumps(_set(meta, ("steps", 0, "entries"), [meta["steps"][0]["entries"][0]] * 2))
    version = f'"format_version": {meta["format_version"]}'
    yield "nan-literal", dumps(meta).replace(version, '"format_version": NaN', 1)
    yield "infinity-literal", dumps(meta).replace(version, '"format_version": Infinity', 1)
    yield "float-overflow", dumps(meta).replace(version, '"format_version": 1e999', 1)
    yield "not-an-object", "[1, 2, 3]"
    yield "not-json", "{steps: [}"
    yield "empty", ""


def _huge_at(meta: dict, path: tuple) -> str:
    marker = "__HUGE__"
    return json.dumps(_set(meta, path, marker)).replace(f'"{marker}"', HUGE)


def _duplicate_key(meta: dict, path: tuple) -> str:
    """The object at ``path[:-1]`` with key ``path[-1]`` written twice (second value a decoy)."""
    marker = "__DUP__"
    text = json.dumps(_set(meta, path, marker))
    key = json.dumps(path[-1])
    original = json.dumps(_get(meta, path))
    return text.replace(f"{key}: \"{marker}\"", f"{key}: {original}, {key}: \"decoy\"", 1)


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _deep_at(meta: dict, where: tuple) -> str:
    marker = "__DEEP__"
    target = _get(meta, where) if where else meta
    if not isinstance(target, dict):
        return json.dumps(meta)
    text = json.dumps(_set(meta, (*where, "x_deep"), marker))
    return text.replace(f'"{marker}"', "[" * DEEP + "]" * DEEP, 1)


# --------------------------------------------------------------------------- container mutations


def container_mutations(header: dict, meta: dict, data: bytes) -> Iterator[tuple[str, Callable[[Path], Path]]]:
    """(case name, writer of a hostile patch file at a path)."""
    meta_text = json.dumps(meta)
    good = dict(header)
    good["__metadata__"] = {"zupatch": meta_text}
    raw = json.dumps(good).encode()
    key = sorted(k for k in header)[0]
    yield "length-past-end", lambda p: write_raw(p, raw, data, length=len(raw) + len(data) + 100)
    yield "length-zero", lambda p: write_raw(p, raw, data, length=0)
    yield "length-2^63", lambda p: write_raw(p, raw, data, length=2**63)
    yield "only-4-bytes", lambda p: (p.write_bytes(b"\x01\x02\x03\x04"), p)[1]
    yield "empty-file", lambda p: (p.write_bytes(b""), p)[1]
    yield "truncated-data", lambda p: write_raw(p, raw, data[: len(data) // 2])
    yield "header-not-utf8", lambda p: write_raw(p, b'{"a": "\xff\xfe"}', data)
    yield "header-deep", lambda p: write_raw(p, b"[" * DEEP + b"]" * DEEP, data)
    yield "header-huge-int", lambda p: write_raw(p, raw.replace(b'"data_offsets": [0', b'"data_offsets": [' + HUGE.encode(), 1), data)
    yield "header-dup-tensor", lambda p: write_raw(
        p, raw.replace(b"{", b'{"' + key.encode() + b'": ' + json.dumps(header[key]).encode() + b", ", 1), data)
    for field, value in (("dtype", "Q7"), ("shape", [-1]), ("shape", "x"), ("data_offsets", [0, 10**12]),
                         ("data_offsets", [5, 1]), ("data_offsets", [0]), ("data_offsets", None)):  # fmt: skip
        def bad(p: Path, field: str = field, value: Any = value) -> Path:
            h = copy.deepcopy(header)
            h[key][field] = value
            return write_patch(p, h, meta_text, data)

        yield f"tensor-{field}-{json.dumps(value)[:16]}", bad

    def overlap(p: Path) -> Path:
        h = copy.deepcopy(header)
        keys = sorted(h, key=lambda k: h[k]["data_offsets"][0])
        a, b = keys[0], keys[1]
        size = h[a]["data_offsets"][1] - h[a]["data_offsets"][0]
        if h[b]["data_offsets"][1] - h[b]["data_offsets"][0] == size and h[a]["dtype"] == h[b]["dtype"]:
            h[b] = dict(h[b], data_offsets=h[a]["data_offsets"], shape=h[a]["shape"])
        else:
            h[b] = dict(h[b], data_offsets=[0, h[b]["data_offsets"][1] - h[b]["data_offsets"][0]])
        return write_patch(p, h, meta_text, data)

    yield "tensors-overlap", overlap
    yield "metadata-not-string", lambda p: write_raw(p, json.dumps({**header, "__metadata__": {"zupatch": 5}}).encode(), data)
    yield "metadata-missing", lambda p: write_raw(p, json.dumps(header).encode(), data)

    def extra_tensor(p: Path) -> Path:
        h = copy.deepcopy(header)
        end = max(v["data_offsets"][1] for v in h.values())
        h["stowaway"] = {"dtype": "U8", "shape": [4], "data_offsets": [end, end + 4]}
        return write_patch(p, h, meta_text, data + b"evil")

    yield "unreferenced-tensor", extra_tensor


# --------------------------------------------------------------------------- checkpoint folders


WEIGHTS = ("apply", "verify", "inspect")  # commands that read the weights
COPIES = ("apply",)  # commands that read every file of the folder (verify and inspect read only weights)


def checkpoint_mutations(base: Path) -> Iterator[tuple[str, Callable[[Path], Path], str, tuple[str, ...]]]:
    """(case name, builder of a hostile model folder inside a folder, needle, commands that must refuse it)."""

    def sharded(tmp: Path) -> Path:
        folder = tmp / "model"
        shutil.copytree(base, folder, symlinks=True)
        return folder

    def with_index(text: str | bytes) -> Callable[[Path], Path]:
        def build(tmp: Path) -> Path:
            folder = sharded(tmp)
            data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
            (folder / "model.safetensors.index.json").write_bytes(data)
            return folder

        return build

    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    idx = "model.safetensors.index.json"
    yield "index-not-json", with_index("{weight_map: }"), idx, WEIGHTS
    yield "index-deep", with_index("[" * DEEP + "]" * DEEP), idx, WEIGHTS
    yield "index-huge-int", with_index(json.dumps(index)[:-1] + f', "x": {HUGE}}}'), idx, WEIGHTS
    yield "index-dup-key", with_index(json.dumps(index).replace('"weight_map": {', f'"weight_map": {{"{first}": "{shard}", ', 1)), idx, WEIGHTS
    yield "index-surrogate", with_index(json.dumps({**index, "metadata": {"x": "\ud800"}}, ensure_ascii=True)), idx, WEIGHTS
    yield "index-not-utf8", with_index(b"\xff\xfe{}"), idx, WEIGHTS
    yield "index-list", with_index("[]"), idx, WEIGHTS
    yield "index-no-map", with_index("{}"), idx, WEIGHTS
    yield "index-map-empty", with_index('{"weight_map": {}}'), idx, WEIGHTS
    for name in ("../outside.safetensors", "/etc/passwd", "a/../../b.safetensors", "x\\..\\y", "nul\u0000.safetensors", ""):
        yield f"index-shard-{name[:10]!r}", with_index(json.dumps({"weight_map": {**index["weight_map"], first: name}})), idx, WEIGHTS
    yield "index-shard-missing", with_index(json.dumps({"weight_map": {**index["weight_map"], first: "gone.safetensors"}})), idx, WEIGHTS

    def both(tmp: Path) -> Path:
        folder = sharded(tmp)
        shutil.copy(folder / shard, folder / "model.safetensors")
        return folder

    yield "both-layouts", both, "model.safetensors.index.json", WEIGHTS

    def link(target: Callable[[Path], str]) -> Callable[[Path], Path]:
        def build(tmp: Path) -> Path:
            folder = sharded(tmp)
            (tmp / "secret.txt").write_text("hunter2")
            (folder / "notes.txt").symlink_to(target(tmp))
            return folder

        return build

    yield "link-secret", link(lambda t: str(t / "secret.txt")), "notes.txt", COPIES
    yield "link-dev-zero", link(lambda t: "/dev/zero"), "notes.txt", COPIES
    yield "link-dangling", link(lambda t: str(t / "missing")), "notes.txt", COPIES
    yield "link-folder", link(lambda t: str(t)), "notes.txt", COPIES
    yield "link-self", link(lambda t: str(t / "model" / "notes.txt")), "notes.txt", COPIES

    def shard_link(tmp: Path) -> Path:
        folder = sharded(tmp)
        outside = tmp / "outside.safetensors"
        shutil.move(folder / shard, outside)
        (folder / shard).symlink_to(outside)
        return folder

    yield "shard-link-outside", shard_link, shard, WEIGHTS

    def fifo(tmp: Path) -> Path:
        folder = sharded(tmp)
        os.mkfifo(folder / "pipe.txt")
        return folder

    yield "fifo", fifo, "pipe.txt", COPIES

    def shard_bytes(mutate: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
        def build(tmp: Path) -> Path:
            folder = sharded(tmp)
            path = folder / shard
            blob = path.read_bytes()
            path.unlink()
            path.write_bytes(mutate(blob))
            return folder

        return build

    def header_of(blob: bytes) -> tuple[int, bytes]:
        (n,) = struct.unpack("<Q", blob[:8])
        return n, blob[8 : 8 + n]

    yield "shard-truncated", shard_bytes(lambda b: b[: len(b) // 2]), shard, WEIGHTS
    yield "shard-empty", shard_bytes(lambda b: b""), shard, WEIGHTS
    yield "shard-length-lie", shard_bytes(lambda b: struct.pack("<Q", 2**40) + b[8:]), shard, WEIGHTS
    yield "shard-header-deep", shard_bytes(lambda b: _rewrite_header(b, b"[" * DEEP + b"]" * DEEP)), shard, WEIGHTS
    yield "shard-header-dup", shard_bytes(lambda b: _rewrite_header(b, _dup_first(header_of(b)[1]))), shard, WEIGHTS
    yield "shard-header-huge-int", shard_bytes(lambda b: _rewrite_header(
        b, header_of(b)[1].replace(b'"data_offsets":[0', b'"data_offsets":[' + HUGE.encode(), 1))), shard, WEIGHTS

    def dup_across(tmp: Path) -> Path:
        from safetensors.torch import load_file, save_file

        folder = sharded(tmp)
        other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
        tensors = load_file(folder / other)
        tensors[first] = load_file(folder / shard)[first]
        (folder / other).unlink()
        save_file(tensors, folder / other, metadata={"format": "pt"})
        return folder

    yield "tensor-in-two-shards", dup_across, "stored in both", WEIGHTS


def _rewrite_header(blob: bytes, header: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def _dup_first(header: bytes) -> bytes:
    doc = json.loads(header)
    key = next(k for k in doc if k != "__metadata__")
    return header.replace(b"{", b"{" + json.dumps(key).encode() + b":" + json.dumps(doc[key]).encode() + b",", 1)


# --------------------------------------------------------------------------- eval's forget data


def request_mutations() -> Iterator[tuple[str, str]]:
    good = {"prompt": "The capital of {} is", "subject": "France", "target": "Paris"}
    line = json.dumps(good)
    yield "deep", "[" * DEEP + "]" * DEEP
    yield "deep-line", line + "\n" + "[" * DEEP + "]" * DEEP
    yield "huge-int", line + "\n" + line[:-1] + f', "n": {HUGE}}}'
    yield "dup-key", '{"prompt": "a {}", "subject": "b", "target": "c", "target": "d"}'
    yield "surrogate-target", json.dumps({**good, "target": "Par\ud800is"})
    yield "surrogate-key", json.dumps({**good, "\udc00": 1})
    yield "nan", line[:-1] + ', "n": NaN}'
    yield "not-object", "[1, 2]\n"
    yield "string-record", '"just a string"'
    yield "no-target", json.dumps({"prompt": "a {}", "subject": "b"})
    yield "prompt-number", json.dumps({**good, "prompt": 5})
    yield "subject-list", json.dumps({**good, "subject": ["France"]})
    yield "list-deep", "[" + "[" * DEEP + "]" * DEEP + "]"
    yield "list-huge-int", f"[{HUGE}]"
    yield "malformed", line + "\n{\"prompt\": \n"
    yield "empty-file", ""
    yield "not-utf8", "\udcff"  # written with surrogateescape: one 0xFF byte
