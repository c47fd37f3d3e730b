"""``zupatch export``: a patch in another tool's format (a thin layer over zupatch.export).

Today one format: a PEFT LoRA adapter folder, so serving stacks that swap
adapters on one base (PEFT, vLLM, TGI) can serve a forget edit (docs/serving.md).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from zupatch.cli import ui


class ExportFormat(str, Enum):
    peft = "peft"


def export(
    patch: Annotated[str, typer.Argument(help="Patch file (.zup.safetensors), or a Hub reference to one.",
                                         show_default=False)],
    to: Annotated[ExportFormat, typer.Option("--to", help="Format: peft (a LoRA adapter folder).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the adapter.")],
    base_model: Annotated[str | None, typer.Option(
        "--base-model", help="Base model for adapter_config.json (default: the one the patch records).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the adapter files of an existing folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary output.")] = False,
) -> None:  # fmt: skip
    """Write a patch as a PEFT LoRA adapter that loads with PeftModel.from_pretrained(base, DIR).

    Only a patch whose every entry is W' = W + U·B (scale c = 1, low rank,
    forward) has this form; it is what ZeroUnlearn makes with the default
    --projection off. A scale c ≠ 1, a dense entry (ga/npo), an inverse
    entry or a tensor other than an MLP down projection is refused, and
    nothing is written. Stacked steps on one tensor are joined into one
    LoRA module of the summed rank. The folder holds adapter_config.json
    (lora_alpha = r: scaling 1) and adapter_model.safetensors (the patch's
    factors, in their own dtype). Loading it needs peft (zupatch's peft
    extra); exporting does not. Serving several adapters: docs/serving.md.
    """
    from zupatch.export.peft import export_peft
    from zupatch.hub import hub_output, load_patch

    with ui.guard(), hub_output(quiet or as_json):
        p = load_patch(patch)
        report = export_peft(p, output, source=patch, base_model=base_model, overwrite=force)
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        elif not quiet:
            a = report.adapter
            layers = ", ".join(map(str, a.layers))
            ratio = report.adapter_bytes / a.factor_bytes if a.factor_bytes else 0.0
            ui.console.print(f"[green]wrote[/] PEFT LoRA adapter [bold]{escape(str(output))}[/]", soft_wrap=True)
            ui.console.print(f"  rank {a.rank}, layer(s) {layers}; {ui.human_bytes(report.adapter_bytes)} "
                             f"({ratio:.2f}× the patch's factors)")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(export)
