"""The ``zupatch`` command: thin entry points over one library call each.

Every command reports a user error as one line on stderr with a non-zero exit
code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from zupatch._version import __version__
from zupatch.cli import create_cli, demo_cli, eval_cli, export_cli, hub_cli, ui
from zupatch.errors import ZupatchError

app = typer.Typer(
    name="zupatch",
    help="Compute, apply, invert, stack, inspect and ship ZeroUnlearn patches for Hugging Face models.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Exit codes of `zupatch verify` (documented in docs/cli.md).
EXIT_FITS, EXIT_ERROR, EXIT_APPLIED, EXIT_MISMATCH = 0, 1, 3, 4

PatchArg = Annotated[
    str,
    typer.Argument(help="Patch file (.zup.safetensors), or a Hub reference NAMESPACE/NAME[@REVISION][:FILE].",
                   show_default=False),
]  # fmt: skip
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hub repo id resolved through the HF cache.")
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of --model.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary output.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output patch file.")]


def _print_version(value: bool) -> None:
    """Runs while the options are parsed, before click asks for a command."""
    if value:
        typer.echo(f"zupatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Show the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """zupatch: knowledge unlearning shipped as small, exact, invertible patches."""
    ui.state.debug = debug


def _load_patch(ref: str, revision: str | None = None, token: str | None = None):
    """A patch from a local file or a Hub reference (resolved through the HF cache)."""
    from zupatch.hub import load_patch

    return load_patch(ref, revision, token=token)


def _warn(message: str | None, quiet: bool) -> None:
    if message and not quiet:
        ui.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- apply


@app.command()
def apply(
    patch: PatchArg,
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the patched checkpoint.")],
    revision: RevisionOpt = None,
    link: Annotated[bool, typer.Option(
        "--link", help="Hard-link untouched files instead of copying them. Risky: the output then shares "
        "inodes with the input (or the HF cache), so an in-place write into the output changes the input too.")] = False,
    copy: Annotated[bool, typer.Option("--copy", hidden=True, help="The default now; kept for old scripts.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Apply even if the patch writes NaN/Inf where the weights were finite.")] = False,
    push_to: Annotated[
        str | None,
        typer.Option("--push-to", help="Also publish the patched checkpoint to this Hub repo (if that fails or is "
                     "interrupted, the output folder stays and the message says what reached the Hub)."),
    ] = None,
    private: hub_cli.PrivateOpt = False,
    token: hub_cli.TokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a patched copy of a checkpoint, without loading the model.

    Checks that the checkpoint is the patch's base (sha256 of every touched
    tensor), reads only the touched tensors, writes into a temporary folder and
    renames it at the end. Every result tensor is hash-checked, the patch's
    stored inverse must give back the base bits (a patch whose undo would fail
    is refused), and new NaN/Inf values are refused unless --allow-nonfinite.

    Untouched files are reflinked where the filesystem can, else copied: the
    output never shares an inode with the input or the Hugging Face cache
    unless --link asks for it. Refused as ambiguous: a folder holding both
    model.safetensors and model.safetensors.index.json, and a tensor stored in
    two shards. Links are followed only to files inside the model folder (or a
    cache snapshot's blobs). A hidden partial folder left by a killed run on
    the same output is removed.
    """
    from zupatch.checkpoint.apply import apply_to_checkpoint
    from zupatch.hub.resolve import resolve_model
    from zupatch.hub import base_revision_note, hub_output

    with ui.guard(), hub_output(quiet or as_json):
        if push_to:
            hub_cli.check_push_target(push_to, token)  # before writing anything
        p = _load_patch(patch, token=token)
        resolved = resolve_model(model, revision, token=token)
        _warn(base_revision_note(p, resolved), quiet)
        with ui.progress(quiet or as_json) as progress:
            report = apply_to_checkpoint(p, resolved.path, output, link=link and not copy,
                                         allow_nonfinite=allow_nonfinite, progress=progress)  # fmt: skip
        result = {
            "output": str(report.output),
            "model": resolved.label,
            "tensors": report.tensors,
            "touched_files": report.touched_files,
            "linked_files": len(report.linked_files),
            "cloned_files": len(report.cloned_files),
            "copied_files": len(report.copied_files),
            "removed_partial_folders": report.removed_partials,
            "seconds": round(report.seconds, 3),
        }
        if not as_json and not quiet:
            ui.console.print(
                f"[green]applied[/] {len(report.tensors)} tensor(s) in {len(report.touched_files)} file(s) "
                f"-> [bold]{escape(str(report.output))}[/] ({report.seconds:.2f} s; {_placed(report)})",
                soft_wrap=True,
            )
            for folder in report.removed_partials:
                ui.console.print(f"removed {escape(folder)} (left by a killed run)", soft_wrap=True)
        if push_to:
            result["pushed"] = hub_cli.push_applied(report.output, push_to, p, patch, resolved, private, token,
                                                    quiet or as_json)  # fmt: skip
        if as_json:
            _emit_json(result)


def _placed(report: Any) -> str:
    """How the untouched files got there, e.g. "12 copied" or "3 linked, 9 copied"."""
    counts = [("linked", report.linked_files), ("cloned", report.cloned_files), ("copied", report.copied_files)]
    return ", ".join(f"{len(files)} file(s) {how}" for how, files in counts if files) or "no other files"


# --------------------------------------------------------------------------- verify


@app.command()
def verify(patch: PatchArg, model: ModelOpt, revision: RevisionOpt = None, token: hub_cli.TokenOpt = None,
           as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:  # fmt: skip
    """Does this patch fit this checkpoint, or does the checkpoint already have it?

    Exit code 0: the checkpoint is the patch's base (it fits). 3: the patch is
    already applied. 4: neither (another model, or partly applied). 1: error.
    """
    from zupatch.checkpoint.apply import checkpoint_state
    from zupatch.checkpoint.folder import Checkpoint
    from zupatch.hub.resolve import resolve_model
    from zupatch.hub import base_revision_note, hub_output

    with ui.guard(), hub_output(quiet or as_json):
        p = _load_patch(patch, token=token)
        resolved = resolve_model(model, revision, token=token)
        _warn(base_revision_note(p, resolved), quiet or as_json)
        with ui.progress(quiet or as_json) as progress:
            state = checkpoint_state(p, Checkpoint(resolved.path), progress)
        code = {"base": EXIT_FITS, "applied": EXIT_APPLIED}.get(state.status, EXIT_MISMATCH)
        messages = {
            "base": "fits: the checkpoint is this patch's base",
            "applied": "already applied: the checkpoint is this patch's result",
            "partial": "partly applied: touched tensors are at different steps of the patch",
            "mismatch": "does not fit: the checkpoint is neither the patch's base nor its result",
        }
        if as_json:
            _emit_json({
                "status": state.status,
                "exit_code": code,
                "model": resolved.label,
                "tensors": [
                    {"name": t.name, "sha256": t.sha256, "step": t.position, "steps": t.chain_length}
                    for t in state.tensors
                ],
            })  # fmt: skip
        elif not quiet:
            style = {"base": "green", "applied": "yellow"}.get(state.status, "red")
            ui.console.print(f"[{style}]{messages[state.status]}[/] ({resolved.label})")
            for t in state.tensors:
                if t.position is None:
                    ui.console.print(f"  [red]differs[/] {t.name}")
        raise typer.Exit(code)


# --------------------------------------------------------------------------- invert, stack


@app.command()
def invert(
    patch: PatchArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the inverse patch.")],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the patch that restores the base from the result, bit for bit."""
    from zupatch.patch.ops import invert as invert_patch

    with ui.guard():
        inverse = invert_patch(_load_patch(patch))
        inverse.save(output, overwrite=force)
        _report_written(output, inverse, as_json, quiet, "inverse of " + patch)


@app.command()
def stack(
    patches: Annotated[list[str], typer.Argument(help="Patches, in the order they apply.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the stacked patch.")],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Join patches into one that equals applying them in order, bit for bit."""
    from zupatch.patch.ops import stack as stack_patches

    with ui.guard():
        if len(patches) < 2:
            raise ZupatchError("stack needs at least two patches")
        loaded = [_load_patch(p) for p in patches]
        for i in range(1, len(loaded)):
            try:
                stack_patches(loaded[: i + 1])
            except ZupatchError as exc:
                raise ZupatchError(f"does not apply on top of {', '.join(patches[:i])}: {exc.message}", patches[i])
        stacked = stack_patches(loaded)
        stacked.save(output, overwrite=force)
        _report_written(output, stacked, as_json, quiet, f"{len(patches)} patches stacked")


def _report_written(output: Path, patch: Any, as_json: bool, quiet: bool, what: str) -> None:
    size = output.stat().st_size
    if as_json:
        _emit_json({"output": str(output), "bytes": size, "steps": len(patch.steps), "tensors": patch.tensor_names})
    elif not quiet:
        ui.console.print(f"[green]wrote[/] [bold]{output}[/] ({ui.human_bytes(size)}; {what})")


# --------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    patch: PatchArg,
    patch_revision: Annotated[str | None, typer.Option(
        "--patch-revision", help="Hub revision of a patch repo (or write NAMESPACE/NAME@REVISION).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="The patch's base (folder or Hub repo id): also show |W'-W|/|W| per entry.")] = None,
    revision: RevisionOpt = None,
    token: hub_cli.TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarise a patch: base, method, steps, sizes, hashes, and what each entry can change.

    Per entry: its rank, the norm of its additive change (|UB| or |delta|),
    and the number of bit corrections of its result and of its inverse. With
    --model (the base), also the relative change |W'-W|/|W| and the largest
    value change any one correction makes, as a fraction of the tensor's RMS:
    a rounding fix is about one ulp (under 1% of the RMS in bf16), so a
    "rank 2" entry whose corrections move values by a large fraction writes
    values its arithmetic does not explain.
    """
    from zupatch.checkpoint.apply import measure_changes
    from zupatch.checkpoint.folder import Checkpoint
    from zupatch.hub.resolve import resolve_model
    from zupatch.hub import hub_output
    from zupatch.patch.summary import summarize

    with ui.guard(), hub_output(as_json):
        if revision and not model:
            raise ZupatchError("--revision is the revision of --model; for a patch repo use --patch-revision")
        p = _load_patch(patch, patch_revision, token=token)
        changes = measure_changes(p, Checkpoint(resolve_model(model, revision, token=token).path)) if model else None
        summary = summarize(p, file_bytes=Path(p.source).stat().st_size, changes=changes)
        if as_json:
            _emit_json(summary)
        else:
            ui.print_summary(summary, title=patch)


create_cli.register(app)
demo_cli.register(app)
eval_cli.register(app)
export_cli.register(app)
hub_cli.register(app)


#: Placeholders ``--help`` shows for an option's value, by Typer's type label.
_PLACEHOLDERS = {"<str>": "TEXT", "<path>": "PATH", "<int>": "N", "<float>": "NUMBER",
                 "<list[str]>": "TEXT", "<list[Path]>": "PATH"}  # fmt: skip


def _plain_placeholders(command: Any) -> None:
    """Flags show no value placeholder (Typer prints ``<bool>``), other options a plain
    one (``TEXT``, ``PATH``, ``N``, ``NUMBER``, choices as ``[a|b]``), arguments their
    name in capitals (``PATCH``), unless set."""
    context = typer.Context(command, help_option_names=["-h", "--help"])
    options = [p for p in [*command.params, command.get_help_option(context)] if isinstance(p, typer.core.TyperOption)]
    for option in options:
        if option.metavar is not None:
            continue
        shown = option.display_type(context)
        if option.is_flag:
            option.metavar = ""
        elif shown in _PLACEHOLDERS:
            option.metavar = _PLACEHOLDERS[shown]
        elif "|" in shown:  # an enumeration: its choices
            option.metavar = "[" + shown.strip("<>") + "]"
    for argument in command.params:
        if isinstance(argument, typer.core.TyperArgument) and argument.metavar is None:
            argument.metavar = argument.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _plain_placeholders(sub)


def command() -> Any:
    """The click command tree of ``app`` as ``zupatch`` runs it (plain ``--help`` placeholders)."""
    tree = typer.main.get_command(app)
    _plain_placeholders(tree)
    return tree


def main() -> None:
    """Run the command line (the ``zupatch`` command starts here through :mod:`zupatch.__main__`)."""
    # A polite kill (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        command()()
    except KeyboardInterrupt:  # before typer's own handling (building the command tree)
        ui.console.print("[red]interrupted[/]: nothing was written")
        raise SystemExit(130) from None
    except SystemExit as exc:
        # Ctrl-C in a command before its ui.guard() (its imports: torch for create, eval...): typer
        # turns it into exit code 130 without a word, so say it here; guard() reports the others.
        if exc.code == 130 and not ui.state.interrupt_reported:
            ui.console.print("[red]interrupted[/]: nothing was written")
        raise
