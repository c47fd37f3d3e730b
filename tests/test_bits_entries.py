"""``bits`` entries (format version 2): the result's bit patterns as a difference from the base's.

Checked against the arithmetic entries they replace (same result hash, same
bits), through apply, invert and stack on real checkpoint folders, and
against the reader rules of docs/format.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.patching import base_tensors, folder_digest, random_patch
from tests.test_exactness import DTYPES, base_tensor, edit_for
from tests.test_format_rules import metadata_text, rewrite_metadata
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app
from zupatch.errors import PatchFormatError, ZupatchError
from zupatch.export.peft import to_adapter
from zupatch.patch import numerics as nm
from zupatch.patch.format import Patch
from zupatch.patch.ops import LowRankEdit, build_patch, invert, run_chain_in_memory, stack

runner = CliRunner()
DOWN = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (0, 1)]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("bits") / "base", dtype=torch.bfloat16)


def zup(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_a_bits_entry_gives_the_arithmetic_entrys_bits_both_ways(data: st.DataObject, dtype: nm.DType) -> None:
    """Any edit, any dtype, special values included: the bits entry's result and inverse are exact."""
    base = data.draw(base_tensor(dtype))
    edit = data.draw(edit_for("w", base.shape))
    arithmetic = build_patch([edit], {"w": (base, dtype)})
    bits = Patch.load_bytes(build_patch([edit], {"w": (base, dtype)}, encoding="bits").to_bytes())
    a, b = arithmetic.steps[0].entries[0], bits.steps[0].entries[0]
    assert b.sha256_after == a.sha256_after
    expected = run_chain_in_memory(arithmetic.chain("w"), base)
    if np.array_equal(expected, base):
        assert b.kind == a.kind  # nothing changes: nothing to store as bits
        return
    assert b.kind == "bits" and b.fix is None and b.inverse_fix is None and bits.format_version == 2
    assert np.array_equal(run_chain_in_memory(bits.chain("w"), base, prove_inverse=True), expected)
    assert np.array_equal(run_chain_in_memory(invert(bits).chain("w"), expected), base)


def test_auto_keeps_factors_for_a_low_rank_edit_and_bits_for_a_full_rank_one(base: Path, tmp_path: Path) -> None:
    tensors = base_tensors(base, DOWN)
    rows, cols = tensors[DOWN[0]][0].shape
    rng = np.random.default_rng(0)
    low = LowRankEdit(DOWN[0], 1.0, rng.standard_normal((rows, 1)) * 0.05, rng.standard_normal((1, cols)) * 0.05)
    full = LowRankEdit(DOWN[1], 1.0, rng.standard_normal((rows, rows)) * 0.05, rng.standard_normal((rows, cols)) * 0.05)
    patch = build_patch([low, full], tensors, encoding="auto")
    kinds = {e.name: e.kind for e in patch.steps[0].entries}
    assert kinds == {DOWN[0]: "lowrank", DOWN[1]: "bits"}
    arithmetic = build_patch([low, full], tensors)
    for a, b in zip(arithmetic.steps[0].entries, patch.steps[0].entries):
        assert a.sha256_after == b.sha256_after
        assert b.stored_bytes() <= a.stored_bytes()
    assert patch.steps[0].entries[1].stored_bytes() < 0.5 * arithmetic.steps[0].entries[1].stored_bytes()
    # a patch without bits entries stays a version-1 file
    for made, version in ((arithmetic, 1), (patch, 2)):
        made.save(tmp_path / f"v{version}.zup.safetensors")
        assert json.loads(metadata_text(tmp_path / f"v{version}.zup.safetensors"))["format_version"] == version
    with pytest.raises(ValueError, match="unknown encoding"):
        build_patch([low], tensors, encoding="smallest")


def test_bits_patches_apply_invert_and_stack_on_a_checkpoint(base: Path, tmp_path: Path) -> None:
    """Through the CLI: apply, verify, invert, stack with an arithmetic patch, inspect."""
    before = folder_digest(base)
    a = random_patch(base, DOWN, seed=1, encoding="bits")
    assert {e.kind for e in a.steps[0].entries} == {"bits"}
    a.save(tmp_path / "a.zup.safetensors")
    assert zup("apply", str(tmp_path / "a.zup.safetensors"), "-m", str(base), "-o", str(tmp_path / "A"))[0] == 0
    reference = random_patch(base, DOWN, seed=1)  # the same edit, kept as factors
    reference.save(tmp_path / "r.zup.safetensors")
    assert zup("apply", str(tmp_path / "r.zup.safetensors"), "-m", str(base), "-o", str(tmp_path / "R"))[0] == 0
    assert folder_digest(tmp_path / "A") == folder_digest(tmp_path / "R")
    assert zup("verify", str(tmp_path / "a.zup.safetensors"), "-m", str(tmp_path / "A"))[0] == 3

    b = random_patch(tmp_path / "A", DOWN[1:], seed=2)  # arithmetic, on top of the bits patch
    b.save(tmp_path / "b.zup.safetensors")
    code, out = zup("stack", str(tmp_path / "a.zup.safetensors"), str(tmp_path / "b.zup.safetensors"),
                    "-o", str(tmp_path / "ab.zup.safetensors"))  # fmt: skip
    assert code == 0, out
    assert Patch.load(tmp_path / "ab.zup.safetensors").format_version == 2
    assert zup("apply", str(tmp_path / "ab.zup.safetensors"), "-m", str(base), "-o", str(tmp_path / "AB"))[0] == 0
    assert zup("invert", str(tmp_path / "ab.zup.safetensors"), "-o", str(tmp_path / "ba.zup.safetensors"))[0] == 0
    code, out = zup("apply", str(tmp_path / "ba.zup.safetensors"), "-m", str(tmp_path / "AB"), "-o",
                    str(tmp_path / "back"))  # fmt: skip
    assert code == 0, out
    assert folder_digest(tmp_path / "back") == before == folder_digest(base)

    code, out = zup("inspect", "--json", str(tmp_path / "a.zup.safetensors"))
    summary = json.loads(out)
    assert code == 0 and summary["format_version"] == 2
    assert all(e["kind"] == "bits" and e["diff_count"] > 0 and e["change_norm"] is None for e in summary["entries"])
    code, out = zup("inspect", str(tmp_path / "a.zup.safetensors"), "--model", str(base))
    assert code == 0 and "bits" in out and "changed" in out, out


def test_bits_entries_are_read_only_as_the_format_says(base: Path, tmp_path: Path) -> None:
    random_patch(base, DOWN[:1], encoding="bits").save(tmp_path / "good.zup.safetensors")
    meta = json.loads(metadata_text(tmp_path / "good.zup.safetensors"))

    def refused(change, match: str) -> None:
        bad = json.loads(json.dumps(meta))
        change(bad)
        path = rewrite_metadata(tmp_path / "good.zup.safetensors", tmp_path / "bad.zup.safetensors", json.dumps(bad))
        with pytest.raises(PatchFormatError, match=match):
            Patch.load(path)

    refused(lambda m: m.update(format_version=1), "needs format_version 2")
    refused(lambda m: m["steps"][0]["entries"][0].update(fix=m["steps"][0]["entries"][0]["diff"]),
            "must be null for a bits entry")
    refused(lambda m: m["steps"][0]["entries"][0].pop("diff"), "missing 'diff'")
    # a diff whose count does not match its data is found when it is decoded, before anything is written
    bad = json.loads(json.dumps(meta))
    bad["steps"][0]["entries"][0]["diff"]["count"] = 1
    path = rewrite_metadata(tmp_path / "good.zup.safetensors", tmp_path / "bad.zup.safetensors", json.dumps(bad))
    bits, _ = base_tensors(base, DOWN[:1])[DOWN[0]]
    with pytest.raises(PatchFormatError, match="unusable: correction data has the wrong length"):
        run_chain_in_memory(Patch.load(path).chain(DOWN[0]), bits)


def test_a_bits_patch_is_not_a_lora_adapter(base: Path) -> None:
    with pytest.raises(ZupatchError, match="--encoding arithmetic"):
        to_adapter(random_patch(base, DOWN, scale=1.0, encoding="bits"))
