"""docs/cli.md is generated from the Typer app and must be current."""

from pathlib import Path

from zupatch.cli.main import app
from zupatch.cli.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text() == render(app), "docs/cli.md is stale: run `python -m zupatch.cli.reference > docs/cli.md`"


def test_every_command_and_option_is_documented() -> None:
    text = render(app)
    for command in ("apply", "verify", "invert", "stack", "inspect", "push"):
        assert f"## `zupatch {command}`" in text
    assert "`--output`, `-o`" in text and "`--json`" in text
