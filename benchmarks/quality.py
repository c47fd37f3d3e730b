"""Unlearning quality on SmolLM2-135M-Instruct: ZeroUnlearn vs ZeroUnlearn-GD vs GA vs NPO.

The same 10 facts to forget (benchmarks/data/quality_forget.jsonl, each with
the paraphrases the base model answers) and 40 facts to keep
(quality_retain.jsonl): every other retain fact goes to ``create --retain``
(20 "seen"), the other 20 are held out. Every method edits the same layers
(the default: 17, 18, 19 of 30) from the same requests, through the real CLI:

1. ``zupatch create --method M`` for each method, timed in a wrapper process
   (wall time, peak RSS); the patch size is the file's;
2. one ``zupatch eval --json`` with every patch: efficacy, generalization,
   specificity on all 40 retain facts, perplexity on tests/data/ordinary_text.txt;
3. a second ``zupatch eval`` with only the 20 held-out facts as retain set and
   the data-free fluency text (2048 tokens the base model samples itself).

Prints one Markdown table (docs/benchmarks.md keeps the figures) and writes
the raw reports to --out.

Usage: python benchmarks/quality.py [--methods zerounlearn,zerounlearn-gd,ga,npo] [--tokens 16384]
       [--device auto] [--out quality.json] [--set METHOD:KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import measure  # benchmarks/measure.py (scripts run from their folder)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
FORGET = DATA / "quality_forget.jsonl"
RETAIN = DATA / "quality_retain.jsonl"
TEXT = ROOT / "tests" / "data" / "ordinary_text.txt"
METHODS = ("zerounlearn", "zerounlearn-gd", "ga", "npo")


def zupatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "zupatch", *args]


def run_json(cmd: list[str]) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tokens", type=int, default=None, help="statistics token budget (default: create's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the raw results (JSON) here")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="extra create setting for one method, e.g. ga:baseline.learning_rate=1e-4")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]

    from zupatch.models.demo import demo_checkpoint

    model = demo_checkpoint(progress=True)
    retain = [line for line in RETAIN.read_text().splitlines() if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="zupatch-quality-"))
    seen, held_out = work / "retain_seen.jsonl", work / "retain_held_out.jsonl"
    seen.write_text("\n".join(retain[0::2]) + "\n")
    held_out.write_text("\n".join(retain[1::2]) + "\n")

    created: dict[str, dict] = {}
    for method in methods:
        patch = work / f"{method}.zup.safetensors"
        extra = [f"--set={s.split(':', 1)[1]}" for s in args.set if s.split(":", 1)[0] == method]
        tokens = ["--tokens", str(args.tokens)] if args.tokens else []
        cmd = zupatch("create", "-m", str(model), "-f", str(FORGET), "--retain", str(seen), "-o", str(patch),
                      "--method", method, "--device", args.device, "--force", "-q", *tokens, *extra)  # fmt: skip
        if method == "zerounlearn":  # fill the statistics cache first, so no method is timed with a cold cache
            stats = zupatch("stats", "compute", "-m", str(model), "--device", args.device, "-q", *tokens)
            subprocess.run(stats, check=True)
        figures = measure(cmd, env=dict(os.environ))
        created[method] = {**figures, "patch": str(patch), "bytes": patch.stat().st_size}
        print(f"{method}: {figures['seconds']:.1f}s, {patch.stat().st_size} bytes", file=sys.stderr)

    patches = [a for m in methods for a in ("-p", created[m]["patch"])]
    common = ["-m", str(model), "-d", str(FORGET), "--device", args.device, "--json", "-q", *patches]
    full = run_json(zupatch("eval", *common, "--retain", str(RETAIN), "--text", str(TEXT)))
    held = run_json(zupatch("eval", *common, "--retain", str(held_out), "--generations", "0"))

    rows = []
    for index, name in enumerate(["base", *methods]):
        a, b = full["models"][index], held["models"][index]
        rows.append({
            "method": name,
            "efficacy": a["efficacy"]["answered"],
            "forget_probability": a["efficacy"]["probability"],
            "generalization": a["generalization"]["answered"],
            "specificity_kept": a["specificity"]["kept"],
            "held_out_kept": b["specificity"]["kept"],
            "perplexity": a["fluency"]["perplexity"],
            "perplexity_change": a["fluency"]["perplexity_change"],
            "sampled_perplexity_change": b["fluency"]["perplexity_change"],
            "create_seconds": created.get(name, {}).get("seconds"),
            "create_peak_rss_mb": created.get(name, {}).get("peak_rss_mb"),
            "patch_bytes": created.get(name, {}).get("bytes"),
        })  # fmt: skip
    print_table(rows, full)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "created": created, "eval": full, "eval_held_out": held},
                                       indent=2, ensure_ascii=False))  # fmt: skip


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def print_table(rows: list[dict], report: dict) -> None:
    data = report["data"]
    print(f"SmolLM2-135M-Instruct, {data['forget']} facts to forget ({data['paraphrases']} paraphrases), "
          f"{data['retain']} to keep (20 seen by create, 20 held out), {report['settings']['device']}\n")  # fmt: skip
    print("| method | efficacy (still answered) | answer p | generalization (paraphrases still answered) "
          "| specificity (kept, all 40) | kept, 20 held out | perplexity (ordinary text) | perplexity, sampled text "
          "| create time | peak RSS | patch size |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "base":
            extra = ["", "", "", ""]
            change = ""
        else:
            extra = [f"{100 * r['sampled_perplexity_change']:+.1f}%", f"{r['create_seconds']:.0f} s",
                     f"{r['create_peak_rss_mb']:.0f} MB", f"{r['patch_bytes'] / 1e6:.2f} MB"]  # fmt: skip
            change = f" ({100 * r['perplexity_change']:+.1f}%)"
        cells = [r["method"], _pct(r["efficacy"]), f"{r['forget_probability']:.3f}", _pct(r["generalization"]),
                 _pct(r["specificity_kept"]), _pct(r["held_out_kept"]), f"{r['perplexity']:.2f}{change}", *extra]  # fmt: skip
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
