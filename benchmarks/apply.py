"""Benchmark `zupatch apply` against copying the touched shards and the naive path.

Builds synthetic Llama-shaped checkpoints (hidden 3072, MLP 8192, bf16, ~500 MB
shards) of two sizes, a patch with rank-20 factors on three down projections,
then measures side by side, interleaved, in one run:

- `cp` of the touched shards (the floor any apply must pay),
- `zupatch apply --link` (untouched files hard-linked: the touched-shard work
  alone, wall time and peak RSS), and the same without the inverse proof (its cost),
- `cp -r` of the whole folder and the default `zupatch apply` (untouched files
  reflinked or copied, so the output shares no inode with the input),
- the naive path: transformers `from_pretrained`, edit, `save_pretrained`.

Usage: python benchmarks/apply.py [--sizes 8,16] [--repeat 3] [--workdir DIR]
Prints a table and the ratios that docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from measure import measure  # benchmarks/measure.py (scripts run from their folder)
from safetensors.torch import save_file

HIDDEN, MLP, VOCAB, RANK = 3072, 8192, 32000, 20
TOUCHED_LAYERS = (2, 3, 4)


NO_PROOF = r"""
import sys
from zupatch.checkpoint.apply import ApplyChecks, apply_to_checkpoint
from zupatch.patch.format import Patch
apply_to_checkpoint(Patch.load(sys.argv[1]), sys.argv[2], sys.argv[3], link=True,
                    checks=ApplyChecks(prove_inverse=False))
"""

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
src, out, factors = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
f = load_file(factors)
params = dict(model.named_parameters())
with torch.no_grad():
    for layer in %s:
        w = params[f"model.layers.{layer}.mlp.down_proj.weight"]
        U, B = f[f"{layer}.U"].double(), f[f"{layer}.B"].double()
        w.copy_((1.01 * w.double() + U @ B).to(torch.bfloat16))
model.save_pretrained(out, max_shard_size="500MB")
""" % (list(TOUCHED_LAYERS),)


def write_checkpoint(path: Path, layers: int, seed: int = 0) -> None:
    """A Llama-shaped bf16 checkpoint written shard by shard (never all in memory)."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=24,
        num_key_value_heads=24, vocab_size=VOCAB, tie_word_embeddings=True, torch_dtype="bfloat16",
    ).save_pretrained(path)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    groups: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(VOCAB, HIDDEN),
                                              "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}]  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": rand(HIDDEN, HIDDEN),
                       p + "self_attn.v_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                       p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)})  # fmt: skip
        groups.append({p + "mlp.gate_proj.weight": rand(MLP, HIDDEN), p + "mlp.up_proj.weight": rand(MLP, HIDDEN),
                       p + "mlp.down_proj.weight": rand(HIDDEN, MLP)})  # fmt: skip
    # pack groups into ~500 MB shards, written one at a time
    shards: list[dict[str, torch.Tensor]] = [{}]
    for g in groups:
        size = sum(t.numel() * 2 for t in shards[-1].values())
        if size and size + sum(t.numel() * 2 for t in g.values()) > 500e6:
            shards.append({})
        shards[-1].update(g)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
        shard.clear()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def make_patch(ckpt: Path, out: Path, factors_out: Path) -> dict:
    """Rank-20 edits (scale 1.01, the paper's projection) on three down projections."""
    from zupatch.checkpoint.folder import Checkpoint
    from zupatch.patch import numerics as nm
    from zupatch.patch.ops import LowRankEdit, build_patch

    rng = np.random.default_rng(1)
    ck = Checkpoint(ckpt)
    bf = nm.FLOAT_DTYPES["BF16"]
    edits, base, factors = [], {}, {}
    for layer in TOUCHED_LAYERS:
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        base[name] = (ck.read_bits(name, bf.bits), bf)
        # a small relative change, as a real edit makes (|UB| ~ 1% of |W|)
        U = (rng.standard_normal((HIDDEN, RANK)) * 0.01).astype(np.float32)
        B = (rng.standard_normal((RANK, MLP)) * 0.0045).astype(np.float32)
        edits.append(LowRankEdit(name, 1.01, U, B))
        factors[f"{layer}.U"], factors[f"{layer}.B"] = torch.from_numpy(U), torch.from_numpy(B)
    t = time.perf_counter()
    patch = build_patch(edits, base, method="benchmark")
    build_s = time.perf_counter() - t
    patch.save(out, overwrite=True)
    save_file(factors, factors_out)
    touched = sum(b.nbytes for b, _ in base.values())
    fixes = sum(e.inverse_fix.count for e in patch.steps[0].entries if e.inverse_fix)
    return {"patch_bytes": out.stat().st_size, "touched_bytes": touched, "build_seconds": build_s,
            "corrected_fraction": fixes / (touched / 2),
            "touched_shards": sorted({ck.weight_map[n] for n in base})}  # fmt: skip




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,16", help="layer counts of the synthetic checkpoints")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zupatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    zupatch = [sys.executable, "-c", "from zupatch.cli.main import main; main()"]
    rows = []
    for layers in (int(s) for s in args.sizes.split(",")):
        ckpt = work / f"ckpt-{layers}"
        if not ckpt.exists():
            print(f"writing a {layers}-layer checkpoint ...", file=sys.stderr)
            write_checkpoint(ckpt, layers)
        size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        info = make_patch(ckpt, work / f"p{layers}.zup.safetensors", work / f"f{layers}.safetensors")
        kinds = ("copy", "link", "link-no-proof", "copy-all", "zupatch", "naive")
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        patch_file = str(work / f"p{layers}.zup.safetensors")
        for _ in range(args.repeat):
            for kind in results:
                if kind == "naive" and args.skip_naive:
                    continue
                out = work / f"out-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                if kind == "copy":
                    out.mkdir()
                    cmd = ["cp", *[str(ckpt / s) for s in info["touched_shards"]], str(out)]
                elif kind == "copy-all":
                    cmd = ["cp", "-r", str(ckpt), str(out)]
                elif kind == "link":
                    cmd = [*zupatch, "apply", patch_file, "-m", str(ckpt), "-o", str(out), "-q", "--link"]
                elif kind == "link-no-proof":
                    cmd = [sys.executable, "-c", NO_PROOF, patch_file, str(ckpt), str(out)]
                elif kind == "zupatch":
                    cmd = [*zupatch, "apply", patch_file, "-m", str(ckpt), "-o", str(out), "-q"]
                else:
                    cmd = [sys.executable, "-c", NAIVE, str(ckpt), str(out), str(work / f"f{layers}.safetensors")]
                results[kind].append(measure(cmd))
                shutil.rmtree(out, ignore_errors=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_rss_mb")} for k, v in results.items() if v}
        rows.append((layers, size, info, med))
    print(f"\nmachine: {os.cpu_count()} cores; rank {RANK}; touched: 3 x {HIDDEN}x{MLP} bf16; median of {args.repeat}")
    nan = {"seconds": float("nan"), "peak_rss_mb": float("nan")}
    for layers, size, info, med in rows:
        s = {k: med.get(k, nan)["seconds"] for k in results}
        print(f"{layers} layers, {size / 1e9:.2f} GB; patch {100 * info['patch_bytes'] / info['touched_bytes']:.2f}% "
              f"of the touched bytes, inverse fix on {100 * info['corrected_fraction']:.2f}% of their elements")
        print(f"  touched shards: cp {s['copy']:.2f} s | apply --link {s['link']:.2f} s "
              f"(ratio {s['link'] / s['copy']:.2f}) | without the inverse proof {s['link-no-proof']:.2f} s "
              f"(ratio {s['link-no-proof'] / s['copy']:.2f})")
        print(f"  whole folder:   cp -r {s['copy-all']:.2f} s | apply (default, copies) {s['zupatch']:.2f} s "
              f"(ratio {s['zupatch'] / s['copy-all']:.2f}); peak RSS {med['zupatch']['peak_rss_mb']:.0f} MB")
        print(f"  naive: {s['naive']:.2f} s, {med.get('naive', nan)['peak_rss_mb']:.0f} MB "
              f"({s['naive'] / s['zupatch']:.1f}x the time of apply, "
              f"{med.get('naive', nan)['peak_rss_mb'] / med['zupatch']['peak_rss_mb']:.1f}x its memory)")  # fmt: skip
    print(f"\nworkdir: {work} (delete it when done)")


if __name__ == "__main__":
    main()
