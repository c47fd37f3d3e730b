"""``zupatch demo``: the whole job on one fact, drawn as tables (a thin layer over zupatch.demo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from zupatch.cli import ui

STYLES = {"forgotten": "green", "kept": "green", "still known": "yellow", "changed": "red", "not known before": "dim"}


def demo(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint folder or Hub repo id (default: the SmolLM2-135M-Instruct demo model, fetched and converted once into the zupatch cache). When this model does not give the built-in fact's answer, the demo uses the first of Japan→Tokyo, gold→Au that it gives.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help='Forget prompt, {} marks the subject (default: "The capital of {} is"). Needs --target.')] = None,
    subject: Annotated[str | None, typer.Option("--subject", help='Subject filled into {} (default: "France").')] = None,
    target: Annotated[str | None, typer.Option("--target", help='The answer to forget, as in a requests file (default: "Paris"). Needs --prompt.')] = None,
    paraphrase: Annotated[list[str] | None, typer.Option("--paraphrase", help="Another wording of the fact to show (repeatable; {} allowed). Default: one for the built-in fact, none for your own.")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="New folder for the patches and checkpoints the demo writes.")] = Path("zupatch-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo's output folder.")] = False,
    tokens: Annotated[int, typer.Option("--tokens", help="Token budget of the key statistics (sampled from the model, cached; the default is create's, so a later create reads the same cache).")] = 16_384,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report (generations, sizes, seconds, hashes) as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables; errors and the exit code only.")] = False,
) -> None:  # fmt: skip
    """Forget one fact in a real model, show before/after, and prove the undo is bit-exact.

    Fetches the model (once), shows the base model's greedy answers, creates
    the patch, applies it, shows the patched model's answers side by side,
    inverts the patch and checks that applying the inverse restores every
    weight file bit for bit (sha256). Prints the patch's size against the
    model's and the time of each step. Writes the patches and the two
    checkpoints into --output-dir; the fact's text is written nowhere.
    Exit code 1 if the round trip is not bit-exact. CPU: a few minutes.
    """
    ui.require_engine("demo")
    from zupatch.demo import STEPS, DemoConfig, run_demo
    from zupatch.hub import hub_output

    silent = quiet or as_json
    with ui.guard(), hub_output(silent):
        config = DemoConfig(model=model, output_dir=output_dir, force=force, tokens=tokens, device=device)
        config = config.with_fact(prompt, subject, target, paraphrase or ())
        counter = {"n": 0}

        def on_step(label: str, seconds: float | None) -> None:
            if seconds is not None or silent:
                return
            if not counter["n"]:  # printed once the inputs checked out, so a user error stays one line
                where = model or "the SmolLM2-135M-Instruct demo model"
                ui.console.print(f"[bold]zupatch demo[/]: forget one fact in {where}", soft_wrap=True)
            counter["n"] += 1
            ui.console.print(f"[dim]{counter['n']}/{len(STEPS)}[/] {label}", soft_wrap=True)

        with ui.progress(silent) as progress:
            report = run_demo(config, progress=progress, on_step=on_step, show_download=not silent)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        elif not quiet:
            _print_report(report)
        if not report.round_trip_exact:
            if not silent:
                ui.console.print(f"[red]error:[/] the round trip is NOT bit-exact: {', '.join(report.mismatched_files)} "
                                 "differ from the original")  # fmt: skip
            raise typer.Exit(1)


def _shown(text: str) -> Text:
    """A generation on one line: line breaks as ↵, the end of text as (end)."""
    stripped = text.strip(" ")
    return Text(stripped.replace("\n", "↵") if stripped else "(end)")


def _print_report(report: Any) -> None:
    """The before/after table, sizes, timings and the round-trip verdict."""
    from rich.filesize import decimal as human_bytes

    out = Console(highlight=False)
    table = Table(title=f"greedy answers of {report.model}, before and after the patch", title_justify="left")
    for col in ("", "prompt", "before", "after", ""):
        table.add_column(col, overflow="fold")
    for row in report.rows:
        table.add_row(row.kind, Text(row.prompt), _shown(row.before), _shown(row.after),
                      Text(row.verdict, style=STYLES.get(row.verdict, "")))  # fmt: skip
    out.print(table)
    for note in _notes(report.rows):
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)

    size, model_bytes, touched = report.patch_bytes, report.model_bytes, report.touched_bytes
    out.print(
        f"[bold]size[/]: patch {human_bytes(size)} for a {human_bytes(model_bytes)} model "
        f"({100 * size / model_bytes:.3f}%); it changes {len(report.tensors_changed)} of {report.tensors_total} "
        f"tensors ({human_bytes(touched)}, {100 * touched / model_bytes:.2f}% of the weights; patch = "
        f"{100 * size / touched:.2f}% of what it changes); layers {', '.join(map(str, report.layers))}, "
        f"ranks {', '.join(map(str, report.ranks))}",
        soft_wrap=True,
    )

    timings = Table(title="time per step", title_justify="left", show_edge=False)
    timings.add_column("step")
    timings.add_column("seconds", justify="right")
    timings.add_column("")
    phases = ", ".join(f"{k} {v:.1f}" for k, v in report.create_phases.items() if k not in ("total", "load", "patch"))
    for step, seconds in report.seconds.items():
        note = phases if step == "create" else ""
        timings.add_row(step if step != "total" else Text("total", style="bold"), f"{seconds:.1f}", note)
    out.print(timings)

    out.print(
        f"wrote [bold]{report.output_dir}[/]: {Path(report.patch_path).name}, {Path(report.inverse_path).name} "
        f"({human_bytes(report.inverse_bytes)}), {Path(report.unlearned_path).name}/ (patched), "
        f"{Path(report.restored_path).name}/ (restored)",
        soft_wrap=True,
    )
    if report.round_trip_exact:
        out.print(f"[bold green]round trip bit-exact ✓[/] ({len(report.file_sha256)} weight files, sha256 of each "
                  "restored file = the original's)")  # fmt: skip


def _notes(rows: Any) -> list[str]:
    """What a reader should know about the table's verdicts (the demo has no retain file)."""
    notes = []
    for row in rows:
        if row.kind == "forget" and not row.said_before:
            notes.append(f"the base model did not answer {row.answer!r} to the forget prompt; pick a fact it knows")
        elif row.kind == "forget" and row.said_after:
            notes.append(f"the patched model still answers {row.answer!r}; docs/create.md lists the settings to try")
    changed = sum(1 for row in rows if row.kind == "unrelated" and row.verdict == "changed")
    if changed:
        notes.append(f"{changed} unrelated answer(s) changed: facts of the same pattern need protecting, which "
                     "`zupatch create --retain FILE` does (docs/create.md)")  # fmt: skip
    return notes


def register(app: typer.Typer) -> None:
    app.command()(demo)
