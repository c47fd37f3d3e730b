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

    from zupatch.cli.choices import DeviceMap, Encoding, Method, Projection
    from zupatch.cli.main import app
    from zupatch.engine.create import METHODS
    from zupatch.engine.placement import DEVICE_MAPS
    from zupatch.engine.solvers import PROJECTIONS
    from zupatch.patch.ops import ENCODINGS

    assert tuple(m.value for m in Method) == tuple(METHODS)
    assert tuple(d.value for d in DeviceMap) == DEVICE_MAPS
    assert tuple(p.value for p in Projection) == tuple(PROJECTIONS)
    assert tuple(e.value for e in Encoding) == ENCODINGS
    result = CliRunner().invoke(app, ["create", "-m", "x", "--forget", "f.jsonl", "-o", "p", "--method", "zerounlern"])
    assert result.exit_code == 2 and "zerounlearn-gd" in result.output


def test_revision_means_the_models_revision_everywhere() -> None:
    from typer.testing import CliRunner

    from zupatch.cli.main import app

    result = CliRunner().invoke(app, ["inspect", "p.zup.safetensors", "--revision", "v1"])
    assert result.exit_code == 1 and "--patch-revision" in result.output


def test_help_shows_plain_placeholders() -> None:
    """Flags show no value placeholder (Typer's own help prints ``--json <bool>``), options
    a plain one: TEXT, PATH, N, NUMBER, or their choices."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200"}
    for args in (["create", "-h"], ["eval", "-h"], ["apply", "-h"], ["stats", "compute", "-h"], ["-h"]):
        shown = subprocess.run([sys.executable, "-m", "zupatch", *args], capture_output=True, text=True, env=env)
        assert shown.returncode == 0, shown.stderr
        for typer_label in ("<bool>", "<int>", "<float>", "<path>", "<list[", "<auto|"):
            assert typer_label not in shown.stdout, (args, typer_label)
    create = subprocess.run([sys.executable, "-m", "zupatch", "create", "-h"], capture_output=True, text=True, env=env)
    rows = {}  # option -> the words after it and its short form: placeholder (if any), then help
    for line in create.stdout.splitlines():
        words = line.strip("│ *").split()
        if words and words[0].startswith("--"):
            rows[words[0]] = [w for w in words[1:] if not (w.startswith("-") and len(w) == 2)]
    assert rows["--tokens"][0] == "N" and rows["--model"][0] == "TEXT" and rows["--forget"][0] == "PATH"
    assert rows["--method"][0] == "[zerounlearn|zerounlearn-gd|ga|npo]" and rows["--lr"][0] == "NUMBER"
    assert rows["--json"][0] == "Print" and rows["--help"][0] == "Show", (rows["--json"], rows["--help"])
