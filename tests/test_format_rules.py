"""The reader rules and invert/stack field rules of docs/format.md (§2, §5, §6), each shown on real files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.patching import base_tensors, random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app
from zupatch.errors import PatchFormatError
from zupatch.io import jsondoc
from zupatch.patch.format import Patch
from zupatch.patch.ops import DenseEdit, build_patch, invert, stack

runner = CliRunner()
DOWN = MLP_DOWN_PROJ["llama"].format(i=1)
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("rules") / "base")


def rewrite_metadata(src: Path, dst: Path, text: str) -> Path:
    """``src`` with its metadata JSON replaced by ``text`` verbatim (tensors untouched)."""
    blob = src.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"]["zupatch"] = text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    return dst


def metadata_text(path: Path) -> str:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n])["__metadata__"]["zupatch"]


def test_duplicate_keys_are_refused_not_last_one_wins(base: Path, tmp_path: Path) -> None:
    """Two readers must not disagree: a second "direction" key would invert the entry for a last-wins reader."""
    good = random_patch(base, [DOWN])
    good.save(tmp_path / "good.zup.safetensors")
    text = metadata_text(tmp_path / "good.zup.safetensors")
    assert text.count('"direction":"forward"') == 1
    twice = text.replace('"direction":"forward"', '"direction":"forward","direction":"inverse"')
    bad = rewrite_metadata(tmp_path / "good.zup.safetensors", tmp_path / "dup.zup.safetensors", twice)
    with pytest.raises(PatchFormatError, match="'direction' twice"):
        Patch.load(bad)
    with pytest.raises(jsondoc.JSONDocumentError):
        jsondoc.loads('{"a": 1, "a": 1}')  # even with equal values


@pytest.mark.parametrize("version", [0, -5])
def test_format_versions_below_one_are_refused(version: int, base: Path, tmp_path: Path) -> None:
    random_patch(base, [DOWN]).save(tmp_path / "good.zup.safetensors")
    meta = json.loads(metadata_text(tmp_path / "good.zup.safetensors"))
    meta["format_version"] = version
    bad = rewrite_metadata(tmp_path / "good.zup.safetensors", tmp_path / "v.zup.safetensors", json.dumps(meta))
    with pytest.raises(PatchFormatError, match="format_version"):
        Patch.load(bad)


def test_invert_and_stack_of_a_dense_norm_edit_load_back(base: Path, tmp_path: Path) -> None:
    """A dense edit of a 1-D tensor survives invert and stack as a patch zupatch itself can read."""
    tensors = base_tensors(base, [NORM])
    rng = np.random.default_rng(0)
    first = build_patch([DenseEdit(NORM, rng.standard_normal(tensors[NORM][0].shape) * 1e-2)], tensors)
    first.save(tmp_path / "norm.zup.safetensors")
    loaded = Patch.load(tmp_path / "norm.zup.safetensors")
    assert loaded.steps[0].entries[0].shape == tensors[NORM][0].shape
    inverse = invert(loaded)
    inverse.save(tmp_path / "inv.zup.safetensors")
    back = Patch.load(tmp_path / "inv.zup.safetensors")
    np.testing.assert_array_equal(back.steps[0].entries[0].delta, loaded.steps[0].entries[0].delta)
    stack([loaded, back]).save(tmp_path / "both.zup.safetensors")
    assert len(Patch.load(tmp_path / "both.zup.safetensors").steps) == 2
    out = tmp_path / "out"
    assert runner.invoke(app, ["stack", str(tmp_path / "norm.zup.safetensors"), str(tmp_path / "inv.zup.safetensors"),
                               "-o", str(tmp_path / "cli.zup.safetensors")]).exit_code == 0  # fmt: skip
    result = runner.invoke(app, ["apply", str(tmp_path / "cli.zup.safetensors"), "-m", str(base), "-o", str(out)])
    assert result.exit_code == 0, result.output


def test_unknown_keys_survive_invert_and_stack(base: Path, tmp_path: Path) -> None:
    patch = random_patch(base, [DOWN])
    patch.save(tmp_path / "p.zup.safetensors")
    meta = json.loads(metadata_text(tmp_path / "p.zup.safetensors"))
    meta["x_review"] = {"by": "carol"}
    meta["steps"][0]["x_ticket"] = "SEC-42"
    meta["steps"][0]["entries"][0]["x_note"] = "kept?"
    src = rewrite_metadata(tmp_path / "p.zup.safetensors", tmp_path / "x.zup.safetensors", json.dumps(meta))

    assert runner.invoke(app, ["invert", str(src), "-o", str(tmp_path / "inv.zup.safetensors")]).exit_code == 0
    inv = json.loads(metadata_text(tmp_path / "inv.zup.safetensors"))
    assert inv["x_review"] == {"by": "carol"} and inv["steps"][0]["x_ticket"] == "SEC-42"

    args = ["stack", str(src), str(tmp_path / "inv.zup.safetensors"), "-o", str(tmp_path / "s.zup.safetensors")]
    assert runner.invoke(app, args).exit_code == 0
    stacked = json.loads(metadata_text(tmp_path / "s.zup.safetensors"))
    assert stacked["x_review"] == {"by": "carol"}
    assert [s.get("x_ticket") for s in stacked["steps"]] == ["SEC-42", "SEC-42"]

    meta["x_review"] = {"by": "dave"}  # the same key with another value: refused, nothing written
    other = rewrite_metadata(src, tmp_path / "y.zup.safetensors", json.dumps(meta))
    result = runner.invoke(app, ["stack", str(other), str(tmp_path / "inv.zup.safetensors"),
                                 "-o", str(tmp_path / "t.zup.safetensors")])  # fmt: skip
    assert result.exit_code == 1 and "x_review" in result.output
    assert not (tmp_path / "t.zup.safetensors").exists()


def test_documented_limits_are_the_enforced_ones() -> None:
    """docs/format.md §6 states the numbers the readers use."""
    from zupatch.io import safetensors_file
    from zupatch.patch import format as fmt

    doc = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    section = doc.split("## 6.", 1)[1].split("## 7.", 1)[0]
    assert f"nested at most {jsondoc.MAX_DEPTH} levels" in section
    assert f"integers of at most {jsondoc.MAX_INT_DIGITS} digits" in section
    assert f"1 to {fmt.MAX_NDIM} axes" in section and f"at most {fmt.MAX_RANK}" in section
    assert f"each 1 to 2^{fmt.MAX_DIM.bit_length() - 1}" in section
    assert f"2^{fmt.MAX_NUMEL.bit_length() - 1} elements" in section
    assert f"at most {safetensors_file.MAX_HEADER_BYTES >> 20} MiB" in section


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda m: m.update(created=5), "metadata.created"),
        (lambda m: m.update(tool={"name": ["zupatch"]}), "metadata.tool.name"),
    ],
)
def test_metadata_the_reader_lets_through_still_meets_the_schema(mutate, where: str, base: Path, tmp_path: Path) -> None:
    """Fields the reader itself does not need are held to the documented JSON Schema at load
    (one source of truth, shipped as zupatch/patch/metadata.schema.json): one line, via the CLI too."""
    random_patch(base, [DOWN]).save(tmp_path / "good.zup.safetensors")
    meta = json.loads(metadata_text(tmp_path / "good.zup.safetensors"))
    mutate(meta)
    bad = rewrite_metadata(tmp_path / "good.zup.safetensors", tmp_path / "bad.zup.safetensors", json.dumps(meta))
    with pytest.raises(PatchFormatError, match=rf"{where}: does not match the format's schema"):
        Patch.load(bad)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "bad.zup.safetensors" in result.output and where in result.output
