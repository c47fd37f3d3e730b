"""Each fact's answer probability before and after each patch, as a picture.

``zupatch eval --plot FILE.png`` draws it from the report alone (each
model's ``efficacy.probabilities`` and ``generalization.probabilities``,
docs/eval.md), so the picture and the JSON never disagree. One row per forget
prompt (and one per paraphrase, in a second panel, when the data has them):
the base model's probability of the true answer, and a segment from there to
each patched model's, on a log scale, where "forgotten" (1e-4) and "less
likely" (1e-1) look different. The rows are labelled with the prompts and
answers, so the picture holds the forget text, as the report does.

matplotlib is an optional extra (``zupatch[plot]``), imported only here and
only when a picture is asked for; :func:`check_plot_output` fails with one
line naming the extra before any model is loaded. The figure is a plain
:class:`matplotlib.figure.Figure` rendered by the Agg canvas: no pyplot, no
global backend switch, no window.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zupatch.errors import ZupatchError

#: Probabilities below this are drawn at it (the log axis needs a floor).
FLOOR = 1e-6
#: Rows drawn per panel; a longer list shows its first rows and says so.
MAX_ROWS = 60
#: Characters of a row label ("prompt → answer").
LABEL_CHARS = 44
#: (section of the report, panel title) in drawing order.
PANELS = (("efficacy", "forget prompts"), ("generalization", "paraphrases"))


def require_matplotlib() -> None:
    """Raise a one-line error naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ZupatchError(
            "--plot needs matplotlib, which is not installed: pip install 'zupatch[plot]' (or: pip install matplotlib)"
        ) from None


def check_plot_output(path: Path) -> None:
    """Fail before the evaluation if ``path`` cannot be drawn to: no matplotlib, unknown format, no folder."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if path.is_dir():
        raise ZupatchError("--plot: is a folder, expected a picture file name", path)
    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(f".{s}" for s in sorted(formats))
        given = path.suffix or "(no suffix)"
        raise ZupatchError(f"--plot: unknown picture format {given!r}; use .png (matplotlib also writes {known})", path)
    if not path.parent.is_dir():
        raise ZupatchError("--plot: the folder does not exist", path)


def short_name(name: str) -> str:
    """A patch file's name without folders and the .zup.safetensors suffix; Hub refs and "base" as given."""
    if name.endswith(".safetensors"):
        return Path(name).name.removesuffix(".safetensors").removesuffix(".zup")
    return name


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _labels(given: Sequence[str] | None, n: int) -> list[str]:
    if given is not None and len(given) == n:
        return [_label(" ".join(text.split())) for text in given]
    return [f"#{i + 1}" for i in range(n)]


def _probabilities(model: dict[str, Any], section: str) -> list[float]:
    values = (model.get(section) or {}).get("probabilities")
    if values is None:
        raise ZupatchError(
            f"the report has no per-fact probabilities ({model.get('name')!r}, {section}); "
            "it was made by an older zupatch eval"
        )
    return [max(float(v), FLOOR) for v in values]


def draw_report(
    report: dict[str, Any],
    path: str | os.PathLike,
    forget_labels: Sequence[str] | None = None,
    paraphrase_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``report`` (``EvalReport.to_dict()``) to ``path``; the format follows its suffix.

    ``forget_labels`` and ``paraphrase_labels`` name the rows (``prompt →
    answer``), one per prompt in the data's order; without them rows are
    numbered. ``title`` replaces "zupatch eval: MODEL". The file is written
    whole or not at all (a temporary file in the same folder, then renamed).
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    path = Path(path)
    models = report["models"]
    labels = {"efficacy": forget_labels, "generalization": paraphrase_labels}
    panels = [(section, heading) for section, heading in PANELS if (models[0].get(section) or {}).get("n")]
    rows = [min(models[0][section]["n"], MAX_ROWS) for section, _ in panels]
    figure = Figure(figsize=(9, 1.6 + 0.32 * sum(rows) + 0.6 * len(panels)), layout="constrained", dpi=100)
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=[r + 1.5 for r in rows])[:, 0]
    colours = ["#222222", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    markers = ["o", "s", "D", "^", "v", "P", "X", "<", ">"]
    for axis, (section, heading), shown in zip(axes, panels, rows):
        n = models[0][section]["n"]
        values = [_probabilities(m, section)[:shown] for m in models]
        names = _labels(labels[section], n)[:shown]
        slot = 0.7 / len(models)
        for index, (model, probabilities) in enumerate(zip(models, values)):
            y = [row + (index - (len(models) - 1) / 2) * slot for row in range(shown)]
            colour, marker = colours[index % len(colours)], markers[index % len(markers)]
            if index:  # before -> after
                axis.hlines(y, values[0], probabilities, colors=colour, linewidth=1, alpha=0.5)
            name = short_name(model["name"])
            if model.get("patch") and model["patch"]["method"] != name:
                name = f"{name} ({model['patch']['method']})"
            label = name if section == panels[0][0] else None  # one legend entry per model
            axis.scatter(probabilities, y, s=22, color=colour, marker=marker, label=label, zorder=3)
        axis.set_xscale("log")
        axis.set_xlim(FLOOR / 2, 1.5)
        axis.set_yticks(range(shown), names, fontsize=8)
        axis.set_ylim(shown - 0.5, -0.5)  # first fact on top
        axis.grid(axis="x", alpha=0.3)
        more = f" (first {shown} of {n})" if shown < n else ""
        axis.set_title(f"{heading}{more}: p(true answer | prompt)", fontsize=10, loc="left")
    axes[-1].set_xlabel(f"answer probability (log scale; below {FLOOR:g} drawn at {FLOOR:g})", fontsize=9)
    model = report["model"]
    title = title or f"zupatch eval: {Path(model).name if Path(model).is_dir() else model}"
    figure.suptitle(title, fontsize=10)
    figure.legend(loc="outside lower center", ncols=min(len(models), 4), fontsize=8, frameon=False)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the usual permissions, not 0600
    try:
        with open(temporary, "wb") as out:
            figure.savefig(out, format=path.suffix.lower().lstrip(".") or "png")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
