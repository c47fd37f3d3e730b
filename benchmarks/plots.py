"""The pictures of docs/benchmarks.md and docs/create.md, drawn from recorded JSON.

People compare methods faster on a picture than in a table, so the recorded
figures are drawn, not re-measured (the runs take hours on a CPU):

- ``quality-tradeoff.png``: the quality benchmark (benchmarks/quality.py) as
  a trade-off. Specificity (facts kept, same-pattern probes unchanged) against
  generalization (paraphrases still answered), one point per run: zerounlearn,
  the previous defaults, zerounlearn with a retain file, GA and NPO; the base
  (which answers every paraphrase) as a dashed line. Efficacy (forget prompts still answered) is in the title when every
  run has the same figure, else in each label.
- ``lambda-sweep.png``: the λ_r and λ_f measurements that chose the defaults
  (docs/create.md, "Presets and defaults"): other facts kept against λ.
- ``eval-probabilities.png``: what ``zupatch eval --plot`` draws, from a
  recorded ``eval --json`` report (docs/eval.md): each forget prompt's and
  paraphrase's answer probability under the base and each patch.

Inputs: ``--quality`` is the ``--out`` file of benchmarks/quality.py (its
``rows``); by default benchmarks/data/quality_2026-11-30.json, the rows of the
run docs/benchmarks.md reports. ``--sweep`` is benchmarks/data/lambda_sweep.json,
copied by hand from docs/create.md's tables (those runs kept no JSON).
``--eval-report`` is an ``eval --json`` report and ``--eval-data`` the forget
file it scored (for the row labels); by default
benchmarks/data/eval_smollm2_2026-11-30.json, SmolLM2-135M-Instruct with the
zerounlearn, GA and NPO patches of that quality run, on
benchmarks/data/quality_forget.jsonl.

The PNGs are stored with a 128-colour palette, which keeps each one well
under 150 kB without visible loss (plots with flat colours).

Needs matplotlib (``pip install 'zupatch[plot]'``) and zupatch itself (run it
from the repository root, or with zupatch installed); no model is loaded.
Usage: python benchmarks/plots.py [--quality FILE] [--sweep FILE]
       [--eval-report FILE --eval-data FILE] [--out-dir docs/images]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

#: How each quality run is named in the picture, and its colour and marker.
RUNS = {
    "base": ("base model", "#222222", "_"),
    "zerounlearn": ("zerounlearn (defaults)", "#d62728", "o"),
    "zerounlearn+retain": ("zerounlearn + --retain", "#ff7f0e", "s"),
    "robust": ("zerounlearn --preset robust", "#e377c2", "X"),
    "layers-17-19": ("zerounlearn, layers 17-19", "#8c564b", "P"),
    "previous": ("zerounlearn, previous defaults", "#9467bd", "D"),
    "ga": ("ga", "#1f77b4", "^"),
    "npo": ("npo", "#2ca02c", "v"),
}


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _style(run: str) -> tuple[str, str, str]:
    return RUNS.get(run, (run, "#7f7f7f", "o"))


def quality_tradeoff(quality: dict[str, Any], out: Path) -> Path:
    """Facts kept and probes unchanged against paraphrases answered, one point per run."""
    from matplotlib.figure import Figure

    rows = quality["rows"]
    facts = quality.get("facts", {})
    figure = Figure(figsize=(9, 4.2), layout="constrained", dpi=100)
    kept, probes = figure.subplots(1, 2, sharex=True)
    runs = [row for row in rows if row["run"] != "base"]
    base = next((row for row in rows if row["run"] == "base"), None)
    efficacies = {row["efficacy"] for row in runs}
    right = max(50.0, 10 * (1 + max(100 * row["generalization"] for row in runs) // 10))
    if base:  # at the far right (it answers every paraphrase): a reference line, not a point
        label, colour, _ = _style("base")
        for axis, key in ((kept, "held_out_kept"), (probes, "probes_unchanged")):
            axis.axhline(100 * base[key], color=colour, ls="--", lw=1,
                         label=f"{label}: {_percent(base['generalization'])} of paraphrases answered"
                         if axis is kept else None)  # fmt: skip
    for row in runs:
        label, colour, marker = _style(row["run"])
        if len(efficacies) > 1 and row["run"] != "base":
            label += f", forget {_percent(row['efficacy'])}"
        if row.get("perplexity_change"):
            label += f" (ppl {100 * row['perplexity_change']:+.1f}%)"
        x = 100 * row["generalization"]
        size = 60
        kept.scatter(x, 100 * row["held_out_kept"], s=size, color=colour, marker=marker, label=label, zorder=3)
        kept.scatter(x, 100 * row["tuning_kept"], s=size, facecolors="none", edgecolors=colour, marker=marker, zorder=3)
        kept.plot([x, x], [100 * row["held_out_kept"], 100 * row["tuning_kept"]], color=colour, alpha=0.4, lw=1)
        probes.scatter(x, 100 * row["probes_unchanged"], s=size, color=colour, marker=marker, zorder=3)
    held, tuning = facts.get("held_out", "held-out"), facts.get("tuning", "tuning")
    kept.set_ylabel("other facts kept (%)")
    kept.set_title(f"facts kept: filled {held} held-out, hollow {tuning} tuning", fontsize=9)
    probes.set_ylabel("same-pattern probes unchanged (%)")
    probes.set_title("eval's same-pattern probes (top-1 unchanged)", fontsize=9)
    for axis in (kept, probes):
        axis.set_xlabel(f"paraphrases still answered (%, of {facts.get('paraphrases', '?')}; lower is better)")
        axis.set_xlim(0, right)
        axis.set_ylim(0, 105)
        axis.grid(alpha=0.3)
        axis.annotate("better", xy=(0.62 * right, 0.5 * 100), xytext=(0.8 * right, 0.3 * 100), fontsize=8,
                      color="#555555", ha="center", arrowprops={"arrowstyle": "->", "color": "#555555"})  # fmt: skip
    title = "Unlearning quality on SmolLM2-135M-Instruct"
    if len(efficacies) == 1:
        title += f": forget prompts still answered {_percent(efficacies.pop())} for every method"
    figure.suptitle(title, fontsize=10)
    figure.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _save(figure, out)


def lambda_sweep(sweep: dict[str, Any], out: Path) -> Path:
    """Other facts kept against λ_r (no retain file) and λ_f (with one), the defaults marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained", dpi=100)
    left, right = figure.subplots(1, 2)
    retain = sweep["lambda_retain"]
    xs = [run["lambda_retain"] for run in retain["runs"]]
    ys = [100 * run["kept"] / retain["kept_of"] for run in retain["runs"]]
    left.plot(xs, ys, marker="o", color="#d62728", label=f"other facts kept (of {retain['kept_of']})")
    for x, run in zip(xs, retain["runs"]):
        left.annotate(f"{run['kept']}/{retain['kept_of']}", (x, 100 * run["kept"] / retain["kept_of"]),
                      textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)  # fmt: skip
    left.axvline(retain["default"], color="#555555", ls="--", lw=1, label=f"default λ_r = {retain['default']:g}")
    left.set_xscale("log")
    left.set_xticks(xs, [f"{x:g}" for x in xs])
    left.set_xlabel("λ_r (retain weight)")
    left.set_title(f"λ_r: {retain['forgotten_of']} capitals forgotten in every run, no retain file", fontsize=9)

    forget = sweep["lambda_forget"]
    xs = [run["lambda_forget"] for run in forget["runs"]]
    for key, of, colour, what, offset in (("kept", forget["kept_of"], "#1f77b4", "other facts kept", 7),
                                          ("not_in_retain_kept", forget["not_in_retain_of"], "#2ca02c",
                                           "of them not in the retain file", -13)):  # fmt: skip
        ys = [100 * run[key] / of for run in forget["runs"]]
        right.plot(xs, ys, marker="o", color=colour, label=f"{what} (of {of})")
        for x, y, run in zip(xs, ys, forget["runs"]):
            right.annotate(f"{run[key]}/{of}", (x, y), textcoords="offset points", xytext=(0, offset), ha="center",
                           fontsize=8, color=colour)  # fmt: skip
    right.axvline(forget["default"], color="#555555", ls="--", lw=1, label=f"default λ_f = {forget['default']:g}")
    right.set_xscale("log")
    right.set_xticks(xs, [f"{x:g}" for x in xs])
    right.set_xlabel("λ_f (forget weight)")
    right.set_title("λ_f: 3 facts forgotten in every run, with a retain file", fontsize=9)
    right.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
    for axis in (left, right):
        axis.set_xticks([], minor=True)  # only the measured λ are labelled
        axis.set_ylim(50, 105)
        axis.set_ylabel("kept (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")
    figure.suptitle("Choosing λ on SmolLM2-135M-Instruct, layers 17–19 (docs/create.md)", fontsize=10)
    return _save(figure, out)


def eval_probabilities(report: dict[str, Any], data: Path, out: Path) -> Path:
    """``zupatch eval --plot``'s picture of a recorded report, its rows labelled from ``data``."""
    from zupatch.eval.data import load_eval_data
    from zupatch.eval.plot import draw_report

    records = load_eval_data(data)
    name = report["model"].rstrip("/").rsplit("/", 1)[-1]
    draw_report(report, out, [f"{i.prompt} → {i.answer}" for i in records.forget],
                [f"{i.prompt} → {i.answer}" for i in records.paraphrases],
                title=f"zupatch eval --plot: {name}, {report['data']['forget']} facts to forget")  # fmt: skip
    return _palette(out)


def _save(figure: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return _palette(out)


def _palette(path: Path) -> Path:
    """Rewrite the PNG with a 128-colour palette: a third of the bytes, the same picture."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=128)
    quantized.save(path, format="png", optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=Path, default=DATA / "quality_2026-11-30.json",
                        help="benchmarks/quality.py --out file (its rows)")  # fmt: skip
    parser.add_argument("--sweep", type=Path, default=DATA / "lambda_sweep.json", help="the λ measurements")
    parser.add_argument("--eval-report", type=Path, default=DATA / "eval_smollm2_2026-11-30.json",
                        help="a zupatch eval --json report")  # fmt: skip
    parser.add_argument("--eval-data", type=Path, default=DATA / "quality_forget.jsonl",
                        help="the forget file that report scored (row labels)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this tree's zupatch draws the eval picture, not another install
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: benchmarks/plots.py needs matplotlib: pip install 'zupatch[plot]'", file=sys.stderr)
        return 1
    written = [
        quality_tradeoff(json.loads(args.quality.read_text()), args.out_dir / "quality-tradeoff.png"),
        lambda_sweep(json.loads(args.sweep.read_text()), args.out_dir / "lambda-sweep.png"),
        eval_probabilities(json.loads(args.eval_report.read_text()), args.eval_data,
                           args.out_dir / "eval-probabilities.png"),
    ]
    for path in written:
        print(f"{path}: {path.stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
