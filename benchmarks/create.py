"""Benchmark the pieces of `zupatch create` on SmolLM2-135M-Instruct, on CPU, float32.

Measures side by side, in one run:

1. key statistics throughput (tokens/s) over a fixed text corpus (the lines of
   tests/data/ordinary_text.txt repeated), capturing layers 17,18,19 of 30:
   early stop after the last captured layer (what `create` does) vs the same
   capture with ``stop_early=False`` (the full forward through all 30 layers
   and the head); and, as a reference, a plain ``model(...)`` forward over the
   same batches with no capture at all;
2. target-vector (v*) optimisation (site "block" of layer 19, EOS target, the
   default context prefixes, a fixed number of steps, no early convergence):
   all requests in one batched call vs one call per request, n = 1, 10, 50;
3. end to end: `zupatch create` for 10 requests with a warm statistics cache
   (a first run fills a temporary $ZUPATCH_CACHE, the second is timed): wall
   time and peak RSS of the process; and the same with the layer-input cache
   off (``--set layer_cache_mb=0``: every forward from the first layer).

Usage: python benchmarks/create.py [--tokens 8192] [--steps 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from measure import measure  # benchmarks/measure.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "tests" / "data" / "smollm2_facts.jsonl"
TEXT = ROOT / "tests" / "data" / "ordinary_text.txt"
LAYERS = (17, 18, 19)





def load_model(cache_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zupatch.models.smollm2 import demo_checkpoint

    folder = demo_checkpoint(cache_dir=cache_dir, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return folder, model, tokenizer


def bench_statistics(model, tokenizer, tokens: int, repeat: int) -> dict:
    from zupatch.engine.architectures import num_layers, resolve_architecture
    from zupatch.engine.stats import StatsConfig, TextCorpus, collect_key_statistics, pad_right, pad_token_id

    spec = resolve_architecture(model)
    lines = [line.strip() for line in TEXT.read_text().splitlines() if line.strip()]
    text = " ".join(lines)
    config = StatsConfig(token_budget=tokens, max_length=256, batch_size=8)
    texts = (text,) * (tokens // max(1, len(tokenizer(text)["input_ids"])) + 2)
    windows = TextCorpus(texts).windows(model, tokenizer, config).windows
    count = sum(len(w) for w in windows)
    pad = pad_token_id(tokenizer)

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, len(windows), config.batch_size):
                ids, mask = pad_right(windows[start : start + config.batch_size], pad, torch.device("cpu"))
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    runs = {
        "early stop": lambda: collect_key_statistics(model, spec, LAYERS, windows, config.batch_size, pad, stop_early=True),
        "full forward": lambda: collect_key_statistics(model, spec, LAYERS, windows, config.batch_size, pad, stop_early=False),
        "plain forward": plain,
    }
    # warm-up (small), then interleave the kinds and keep the best of `repeat`
    collect_key_statistics(model, spec, LAYERS, windows[:2], config.batch_size, pad)
    best = {k: float("inf") for k in runs}
    for _ in range(repeat):
        for kind, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[kind] = min(best[kind], time.perf_counter() - t)
    return {"tokens": count, "windows": len(windows), "layers_total": num_layers(model, spec), "seconds": best}


def bench_targets(model, tokenizer, sizes: list[int], steps: int) -> list[dict]:
    from zupatch.engine.architectures import resolve_architecture
    from zupatch.engine.requests import load_requests
    from zupatch.engine.targets import OptimisationConfig, generate_context_prefixes, optimise_representations

    spec = resolve_architecture(model)
    requests = load_requests(FACTS)
    prefixes = generate_context_prefixes(model, tokenizer)
    config = OptimisationConfig(max_steps=steps, converged_nll=0.0)
    eos = tokenizer.eos_token

    def run(reqs) -> torch.Tensor:
        return optimise_representations(
            model, tokenizer, spec, reqs, [eos] * len(reqs), site="block", layer=LAYERS[-1],
            prefixes=prefixes, config=config,
        ).vectors  # fmt: skip

    run(requests[:1])  # warm-up
    rows = []
    for n in sizes:
        chosen = requests[:n]
        t = time.perf_counter()
        batched = run(chosen)
        batched_s = time.perf_counter() - t
        t = time.perf_counter()
        single = torch.cat([run([r]) for r in chosen], dim=1)
        single_s = time.perf_counter() - t
        diff = float((batched - single).abs().max() / batched.abs().max())
        rows.append({"n": n, "batched": batched_s, "single": single_s, "rel_diff": diff})
    return rows, len(prefixes)


def bench_end_to_end(folder: Path, n: int, tokens: int, work: Path) -> dict:
    facts = work / f"facts{n}.jsonl"
    facts.write_text("".join(FACTS.read_text().splitlines(keepends=True)[:n]))
    env = dict(os.environ, ZUPATCH_CACHE=str(work / "cache"))
    cmd = [sys.executable, "-c", "from zupatch.cli.main import main; main()", "create", "-m", str(folder),
           "--forget", str(facts), "-o", str(work / "out.zup.safetensors"), "--tokens", str(tokens),
           "--device", "cpu", "--dtype", "float32", "--force", "-q"]  # fmt: skip
    cold = measure(cmd, env)
    warm = measure(cmd, env)
    full = measure([*cmd, "--set", "layer_cache_mb=0"], env)  # every forward from the first layer
    return {"cold": cold, "warm": warm, "no_layer_cache": full,
            "patch_bytes": (work / "out.zup.safetensors").stat().st_size}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the statistics throughput corpus")
    ap.add_argument("--repeat", type=int, default=1, help="statistics runs per kind (best kept)")
    ap.add_argument("--steps", type=int, default=2, help="v* optimisation steps (fixed, no convergence stop; 2 to fit a 2-core CPU time budget)")
    ap.add_argument("--sizes", default="1,10,50", help="request counts for the v* comparison")
    ap.add_argument("--e2e-requests", type=int, default=10)
    ap.add_argument("--e2e-tokens", type=int, default=4096, help="--tokens of the end-to-end create")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "zupatch")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeat, args.steps, args.sizes = 1024, 1, 1, "1,3"
        args.e2e_requests, args.e2e_tokens = 2, 512
    sizes = [int(s) for s in args.sizes.split(",")]

    started = time.perf_counter()
    folder, model, tokenizer = load_model(args.cache_dir)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"SmolLM2-135M-Instruct, CPU, float32", flush=True)  # fmt: skip

    s = bench_statistics(model, tokenizer, args.tokens, args.repeat)
    sec = s["seconds"]
    print(f"\n[1] key statistics, layers {','.join(map(str, LAYERS))} of {s['layers_total']}: "
          f"{s['tokens']} tokens in {s['windows']} windows (max 256), batch 8, best of {args.repeat}")  # fmt: skip
    print(f"{'run':<44} {'seconds':>8} {'tokens/s':>9}")
    labels = {
        "early stop": "capture 17-19, stop after layer 19 (create)",
        "full forward": "capture 17-19, stop_early=False (all 30+head)",
        "plain forward": "plain model forward, no capture (reference)",
    }
    for kind, label in labels.items():
        print(f"{label:<44} {sec[kind]:>8.2f} {s['tokens'] / sec[kind]:>9.0f}")
    print(f"speed-up early stop vs full forward (same capture): {sec['full forward'] / sec['early stop']:.2f}x; "
          f"vs plain forward: {sec['plain forward'] / sec['early stop']:.2f}x", flush=True)  # fmt: skip

    rows, n_prefixes = bench_targets(model, tokenizer, sizes, args.steps)
    print(f"\n[2] v* optimisation, block output of layer {LAYERS[-1]}, EOS target, {n_prefixes} prefixes "
          f"(+1 KL row) per request, {args.steps} steps fixed (converged_nll=0)")  # fmt: skip
    print(f"{'n':>4} {'batched s':>10} {'one-at-a-time s':>16} {'ratio':>7} {'max rel diff':>13}")
    for r in rows:
        print(f"{r['n']:>4} {r['batched']:>10.2f} {r['single']:>16.2f} {r['single'] / r['batched']:>7.2f} {r['rel_diff']:>13.1e}")
    sys.stdout.flush()

    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="zupatch-bench-create-") as tmp:
            e = bench_end_to_end(folder, args.e2e_requests, args.e2e_tokens, Path(tmp))
        print(f"\n[3] zupatch create, {args.e2e_requests} requests, --tokens {args.e2e_tokens}, CPU float32, "
              f"self-sampled corpus (default)")  # fmt: skip
        print(f"{'run':<34} {'wall s':>7} {'peak RSS MB':>12}")
        print(f"{'cold (samples + fills stats cache)':<34} {e['cold']['seconds']:>7.1f} {e['cold']['peak_rss_mb']:>12.0f}")
        print(f"{'warm (statistics from cache)':<34} {e['warm']['seconds']:>7.1f} {e['warm']['peak_rss_mb']:>12.0f}")
        full = e["no_layer_cache"]
        print(f"{'warm, layer_cache_mb=0':<34} {full['seconds']:>7.1f} {full['peak_rss_mb']:>12.0f}")
        print(f"layer-input cache: {full['seconds'] / e['warm']['seconds']:.2f}x faster")
        print(f"patch: {e['patch_bytes'] / 1e6:.2f} MB")
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
