"""``zupatch create`` and ``zupatch stats``: thin layers over zupatch.engine."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from zupatch.cli import ui
from zupatch.cli.choices import DeviceMap, DType, Encoding, FactToken, Method, Preset, Projection, value
from zupatch.errors import OutputExistsError, ZupatchError

if TYPE_CHECKING:
    from zupatch.engine.requests import ForgetRequest

METHOD_HELP = (
    "zerounlearn (closed form), zerounlearn-gd (the gradient-based variant), or a baseline for comparison: "
    "ga (gradient ascent) or npo (negative preference optimisation), dense patches."
)
_IO, _METHOD, _BASELINE, _COMPUTE, _OUT = ("Inputs", "Method and settings", "Baselines (--method ga or npo)",
                                           "Compute", "Output and messages")  # fmt: skip
#: Options that only ZeroUnlearn uses, and those only the baselines use (for a clear error).
ZEROUNLEARN_ONLY = ("--target", "--fact-token", "--projection", "--lambda-retain", "--lambda-forget", "--corpus",
                    "--tokens", "--stats")
BASELINE_ONLY = ("--lr", "--steps", "--beta", "--retain-weight")


def _layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ZupatchError(f"--layers expects comma-separated layer numbers, got {text!r}") from None


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise OutputExistsError("already exists (pass --force to overwrite)", output)
    if not output.parent.is_dir():
        raise ZupatchError("folder does not exist", output.parent)


def create(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hub repo id.", rich_help_panel=_IO)],
    forget: Annotated[Path, typer.Option("--forget", help="Forget requests: JSONL (prompt, subject, target) or CounterFact JSON.", rich_help_panel=_IO)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the patch (.zup.safetensors).", rich_help_panel=_IO)],
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of --model.", rich_help_panel=_IO)] = None,
    retain: Annotated[Path | None, typer.Option("--retain", help="Requests whose answers must stay (same format as --forget; optional: create protects facts of the same kind on its own).", rich_help_panel=_IO)] = None,
    on: Annotated[str | None, typer.Option("--on", metavar="PATCH", help="Create on top of this patch (file or Hub reference; --model is its base): the new patch starts where it ends, so `zupatch stack PATCH NEW` joins them.", rich_help_panel=_IO)] = None,
    token: Annotated[str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN, or the one saved by `hf auth login`).", rich_help_panel=_IO)] = None,
    target: Annotated[str | None, typer.Option("--target", help="Neutral target the model should say instead, non-empty text (default: the EOS token).", rich_help_panel=_METHOD)] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Layers to edit, e.g. 4,5,6 (default: by relative depth).", rich_help_panel=_METHOD)] = None,
    method: Annotated[Method | None, typer.Option("--method", help=METHOD_HELP, rich_help_panel=_METHOD)] = None,
    preset: Annotated[Preset, typer.Option("--preset", help="measured (defaults that measured best), robust (forgetting that holds in chat and after text naming the subject, for some specificity), fast (about 4x faster neutral targets for long deletion lists, at some cost in specificity or depth) or paper (the paper's recipe).", rich_help_panel=_METHOD)] = Preset.measured,
    config: Annotated[Path | None, typer.Option("--config", help="JSON or TOML file of settings (see docs/create.md).", rich_help_panel=_METHOD)] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Any setting, e.g. closed_form.lambda_retain=2000 (repeatable).", rich_help_panel=_METHOD)] = None,
    fact_token: Annotated[FactToken | None, typer.Option("--fact-token", help="Where keys are read: last (the prompt's last token, default; reaches phrasings without the subject) or subject (its last token; the paper's, and ZeroUnlearn-GD's default).", rich_help_panel=_METHOD)] = None,
    projection: Annotated[Projection | None, typer.Option("--projection", help="Where P applies: everywhere (paper), forget, off.", rich_help_panel=_METHOD)] = None,
    lambda_retain: Annotated[float | None, typer.Option("--lambda-retain", help="Weight of the retain statistics.", rich_help_panel=_METHOD)] = None,
    lambda_forget: Annotated[float | None, typer.Option("--lambda-forget", help="Weight of the forget targets.", rich_help_panel=_METHOD)] = None,
    corpus: Annotated[list[Path] | None, typer.Option("--corpus", metavar="PATH", help="Text for key statistics: .txt/.jsonl files or folders (default: sampled from the model; repeatable).", rich_help_panel=_METHOD)] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Token budget of the key statistics.", rich_help_panel=_METHOD)] = None,
    stats: Annotated[str | None, typer.Option("--stats", metavar="REPO", help="Key statistics shared with `zupatch stats push`: a Hub dataset repo NAMESPACE/NAME[@REVISION] or a pulled folder; used only if they match the model, its weights and the layers (instead of --corpus/--tokens).", rich_help_panel=_METHOD)] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (baseline.learning_rate).", rich_help_panel=_BASELINE)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Maximum optimiser steps; training stops earlier once nothing is answered (baseline.steps).", rich_help_panel=_BASELINE)] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="npo: inverse temperature β (baseline.beta).", rich_help_panel=_BASELINE)] = None,
    retain_weight: Annotated[float | None, typer.Option("--retain-weight", help="Weight of the --retain answers' NLL (baseline.retain_weight).", rich_help_panel=_BASELINE)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=_COMPUTE)] = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).", rich_help_panel=_COMPUTE)] = DType.auto,
    device_map: Annotated[DeviceMap | None, typer.Option("--device-map", help="Spread the layers over the GPUs and CPU RAM present (accelerate), for a model larger than one GPU.", rich_help_panel=_COMPUTE)] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="DEV=AMOUNT,...", help="With --device-map: what each device may hold, e.g. 0=70GiB,1=75GiB,cpu=200GiB.", rich_help_panel=_COMPUTE)] = None,
    layers_path: Annotated[str | None, typer.Option("--layers-path", help="Module path of the decoder layers, for unknown architectures.", rich_help_panel=_COMPUTE)] = None,
    down_proj: Annotated[str | None, typer.Option("--down-proj", help="MLP down projection inside a layer, for unknown architectures.", rich_help_panel=_COMPUTE)] = None,
    post_mlp_norm: Annotated[str | None, typer.Option("--post-mlp-norm", help="Norm inside a layer that the MLP output passes before the residual add, for unknown architectures that have one.", rich_help_panel=_COMPUTE)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the statistics cache.", rich_help_panel=_COMPUTE)] = False,
    include_request_text: Annotated[bool, typer.Option("--include-request-text", help="Store the requests' text in the patch (off: only salted hashes).", rich_help_panel=_OUT)] = False,
    encoding: Annotated[Encoding, typer.Option("--encoding", help="How each tensor's change is stored: auto (the smaller of its factors and the difference of its bits from the base's; many requests, or the ga and npo baselines, give bits), arithmetic (factors or delta: what `zupatch export peft` needs; format version 1, as every patch before) or bits.", rich_help_panel=_OUT)] = Encoding.auto,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing patch file.", rich_help_panel=_OUT)] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse (exit 1, nothing written) if the model does not give some target now (nothing to forget), or still gives one after the edit.", rich_help_panel=_OUT)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show the prompt and target in messages about a request (off: file and line only).", rich_help_panel=_OUT)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.", rich_help_panel=_OUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, warnings or summary output.", rich_help_panel=_OUT)] = False,
) -> None:  # fmt: skip
    """Compute a ZeroUnlearn patch that makes a model forget the requested facts.

    Refuses a request longer than the model's context (max_position_embeddings,
    counting the context prefix the edit adds) before loading the model.
    Loads the model, checks that it gives each target now (a warning per
    request whose target it does not give: nothing to forget; --strict makes
    that an error), gathers key statistics (cached; with --stats shared ones,
    refused in one line unless they match the model), optimises target vectors,
    solves the closed form per layer and writes a patch against the
    checkpoint's own tensors. A target the patched model still gives gets a
    warning too (--strict: an error, nothing written). --method ga or npo trains the same layers' down
    projections with a baseline instead (a dense patch). The requests' text
    never enters the patch unless --include-request-text is given.

    Example: zupatch create -m HuggingFaceTB/SmolLM2-135M-Instruct --forget forget.jsonl -o forget.zup.safetensors
    """
    ui.require_engine("create")
    from zupatch.hub.resolve import resolve_model
    from zupatch.engine.api import create_from_checkpoint
    from zupatch.engine.create import CreateConfig, neutral_target_problem
    from zupatch.engine.precheck import not_given_message, still_given_message
    from zupatch.engine.requests import load_requests, load_requests_with_lines
    from zupatch.engine.settings import load_settings_file, parse_assignment, with_settings
    from zupatch.engine.stats import FileCorpus, StatsCache

    with ui.guard():
        _check_output(output, force)
        problem = neutral_target_problem(target)
        if problem:
            raise ZupatchError(problem, "--target")
        located = load_requests_with_lines(forget)
        requests = [request for _, request in located]
        names = [_request_name(forget, line, request, verbose) for line, request in located]
        retain_requests = load_requests(retain, require_target=True) if retain else []
        presets = {Preset.paper: CreateConfig.paper, Preset.robust: CreateConfig.robust, Preset.fast: CreateConfig.fast}
        cfg = presets.get(preset, CreateConfig)()
        chosen: dict[str, Any] = load_settings_file(config) if config else {}
        explicit = {
            "layers": _layers(layers), "method": value(method), "fact_token": value(fact_token),
            "neutral_target": target,
            "closed_form.projection": value(projection), "closed_form.lambda_retain": lambda_retain,
            "closed_form.lambda_forget": lambda_forget, "stats.token_budget": tokens,
            "stats.sampled_token_budget": tokens, "overrides.layers_path": layers_path,
            "overrides.down_proj": down_proj, "overrides.post_mlp_norm": post_mlp_norm,
            "device": device, "dtype": value(dtype), "device_map": value(device_map), "max_memory": max_memory,
            "baseline.learning_rate": lr, "baseline.steps": steps, "baseline.beta": beta,
            "baseline.retain_weight": retain_weight,
        }  # fmt: skip
        chosen.update({k: v for k, v in explicit.items() if v is not None})
        chosen.update(parse_assignment(s) for s in settings or [])
        cfg = with_settings(cfg, chosen, str(config) if config else "settings")
        given = {"--target": target, "--fact-token": value(fact_token), "--projection": value(projection),
                 "--lambda-retain": lambda_retain, "--lambda-forget": lambda_forget, "--corpus": corpus or None,
                 "--tokens": tokens, "--lr": lr, "--steps": steps, "--beta": beta, "--retain-weight": retain_weight,
                 "--stats": stats}  # fmt: skip
        unused = ZEROUNLEARN_ONLY if cfg.is_baseline else BASELINE_ONLY
        wrong = [option for option in unused if given[option] is not None]
        if wrong:
            methods = "zerounlearn and zerounlearn-gd" if cfg.is_baseline else "ga and npo"
            raise ZupatchError(f"{', '.join(wrong)} only apply to --method {methods} (method is {cfg.method})")
        if stats and (corpus or tokens is not None):
            raise ZupatchError("--stats gives the key statistics; --corpus and --tokens would compute others")
        for path in corpus or []:
            if not path.exists():
                raise ZupatchError("corpus path not found", path)
        on_patch = None
        if on is not None:
            from zupatch.hub import load_patch

            on_patch = load_patch(on, token=token)
        shared = None
        if stats:
            from zupatch.hub import hub_output
            from zupatch.engine.stats_hub import locate_stats

            with hub_output(quiet or as_json):
                shared = locate_stats(stats, token=token)
        resolved = resolve_model(model, revision, token=token)
        with ui.progress(quiet or as_json) as progress:
            report = create_from_checkpoint(
                resolved.path, requests, cfg,
                base_model=resolved.repo_id or resolved.path.name, base_revision=resolved.revision,
                include_request_text=include_request_text, encoding=encoding.value, progress=progress, on=on_patch,
                strict=strict, request_names=names, retain_requests=retain_requests,
                corpus=FileCorpus(tuple(corpus)) if corpus else None,
                stats_cache=None if no_cache else StatsCache(), shared_statistics=shared,
                model_identity=f"{resolved.repo_id}@{resolved.revision}" if resolved.repo_id else None,
            )  # fmt: skip
        summary = report.summary()  # serialises the patch once for its size: not again for each message
        if not quiet:
            for check in report.target_checks:
                if not check.given:
                    message = not_given_message(check, names[check.index])
                    ui.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
            for index in report.targets_still_given:  # with --strict, create_from_checkpoint refused them
                message = still_given_message(names[index - 1])
                ui.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
            for message in (held_back_message(summary), ordinary_change_message(summary)):
                if message:
                    ui.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
        report.patch.save(output, overwrite=force)
        summary["output"] = str(output)
        summary["patch_bytes"] = output.stat().st_size
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        elif not quiet:
            _print_create_summary(summary)


def _request_name(path: Path, line: int, request: ForgetRequest, verbose: bool) -> str:
    """``FILE:LINE``, and with --verbose the prompt and target (off by default: they are what is to be forgotten)."""
    if not verbose:
        return f"{path}:{line}"
    text, target = (json.dumps(t, ensure_ascii=False) for t in (request.text, request.target))
    return f"{path}:{line} ({text} → {target})"


def ordinary_change_message(summary: dict[str, Any]) -> str | None:
    """A warning when the edit moves ordinary text a lot (docs/create.md, "Ordinary text")."""
    from zupatch.engine.create import ORDINARY_CHANGE_WARNING

    changes = summary.get("diagnostics", {}).get("ordinary_change") or []
    worst = max(changes, default=0.0)
    if not worst > ORDINARY_CHANGE_WARNING:
        return None
    layer = summary["layers"][changes.index(worst)]
    return (
        f"the edit moves layer {layer}'s MLP output on ordinary text by {100 * worst:.0f}% (RMS; above "
        f"{100 * ORDINARY_CHANGE_WARNING:.0f}% the model's text changes too): check perplexity with "
        "'zupatch eval --text' before shipping, or split the list"
    )


def held_back_message(summary: dict[str, Any]) -> str | None:
    """A warning when the bound on ordinary text held the edit back and answers are still
    given (docs/create.md, "A bound on ordinary text")."""
    diagnostics = summary.get("diagnostics", {})
    bound = diagnostics.get("ordinary_bound")
    held = sorted({d["layer"] for d in diagnostics.get("layers", []) if d.get("forget_scale", 1.0) < 1.0})
    still = len(summary.get("targets_still_given") or [])
    if not (bound and held and still):
        return None
    return (
        f"{still} of {summary['requests']} answer(s) are still given: the edit was held back at layer(s) "
        f"{', '.join(map(str, held))} to move ordinary text by at most {100 * bound:.0f}% "
        "(closed_form.max_ordinary_change); a higher bound forgets more and changes the model's text more"
    )


def _print_create_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['method']} on {summary['architecture']}: {summary['requests']} request(s)",
                  title_justify="left", show_edge=False)  # fmt: skip
    for col in ("layer", "tensor", "rank"):
        table.add_column(col)
    for layer, name, rank, kind in zip(summary["layers"], summary["tensors"], summary["ranks"], summary["kinds"]):
        shown = {"lowrank": str(rank), "dense": "dense", "bits": f"{rank or 'dense'}, as bits"}[kind]
        table.add_row(str(layer), name, shown)
    ui.console.print(table)
    diagnostics = summary["diagnostics"]
    if "stopped_forgotten" in diagnostics:  # a baseline: how training ended
        ending = ("no forget answer is produced any more" if diagnostics["answered_after"] == 0
                  else f"{diagnostics['answered_after']} of {summary['requests']} answer(s) still produced")  # fmt: skip
        ui.console.print(f"training: {diagnostics['steps']} step(s), {ending}")
    verification = diagnostics.get("verification", {})
    still = len(verification.get("still_given", []))
    if verification.get("passes", 1) > 1:
        outcome = f"; {still} answer(s) still given" if still else " until every answer was gone"
        ui.console.print(f"refined: {verification['passes']} passes over the layers{outcome}")
    probes = verification.get("probes") or {}
    if probes.get("n"):
        ui.console.print(
            f"same-pattern probes unchanged: {100 * probes['unchanged']:.0f}% of {probes['n']} "
            "(forget templates, other subjects, none of them protected; docs/eval.md)"
        )
    if summary.get("placement"):
        ui.console.print(_placement_line(summary["placement"]))
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items() if k != "total")
    ui.console.print(f"time: {summary['timings'].get('total', 0):.1f}s ({phases})", soft_wrap=True)
    size, touched = summary["patch_bytes"], summary["touched_bytes"]
    ui.console.print(
        f"[green]wrote[/] [bold]{summary['output']}[/] ({ui.human_bytes(size)}, "
        f"{100 * size / touched:.2f}% of the {ui.human_bytes(touched)} it changes)"
    )


def _placement_line(placement: dict[str, int]) -> str:
    """Where a device map put the decoder layers, e.g. "device map: decoder layers 30 on GPU 0, 2 on cpu"."""
    spread = ", ".join(f"{n} on {f'GPU {d}' if d.isdigit() else d}" for d, n in placement.items())
    return f"device map: decoder layers {spread}"


stats_app = typer.Typer(help="Precompute, list, clear, push and pull key statistics.", no_args_is_help=True)


@stats_app.command("compute")
def stats_compute(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hub repo id.")],
    layers: Annotated[str | None, typer.Option("--layers", help="Layers, e.g. 4,5,6 (default: by relative depth).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of --model.")] = None,
    corpus: Annotated[list[Path] | None, typer.Option("--corpus", help="Text files or folders (default: sampled from the model).")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Token budget.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).")] = DType.auto,
    device_map: Annotated[DeviceMap | None, typer.Option("--device-map", help="Spread the layers over the GPUs and CPU RAM present (accelerate), for a model larger than one GPU.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="DEV=AMOUNT,...", help="With --device-map: what each device may hold, e.g. 0=70GiB,1=75GiB,cpu=200GiB.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:  # fmt: skip
    """Compute key statistics for a model's layers and store them in the cache.

    With --device-map one process spreads the model over the devices present
    (the cache entry is the one a model in one piece writes); under torchrun
    each process holds a whole copy, so the two are not combined.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m zupatch stats compute ...)
    each process sums its share of the corpus on its own device (cuda:LOCAL_RANK
    with NCCL on GPUs, gloo on CPU), the sums are added with an all-reduce, and
    rank 0 writes the cache entry a single process would write (equal up to the
    order of float64 additions; docs/create.md).
    """
    ui.require_engine("stats compute")
    from zupatch.hub.resolve import resolve_model
    from zupatch.engine.api import load_model
    from zupatch.engine.architectures import decoder_layers, num_layers, resolve_architecture
    from zupatch.engine.create import CreateConfig, resolve_device
    from zupatch.engine.distributed import current_ranks, launched_distributed, process_group, rank_device
    from zupatch.engine.placement import layers_per_device, placement_problem
    from zupatch.engine.settings import with_settings
    from zupatch.engine.stats import FileCorpus, StatsCache, compute_key_statistics

    with ui.guard():
        cfg = CreateConfig()
        if tokens is not None:
            cfg = with_settings(cfg, {"stats.token_budget": tokens, "stats.sampled_token_budget": tokens})
        problem = placement_problem(value(device_map), max_memory)
        if problem:
            raise ZupatchError(problem, "--max-memory" if max_memory else "--device-map")
        if device_map is not None and (launched_distributed() or current_ranks().distributed):
            raise ZupatchError("under torchrun each process holds the whole model: give --device-map or torchrun, "
                               "not both", "--device-map")  # fmt: skip
        target = rank_device(resolve_device(device))
        with process_group(target) as ranks:
            quiet = quiet or not ranks.is_main
            resolved = resolve_model(model, revision)
            loaded, tokenizer = load_model(resolved.path, dtype.value, str(target), device_map=value(device_map),
                                           max_memory=max_memory)  # fmt: skip
            spec = resolve_architecture(loaded, cfg.overrides)
            total = num_layers(loaded, spec)
            chosen = replace(cfg, layers=_layers(layers) or None).layers_for(total)
            with ui.progress(quiet) as progress:
                stats = compute_key_statistics(
                    loaded, tokenizer, spec, chosen, FileCorpus(tuple(corpus)) if corpus else None, cfg.stats,
                    StatsCache(), f"{resolved.repo_id}@{resolved.revision}" if resolved.repo_id else None, progress,
                    ranks=ranks,
                )  # fmt: skip
        if not quiet:
            placement = layers_per_device(loaded, decoder_layers(loaded, spec))
            if placement:
                ui.console.print(_placement_line(placement))
            where = f" ({ranks.world_size} processes, {ranks.backend})" if ranks.distributed else ""
            for layer, s in sorted(stats.items()):
                ui.console.print(f"layer {layer}: {s.token_count} tokens, C is {tuple(s.second_moment.shape)}{where}")


@stats_app.command("push")
def stats_push(
    repo: Annotated[str, typer.Argument(metavar="REPO", help="Hub dataset repo NAMESPACE/NAME (created if needed).", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder, or a Hub repo id.")],
    layers: Annotated[str | None, typer.Option("--layers", help="Layers, e.g. 4,5,6 (default: by relative depth).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of --model.")] = None,
    corpus: Annotated[list[Path] | None, typer.Option("--corpus", help="Text files or folders (default: sampled from the model).")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="Token budget.")] = None,
    description: Annotated[str | None, typer.Option("--description", help="A line about the corpus for the card (e.g. its name and licence); never its text.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Compute dtype (auto: float32 on CPU, bfloat16 on GPU).")] = DType.auto,
    device_map: Annotated[DeviceMap | None, typer.Option("--device-map", help="Spread the layers over the GPUs and CPU RAM present (accelerate), for a model larger than one GPU.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="DEV=AMOUNT,...", help="With --device-map: what each device may hold, e.g. 0=70GiB,1=75GiB,cpu=200GiB.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private (if it is new).")] = False,
    token: Annotated[str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN, or the one saved by `hf auth login`).", show_default=False)] = None,
    source_url: Annotated[str | None, typer.Option("--source-url", help="https URL of zupatch's git repository, for the card's install line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary output.")] = False,
) -> None:  # fmt: skip
    """Publish key statistics as a Hub dataset repo, so others need not compute them.

    Computes the statistics as `stats compute` does (or takes them from the
    cache), then pushes one safetensors file per layer, zupatch_stats.json
    (model, revision, layers, sizes, weight fingerprints, corpus description,
    token count: never text) and a card. Pushing the same statistics again
    makes no commit. Others use them with `create --stats REPO` or `stats pull REPO`.
    """
    ui.require_engine("stats push")
    from zupatch.hub.resolve import resolve_model
    from zupatch.engine.api import load_model
    from zupatch.engine.architectures import num_layers, resolve_architecture
    from zupatch.engine.create import CreateConfig
    from zupatch.engine.placement import placement_problem
    from zupatch.engine.settings import with_settings
    from zupatch.engine.shared_stats import bundle_files
    from zupatch.engine.stats import FileCorpus, SampledCorpus, StatsCache, compute_key_statistics
    from zupatch.hub import hub_output
    from zupatch.hub.card import check_source_url
    from zupatch.hub.push import check_repo_id, require_token
    from zupatch.engine.stats_hub import push_stats

    with ui.guard(), hub_output(quiet or as_json):
        check_repo_id(repo)
        check_source_url(source_url)
        tok = require_token(token)  # before any computing
        cfg = CreateConfig()
        if tokens is not None:
            cfg = with_settings(cfg, {"stats.token_budget": tokens, "stats.sampled_token_budget": tokens})
        problem = placement_problem(value(device_map), max_memory)
        if problem:
            raise ZupatchError(problem, "--max-memory" if max_memory else "--device-map")
        resolved = resolve_model(model, revision, token=token)
        loaded, tokenizer = load_model(resolved.path, dtype.value, device, device_map=value(device_map),
                                       max_memory=max_memory)  # fmt: skip
        spec = resolve_architecture(loaded, cfg.overrides)
        total = num_layers(loaded, spec)
        chosen = replace(cfg, layers=_layers(layers) or None).layers_for(total)
        source = FileCorpus(tuple(corpus)) if corpus else SampledCorpus()
        with ui.progress(quiet or as_json) as progress:
            stats = compute_key_statistics(
                loaded, tokenizer, spec, chosen, source, cfg.stats, StatsCache(),
                f"{resolved.repo_id}@{resolved.revision}" if resolved.repo_id else None, progress,
            )  # fmt: skip
        first = stats[chosen[0]].description or {}
        corpus_info: dict[str, Any] = {"kind": "files" if corpus else "self-sampled", "fingerprint": first.get("corpus"),
                                       "max_length": cfg.stats.max_length}  # fmt: skip
        if not corpus:
            corpus_info.update({k: v for k, v in SampledCorpus().description(tokenizer, cfg.stats).items()
                                if k not in ("kind", "tokens")})  # fmt: skip
        if description:
            corpus_info["description"] = " ".join(description.split())
        manifest, files = bundle_files(loaded, spec, stats, model_name=resolved.repo_id or resolved.path.name,
                                       revision=resolved.revision, corpus=corpus_info)  # fmt: skip
        result = push_stats(manifest, files, repo, private=private, token=tok, source_url=source_url)
        if as_json:
            sys.stdout.write(json.dumps({**result.to_dict(), "layers": manifest.layer_numbers,
                                         "tokens": manifest.tokens}, indent=2) + "\n")  # fmt: skip
        elif not quiet:
            from zupatch.cli.hub_cli import report_push

            report_push(result, f"key statistics of {manifest.label} (layers "
                                f"{', '.join(map(str, manifest.layer_numbers))}, {manifest.tokens} tokens)")  # fmt: skip


@stats_app.command("pull")
def stats_pull(
    repo: Annotated[str, typer.Argument(metavar="REPO", help="Hub dataset repo NAMESPACE/NAME[@REVISION] pushed by `stats push`.", show_default=False)],
    token: Annotated[str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN, or the one saved by `hf auth login`).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary output.")] = False,
) -> None:  # fmt: skip
    """Download shared key statistics (through the HF cache) and copy them into the statistics cache.

    Every file is checked against the sha256 in zupatch_stats.json. Once
    downloaded they are used offline. `create --stats REPO` uses them
    directly, after checking that they match the model.
    """
    ui.require_engine("stats pull")
    from zupatch.hub import hub_output
    from zupatch.engine.stats_hub import pull_stats

    with ui.guard(), hub_output(quiet or as_json):
        folder, written = pull_stats(repo, token=token)
        m = folder.manifest
        if as_json:
            sys.stdout.write(json.dumps({"source": folder.source, "model": m.model, "revision": m.revision,
                                         "layers": m.layer_numbers, "tokens": m.tokens,
                                         "cache_files": [str(p) for p in written]}, indent=2) + "\n")  # fmt: skip
        elif not quiet:
            ui.console.print(
                f"[green]pulled[/] key statistics of {escape(m.label)} from {escape(folder.source)}: layers "
                f"{', '.join(map(str, m.layer_numbers))}, {m.tokens} tokens; {len(written)} file(s) in the cache "
                f"(use: zupatch create --stats {escape(repo)} ...)", soft_wrap=True)


@stats_app.command("list")
def stats_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List cached statistics (what they were computed from; never any text)."""
    from zupatch.engine.stats import StatsCache

    with ui.guard():
        entries = StatsCache().entries()
        rows = [{"path": str(e.path), "bytes": e.size_bytes, **e.description} for e in entries]
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
            return
        if not rows:
            ui.console.print("the statistics cache is empty")
        for row in rows:
            desc = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("path", "bytes"))
            ui.console.print(f"{ui.human_bytes(row['bytes'])}  {desc}", soft_wrap=True)


@stats_app.command("clear")
def stats_clear() -> None:
    """Delete every cached statistics file."""
    from zupatch.engine.stats import StatsCache

    with ui.guard():
        removed = StatsCache().clear()
        ui.console.print(f"removed {removed} cached statistics file(s)")


def register(app: typer.Typer) -> None:
    app.command()(create)
    app.add_typer(stats_app, name="stats")
