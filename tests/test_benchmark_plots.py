"""benchmarks/plots.py draws the docs' pictures from recorded JSON that matches the docs' tables.

The recorded figures live twice, as Markdown tables (docs/benchmarks.md,
docs/create.md) and as the JSON the pictures are drawn from
(benchmarks/data/); this checks that they agree, that the script draws valid
PNGs from them, and that the committed pictures stay small and referenced.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
IMAGES = ROOT / "docs" / "images"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 150_000

#: quality run -> the start of its row in docs/benchmarks.md's quality table
QUALITY_ROWS = {
    "base": "| base |",
    "zerounlearn": "| **zerounlearn (defaults, layers 4–6)** |",
    "robust": "| zerounlearn `--preset robust` |",
    "layers-17-19": "| zerounlearn, layers 17–19 (the defaults before) |",
    "previous": "| previous defaults (layers 17–19) |",
    "zerounlearn+retain": "| zerounlearn + `--retain`",
    "ga": "| ga (layers 4–6) |",
    "npo": "| npo (layers 4–6) |",
}


def _plots() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_plots", ROOT / "benchmarks" / "plots.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(doc: str, start: str) -> list[str]:
    (line,) = [line for line in doc.splitlines() if line.startswith(start)]
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")]


def _row(label: str, default: bool) -> str:
    """The start of a table row whose first cell is ``label`` (bold for the default)."""
    return f"| **{label}** |" if default else f"| {label} |"


def test_recorded_json_matches_the_docs_tables() -> None:
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    for row in json.loads((DATA / "quality_2026-11-30.json").read_text())["rows"]:
        cells = _cells(benchmarks, QUALITY_ROWS[row["run"]])
        shares = ["efficacy", "generalization", "tuning_kept", "held_out_kept", "held_out_same_template_kept",
                  "probes_unchanged"]  # fmt: skip
        assert cells[1:7] == [f"{100 * row[key]:.0f}%" for key in shares], row["run"]
        assert cells[7].startswith(f"{row['perplexity']:.2f}"), row["run"]

    create = (ROOT / "docs" / "create.md").read_text()
    sweep = json.loads((DATA / "lambda_sweep.json").read_text())
    retain = sweep["lambda_retain"]
    for run in retain["runs"]:
        cells = _cells(create, _row(f"λ_r {run['lambda_retain']}", run["lambda_retain"] == retain["default"]))
        assert cells[1:] == [f"{run['forgotten']}/{retain['forgotten_of']}", f"{run['kept']}/{retain['kept_of']}"]
    forget = sweep["lambda_forget"]
    for run in forget["runs"]:
        cells = _cells(create, _row(f"λ_f {run['lambda_forget']}", run["lambda_forget"] == forget["default"]))
        assert cells[1:] == [f"{run['kept']}/{forget['kept_of']}",
                             f"{run['not_in_retain_kept']}/{forget['not_in_retain_of']}"]  # fmt: skip


def test_plots_script_draws_small_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert _plots().main(["--out-dir", str(tmp_path)]) == 0
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == ["eval-probabilities.png", "lambda-sweep.png", "quality-tradeoff.png"]
    for name in drawn:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 0 < len(data) < MAX_BYTES, (name, len(data))


def test_committed_pictures_are_small_and_referenced() -> None:
    pictures = sorted(IMAGES.glob("*.png"))
    assert {p.name for p in pictures} >= {"eval-probabilities.png", "lambda-sweep.png", "quality-tradeoff.png"}
    docs = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    referenced = {(path.parent / link).resolve() for path, text in docs.items()
                  for link in re.findall(r"\]\(([^)\s]+\.png)\)", text)}  # fmt: skip
    for picture in pictures:
        data = picture.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 0 < len(data) < MAX_BYTES, (picture.name, len(data))
        assert picture.resolve() in referenced, f"{picture.name} is not shown in any doc"
    assert all(path.is_file() for path in referenced), "a doc shows a picture that does not exist"
    assert "](docs/images/" in docs[ROOT / "README.md"]
