"""Key statistics as a shareable folder, and the check that they fit a model before an edit uses them.

Statistics of a large model cost GPU-hours, and they depend only on the
model, the layer and the corpus, so one person can compute them and others
reuse them (``zupatch stats push`` / ``stats pull`` / ``create --stats``; a Hub
*dataset* repo holds this folder). Layout::

    zupatch_stats.json       manifest: model, revision, architecture, dtype, hidden size,
                             token count, corpus description, and per layer its file,
                             key width, sha256 and a fingerprint of the weights it depends on
    layer-017.safetensors    one per layer: ``second_moment`` (f×f, float64) and, in the
                             metadata key ``zupatch_stats``, the cache description and token count
    README.md                the card (:func:`zupatch.hub.card.stats_card`), on the Hub only

The files are a pure function of the statistics (sorted JSON, one metadata
key, no clock), so pushing the same statistics again changes nothing. They
hold numbers only: the corpus is described by its kind, settings and a hash
of its token ids, never by its text.

Before an edit uses them, :meth:`StatsFolder.statistics_for` checks that
they fit: the architecture, the hidden size and each layer's key width, the
layer set, and the weights (a sha256 over every weight the keys of a layer
depend on, :func:`zupatch.engine.stats.weights_fingerprints`, hashed in the
dtype the statistics were computed in). Any mismatch is refused in one line
naming the model and revision the statistics were computed from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from zupatch.engine.architectures import ArchitectureSpec, down_proj_module, down_proj_weight_math
from zupatch.engine.solvers import SecondMoment
from zupatch.engine.stats import KeyStatistics, LazyKeyStatistics, stored_second_moment, weights_fingerprints
from zupatch.errors import ZupatchError
from zupatch.io import jsondoc

MANIFEST = "zupatch_stats.json"
BUNDLE_FORMAT = "zupatch-key-stats-repo/1"
METADATA_KEY = "zupatch_stats"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def layer_filename(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


@dataclass(frozen=True)
class SharedLayer:
    """One layer's entry in the manifest."""

    layer: int
    file: str
    key_width: int
    token_count: int
    sha256: str  # of the layer file
    weights: str  # weights_fingerprints(...)[layer]


@dataclass(frozen=True)
class StatsManifest:
    """What a statistics folder holds and what it was computed from (numbers and names only)."""

    model: str  # Hub repo id, or a local folder's name
    revision: str | None  # the model's commit, when it came from the Hub
    architecture: str
    model_type: str
    dtype: str  # the dtype the model ran in
    hidden_size: int
    tokens: int
    corpus: dict[str, Any]
    layers: tuple[SharedLayer, ...]

    @property
    def label(self) -> str:
        return f"{self.model}@{self.revision[:12]}" if self.revision else self.model

    @property
    def layer_numbers(self) -> list[int]:
        return [entry.layer for entry in self.layers]

    def entry(self, layer: int) -> SharedLayer:
        return next(e for e in self.layers if e.layer == layer)

    def to_json(self) -> bytes:
        document = {
            "format": BUNDLE_FORMAT,
            "model": self.model,
            "revision": self.revision,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "tokens": self.tokens,
            "corpus": self.corpus,
            "layers": [e.__dict__ for e in self.layers],
        }
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StatsManifest:
        """Parse and validate a manifest; one-line errors naming ``where``."""
        try:
            doc = jsondoc.loads(data)
        except jsondoc.JSONDocumentError as error:
            raise ZupatchError(f"{MANIFEST} is not valid JSON: {error}", where) from None
        if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
            raise ZupatchError(f"not zupatch key statistics ({MANIFEST} lacks format {BUNDLE_FORMAT!r})", where)
        try:
            layers = tuple(
                SharedLayer(int(e["layer"]), str(e["file"]), int(e["key_width"]), int(e["token_count"]),
                            str(e["sha256"]), str(e["weights"]))  # fmt: skip
                for e in doc["layers"]
            )
            manifest = cls(
                model=str(doc["model"]), revision=None if doc["revision"] is None else str(doc["revision"]),
                architecture=str(doc["architecture"]), model_type=str(doc["model_type"]), dtype=str(doc["dtype"]),
                hidden_size=int(doc["hidden_size"]), tokens=int(doc["tokens"]), corpus=dict(doc["corpus"]),
                layers=layers,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise ZupatchError(f"{MANIFEST} is malformed ({error.__class__.__name__}: {error})", where) from None
        for entry in layers:
            if entry.file != layer_filename(entry.layer):
                raise ZupatchError(f"{MANIFEST} names an unexpected file {entry.file!r}", where)
        if manifest.dtype not in _DTYPES or not layers:
            raise ZupatchError(f"{MANIFEST} is malformed (dtype {manifest.dtype!r}, {len(layers)} layers)", where)
        return manifest


def layer_bytes(statistics: KeyStatistics) -> bytes:
    """One layer's file: deterministic bytes for given statistics."""
    meta = {"description": statistics.description, "token_count": statistics.token_count}
    second_moment = statistics.second_moment.to(torch.float64).contiguous()
    return save({"second_moment": second_moment}, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def bundle_files(
    model: nn.Module,
    spec: ArchitectureSpec,
    statistics: Mapping[int, KeyStatistics],
    *,
    model_name: str,
    revision: str | None,
    corpus: dict[str, Any],
) -> tuple[StatsManifest, dict[str, bytes]]:
    """The manifest and the files (manifest + one per layer) that share ``statistics`` of ``model``."""
    layers = sorted(statistics)
    dtype = next(model.parameters()).dtype
    fingerprints = weights_fingerprints(model, spec, layers[-1])
    files: dict[str, bytes] = {}
    entries = []
    for layer in layers:
        data = layer_bytes(statistics[layer])
        files[layer_filename(layer)] = data
        entries.append(SharedLayer(layer, layer_filename(layer), int(statistics[layer].second_moment.shape[0]),
                                   statistics[layer].token_count, hashlib.sha256(data).hexdigest(),
                                   fingerprints[layer]))  # fmt: skip
    weight = down_proj_weight_math(down_proj_module(model, spec, layers[0]), spec)
    manifest = StatsManifest(
        model=model_name, revision=revision, architecture=spec.name, model_type=str(model.config.model_type),
        dtype=str(dtype).removeprefix("torch."), hidden_size=int(weight.shape[0]),
        tokens=statistics[layers[0]].token_count, corpus=corpus, layers=tuple(entries),
    )  # fmt: skip
    files[MANIFEST] = manifest.to_json()
    return manifest, files


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_mismatch(entry: SharedLayer, where: str) -> ZupatchError:
    return ZupatchError(f"{entry.file} does not match the sha256 in {MANIFEST} (damaged or changed)", where)


def _check_sha256(path: Path, entry: SharedLayer, where: str) -> None:
    """Refuse (one line) a layer file whose sha256 is not its manifest entry's."""
    if _file_sha256(path) != entry.sha256:
        raise _sha256_mismatch(entry, where)


def read_layer(path: Path, entry: SharedLayer, where: str) -> KeyStatistics:
    """One layer's statistics, checked against its manifest entry (sha256, shape, finite values)."""
    _check_sha256(path, entry, where)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[METADATA_KEY])
            second_moment = handle.get_tensor("second_moment").to(torch.float64)
    except Exception as error:  # noqa: BLE001 - a damaged file is one line
        raise ZupatchError(f"{entry.file} is not a statistics file ({error.__class__.__name__})", where) from None
    if tuple(second_moment.shape) != (entry.key_width, entry.key_width) or not torch.isfinite(second_moment).all():
        raise ZupatchError(f"{entry.file} holds a {tuple(second_moment.shape)} matrix, not a finite "
                           f"{entry.key_width}×{entry.key_width} one", where)  # fmt: skip
    return KeyStatistics(second_moment, int(meta.get("token_count", entry.token_count)), meta.get("description"))


def _listed(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers))


@dataclass(frozen=True)
class StatsFolder:
    """Shared statistics: their manifest, where they came from, and how to get a file of them.

    ``fetch(name)`` returns a local path of one of the folder's files (a Hub
    folder downloads it then, so only the layers an edit needs are fetched).
    """

    manifest: StatsManifest
    source: str  # for messages: a folder, or REPO@COMMIT
    fetch: Callable[[str], Path]

    @classmethod
    def local(cls, folder: str | Path) -> StatsFolder:
        """A folder holding a manifest (e.g. a ``stats pull`` snapshot)."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise ZupatchError(f"has no {MANIFEST}: not a folder of zupatch key statistics", folder)
        manifest = StatsManifest.from_json(manifest_path.read_bytes(), str(folder))
        return cls(manifest, str(folder), lambda name: folder / name)

    def read(self, layer: int) -> KeyStatistics:
        entry = self.manifest.entry(layer)
        return read_layer(self.fetch(entry.file), entry, self.source)

    def stored(self, layer: int) -> SecondMoment:
        """One layer's matrix, its sha256 checked now, read in blocks of rows by the solve."""
        entry = self.manifest.entry(layer)
        path = self.fetch(entry.file)
        _check_sha256(path, entry, self.source)
        moment = stored_second_moment(path, lambda metadata: METADATA_KEY in metadata,
                                      _sha256_mismatch(entry, self.source))  # fmt: skip
        if moment.size != entry.key_width:
            raise ZupatchError(f"{entry.file} holds a {moment.size}×{moment.size} matrix, not a "
                               f"{entry.key_width}×{entry.key_width} one", self.source)  # fmt: skip
        return moment

    def check(self, model: nn.Module, spec: ArchitectureSpec, layers: Sequence[int],
              model_identity: str | None = None) -> None:  # fmt: skip
        """Refuse (one line) statistics of another architecture, shape, layer set or model."""
        m = self.manifest
        needed = sorted(set(layers))
        if spec.name != m.architecture:
            raise ZupatchError(f"the statistics are of a {m.architecture} model ({m.label}), "
                               f"but this model is a {spec.name}", self.source)  # fmt: skip
        missing = [layer for layer in needed if layer not in m.layer_numbers]
        if missing:
            raise ZupatchError(f"the statistics cover layer(s) {_listed(m.layer_numbers)}, but this edit needs "
                               f"{_listed(needed)} (no statistics for {_listed(missing)}): pass --layers "
                               f"{_listed(m.layer_numbers)}, or push statistics of these layers", self.source)  # fmt: skip
        for layer in needed:
            weight = down_proj_weight_math(down_proj_module(model, spec, layer), spec)
            hidden, width = int(weight.shape[0]), int(weight.shape[1])
            if hidden != m.hidden_size or width != m.entry(layer).key_width:
                raise ZupatchError(
                    f"the statistics ({m.label}) are for hidden size {m.hidden_size} and {m.entry(layer).key_width} "
                    f"keys at layer {layer}, but this model has {hidden} and {width}: another model", self.source)
        fingerprints = weights_fingerprints(model, spec, needed[-1], _DTYPES[m.dtype])
        differing = [layer for layer in needed if fingerprints[layer] != m.entry(layer).weights]
        if differing:
            this = f", not {_short(model_identity)}" if model_identity else ""
            raise ZupatchError(
                f"the statistics were computed from {m.label}{this}: this model's weights up to layer "
                f"{differing[0]} differ (another model or revision)", self.source)

    def statistics_for(self, model: nn.Module, spec: ArchitectureSpec, layers: Sequence[int],
                       model_identity: str | None = None) -> LazyKeyStatistics:  # fmt: skip
        """The statistics of ``layers``, after :meth:`check` accepted them for ``model``.

        Each layer's file is fetched and its sha256 checked now (a damaged file is
        refused before any work); it is checked again each time the layer is asked
        for, and a solve reads its matrix a block of rows at a time (:meth:`stored`).
        """
        self.check(model, spec, layers, model_identity)
        needed = sorted(set(layers))
        for layer in needed:
            entry = self.manifest.entry(layer)
            _check_sha256(self.fetch(entry.file), entry, self.source)
        counts = {layer: self.manifest.entry(layer).token_count for layer in needed}
        return LazyKeyStatistics(self.read, counts, stored=self.stored)


def _short(identity: str) -> str:
    """``repo@commit`` with the commit cut to 12 characters."""
    name, at, revision = identity.partition("@")
    return f"{name}@{revision[:12]}" if at and revision else name
