"""How long `zupatch demo` runs, and how long it goes without telling the user anything.

Runs the demo in-process on the demo model (SmolLM2-135M-Instruct, converted
once into the zupatch cache) with the same two callbacks the CLI draws from:
``on_step`` (a numbered step line) and ``progress(stage, done, total)`` (a
bar). Every call is timestamped. Reports, in one run:

- the wall time of each step and of the whole demo;
- the longest interval without any update (a step line or a bar moving),
  where it fell (the events before and after it), and the five longest.

Run it twice on a fresh ``$ZUPATCH_CACHE`` to see the first run (model
converted, statistics sampled) and the second (both cached); ``--runs 2``
does that in one call. The output folder is a temporary one, deleted after.

Usage: python benchmarks/progress.py [--runs 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zupatch.demo import DemoConfig, run_demo  # noqa: E402


def one_run(tokens: int | None) -> dict:
    """Run the demo once; return its steps' seconds and the timestamped update events."""
    events: list[tuple[float, str]] = []
    start = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        events.append((time.perf_counter() - start, f"{stage} {done}/{total}"))

    def on_step(label: str, seconds: float | None) -> None:
        events.append((time.perf_counter() - start, f"step {label.split(':')[0]}" + (" done" if seconds else "")))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DemoConfig(output_dir=Path(tmp) / "demo", **({"tokens": tokens} if tokens else {}))
        report = run_demo(cfg, progress=progress, on_step=on_step, show_download=False)
    end = time.perf_counter() - start
    marks = [(0.0, "start")] + events + [(end, "end")]
    gaps = sorted(
        ((b[0] - a[0], a[1], b[1], a[0]) for a, b in zip(marks, marks[1:])), reverse=True
    )
    return {
        "total_s": round(end, 1),
        "steps_s": {k: round(v, 1) for k, v in report.seconds.items()},
        "create_phases_s": report.create_phases,
        "updates": len(events),
        "longest_gaps": [
            {"seconds": round(g, 2), "at_s": round(at, 1), "after": a, "before": b} for g, a, b, at in gaps[:5]
        ],
        "round_trip_exact": report.round_trip_exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="demo runs in a row (the first may fill caches)")
    parser.add_argument("--tokens", type=int, default=None, help="statistics token budget (default: the demo's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    import torch

    results = []
    for i in range(args.runs):
        r = one_run(args.tokens)
        results.append(r)
        print(f"run {i + 1}: {r['total_s']} s, {r['updates']} updates, round trip exact: {r['round_trip_exact']}")
        print("  steps: " + ", ".join(f"{k} {v}" for k, v in r["steps_s"].items()))
        print("  create: " + ", ".join(f"{k} {v}" for k, v in r["create_phases_s"].items()))
        for g in r["longest_gaps"]:
            print(f"  {g['seconds']:6.2f} s without an update at {g['at_s']} s: after {g['after']!r}, "
                  f"before {g['before']!r}")  # fmt: skip
    if args.json:
        machine = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"machine": machine, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
