"""Benchmark the low-rank kernel: canonical elementwise numpy vs the proven BLAS fast path.

One Llama-shaped down projection (3072 x 8192, bf16 weights ~ N(0, 0.02)),
rank-20 float32 factors changing the weights by about 1%, scale 1.01; processed
in the row blocks ChainRunner uses (``ops.rows_per_block``), one thread, as one
compute worker does. Canonical and fast runs are interleaved (the machine is
shared and noisy) and medians reported; every fast result is compared bit for
bit with the canonical one.

Usage: python benchmarks/kernel.py [--repeat 7] [--dtype BF16] [--rows 3072 --cols 8192 --rank 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from zupatch.patch import fastpath as fp
from zupatch.patch import numerics as nm
from zupatch.patch.ops import rows_per_block


def make(rows: int, cols: int, rank: int, dtype: nm.DType, seed: int = 0):
    rng = np.random.default_rng(seed)
    w_bits = nm.round_to(rng.normal(0.0, 0.02, (rows, cols)), dtype)
    factor = np.float32 if dtype.itemsize <= 2 else np.float64
    # U B has entries of about 1% of the weights' spread
    sigma = (0.02 * 0.01 / np.sqrt(rank)) ** 0.5 if rank else 0.0
    U = (rng.normal(0.0, sigma, (rows, rank))).astype(factor)
    B = (rng.normal(0.0, sigma, (rank, cols))).astype(factor)
    return w_bits, U, B


def run_blocks(kernel, w_bits, dtype, scale, U, B, direction):
    rows, cols = w_bits.shape
    step = rows_per_block(cols)
    outs, unsafe = [], 0
    t = time.perf_counter()
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out, n = kernel(w_bits[r0:r1], dtype, scale, U[r0:r1], B, direction)
        outs.append(out)
        unsafe += n
    return time.perf_counter() - t, np.concatenate(outs), unsafe


def canonical(w_bits, dtype, scale, U, B, direction):
    return fp.canonical_rounded(w_bits, dtype, scale, U, B, direction), 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--dtype", default="BF16", choices=list(nm.FLOAT_DTYPES))
    ap.add_argument("--scale", type=float, default=1.01)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    dtype = nm.float_dtype(args.dtype)
    w_bits, U, B = make(args.rows, args.cols, args.rank, dtype)
    print(f"{args.rows}x{args.cols} {dtype.name}, rank {args.rank}, scale {args.scale}, "
          f"{rows_per_block(args.cols)} rows per block, {args.repeat} interleaved runs, medians")
    head = ("direction", "canonical s", "fast s", "speedup", "unsafe", "fraction")
    print("{:10s} {:>12s} {:>9s} {:>8s} {:>8s} {:>10s}".format(*head))
    for direction in ("forward", "inverse"):
        t_can, t_fast = [], []
        base = w_bits
        if direction == "inverse":  # invert an actual forward result
            base = run_blocks(canonical, w_bits, dtype, args.scale, U, B, "forward")[1]
        unsafe = 0
        for i in range(args.repeat):
            if i % 2:  # alternate which goes first
                tf, got, unsafe = run_blocks(fp.lowrank_rounded_stats, base, dtype, args.scale, U, B, direction)
            tc, ref, _ = run_blocks(canonical, base, dtype, args.scale, U, B, direction)
            if not i % 2:
                tf, got, unsafe = run_blocks(fp.lowrank_rounded_stats, base, dtype, args.scale, U, B, direction)
            if not np.array_equal(ref, got):
                raise SystemExit(f"MISMATCH in {direction}: {(ref != got).sum()} elements differ")
            t_can.append(tc)
            t_fast.append(tf)
        mc, mf = statistics.median(t_can), statistics.median(t_fast)
        print(f"{direction:10s} {mc:12.3f} {mf:9.3f} {mc / mf:7.1f}x {unsafe:8d} {unsafe / base.size:10.2e}")


if __name__ == "__main__":
    main()
