"""``zupatch export --to peft``: the adapter PEFT loads computes what the applied checkpoint computes.

Real models, no mocks: the patch is exported through the CLI, the adapter is
loaded with ``PeftModel.from_pretrained(base, DIR)``, and its logits are
compared with those of the ``zupatch apply``'d checkpoint loaded with plain
transformers. Tolerances (docs/serving.md): max |Δlogit| ≤ 1.0 in bf16 (the
same bf16 model, batched vs. one prompt at a time, differs by 0.81 on these
prompts), ≤ 1e-3 in float32 (measured 4e-5 on SmolLM2). The edits are large
enough that the applied model differs from the base far beyond the tolerance,
so an adapter that did not load would fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.patching import base_tensors, random_patch
from tests.tiny_models import MLP_DOWN_PROJ, make_tiny_checkpoint
from zupatch.cli.main import app
from zupatch.patch.format import Patch
from zupatch.patch.ops import LowRankEdit, build_patch, invert, stack

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

runner = CliRunner()
DATA = Path(__file__).parent / "data"
BF16_TOLERANCE = 1.0
F32_TOLERANCE = 1e-3
LAYERS = (17, 18, 19)


def zup(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def c1_patch(folder: Path, names: list[str], ranks: list[int], *, amplitude: float, seed: int = 0) -> Patch:
    """A c = 1 low-rank patch (what ZeroUnlearn makes with --projection off) with random factors."""
    rng = np.random.default_rng(seed)
    base = base_tensors(folder, names)
    edits = []
    for name, r in zip(names, ranks):
        rows, cols = base[name][0].shape
        edits.append(LowRankEdit(name, 1.0, rng.standard_normal((rows, r)) * amplitude,
                                 rng.standard_normal((r, cols)) * amplitude))  # fmt: skip
    return build_patch(edits, base, method="zerounlearn", base_model=folder.name)


def export_and_apply(patch: Patch, base: Path, tmp: Path) -> tuple[Path, Path, dict]:
    tmp.mkdir(exist_ok=True)
    patch_file = patch.save(tmp / "forget.zup.safetensors")
    code, out = zup("apply", str(patch_file), "--model", str(base), "-o", str(tmp / "applied"), "-q")
    assert code == 0, out
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(tmp / "adapter"), "--json")
    assert code == 0, out
    return tmp / "applied", tmp / "adapter", json.loads(out)


def prompts(n: int = 20) -> list[str]:
    facts = [json.loads(line) for line in (DATA / "smollm2_facts.jsonl").read_text().splitlines() if line.strip()]
    return [f["prompt"].replace("{}", f["subject"]) for f in facts[:n]]


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()[batch["attention_mask"].bool()]  # real tokens only


def compare(base: Path, applied: Path, adapter: Path, dtype: torch.dtype, batch: dict) -> tuple[float, float]:
    """(max |peft - applied|, max |base - applied|) over every real token's logits."""
    reference = logits(AutoModelForCausalLM.from_pretrained(applied, dtype=dtype).eval(), batch)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()
    wrapped = logits(model, batch)
    with model.disable_adapter():
        plain = logits(model, batch)
    return (wrapped - reference).abs().max().item(), (plain - reference).abs().max().item()


@pytest.mark.slow
def test_smollm2_adapter_matches_the_applied_checkpoint(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in LAYERS]
    patch = c1_patch(smollm2_checkpoint, names, [4, 4, 2], amplitude=0.2)  # layer 19 has rank 2: rank_pattern
    applied, adapter, result = export_and_apply(patch, smollm2_checkpoint, tmp_path / "bf16")

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == smollm2_checkpoint.name
    assert config["target_modules"] == ["down_proj"] and config["layers_to_transform"] == list(LAYERS)
    assert config["r"] == config["lora_alpha"] == 4 and config["fan_in_fan_out"] is False
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.19.mlp.down_proj": 2}
    factor_bytes = sum(e.U.nbytes + e.B.nbytes for e in patch.steps[0].entries)
    assert result["patch_factor_bytes"] == factor_bytes
    assert result["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size <= 1.1 * factor_bytes

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    batch = tokenizer(prompts(), return_tensors="pt", padding=True)
    peft_diff, edit_size = compare(smollm2_checkpoint, applied, adapter, torch.bfloat16, batch)
    print(f"bf16: max |peft - applied| = {peft_diff:.4f}, max |base - applied| = {edit_size:.4f}")
    assert peft_diff <= BF16_TOLERANCE < 3 * BF16_TOLERANCE < edit_size

    # float32: a float32 copy of the checkpoint, so neither side rounds to bf16
    f32 = tmp_path / "f32-base"
    f32.mkdir()
    from safetensors.torch import load_file, save_file

    for file in smollm2_checkpoint.iterdir():
        if file.suffix == ".safetensors":
            save_file({k: v.float() for k, v in load_file(file).items()}, f32 / file.name, metadata={"format": "pt"})
        elif file.is_file():
            shutil.copy(file, f32 / file.name)
    patch = c1_patch(f32, names, [4, 4, 2], amplitude=0.2)
    applied, adapter, _ = export_and_apply(patch, f32, tmp_path / "f32")
    peft_diff, edit_size = compare(f32, applied, adapter, torch.float32, batch)
    print(f"float32: max |peft - applied| = {peft_diff:.2e}, max |base - applied| = {edit_size:.4f}")
    assert peft_diff <= F32_TOLERANCE and edit_size > 1.0


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "olmo2", "smollm3"])
def test_other_families_and_stacks_are_exact_in_float32(arch: str, tmp_path: Path) -> None:
    """GPT-2's transposed Conv1D (fan_in_fan_out), GPT-NeoX's names, OLMo 2 (the adapter sits before
    its post-feed-forward norm, as the patch does), SmolLM3, and a stack of two steps on one tensor."""
    base = make_tiny_checkpoint(arch, tmp_path / "base", dtype=torch.float32)
    names = [MLP_DOWN_PROJ[arch].format(i=i) for i in (1, 2)]
    first = c1_patch(base, names, [2, 3], amplitude=0.3, seed=1)
    first_file = first.save(tmp_path / "first.zup.safetensors")
    code, out = zup("apply", str(first_file), "--model", str(base), "-o", str(tmp_path / "mid"), "-q")
    assert code == 0, out
    second = c1_patch(tmp_path / "mid", names[1:], [2], amplitude=0.3, seed=2)
    stacked = stack([first, second])
    applied, adapter, result = export_and_apply(stacked, base, tmp_path / "run")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert result["ranks"] == {n.removesuffix(".weight"): r for n, r in zip(names, [2, 5])}  # 3 + 2 concatenated

    batch = AutoTokenizer.from_pretrained(base)(["hello world", "the cat sat on"], return_tensors="pt", padding=True)
    peft_diff, edit_size = compare(base, applied, adapter, torch.float32, batch)
    assert peft_diff <= 1e-4 < 1e-2 < edit_size, (peft_diff, edit_size)


def test_patches_without_a_lora_form_are_refused(tiny_checkpoint, tmp_path: Path) -> None:
    base = tiny_checkpoint("llama")
    down = [MLP_DOWN_PROJ["llama"].format(i=i) for i in (1, 2)]
    c1 = c1_patch(base, down, [2, 2], amplitude=0.1)
    cases = {
        "scaled.zup.safetensors": (random_patch(base, down, scale=1.01), "c = 1.01"),
        "dense.zup.safetensors": (random_patch(base, down[:1], scale=1.0, dense=down[1:]), "dense"),
        "inverse.zup.safetensors": (invert(c1), "inverse entry"),
        "upproj.zup.safetensors": (c1_patch(base, ["model.layers.1.mlp.up_proj.weight"], [2], amplitude=0.1),
                                   "not an MLP down projection"),
    }  # fmt: skip
    for filename, (patch, why) in cases.items():
        patch_file = patch.save(tmp_path / filename)
        out_dir = tmp_path / f"{filename}.adapter"
        code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(out_dir))
        lines = [line for line in out.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), out
        assert str(patch_file) in lines[0] and why in lines[0], lines[0]
        assert not out_dir.exists()


def test_output_folder_rules(tiny_checkpoint, tmp_path: Path) -> None:
    base = tiny_checkpoint("llama")
    patch_file = c1_patch(base, [MLP_DOWN_PROJ["llama"].format(i=1)], [2], amplitude=0.1).save(tmp_path / "p.zup.safetensors")
    out_dir = tmp_path / "adapter"
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(out_dir))
    assert code == 0 and "wrote PEFT LoRA adapter" in out, out
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    before = (out_dir / "adapter_model.safetensors").read_bytes()
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(out_dir))
    assert code != 0 and "already exists (pass --force to overwrite)" in out, out
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(out_dir), "--force", "-q")
    assert code == 0 and out == "" and (out_dir / "adapter_model.safetensors").read_bytes() == before  # deterministic
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, out = zup("export", str(patch_file), "--to", "peft", "-o", str(tmp_path / "other"), "--force")
    assert code != 0 and "not an adapter folder" in out and (tmp_path / "other" / "notes.txt").exists(), out
