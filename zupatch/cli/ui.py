"""Terminal presentation: the error boundary, progress bars, summary tables."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from zupatch.errors import ZupatchError
from rich.filesize import decimal as human_bytes  # noqa: F401 - used by the commands as ui.human_bytes

console = Console(stderr=True, highlight=False)


@dataclass
class _State:
    debug: bool = False
    interrupt_reported: bool = False  # guard() said "interrupted: ..." already


state = _State()


@contextmanager
def guard() -> Iterator[None]:
    """Turn user errors into one line on stderr and an exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except ZupatchError as exc:
        if state.debug:
            console.print_exception()
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)  # user text is not markup
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:  # its message, when it has one, says what was left (apply --push-to)
        state.interrupt_reported = True
        console.print(f"[red]interrupted[/]: {escape(str(exc)) or 'nothing was written'}", soft_wrap=True)
        raise typer.Exit(130) from None
    except (OSError, MemoryError) as exc:  # disk full, permission races, ...
        if state.debug:
            console.print_exception()
        where = getattr(exc, "filename", None)
        console.print(f"[red]error:[/] {where + ': ' if where else ''}{exc.strerror or exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def require_engine(command: str) -> None:
    """One line and exit 1 when the engine's dependencies are missing (the light install).

    Called before a command imports anything of the engine, so a user of the
    base install gets the extra to install, not an ImportError traceback.
    """
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        message = (f"zupatch {command} needs {' and '.join(missing)}, which this install does not have: "
                   'pip install "zupatch[create]" (docs/dependencies.md)')  # fmt: skip
        console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(1)
    with interrupts_held():
        import torch  # noqa: F401 - loaded here, where Ctrl-C cannot land inside it


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt.

    torch's import runs Python callbacks from C++ (pybind11): a KeyboardInterrupt
    raised in one of them cannot be caught, and the process ends in
    ``std::terminate`` with a C++ message instead of "interrupted". Held, the
    signal arrives a moment later as the ordinary interrupt. A no-op outside the
    main thread, where signal handlers cannot be set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda signum, _frame: pending.append(signum)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
    if pending:
        raise KeyboardInterrupt


STAGES = {"hash": "checking base hashes", "copy": "copying untouched files (MB)",
          "compute": "computing patched tensors (rows)", "preparing": "contexts, other subjects",
          "probes": "same-pattern probes", "similar keys": "similar subjects' keys (rows)",
          "layers": "editing layers (keys, solve)", "answers before": "base model's answers",
          "answers after": "patched model's answers"}  # fmt: skip


@contextmanager
def progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing rich bars (or nothing)."""
    if quiet or not sys.stderr.isatty():
        yield lambda stage, done, total: None
        return
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(STAGES.get(stage, stage), total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update


def _headline(hyperparameters: dict[str, Any], limit: int = 6) -> list[tuple[str, Any]]:
    """The first few scalar hyperparameters, nested keys dotted (no engine import: no torch here)."""
    flat: dict[str, Any] = {}
    stack = [("", hyperparameters)]
    while stack:
        prefix, mapping = stack.pop()
        for key, value in mapping.items():
            if isinstance(value, dict):
                stack.append((f"{prefix}{key}.", value))
            else:
                flat[f"{prefix}{key}"] = value
    preferred = ["layers", "neutral_target", "closed_form.projection", "closed_form.lambda_retain",
                 "closed_form.lambda_forget", "gd_solver", "baseline.learning_rate", "baseline.steps",
                 "baseline.beta", "retain_term"]  # fmt: skip
    keys = [k for k in preferred if k in flat] + [k for k in flat if k not in preferred]
    return [(k, flat[k]) for k in keys if not isinstance(flat[k], (list, dict)) or k == "layers"][:limit]


def print_summary(summary: dict[str, Any], title: str) -> None:
    """The human form of :func:`zupatch.patch.summary.summarize`."""
    out = Console(highlight=False)
    out.print(f"[bold]{title}[/]")
    sizes = summary["sizes"]
    out.print(
        f"  base: [cyan]{summary['base_model'] or 'unknown'}[/]"
        + (f" @ {summary['base_revision'][:12]}" if summary["base_revision"] else "")
    )
    out.print(
        f"  format v{summary['format_version']}, created {summary['created'] or '?'}, "
        f"{len(summary['steps'])} step(s), {len(summary['tensors'])} tensor(s)"
    )
    out.print(
        f"  size: {human_bytes(sizes['file_bytes'])} for {human_bytes(sizes['touched_bytes'])} of touched weights "
        f"({100 * sizes['ratio']:.2f}%)"
    )
    steps = Table(title="steps", title_justify="left", show_edge=False)
    for col in ("#", "method", "requests", "inverted", "created", "hyperparameters"):
        steps.add_column(col)
    for i, s in enumerate(summary["steps"]):
        hp = ", ".join(f"{k}={v}" for k, v in _headline(s["hyperparameters"]))
        steps.add_row(str(i), s["method"], str(s["requests"]), "yes" if s["inverted"] else "", s["created"], hp)
    out.print(steps)
    relative = any("relative_change" in e for e in summary["entries"])
    entries = Table(title="what each entry changes", title_justify="left", show_edge=False)
    for col in ("#", "tensor", "|ΔW|/|W|" if relative else "|UB|/|Δ|", "rank", "fixes", "stored"):
        entries.add_column(col, overflow="fold")
    for e in summary["entries"]:
        if e["kind"] == "bits":  # no arithmetic to correct: the entry is its changed elements
            fixes = f"{e['diff_count']} changed"
        else:
            fixes = f"{e['fix_count']}/{e['inverse_fix_count']}"
            if relative:
                fixes += f" ≤{_percent(e['fix_max'])}/{_percent(e['inverse_fix_max'])}"
        change = (_percent(e["relative_change"]) if relative else
                  "–" if e["kind"] == "bits" else _number(e["change_norm"]))  # fmt: skip
        entries.add_row(str(e["step"]), _short(e["name"]), change, _rank(e), fixes, human_bytes(e["stored_bytes"]))
    out.print(entries)
    out.print("  rank: 'dense' = a full delta, 'bits' = the result's bits as a difference\n"
              "  from the base's, ×s = scale s ≠ 1, 'inv' = an inverse entry")
    out.print("  fixes: bit corrections of the result / of its inverse" +
              (";\n  ≤: the largest value change of one fix, in % of the tensor's RMS" if relative else ""))
    out.print("[bold]sha256[/] (base → result)")
    dtypes = {e["name"]: f"{e['dtype']} {'x'.join(map(str, e['shape']))}" for e in summary["entries"]}
    for t in summary["tensors"]:
        out.print(f"  {t['name']} ({dtypes[t['name']]})\n    {t['sha256_before']}\n  → {t['sha256_after']}",
                  soft_wrap=True)  # fmt: skip


#: Prefixes the entries table leaves out (the sha256 list below it gives full names): the
#: base model's, and the language model's in a multimodal Gemma 3 checkpoint's files.
_SHORT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")


def _short(name: str) -> str:
    """``model.layers.17.mlp.down_proj.weight`` -> ``layers.17.mlp.down_proj`` (the table fits 80 columns)."""
    prefix = next((p for p in _SHORT_PREFIXES if name.startswith(p)), "")
    return name.removeprefix(prefix).removesuffix(".weight")


def _percent(value: float | None) -> str:
    return "inf" if value is None else f"{100 * value:.3g}%"


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _rank(e: dict[str, Any]) -> str:
    text = str(e["rank"]) if e["kind"] == "lowrank" else e["kind"]  # dense, bits
    if e["kind"] == "lowrank" and e["scale"] != 1:
        text += f" ×{e['scale']:.4g}"
    return text + (" inv" if e["direction"] == "inverse" else "")
