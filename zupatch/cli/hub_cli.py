"""``zupatch push`` and the Hub options of other commands (registered by :mod:`zupatch.cli.main`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from zupatch.cli import ui

TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Hugging Face token (default: HF_TOKEN, or the one saved by `hf auth login`).",
                 show_default=False),
]  # fmt: skip
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repository as private (if it is new).")]


def push(
    patch: Annotated[str, typer.Argument(help="Patch file (or a Hub reference to one).", show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository NAMESPACE/NAME (created if needed).")],
    private: PrivateOpt = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to push to (created from main if missing).")
    ] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    token: TokenOpt = None,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="Hub id of the base for the card, when the patch records a local path."),
    ] = None,
    filename: Annotated[
        str, typer.Option("--filename", help="Name of the patch file in the repository.")
    ] = "patch.zup.safetensors",
    message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
    eval_report: Annotated[
        Path | None,
        typer.Option("--eval-report", help="A `zupatch eval --json` report of this patch: the card shows its "
                     "figures, without and after each --attack.", show_default=False),
    ] = None,  # fmt: skip
    as_adapter: Annotated[bool, typer.Option(
        "--as-adapter", help="Publish the patch's PEFT LoRA adapter export instead (c = 1 low-rank patches only), "
        "with a card the Hub lists among the base's adapters.")] = False,
    source_url: Annotated[str | None, typer.Option(
        "--source-url", help="https URL of zupatch's git repository, for the card's install line "
        "(zupatch is not on PyPI; default: install from a clone).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary output.")] = False,
) -> None:
    """Publish a patch on the Hub with a model card; pushing the same patch again changes nothing.

    The repository gets the patch (as patch.zup.safetensors) and a README.md
    saying what the patch does (method, layers, number of requests, never their
    text), the exact command to apply it, its size and the base revision it
    expects. Users then run: zupatch apply NAMESPACE/NAME --model BASE -o OUT.
    With --eval-report, the card also shows how robust the forgetting is
    (the report's figures for this patch, without and after each attack).

    With --as-adapter the repository gets the patch as a PEFT LoRA adapter
    (adapter_config.json, adapter_model.safetensors; see zupatch export) and
    a card whose metadata says base_model and base_model_relation: adapter.
    Users then load it with PeftModel.from_pretrained(base, NAMESPACE/NAME).
    """
    from zupatch.errors import ZupatchError
    from zupatch.hub import hub_output, push_adapter, push_patch

    with ui.guard(), hub_output(quiet or as_json):
        if as_adapter:
            if filename != "patch.zup.safetensors":
                raise ZupatchError("--filename names a patch file; an adapter repo holds adapter files")
            result = push_adapter(
                patch, repo, private=private, revision=revision, create_pr=create_pr, token=token,
                base_model=base_model, commit_message=message, source_url=source_url,
            )  # fmt: skip
        else:
            result = push_patch(
                patch, repo, private=private, revision=revision, create_pr=create_pr, token=token,
                filename=filename, base_model=base_model, commit_message=message, source_url=source_url,
                eval_report=eval_report,
            )  # fmt: skip
        if as_json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
            return
        if private and result.private is False and not quiet:
            ui.console.print(f"[yellow]warning:[/] {repo} already exists and is public; --private did not change it")
        if quiet:
            return
        report_push(result, "adapter" if as_adapter else "patch")


def report_push(result, what: str) -> None:  # noqa: ANN001 - a PushResult
    """One line saying what a push did."""
    if result.unchanged:
        ui.console.print(
            f"[green]unchanged[/]: {result.repo_id} ({result.revision}) already has this {what} and card; "
            f"no commit made ({result.url})"
        )
    elif result.pr_url:
        ui.console.print(f"[green]opened[/] pull request {result.pr_url} ({len(result.uploaded)} file(s))")
    else:
        files = ", ".join(result.uploaded) if len(result.uploaded) <= 3 else f"{len(result.uploaded)} files"
        ui.console.print(
            f"[green]pushed[/] {what} to {result.url} ({result.revision} @ {(result.commit or '')[:12]}; {files})"
        )


def check_push_target(repo: str, token: str | None) -> None:
    """Fail before any work when ``--push-to`` cannot succeed: a bad repo id or no token."""
    from zupatch.hub.push import check_repo_id, require_token

    check_repo_id(repo)
    require_token(token)


def push_applied(output, repo: str, patch, patch_ref: str, resolved, private: bool, token: str | None,
                 quiet: bool) -> dict:  # fmt: skip  # noqa: ANN001
    """``apply --push-to``: publish the patched checkpoint with a card naming its base and patch.

    Interrupted, it raises ``KeyboardInterrupt`` saying that ``output`` was
    written, that the push did not complete, and what reached the Hub.
    """
    try:
        return _push_applied(output, repo, patch, patch_ref, resolved, private, token, quiet)
    except KeyboardInterrupt as exc:
        hub_state = str(exc) or f"nothing was uploaded to {repo}"
        raise KeyboardInterrupt(f"the patched checkpoint was written to {output}, but the push to {repo} did not "
                                f"complete: {hub_state}") from None  # fmt: skip


def _push_applied(output, repo: str, patch, patch_ref: str, resolved, private: bool, token: str | None,
                  quiet: bool) -> dict:  # fmt: skip  # noqa: ANN001
    import hashlib

    from zupatch.errors import ZupatchError
    from zupatch.hub import checkpoint_card, push_checkpoint
    from zupatch.hub.pull import loaded_from

    source = loaded_from(patch_ref, patch)  # the very file (and commit) that was applied
    readme = checkpoint_card(
        repo,
        base_model=resolved.repo_id or patch.base_model,
        base_revision=resolved.revision if resolved.repo_id else patch.base_revision,
        patch=patch,
        patch_ref=source.pinned if source.repo_id else patch_ref,
        patch_repo_id=source.repo_id,
        patch_sha256=hashlib.sha256(source.path.read_bytes()).hexdigest(),
    )
    try:
        result = push_checkpoint(output, repo, readme=readme, private=private, token=token)
    except ZupatchError as exc:
        raise ZupatchError(
            f"the patched checkpoint was written to {output}, but the push to {repo} failed: {exc.message}"
        ) from None
    if not quiet:
        report_push(result, "patched checkpoint")
    return result.to_dict()


def register(app: typer.Typer) -> None:
    app.command()(push)
