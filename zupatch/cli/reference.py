"""Render the CLI reference (docs/cli.md) from the Typer app itself, so it cannot drift.

``python -m zupatch.cli.reference > docs/cli.md`` regenerates it; a test checks
that the committed file equals the output.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer

HEADER = """# CLI reference

Generated from the command definitions by `python -m zupatch.cli.reference > docs/cli.md`
(a test checks it is current). Every command reports a wrong input as one line on
stderr and exits non-zero; `zupatch --debug COMMAND ...` shows tracebacks. A
command line the parser cannot read (an unknown option, a value outside an
option's listed choices) is a usage error with exit code 2. `-h` is `--help`;
`zupatch --install-completion` installs shell completion.
Ctrl-C (or SIGTERM) at any moment, start-up included, ends a command with one
line, `interrupted: ...` saying what was left (`nothing was written`, or for
`apply --push-to` the output folder and what reached the Hub), and exit code 130.
"""


def _type_name(param: Any) -> str:
    """``str | None`` -> "text", ``Path`` -> "path", ``list[str]`` -> "text, repeatable"..."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    text = str(getattr(annotation, "__name__", annotation)).replace("typing.", "").replace("pathlib.", "")
    text = text.replace(" | None", "").replace("Optional[", "").rstrip("]") if "None" in text else text
    names = {"str": "text", "int": "integer", "float": "number", "Path": "path", "bool": "flag"}
    return names.get(text, text)


def _param_row(param: Any) -> str:
    if not getattr(param, "opts", None) or not param.opts[0].startswith("-"):  # an argument
        name = f"`{(param.metavar or param.name).upper()}`"
        kind = "argument" + (", one or more" if param.nargs == -1 else "")
    else:
        opts = list(param.opts) + list(param.secondary_opts)
        name = ", ".join(f"`{o}`" for o in opts)
        kind = "flag" if getattr(param, "is_flag", False) else _type_name(param)
    default = param.default
    if default is None or (getattr(param, "is_flag", False) and default is False) or default == ():
        shown = ""
    else:
        shown = f"`{default}`"
    required = " (required)" if param.required else ""
    help_text = " ".join((getattr(param, "help", None) or "").split())
    return f"| {name} | {kind}{required} | {shown} | {help_text} |"


def _command_section(name: str, cmd: Any, prefix: str = "zupatch") -> list[str]:
    lines = [f"## `{prefix} {name}`", ""]
    if cmd.help:
        lines += [inspect.cleandoc(cmd.help), ""]
    params = [p for p in cmd.params if p.name not in ("help",)]
    if params:
        lines += ["| parameter | kind | default | description |", "|---|---|---|---|"]
        lines += [_param_row(p) for p in params]
        lines.append("")
    if hasattr(cmd, "commands"):  # a command group
        for sub_name, sub in sorted(cmd.commands.items()):
            sub_lines = _command_section(sub_name, sub, f"{prefix} {name}")
            sub_lines[0] = "#" + sub_lines[0]
            lines += sub_lines
    return lines


def render(app: typer.Typer) -> str:
    group = typer.main.get_command(app)
    lines = [HEADER, "## Global options", "", "| parameter | kind | default | description |", "|---|---|---|---|"]
    lines += [_param_row(p) for p in group.params if p.name != "help"]
    lines.append("")
    for name, cmd in group.commands.items():  # in registration order
        lines += _command_section(name, cmd)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    from zupatch.cli.main import app

    print(render(app), end="")
