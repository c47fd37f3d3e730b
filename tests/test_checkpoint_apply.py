"""apply / verify / invert / stack on real Hugging Face checkpoint folders.

Tiny random-initialised models of every supported architecture, saved with
``save_pretrained`` (sharded and not, bf16 / fp16 / fp32), patched through the
CLI, then loaded back with plain transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tests.patching import folder_digest, random_patch, same_inode
from tests.tiny_models import CONV1D_ARCHITECTURES, MLP_DOWN_PROJ, NUM_LAYERS, TINY_ARCHITECTURES, make_tiny_checkpoint
from zupatch.checkpoint.folder import Checkpoint
from zupatch.cli.main import app
from zupatch.patch.format import Patch
from zupatch.patch.module import applied, apply_to_module, bits_of

runner = CliRunner()

CASES = [(arch, torch.bfloat16, "60KB") for arch in TINY_ARCHITECTURES] + [
    ("llama", torch.float16, None),
    ("llama", torch.float32, "200KB"),
    ("gpt2", torch.float32, None),
]


def zup(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    built = {}
    for arch, dtype, shard in CASES:
        name = f"{arch}-{str(dtype).split('.')[-1]}-{shard or 'single'}"
        built[(arch, dtype, shard)] = make_tiny_checkpoint(arch, root / name, dtype=dtype, max_shard_size=shard)
    return built


def down_projs(arch: str) -> list[str]:
    return [MLP_DOWN_PROJ[arch].format(i=i) for i in (1, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1]).split('.')[-1]}-{c[2] or 'single'}")
def test_apply_invert_roundtrip_on_real_checkpoint(case: tuple, checkpoints: dict, tmp_path: Path) -> None:
    arch, dtype, shard = case
    base = checkpoints[case]
    if shard:
        assert (base / "model.safetensors.index.json").is_file() and len(Checkpoint(base).files) >= 2
    before = folder_digest(base)
    names = down_projs(arch)
    patch = random_patch(base, names, dense=[MLP_DOWN_PROJ[arch].format(i=NUM_LAYERS - 1)], seed=3)
    patch_file = tmp_path / "p.zup.safetensors"
    patch.save(patch_file)

    code, out = zup("apply", str(patch_file), "--model", str(base), "-o", str(tmp_path / "out"))
    assert code == 0, out
    patched = tmp_path / "out"
    assert folder_digest(base) == before  # input untouched

    # untouched files are copies with the same bytes, never sharing an inode with the input
    touched = {Checkpoint(base).weight_map[n] for n in patch.tensor_names}
    for rel in before:
        if rel not in touched:
            assert not same_inode(base / rel, patched / rel), rel
            assert (base / rel).read_bytes() == (patched / rel).read_bytes(), rel
    # the patched checkpoint loads with plain transformers and runs
    model = AutoModelForCausalLM.from_pretrained(patched, dtype=dtype)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits.float()).all()

    # the in-memory apply gives the same bits as the checkpoint apply
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    apply_to_module(patch, reference)
    params = dict(model.named_parameters())
    for name in patch.tensor_names:
        assert np.array_equal(bits_of(dict(reference.named_parameters())[name])[0], bits_of(params[name])[0]), name

    # GPT-2 stores its down projection transposed (Conv1D): the patch follows the stored layout
    if arch in CONV1D_ARCHITECTURES:
        assert patch.chain(names[0])[0].shape[0] > patch.chain(names[0])[0].shape[1]

    # verify says "applied" on the result, "fits" on the base
    assert zup("verify", str(patch_file), "-m", str(patched))[0] == 3
    assert zup("verify", str(patch_file), "-m", str(base))[0] == 0

    # invert restores the base bit for bit
    inverse = tmp_path / "inv.zup.safetensors"
    assert zup("invert", str(patch_file), "-o", str(inverse))[0] == 0
    code, out = zup("apply", str(inverse), "-m", str(patched), "-o", str(tmp_path / "back"))
    assert code == 0, out
    assert folder_digest(tmp_path / "back") == before


def test_stack_equals_sequential_apply(checkpoints: dict, tmp_path: Path) -> None:
    base = checkpoints[("llama", torch.bfloat16, "60KB")]
    names = down_projs("llama")
    a = random_patch(base, names, seed=1)
    a.save(tmp_path / "a.zup.safetensors")
    assert zup("apply", str(tmp_path / "a.zup.safetensors"), "-m", str(base), "-o", str(tmp_path / "A"))[0] == 0
    b = random_patch(tmp_path / "A", names[1:], seed=2, dense=[MLP_DOWN_PROJ["llama"].format(i=0)])
    b.save(tmp_path / "b.zup.safetensors")
    assert zup("apply", str(tmp_path / "b.zup.safetensors"), "-m", str(tmp_path / "A"), "-o", str(tmp_path / "AB"))[0] == 0

    code, out = zup("stack", str(tmp_path / "a.zup.safetensors"), str(tmp_path / "b.zup.safetensors"),
                    "-o", str(tmp_path / "ab.zup.safetensors"))  # fmt: skip
    assert code == 0, out
    assert zup("apply", str(tmp_path / "ab.zup.safetensors"), "-m", str(base), "-o", str(tmp_path / "S"))[0] == 0
    assert folder_digest(tmp_path / "S") == folder_digest(tmp_path / "AB")

    # the stacked patch's inverse restores the base
    assert zup("invert", str(tmp_path / "ab.zup.safetensors"), "-o", str(tmp_path / "ba.zup.safetensors"))[0] == 0
    assert zup("apply", str(tmp_path / "ba.zup.safetensors"), "-m", str(tmp_path / "S"), "-o", str(tmp_path / "R"))[0] == 0
    assert folder_digest(tmp_path / "R") == folder_digest(base)

    # stacking in the wrong order is refused, naming the patch that does not fit
    code, out = zup("stack", str(tmp_path / "b.zup.safetensors"), str(tmp_path / "a.zup.safetensors"),
                    "-o", str(tmp_path / "bad.zup.safetensors"))  # fmt: skip
    assert code == 1 and "a.zup.safetensors" in out and "does not apply on top of" in out
    assert not (tmp_path / "bad.zup.safetensors").exists()

    # verify places a partly applied checkpoint
    assert zup("verify", str(tmp_path / "ab.zup.safetensors"), "-m", str(tmp_path / "A"))[0] == 4


def test_in_memory_apply_is_undone_exactly(checkpoints: dict) -> None:
    base = checkpoints[("qwen3", torch.bfloat16, "60KB")]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    original = {n: bits_of(p)[0] for n, p in model.named_parameters()}
    patch = random_patch(base, down_projs("qwen3"), seed=5)
    with applied(patch, model):
        changed = [n for n, p in model.named_parameters() if not np.array_equal(bits_of(p)[0], original[n])]
        assert sorted(changed) == sorted(patch.tensor_names)
    assert all(np.array_equal(bits_of(p)[0], original[n]) for n, p in model.named_parameters())


def test_inspect_json_describes_the_patch(checkpoints: dict, tmp_path: Path) -> None:
    base = checkpoints[("llama", torch.bfloat16, "60KB")]
    patch = random_patch(base, down_projs("llama"), rank=3)
    patch.save(tmp_path / "p.zup.safetensors")
    code, out = zup("inspect", "--json", str(tmp_path / "p.zup.safetensors"))
    assert code == 0
    summary = json.loads(out)
    assert [e["name"] for e in summary["entries"]] == down_projs("llama")
    assert all(e["rank"] == 3 and e["kind"] == "lowrank" for e in summary["entries"])
    assert summary["sizes"]["file_bytes"] == (tmp_path / "p.zup.safetensors").stat().st_size
    assert summary["steps"][0]["method"] == "test"
    code, out = zup("inspect", str(tmp_path / "p.zup.safetensors"))
    assert code == 0 and "layers.1.mlp.down_proj" in out and "3 ×1.01" in out, out
    loaded = Patch.load(tmp_path / "p.zup.safetensors")
    assert loaded.to_bytes() == patch.to_bytes()
