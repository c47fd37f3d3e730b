"""docs/cli.md is generated from the Typer app and must be current."""

from pathlib import Path

from zupatch.cli.main import app
from zupatch.cli.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text() == render(app), "docs/cli.md is stale: run `python -m zupatch.cli.reference > docs/cli.md`"


def test_every_command_and_option_is_documented() -> None:
    text = render(app)
    for command in ("apply", "verify", "invert", "stack", "inspect", "push", "export"):
        assert f"## `zupatch {command}`" in text
    assert "`--output`, `-o`" in text and "`--json`" in text


def test_version_and_short_help() -> None:
    """`zupatch --version` prints the version (it used to say "Missing command"); -h is --help."""
    from typer.testing import CliRunner

    from zupatch._version import __version__
    from zupatch.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"zupatch {__version__}"
    for args in (["-h"], ["apply", "-h"], ["create", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage: zupatch" in result.output, args


def test_choices_match_the_engine_and_typos_are_caught() -> None:
    """The CLI's enumerations (listed in --help) are the engine's own lists; a typo names the choices."""
    from typer.testing import CliRunner

    from zupatch.cli.choices import Method, Projection
    from zupatch.cli.main import app
    from zupatch.engine.create import METHODS
    from zupatch.engine.solvers import PROJECTIONS

    assert tuple(m.value for m in Method) == METHODS
    assert tuple(p.value for p in Projection) == tuple(PROJECTIONS)
    result = CliRunner().invoke(app, ["create", "-m", "x", "--forget", "f.jsonl", "-o", "p", "--method", "zerounlern"])
    assert result.exit_code == 2 and "zerounlearn-gd" in result.output


def test_revision_means_the_models_revision_everywhere() -> None:
    from typer.testing import CliRunner

    from zupatch.cli.main import app

    result = CliRunner().invoke(app, ["inspect", "p.zup.safetensors", "--revision", "v1"])
    assert result.exit_code == 1 and "--patch-revision" in result.output
