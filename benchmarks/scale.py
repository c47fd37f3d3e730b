"""Scale benchmark: key-statistics throughput, create time and peak memory on a big random-weight checkpoint.

Runs on whatever is present (``--device auto``: a CUDA GPU, else the CPU) and
downloads nothing: a Llama-shaped checkpoint is built with ``from_config``
(random weights: they do not change the cost) and saved in a temporary
folder with a byte-level tokenizer (tests/tiny_models.py).

* On a GPU: Llama-3-8B-shaped (hidden 4096, MLP 14336, 32 layers, vocab
  128256), bfloat16. On a CPU: Llama-3.2-1B-shaped (hidden 2048, MLP 8192, 16
  layers, tied embeddings), float32. ``--shape`` chooses either anywhere.
* [1] statistics throughput: tokens/s of the statistics pass over a synthetic
  text corpus (``compute_key_statistics``, the default layers, the forward
  stopping after the last one), timed from the first batch's end to the last's;
  also as a fraction of the device's measured matmul peak (bfloat16 on a GPU,
  float32 on a CPU: an n×n matmul timed here), counting 2 FLOPs per weight of
  the layers run per token plus the kᵀk products. The statistics land in a
  temporary ``$ZUPATCH_CACHE``.
* [2] ``zupatch create`` for N CounterFact-style requests (generated:
  templates × invented subjects × targets) with those cached statistics, in a
  fresh process (benchmarks/measure.py): wall time, peak RSS, peak RSS ÷ the
  checkpoint's bytes, and on a GPU the peak GPU memory (torch's
  ``max_memory_allocated``) ÷ the model's bytes.

Usage:
    python benchmarks/scale.py                       # auto device, the shape for it, 100 requests
    python benchmarks/scale.py --requests 100,1000   # what the GPU figures of docs/benchmarks.md use
    python benchmarks/scale.py --device cpu --requests 10 --tokens 2048   # a 2-core CPU in minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from measure import measure  # benchmarks/measure.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Llama-shaped configs (no download): the sizes of Llama-3-8B and Llama-3.2-1B.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}  # fmt: skip
TEMPLATES = (
    ("The mother tongue of {} is", ["French", "German", "Spanish", "Italian", "Dutch", "Polish"]),
    ("{} was born in the city of", ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague"]),
    ("{} plays the position of", ["goalkeeper", "defender", "midfielder", "forward", "pitcher", "catcher"]),
    ("The headquarters of {} are in", ["London", "Tokyo", "Toronto", "Sydney", "Boston", "Seoul"]),
    ("{} is a citizen of", ["Canada", "Japan", "Brazil", "Norway", "Kenya", "Chile"]),
)
SYLLABLES = ("ka", "lo", "mi", "ren", "dor", "va", "sel", "tu", "bri", "nox", "pe", "zan", "quil", "ost", "ya")


@dataclass(frozen=True)
class Settings:
    device: str
    shape: str
    dtype: str
    requests: tuple[int, ...]
    tokens: int
    batch_size: int
    create_settings: tuple[str, ...] = ()  # --set KEY=VALUE for create (default: none, the real defaults)


def subject(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return f"{word()} {word()}"


def write_requests(path: Path, n: int, seed: int = 0) -> Path:
    """n CounterFact-style requests (prompt with {} for the subject, subject, target), invented subjects."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        template, targets = TEMPLATES[i % len(TEMPLATES)]
        lines.append(json.dumps({"prompt": template, "subject": subject(rng), "target": rng.choice(targets)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_corpus(path: Path, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocabulary = [subject(rng).split()[0].lower() for _ in range(500)] + ["the", "of", "and", "a", "in", "is"]
    paragraphs = [" ".join(rng.choice(vocabulary) for _ in range(200)) + "." for _ in range(words // 200 + 1)]
    path.write_text("\n\n".join(paragraphs))
    return path


def build_checkpoint(folder: Path, shape: str, dtype: torch.dtype) -> int:
    """A random-weight Llama checkpoint of ``shape`` in ``folder``; returns its weights' bytes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import BOS_ID, EOS_ID, tiny_tokenizer

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    tiny_tokenizer().save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an n×n matmul on ``device`` in ``dtype`` (best of a few): the peak the throughput is a fraction of."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t) / (10 if device.type == "cuda" else 1))
    return 2 * n**3 / best


def bench_statistics(folder: Path, corpus: Path, settings: Settings) -> dict:
    """Fill the cache with the default layers' statistics and time the pass (tokens/s, fraction of peak)."""
    from zupatch.engine.api import load_model
    from zupatch.engine.architectures import decoder_layers, num_layers, resolve_architecture
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.stats import FileCorpus, StatsCache, StatsConfig, compute_key_statistics

    model, tokenizer = load_model(folder, settings.dtype, settings.device)
    device = next(model.parameters()).device
    spec = resolve_architecture(model)
    layers = list(CreateConfig().layers_for(num_layers(model, spec)))  # the layers create edits by default
    config = StatsConfig(token_budget=settings.tokens, batch_size=settings.batch_size)
    marks: list[tuple[float, int]] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "key statistics":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append((time.perf_counter(), done))

    t = time.perf_counter()
    stats = compute_key_statistics(model, tokenizer, spec, layers, FileCorpus((corpus,)), config, StatsCache(),
                                   progress=progress)  # fmt: skip
    total_seconds = time.perf_counter() - t
    tokens = stats[layers[0]].token_count
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0) if len(marks) > 1 else tokens / total_seconds
    blocks = decoder_layers(model, spec)
    weights_run = sum(p.numel() for i in range(layers[-1] + 1) for p in blocks[i].parameters())
    f = stats[layers[0]].second_moment.shape[0]
    flops_per_token = 2 * weights_run + 2 * f * f * len(layers)
    compute_dtype = next(model.parameters()).dtype
    del model
    peak = matmul_peak(device, compute_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": str(device), "dtype": str(compute_dtype).removeprefix("torch."), "layers": layers,
        "tokens": tokens, "batches": len(marks), "seconds_total": total_seconds, "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops_per_token / 1e12, "peak_tflops": peak / 1e12,
        "fraction_of_peak": tokens_per_s * flops_per_token / peak,
    }  # fmt: skip


#: Runs `zupatch create` with its JSON summary going to $ZUPATCH_BENCH_SUMMARY and, on CUDA,
#: writes torch's peak GPU memory to $ZUPATCH_BENCH_GPU_PEAK at exit.
_CREATE = r"""
import atexit, os, sys, torch
sys.stdout = open(os.environ["ZUPATCH_BENCH_SUMMARY"], "w")
def _peak():
    if torch.cuda.is_available() and os.environ.get("ZUPATCH_BENCH_GPU_PEAK"):
        with open(os.environ["ZUPATCH_BENCH_GPU_PEAK"], "w") as f:
            f.write(str(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))))
atexit.register(_peak)
from zupatch.cli.main import main
sys.argv[0] = "zupatch"
main()
"""


def bench_create(folder: Path, corpus: Path, n: int, settings: Settings, work: Path, layers: list[int]) -> dict:
    requests = write_requests(work / f"requests{n}.jsonl", n)
    out = work / f"out{n}.zup.safetensors"
    gpu_peak, summary = work / f"gpu_peak{n}.txt", work / f"summary{n}.json"
    env = dict(os.environ, ZUPATCH_BENCH_GPU_PEAK=str(gpu_peak), ZUPATCH_BENCH_SUMMARY=str(summary))
    cmd = [sys.executable, "-c", _CREATE, "create", "-m", str(folder), "--forget", str(requests), "-o", str(out),
           "--corpus", str(corpus), "--tokens", str(settings.tokens), "--layers", ",".join(map(str, layers)),
           "--device", settings.device, "--dtype", settings.dtype, "--force", "--json"]  # fmt: skip
    for assignment in settings.create_settings:
        cmd += ["--set", assignment]
    result = measure(cmd, env)
    result["patch_bytes"] = out.stat().st_size
    result["gpu_peak_bytes"] = int(gpu_peak.read_text()) if gpu_peak.exists() else None
    result["timings"] = json.loads(summary.read_text()).get("timings", {})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (a CUDA GPU if present, else CPU), cpu, cuda, cuda:N")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: 8b on a GPU, 1b on a CPU")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--requests", default="100", help="comma-separated request counts for create")
    ap.add_argument("--tokens", type=int, help="statistics tokens (default: 65536 on a GPU, 4096 on a CPU)")
    ap.add_argument("--batch-size", type=int, help="statistics batch (default: 64 on a GPU, 8 on a CPU)")
    ap.add_argument("--skip-create", action="store_true", help="statistics throughput only")
    ap.add_argument("--set", dest="create_settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a create setting (repeatable), e.g. refine.max_passes=1 to fit a small CPU")
    ap.add_argument("--checkpoint", type=Path, help="reuse a checkpoint folder built by an earlier run")
    ap.add_argument("--workdir", type=Path, help="where the checkpoint is built (default: a temporary folder)")
    args = ap.parse_args()

    from zupatch.engine.create import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device)
    settings = Settings(
        device=args.device, shape=args.shape or ("8b" if gpu else "1b"), dtype=str(dtype).removeprefix("torch."),
        requests=tuple(int(n) for n in args.requests.split(",")), tokens=args.tokens or (65536 if gpu else 4096),
        batch_size=args.batch_size or (64 if gpu else 8), create_settings=tuple(args.create_settings),
    )  # fmt: skip
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{settings.shape}-shaped Llama, {settings.dtype}, random weights", flush=True)  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zupatch-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        os.environ["ZUPATCH_CACHE"] = str(work / "cache")
        t = time.perf_counter()
        if args.checkpoint:
            folder = args.checkpoint
            model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        else:
            folder = work / "model"
            model_bytes = build_checkpoint(folder, settings.shape, dtype)
        print(f"checkpoint: {model_bytes / 1e9:.2f} GB ready in {time.perf_counter() - t:.0f} s", flush=True)
        corpus = write_corpus(work / "corpus.txt", settings.tokens)  # byte-level tokens: several per word

        s = bench_statistics(folder, corpus, settings)
        print(f"\n[1] key statistics, layers {','.join(map(str, s['layers']))}, {s['tokens']} tokens, "
              f"batch {settings.batch_size}, {s['device']} {s['dtype']}")  # fmt: skip
        print(f"throughput {s['tokens_per_s']:.0f} tokens/s ({s['tflops']:.3f} TFLOP/s; measured {s['dtype']} "
              f"matmul peak {s['peak_tflops']:.2f} TFLOP/s: {100 * s['fraction_of_peak']:.0f}% of it); "
              f"whole call {s['seconds_total']:.1f} s", flush=True)  # fmt: skip
        rows = []
        if not args.skip_create:
            for n in settings.requests:
                r = bench_create(folder, corpus, n, settings, work, s["layers"])
                rows.append((n, r))
                gpu_text = (f", peak GPU memory {r['gpu_peak_bytes'] / 1e9:.2f} GB "
                            f"({r['gpu_peak_bytes'] / model_bytes:.2f}x the model)") if r["gpu_peak_bytes"] else ""  # fmt: skip
                print(f"\n[2] create, {n} requests, cached statistics: {r['seconds']:.1f} s, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] * 2**20 / model_bytes:.2f}x the checkpoint's "
                      f"{model_bytes / 1e9:.2f} GB){gpu_text}; patch {r['patch_bytes'] / 1e6:.2f} MB", flush=True)  # fmt: skip
                phases = ", ".join(f"{k} {v:.0f} s" for k, v in r["timings"].items() if isinstance(v, int | float))
                print(f"    phases: {phases}", flush=True)
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s")
    print(json.dumps({"settings": settings.__dict__, "model_bytes": model_bytes, "statistics": s,
                      "create": {str(n): r for n, r in rows}}, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
