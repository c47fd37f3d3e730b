"""Key statistics ``C = E[k kᵀ]`` of the edited down projections, and their cache.

``k`` is the input of a layer's MLP down projection at one token. ``C`` (f×f,
uncentred second moment, averaged over all non-padding tokens of a retain
corpus) tells the solver which key directions the model uses, so the edit
leaves them alone.

One forward pass serves every edited layer: hooks on the down projections
accumulate ``kᵀk`` in float64 and a hook on the last edited layer stops the
pass (nothing after it is needed).

Under ``torchrun`` (:mod:`zupatch.engine.distributed`) each rank runs every
``world_size``-th batch of the same batches one process would run, the sums
are added with an all-reduce in float64, and rank 0 writes the cache under
the same key: the result equals the single-process one up to the order of
the float64 additions (docs/create.md, "Statistics on several processes").

Corpora:

* :class:`FileCorpus` - text files (whole file = one document), JSONL with a
  ``text`` field, a folder of those, or a ``datasets`` folder saved with
  ``save_to_disk`` (only when ``datasets`` is installed);
* :class:`TextCorpus` - texts in memory;
* :class:`SampledCorpus` - the data-free default: text sampled from the model
  itself, batched, from its document-start token (:func:`document_start_ids`),
  temperature 1, top-k 50, each batch from its own seed (so ranks can sample
  different batches and together get the single-process sample). It needs no
  data and matches the model's own distribution, but costs a generation pass
  (about as many forward steps as tokens per sample, batched), and alone it
  does not protect facts near the forgotten ones: ``create`` adds keys of
  similar subjects for that (docs/create.md, "Specific without a retain file").

:class:`StatsCache` keeps finished statistics on disk under a key naming
everything they depend on. It stores numbers only, never text.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zupatch.engine.architectures import ArchitectureSpec, decoder_layers, down_proj_module, down_proj_weight_math
from zupatch.engine.distributed import Ranks
from zupatch.engine.hooks import on_inputs, run_until_stopped
from zupatch.engine.placement import model_device, readable
from zupatch.engine.solvers import SecondMoment
from zupatch.errors import ZupatchError
from zupatch.io import jsondoc
from zupatch.io.safetensors_file import SafetensorsFile

#: ``progress(phase, done, total)``; library code reports through it and never prints.
ProgressCallback = Callable[[str, int, int], None]

STATS_FORMAT = "zupatch-key-stats/1"
_TEXT_SUFFIXES = {".txt", ".md", ".text"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass(frozen=True)
class StatsConfig:
    """How much text to read and how to batch it.

    ``token_budget``: non-padding tokens to average over (a 3-layer edit of an
    f=1536 model wants several times f). Self-sampling costs a generation
    pass, so its default budget is smaller (``sampled_token_budget``).
    """

    token_budget: int = 65_536
    max_length: int = 256
    batch_size: int = 8
    sampled_token_budget: int = 16_384
    sample_length: int = 128
    sample_batch_size: int = 64
    sample_top_k: int = 50
    sample_temperature: float = 1.0
    seed: int = 0


@dataclass
class KeyStatistics:
    """``second_moment`` = E[k kᵀ] (f×f, float64, symmetric) over ``token_count`` tokens.

    ``description`` is what names them in the cache (:func:`describe_statistics`),
    when they went through one.
    """

    second_moment: torch.Tensor
    token_count: int
    description: dict | None = None


@dataclass
class TokenWindows:
    """Token-id sequences to run, with a fingerprint of what they are."""

    windows: list[list[int]]
    fingerprint: str
    kind: str

    @property
    def token_count(self) -> int:
        return sum(len(w) for w in self.windows)


class Corpus(Protocol):
    """A source of token windows for the statistics pass."""

    def windows(self, model: nn.Module, tokenizer: Any, config: StatsConfig) -> TokenWindows: ...


# --------------------------------------------------------------------------- corpora


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before any text (BOS), found by asking it."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def _hash_windows(windows: Sequence[Sequence[int]], extra: dict) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for window in windows:
        digest.update(torch.tensor(window, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _windows_from_texts(texts: Iterable[str], tokenizer: Any, budget: int, max_length: int) -> list[list[int]]:
    """Tokenize documents (BOS + text) and cut them into windows of max_length tokens."""
    prefix = special_prefix_ids(tokenizer)
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        if not text or not text.strip():
            continue
        ids = prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length][: budget - total]
            if len(window) < 2 and start > 0:
                continue
            windows.append(window)
            total += len(window)
            if total >= budget:
                return windows
    return windows


@dataclass(frozen=True)
class TextCorpus:
    """Texts held in memory (tests, retain prompts)."""

    texts: tuple[str, ...]

    def windows(self, model: nn.Module, tokenizer: Any, config: StatsConfig) -> TokenWindows:
        windows = _windows_from_texts(self.texts, tokenizer, config.token_budget, config.max_length)
        if not windows:
            raise ZupatchError("the corpus has no text")
        extra = {"kind": "text", "max_length": config.max_length}
        return TokenWindows(windows, _hash_windows(windows, extra), "text")


@dataclass(frozen=True)
class FileCorpus:
    """Text from files: ``.txt``/``.md`` (one document each), ``.jsonl`` (a text field
    per line), or folders of them; a folder saved by ``datasets.save_to_disk``
    is read with ``datasets`` when it is installed."""

    paths: tuple[Path, ...]
    text_field: str = "text"

    def texts(self) -> Iterator[str]:
        for path in self.paths:
            path = Path(path)
            if not path.exists():
                raise ZupatchError("corpus path not found", path)
            if path.is_dir() and _is_datasets_folder(path):
                yield from _datasets_texts(path, self.text_field)
            elif path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES | _JSONL_SUFFIXES)
                if not files:
                    raise ZupatchError("no .txt/.md/.jsonl files in corpus folder", path)
                for file in files:
                    yield from self._file_texts(file)
            else:
                yield from self._file_texts(path)

    def _file_texts(self, path: Path) -> Iterator[str]:
        if path.suffix in _JSONL_SUFFIXES:
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = jsondoc.loads(line)
                    except jsondoc.JSONDocumentError as error:
                        raise ZupatchError(str(error), f"{path}:{number}") from None
                    text = record.get(self.text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ZupatchError(f"no string field {self.text_field!r}", f"{path}:{number}")
                    yield text
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ZupatchError(f"cannot read corpus file: {error}", path) from None

    def windows(self, model: nn.Module, tokenizer: Any, config: StatsConfig) -> TokenWindows:
        windows = _windows_from_texts(self.texts(), tokenizer, config.token_budget, config.max_length)
        if not windows:
            raise ZupatchError("the corpus has no text", self.paths[0] if self.paths else None)
        # Fingerprinting the token ids actually used covers content, tokenizer and budget.
        extra = {"kind": "files", "max_length": config.max_length}
        return TokenWindows(windows, _hash_windows(windows, extra), "files")


def _is_datasets_folder(path: Path) -> bool:
    return (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def _datasets_texts(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for folders saved with save_to_disk
    except ImportError:
        raise ZupatchError("this is a `datasets` folder; install `datasets` to read it", path) from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else data[next(iter(data))]
    if field not in data.column_names:
        raise ZupatchError(f"dataset has no column {field!r} (columns: {', '.join(data.column_names)})", path)
    yield from data[field]


@dataclass(frozen=True)
class SampledCorpus:
    """Data-free corpus: batched samples from the model, starting at its BOS token."""

    def description(self, tokenizer: Any, config: StatsConfig) -> dict:
        return {
            "kind": "self-sampled",
            "start_token": start_token_id(tokenizer),
            "seed": config.seed,
            "top_k": config.sample_top_k,
            "temperature": config.sample_temperature,
            "sample_length": config.sample_length,
            "sample_batch_size": config.sample_batch_size,
            "tokens": config.sampled_token_budget,
            "seeding": "per-batch",  # batch b is drawn from batch_seed(seed, b)
        }

    def fingerprint(self, tokenizer: Any, config: StatsConfig) -> str:
        """Names the sample without drawing it (the model is named by the cache key)."""
        text = json.dumps(self.description(tokenizer, config), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def windows(self, model: nn.Module, tokenizer: Any, config: StatsConfig) -> TokenWindows:
        windows = sample_windows(model, tokenizer, config)
        return TokenWindows(windows, self.fingerprint(tokenizer, config), "self-sampled")


#: The document separator of GPT-2-style vocabularies (GPT-2, SmolLM, Qwen, GPT-NeoX).
_DOCUMENT_SEPARATOR = "<|endoftext|>"


def document_start_ids(tokenizer: Any) -> list[int]:
    """Tokens a fresh document starts with, for generating text from nothing.

    The tokenizer's own prefix (BOS) if it adds one; else ``<|endoftext|>``
    when the vocabulary has it (instruct models such as SmolLM2 declare a chat
    token as BOS, from which they generate junk); else BOS, else EOS.
    """
    prefix = special_prefix_ids(tokenizer)
    if prefix:
        return prefix
    separator = tokenizer.get_vocab().get(_DOCUMENT_SEPARATOR)
    if separator is not None:
        return [int(separator)]
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def start_token_id(tokenizer: Any) -> int:
    """The single token self-sampled documents start from (see :func:`document_start_ids`)."""
    start = document_start_ids(tokenizer)
    if not start:
        raise ZupatchError("the tokenizer has neither a BOS nor an EOS token; pass --corpus")
    return start[-1]


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sample batch ``batch``: any rank can draw any batch on its own.

    Batch 0 draws from ``seed`` itself, so a sample that fits in one batch is
    the one earlier versions drew; later batches from a hash of both.
    """
    if batch == 0:
        return seed
    digest = hashlib.sha256(f"zupatch-sample|{seed}|{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_windows(
    model: nn.Module,
    tokenizer: Any,
    config: StatsConfig,
    progress: ProgressCallback | None = None,
    ranks: Ranks = Ranks(),
) -> list[list[int]]:
    """Sample ``sampled_token_budget`` tokens from the model (batched, seeded per batch).

    Each sample runs from the start token to its first EOS (inclusive) or
    ``sample_length`` new tokens. Batch ``b`` is drawn from
    :func:`batch_seed` ``(seed, b)``; with several ranks, rank ``r`` draws
    batches ``r, r + world_size, ...`` and the batches are gathered in order,
    so every rank returns the windows one process would (on the same kind of
    device). The global RNG state is left untouched.
    """
    from transformers import GenerationConfig

    device = model_device(model)
    start = start_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    generation = GenerationConfig(
        do_sample=True,
        temperature=config.sample_temperature,
        top_k=config.sample_top_k,
        top_p=1.0,
        max_new_tokens=config.sample_length,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=eos,
        bos_token_id=start,
    )
    windows: list[list[int]] = []
    total = 0
    budget = config.sampled_token_budget
    fork_devices = [device] if device.type == "cuda" else []
    rounds = 0
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        while total < budget:
            torch.manual_seed(batch_seed(config.seed, rounds * ranks.world_size + ranks.rank))
            prompt = torch.full((config.sample_batch_size, 1), start, dtype=torch.long, device=device)
            done = total
            output = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=generation,
                stopping_criteria=_sampling_progress(progress, done, budget, ranks.world_size),
            )
            rows = [_until_eos(row, eos) for row in output.tolist()]
            rounds += 1
            for batch in ranks.all_gather_object(rows):  # batches in order
                for row in batch:
                    window = row[: budget - total]
                    windows.append(window)
                    total += len(window)
                    if total >= budget:
                        break
                if total >= budget:
                    break
            if progress:
                progress("sampling corpus", min(total, budget), budget)
    return windows


def _sampling_progress(progress: ProgressCallback | None, done: int, budget: int, world_size: int) -> list:
    """A stopping criterion that never stops and reports tokens as they are generated.

    One ``generate`` call can hold the whole budget (64 samples of 128 tokens),
    so reporting per call left the bar empty until the end; this reports every
    step (an estimate until the batch's samples are cut at their EOS).
    """
    if progress is None:
        return []
    from transformers import StoppingCriteria

    class _Report(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            generated = (input_ids.shape[1] - 1) * input_ids.shape[0] * world_size
            progress("sampling corpus", min(done + generated, budget), budget)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return [_Report()]


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    """A sample up to and including its first EOS after the start token."""
    if eos is not None and eos in row[1:]:
        return row[: row.index(eos, 1) + 1]
    return row


# --------------------------------------------------------------------------- collection


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and their attention mask (1 = real token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else EOS, else 0 (padding is masked out anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def collect_key_statistics(
    model: nn.Module,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    windows: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    stop_early: bool = True,
    progress: ProgressCallback | None = None,
    ranks: Ranks = Ranks(),
) -> dict[int, KeyStatistics]:
    """E[k kᵀ] of each layer's down-proj input over the non-padding tokens of ``windows``.

    Sums are float64. On CPU the per-batch products are float64 too; on an
    accelerator they are float32 (fast there) and summed in float64.

    With several ``ranks`` (each holding the same ``windows``), rank ``r``
    runs batches ``r, r + world_size, ...`` of the batches one process would
    run, so every batch and its product are the same as in one process; the
    float64 sums and the token count are then added across ranks. Only the
    order of the float64 additions differs from one process.
    """
    if not windows:
        raise ZupatchError("no tokens to collect statistics from")
    layers = sorted(set(layers))
    device = model_device(model)
    product_dtype = torch.float64 if device.type == "cpu" else torch.float32
    modules = {layer: down_proj_module(model, spec, layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    token_mask: torch.Tensor | None = None

    def accumulate(layer: int, keys: torch.Tensor) -> None:
        selected = keys[token_mask].to(product_dtype)  # (tokens, f): padding dropped
        product = (selected.T @ selected).to(torch.float64)
        if layer in sums:
            sums[layer] += product
        else:
            sums[layer] = product

    total_tokens = sum(len(w) for w in windows)
    starts = range(0, len(windows), batch_size)[ranks.rank :: ranks.world_size]  # this rank's shard
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), on_inputs(modules, accumulate, stop_at=layers[-1] if stop_early else None):
            for start in starts:
                ids, mask = pad_right(windows[start : start + batch_size], pad_id, device)
                token_mask = mask.bool()
                run_until_stopped(partial(model, input_ids=ids, attention_mask=mask, use_cache=False))
                count += int(mask.sum())
                if progress:
                    progress("key statistics", min(count * ranks.world_size, total_tokens), total_tokens)
    finally:
        model.train(was_training)
    if ranks.distributed:
        for layer in layers:  # a rank with no batch adds zeros
            if layer not in sums:
                width = down_proj_weight_math(modules[layer], spec).shape[1]
                sums[layer] = torch.zeros(width, width, dtype=torch.float64, device=device)
            ranks.all_reduce_sum(sums[layer])  # in place: no second f×f copy per layer
        counted = torch.tensor([count], dtype=torch.float64, device=device)
        count = int(ranks.all_reduce_sum(counted).item())
    result = {}
    for layer in layers:
        second_moment = sums[layer].cpu() / count
        result[layer] = KeyStatistics((second_moment + second_moment.T) / 2, count)
    return result


# --------------------------------------------------------------------------- identity


def _tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> memoryview:
    """The tensor's bytes for hashing: a view of its memory where it is a contiguous CPU tensor
    of that dtype (no copy: the embedding of a 1B model is 1 GB), else of a converted copy."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    if dtype is not None and flat.dtype != dtype:
        flat = flat.to(dtype)
    return memoryview(flat.view(torch.uint8).numpy())


def weights_fingerprints(
    model: nn.Module, spec: ArchitectureSpec, up_to_layer: int, dtype: torch.dtype | None = None
) -> list[str]:
    """Per layer l <= up_to_layer, a sha256 of every weight the keys of layer l depend on.

    That is all parameters outside the decoder layers (embeddings, ...) and
    those of layers 0..l, chained so one pass hashes each weight once.
    ``dtype``: hash the weights as if cast to it (one tensor at a time), so a
    bfloat16 checkpoint loaded in float32 hashes as the bfloat16 it is.
    """
    layers = decoder_layers(model, spec)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    digest = hashlib.sha256(f"{spec.name}|{model.config.model_type}".encode())
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in in_layers or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        digest.update(f"{name}|{dtype or parameter.dtype}|{tuple(parameter.shape)}".encode())
        with readable(model, name, parameter) as values:  # a device map may have offloaded the head
            digest.update(_tensor_bytes(values, dtype))
    fingerprints = []
    for index in range(up_to_layer + 1):
        for name, parameter in layers[index].named_parameters():
            digest.update(f"{index}.{name}|{dtype or parameter.dtype}|{tuple(parameter.shape)}".encode())
            with readable(layers[index], name, parameter) as values:
                digest.update(_tensor_bytes(values, dtype))
        fingerprints.append(digest.copy().hexdigest())
    return fingerprints


# --------------------------------------------------------------------------- cache


def default_stats_cache_root() -> Path:
    """``stats`` in zupatch's cache folder (``$ZUPATCH_CACHE``, else ``~/.cache/zupatch``)."""
    from zupatch.models.smollm2 import default_cache_dir

    return default_cache_dir() / "stats"


@dataclass
class CacheEntry:
    path: Path
    description: dict
    size_bytes: int


class StatsCache:
    """Key statistics on disk: one safetensors file per (model, layer, corpus, ...).

    The file name is the sha256 of the describing JSON, which is also stored in
    the file's metadata (checked on load, listed by :meth:`entries`).
    """

    METADATA_KEY = "zupatch_stats"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_stats_cache_root()

    @staticmethod
    def key(description: dict) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def path_for(self, description: dict) -> Path:
        return self.root / f"{self.key(description)}.safetensors"

    def load(self, description: dict) -> KeyStatistics | None:
        return self._read(description, matrix=True)

    def token_count(self, description: dict) -> int | None:
        """The token count of the entry ``description`` names, reading only the file's header
        (not its f×f matrix); None where :meth:`load` would miss."""
        found = self._read(description, matrix=False)
        return found.token_count if found is not None else None

    def _read(self, description: dict, matrix: bool) -> KeyStatistics | None:
        path = self.path_for(description)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = json.loads(handle.metadata()[self.METADATA_KEY])
                if stored != description or "second_moment" not in handle.keys():
                    return None
                second_moment = handle.get_tensor("second_moment") if matrix else torch.empty(0)
                token_count = int(handle.metadata()["token_count"])
        except Exception:  # a damaged cache file is a miss, not an error
            return None
        return KeyStatistics(second_moment, token_count, description)

    def stored(self, description: dict, changed: ZupatchError) -> SecondMoment:
        """The matrix of the entry ``description`` names, left in its file and read in
        blocks of rows when used (:class:`~zupatch.engine.solvers.SecondMoment`);
        ``changed`` is raised, now or then, where :meth:`load` would miss."""
        key = json.dumps(description, sort_keys=True)
        return stored_second_moment(
            self.path_for(description), lambda metadata: metadata.get(self.METADATA_KEY) == key, changed
        )

    def store(self, description: dict, statistics: KeyStatistics) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(description)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        metadata = {
            self.METADATA_KEY: json.dumps(description, sort_keys=True),
            "token_count": str(statistics.token_count),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_file({"second_moment": statistics.second_moment.contiguous()}, str(temporary), metadata=metadata)
        os.replace(temporary, path)
        return path

    def entries(self) -> list[CacheEntry]:
        entries = []
        for path in sorted(self.root.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                description = json.loads(metadata[self.METADATA_KEY])
                description["token_count"] = int(metadata.get("token_count", 0))
            except Exception:
                description = {"error": "unreadable"}
            entries.append(CacheEntry(path, description, path.stat().st_size))
        return entries

    def clear(self) -> int:
        """Delete every cached statistics file; returns how many were removed."""
        removed = 0
        for path in list(self.root.glob("*.safetensors")) + list(self.root.glob("*.tmp*")):
            path.unlink(missing_ok=True)
            removed += 1
        return removed


#: Statistics files' float dtypes, as numpy reads them.
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32}


def stored_second_moment(path: Path, accept: Callable[[dict[str, str]], bool], changed: ZupatchError) -> SecondMoment:
    """The ``second_moment`` (f×f) of a statistics file as a
    :class:`~zupatch.engine.solvers.SecondMoment` that reads rows from the file
    when the solve asks for them, so the f×f matrix is never held whole.

    ``accept(metadata)`` says whether the file is still the one meant; a file
    that is not, or that is gone or cut short by the time rows are read,
    raises ``changed``.
    """
    try:
        handle = SafetensorsFile(path)
    except (OSError, ZupatchError):
        raise changed from None
    info = handle.tensors.get("second_moment")
    if (info is None or info.dtype not in _FLOAT_DTYPES or len(info.shape) != 2
            or info.shape[0] != info.shape[1] or not accept(handle.metadata)):  # fmt: skip
        raise changed
    dtype = _FLOAT_DTYPES[info.dtype]

    def read(start: int, stop: int) -> torch.Tensor:
        try:
            return torch.from_numpy(handle.read_rows("second_moment", start, stop, dtype))
        except (OSError, ZupatchError):
            raise changed from None

    return SecondMoment(info.shape[0], read)


class LazyKeyStatistics(Mapping[int, KeyStatistics]):
    """Key statistics by layer, read (``read(layer)``) each time a layer is asked for.

    Nothing f×f is held: ``statistics[layer]`` returns a fresh
    :class:`KeyStatistics`, freed as soon as the caller drops it, and with
    ``stored`` :meth:`second_moment` reads a layer's matrix from its file a
    block of rows at a time as the solve uses it, so ``create`` never holds
    one whole (on a 1B-shaped model 32 MiB at a time instead of 512 MiB).
    ``in``, ``len``, iteration and :meth:`token_count` read nothing.
    Statistics already in memory can be held here too (``held``); they are
    returned as they are.
    """

    def __init__(self, read: Callable[[int], KeyStatistics], token_counts: Mapping[int, int],
                 held: Mapping[int, KeyStatistics] | None = None,
                 stored: Callable[[int], SecondMoment] | None = None):  # fmt: skip
        self._read = read
        self._token_counts = dict(token_counts)
        self._held = dict(held or {})
        self._stored = stored

    def __getitem__(self, layer: int) -> KeyStatistics:
        if layer in self._held:
            return self._held[layer]
        if layer not in self._token_counts:
            raise KeyError(layer)
        return self._read(layer)

    def __contains__(self, layer: object) -> bool:
        return layer in self._held or layer in self._token_counts

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._held, *self._token_counts}))

    def __len__(self) -> int:
        return len({*self._held, *self._token_counts})

    def second_moment(self, layer: int) -> SecondMoment:
        """``layer``'s matrix for a solve: read from its file in blocks of rows as the
        solve goes (with ``stored``), else whole; held statistics as they are."""
        if layer not in self._held and layer in self._token_counts and self._stored is not None:
            return self._stored(layer)
        return SecondMoment.of(self[layer].second_moment)

    def token_count(self, layer: int) -> int:
        """The number of tokens behind ``layer``'s statistics, without reading its matrix."""
        return self._held[layer].token_count if layer in self._held else self._token_counts[layer]


class CachedKeyStatistics(LazyKeyStatistics):
    """:class:`LazyKeyStatistics` read from a :class:`StatsCache` (``descriptions``: each layer's key)."""

    def __init__(self, cache: StatsCache, descriptions: Mapping[int, dict], token_counts: Mapping[int, int],
                 held: Mapping[int, KeyStatistics] | None = None):  # fmt: skip
        self.cache = cache
        self._descriptions = {layer: descriptions[layer] for layer in token_counts}
        super().__init__(self._load, token_counts, held, self._stored_rows)

    def _changed(self, layer: int) -> ZupatchError:
        return ZupatchError(f"the cached key statistics of layer {layer} were removed or changed while in use; "
                            "run again", self.cache.path_for(self._descriptions[layer]))  # fmt: skip

    def _load(self, layer: int) -> KeyStatistics:
        loaded = self.cache.load(self._descriptions[layer])
        if loaded is None:
            raise self._changed(layer)
        return loaded

    def _stored_rows(self, layer: int) -> SecondMoment:
        return self.cache.stored(self._descriptions[layer], self._changed(layer))


def describe_statistics(
    model_identity: str,
    spec: ArchitectureSpec,
    layer: int,
    corpus_fingerprint: str,
    config: StatsConfig,
    token_budget: int,
    dtype: torch.dtype,
) -> dict:
    """The JSON that names one layer's statistics (the cache key's content)."""
    return {
        "format": STATS_FORMAT,
        "model": model_identity,
        "architecture": spec.name,
        "module": f"{spec.layers_path}.{layer}.{spec.down_proj}",
        "layer": layer,
        "corpus": corpus_fingerprint,
        "tokens": token_budget,
        "max_length": config.max_length,
        "dtype": str(dtype).removeprefix("torch."),
    }


def compute_key_statistics(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchitectureSpec,
    layers: Sequence[int],
    corpus: Corpus | None = None,
    config: StatsConfig = StatsConfig(),
    cache: StatsCache | None = None,
    model_identity: str | None = None,
    progress: ProgressCallback | None = None,
    ranks: Ranks = Ranks(),
    *,
    lazy: bool = False,
) -> dict[int, KeyStatistics] | CachedKeyStatistics:
    """Statistics for ``layers`` from ``corpus`` (default: self-sampled), using ``cache``.

    ``model_identity`` (e.g. ``"repo-id@revision"``) names the model in the
    cache key; without it, the weights the keys depend on are hashed.
    Layers already in the cache are not recomputed; the rest share one pass.

    ``lazy`` (with a ``cache``, on rank 0): return a
    :class:`CachedKeyStatistics` that reads each layer's matrix from the cache
    when it is asked for, instead of a dict holding every layer's f×f matrix;
    the layers computed here are written to the cache and dropped. The
    matrices read are the bits the dict would hold.

    Called on every rank of a process group (``ranks``), the ranks share the
    sampling and the pass (:func:`collect_key_statistics`); rank 0 decides
    which layers the cache lacks and alone writes them, under the key one
    process would use. The other ranks return only the layers computed.
    """
    corpus = corpus if corpus is not None else SampledCorpus()
    layers = sorted(set(layers))
    sampled = isinstance(corpus, SampledCorpus)
    budget = config.sampled_token_budget if sampled else config.token_budget
    dtype = next(model.parameters()).dtype
    windows: TokenWindows | None = None
    descriptions: dict[int, dict] = {}
    results: dict[int, KeyStatistics] = {}
    token_counts: dict[int, int] = {}  # lazy: the cached layers, not read yet
    if cache is not None and ranks.is_main:  # only rank 0 reads and writes the cache
        if sampled:
            fingerprint = corpus.fingerprint(tokenizer, config)
        else:
            windows = corpus.windows(model, tokenizer, config)
            fingerprint = windows.fingerprint
        identities = (
            {layer: model_identity for layer in layers}
            if model_identity
            else dict(enumerate(weights_fingerprints(model, spec, layers[-1])))
        )
        for layer in layers:
            descriptions[layer] = describe_statistics(
                identities[layer], spec, layer, fingerprint, config, budget, dtype
            )
            if lazy:
                tokens = cache.token_count(descriptions[layer])
                if tokens is not None:
                    token_counts[layer] = tokens
                continue
            hit = cache.load(descriptions[layer])
            if hit is not None:
                results[layer] = hit
    lazy = lazy and cache is not None and ranks.is_main
    missing = ranks.broadcast_object([layer for layer in layers if layer not in results and layer not in token_counts])
    if not missing:
        return CachedKeyStatistics(cache, descriptions, token_counts) if lazy else results
    if windows is None:
        windows = (
            TokenWindows(sample_windows(model, tokenizer, config, progress, ranks), "", "self-sampled")
            if sampled
            else corpus.windows(model, tokenizer, config)
        )
    computed = collect_key_statistics(
        model, spec, missing, windows.windows, config.batch_size, pad_token_id(tokenizer), progress=progress,
        ranks=ranks,
    )  # fmt: skip
    for layer in list(computed):
        statistics = computed[layer]
        if cache is not None and ranks.is_main:
            statistics.description = descriptions[layer]
            cache.store(descriptions[layer], statistics)
        if lazy:  # read back from the file when the layer is solved
            token_counts[layer] = statistics.token_count
            del computed[layer], statistics
        else:
            results[layer] = statistics
    return CachedKeyStatistics(cache, descriptions, token_counts) if lazy else results
