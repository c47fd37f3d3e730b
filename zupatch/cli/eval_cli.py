"""``zupatch eval``: a thin layer over :func:`zupatch.eval.evaluate.evaluate`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from zupatch.cli import ui
from zupatch.cli.choices import DeviceMap, DType, value
from zupatch.cli.hub_cli import TokenOpt
from zupatch.errors import ZupatchError


def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hub repo id (the base model).")],
    data: Annotated[Path, typer.Option("--forget", "--data", "-d", help="Facts to forget: zupatch JSONL, CounterFact/MCF or zsRE records (see docs/eval.md).")],
    patch: Annotated[list[str] | None, typer.Option("--patch", "-p", help="Patch file or Hub reference, evaluated applied in memory (repeatable).")] = None,
    retain: Annotated[Path | None, typer.Option("--retain", help="Facts that must stay (create's requests format, answers required).")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="Ordinary text for perplexity, one document per line (default: text sampled from the base model).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of --model.")] = None,
    generations: Annotated[int, typer.Option("--generations", help="Forget prompts shown with the greedy continuation of every model (0: none).")] = 3,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Length of those continuations, in tokens.")] = 12,
    text_tokens: Annotated[int, typer.Option("--text-tokens", help="Tokens of self-sampled text, when no --text is given.")] = 2048,
    probes: Annotated[int, typer.Option("--probes", help="Same-pattern probes: the forget templates filled with N subjects the base model proposes and N vocabulary words, none that create protects; top-1 unchanged is reported (0: none).")] = 16,
    attack: Annotated[list[str] | None, typer.Option("--attack", "-a", help="Also score every model after an attack (repeatable): quant:TYPE (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0), chat, topk:K, lens, mention, relearn:STEPS, or all (docs/eval.md).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).")] = DType.auto,
    device_map: Annotated[DeviceMap | None, typer.Option("--device-map", help="Spread the layers over the GPUs and CPU RAM present (accelerate), for a model larger than one GPU.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="DEV=AMOUNT,...", help="With --device-map: what each device may hold, e.g. 0=70GiB,1=75GiB,cpu=200GiB.")] = None,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (format in docs/eval.md).")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Also draw each forget prompt's (and paraphrase's) answer probability, base and every patch, to this picture (overwritten); it shows the forget prompts and answers. Needs matplotlib: pip install 'zupatch[plot]'.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:  # fmt: skip
    """Score the base model and each patched variant: efficacy, generalization, specificity, fluency.

    Patches are applied in memory from the checkpoint's stored bits (nothing
    is written) after their base hashes are checked. Specificity includes
    same-pattern probes derived from the forget data and the base model, so
    collateral damage shows even without --retain. --attack also scores every
    model after quantization, chat questions, top-K sampling, the logit lens
    or a short fine-tune, to see whether the forgetting holds. The report shows the
    forget prompts' greedy continuations, so it contains the forget text:
    keep it where the data file is. So does the --plot picture: its rows are
    labelled with the forget prompts and answers.
    """
    if plot is not None:  # before torch is imported: a missing extra costs no evaluation
        from zupatch.eval.plot import check_plot_output

        with ui.guard():
            check_plot_output(plot)
    ui.require_engine("eval")
    from zupatch.hub.resolve import resolve_model
    from zupatch.eval.data import load_eval_data
    from zupatch.eval.evaluate import EvalConfig, evaluate
    from zupatch.hub import hub_output, load_patch

    with ui.guard(), hub_output(quiet or as_json):
        config = EvalConfig(device=device, dtype=dtype.value, device_map=value(device_map), max_memory=max_memory,
                            batch_size=batch_size, generations=generations,
                            new_tokens=new_tokens, text_tokens=text_tokens, probes=probes,
                            attacks=tuple(attack or ()))  # fmt: skip
        records = load_eval_data(data, retain)
        texts = _read_texts(text) if text is not None else None
        patches = [(ref, load_patch(ref, token=token)) for ref in patch or []]
        resolved = resolve_model(model, revision, token=token)
        with ui.progress(quiet or as_json) as progress:
            report = evaluate(resolved.path, patches, records, config, texts=texts,
                              model_label=resolved.label, progress=progress)  # fmt: skip
        result = report.to_dict()
        if plot is not None:
            from zupatch.eval.plot import draw_report

            draw_report(result, plot, [f"{i.prompt} → {i.answer}" for i in records.forget],
                        [f"{i.prompt} → {i.answer}" for i in records.paraphrases])  # fmt: skip
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        else:
            print_report(result, data.name)
        if plot is not None and not (quiet or as_json):
            ui.console.print(f"answer probabilities drawn to {escape(str(plot))}", soft_wrap=True)


def _read_texts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ZupatchError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ZupatchError(f"cannot read: {error}", path) from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ZupatchError("no text in file (empty)", path)
    return texts


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _probability(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


#: (section, metric key, label, formatter, count key: the row shows when the base has prompts) of the metrics table
ROWS = [
    ("efficacy", "answered", "forget prompts still answered", _percent, "n"),
    ("efficacy", "probability", "  mean answer probability", _probability, "n"),
    ("generalization", "answered", "paraphrases still answered", _percent, "n"),
    ("generalization", "probability", "  mean answer probability", _probability, "n"),
    ("specificity", "answered", "retain prompts answered", _percent, "n"),
    ("specificity", "kept", "  kept (of those the base answers)", _percent, "n"),
    ("specificity", "unchanged", "unlabelled neighbours unchanged", _percent, "unlabelled_n"),
    ("specificity", "derived_unchanged", "same-pattern probes unchanged", _percent, "derived_n"),
]


def print_report(report: dict[str, Any], data_name: str = "the data file") -> None:
    """The human form of the report: one metrics table, the attacks' table, the lines of
    ``data_name`` still answered, one table of generations."""
    out = Console(highlight=False)
    models = report["models"]
    data = report["data"]
    out.print(
        f"[bold]{escape(report['model'])}[/]: {data['forget']} forget prompt(s), {data['paraphrases']} paraphrase(s), "
        f"{data['retain']} retain prompt(s), {data['unlabelled_neighbours']} unlabelled neighbour(s), "
        f"{data['derived_probes']} same-pattern probe(s); "
        f"perplexity on {data['text_tokens']} tokens of "
        + ("--text" if data["text"] == "text" else "text sampled from the base model"),
        soft_wrap=True,
    )
    table = Table(show_edge=False)
    table.add_column("metric")
    for m in models:
        header = _short(m["name"]) if m["patch"] is None else f"{_short(m['name'])}\n({m['patch']['method']})"
        table.add_column(escape(header), justify="right")
    for section, key, label, fmt, count in ROWS:
        if models[0][section].get(count):
            table.add_row(label, *(fmt(m[section][key]) for m in models))
    if models[0]["fluency"]["perplexity"] is not None:
        table.add_row("perplexity", *(_perplexity(m["fluency"]) for m in models))
    table.add_row("patch size", *("" if m["patch"] is None else ui.human_bytes(m["patch"]["bytes"]) for m in models))
    table.add_row("seconds", *(f"{m['seconds']:.1f}" for m in models))
    out.print(table)
    if report.get("attacks"):
        print_attacks(out, report)
    print_still_answered(out, report, data_name)
    if models[0]["generations"]:
        shown = Table(title="greedy continuations of forget prompts", title_justify="left", show_edge=False)
        shown.add_column("prompt")
        for m in models:
            shown.add_column(escape(_short(m["name"])), overflow="fold")
        for i, item in enumerate(models[0]["generations"]):
            shown.add_row(escape(item["prompt"]), *(_continuation(m["generations"][i]["continuation"]) for m in models))
        out.print(shown)


#: (section, metric key, label, count key) of an attack's rows; shown when the base has a figure
ATTACK_ROWS = [
    ("efficacy", "answered", "forget prompts answered", "n"),
    ("generalization", "answered", "paraphrases answered", "n"),
    ("specificity", "kept", "retain kept", "n"),
    ("specificity", "derived_unchanged", "probes unchanged", "derived_n"),
]


def print_attacks(out: Console, report: dict[str, Any]) -> None:
    """One table: for each attack, what it extracts from each model and what the model keeps after it."""
    models = report["models"]
    table = Table(title="after each attack (docs/eval.md)", title_justify="left", show_edge=False)
    table.add_column("attack / metric")
    for m in models:
        table.add_column(escape(_short(m["name"])), justify="right")
    skipped = []
    for index, attack in enumerate(report["attacks"]):
        entries = [m["attacks"][index] for m in models]
        if entries[0]["skipped"]:
            skipped.append(f"{attack['name']}: skipped, {entries[0]['skipped']}")
            continue
        first = True
        for section, key, label, count in ATTACK_ROWS:
            figures = entries[0][section]
            if not figures or not figures.get(count) or figures.get(key) is None:
                continue
            name = f"{attack['name']}: {label}" if first else f"  {label}"
            table.add_row(escape(name), *(_percent((e[section] or {}).get(key)) for e in entries))
            first = False
        if entries[0]["fluency"] and entries[0]["fluency"]["perplexity"] is not None:
            table.add_row("  perplexity", *(_perplexity(e["fluency"]) for e in entries))
    out.print(table)
    for line in skipped:
        out.print(f"[dim]{escape(line)}[/]")


#: How many line numbers a row of "still answered" shows before "+N more".
SHOWN_LINES = 12


def print_still_answered(out: Console, report: dict[str, Any], data_name: str) -> None:
    """Per patch, the lines of the forget file whose prompt is still answered, without attack
    and after each attack that extracts some: which facts to look at before pushing."""
    attacks = [a["name"] for a in report.get("attacks") or []]
    rows = []
    for model in report["models"][1:]:
        found = [("", model["efficacy"].get("answered_lines") or [])]
        found += [(name, (entry["efficacy"] or {}).get("answered_lines") or [])
                  for name, entry in zip(attacks, model.get("attacks") or [])]  # fmt: skip
        parts = [f"{'after ' + name + ' ' if name else ''}{_lines(lines)}" for name, lines in found if lines]
        if parts:
            rows.append(f"  {escape(_short(model['name']))}: {escape('; '.join(parts))}")
    if rows:
        out.print(f"forget prompts still answered, by line of {escape(data_name)}:")
        for row in rows:
            out.print(row)


def _lines(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:SHOWN_LINES]))
    return shown + (f" (+{len(lines) - SHOWN_LINES} more)" if len(lines) > SHOWN_LINES else "")


def _short(name: str) -> str:
    """A patch file's name without folders and the .zup.safetensors suffix (Hub refs as given)."""
    path = Path(name)
    if path.is_file():
        return path.name.removesuffix(".safetensors").removesuffix(".zup")
    return name


def _continuation(text: str) -> str:
    """Rich cell for a continuation: quoted (markup escaped), or a note when the model stops at once."""
    return escape(repr(text)) if text else "[dim](ends the text)[/]"


def _perplexity(fluency: dict[str, Any]) -> str:
    change = fluency["perplexity_change"]
    suffix = "" if not change else f" ({100 * change:+.1f}%)"
    return f"{fluency['perplexity']:.2f}{suffix}"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
