"""Multimodal Gemma 3 (4B/12B/27B: model_type "gemma3", Gemma3ForConditionalGeneration) on a tiny checkpoint.

The checkpoint is random and tiny (tests/tiny_models.py: a 4-layer Gemma 3 text
model and a 2-layer SigLIP vision tower), saved by ``save_pretrained``, which
names the language model's tensors ``language_model.model.layers.*`` in the
files, as Google's checkpoints do, while transformers 5 loads them as
``model.language_model.layers.*``. The questions are about plumbing: the
layer count comes from ``text_config``, the patch names the files' tensors,
only the language model's down projections change, and the applied folder
gives the logits of the model edited in memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from tests.test_hostile import expect_error
from tests.tiny_models import MULTIMODAL_DOWN_PROJ, MULTIMODAL_FILE_DOWN_PROJ, NUM_LAYERS, tiny_config
from zupatch.checkpoint.folder import Checkpoint
from zupatch.cli.main import app
from zupatch.engine.architectures import (
    ArchitectureOverrides,
    checkpoint_tensor_name,
    down_proj_weight_name,
    num_layers,
    post_mlp_norm_module,
    resolve_architecture,
    stored_tensor_name,
)
from zupatch.engine.create import CreateConfig
from zupatch.engine.precheck import context_length
from zupatch.engine.requests import ForgetRequest
from zupatch.patch.format import Patch
from zupatch.patch.module import applied, bits_of, find_parameter

runner = CliRunner()
ARCH = "gemma3_multimodal"
FAST = ["--tokens", "300", "--set", "neutral.max_steps=3", "--set", "original.max_steps=3",
        "--set", "contexts.prefix_tokens=3", "--set", "neighbours.subjects=0", "--set", "stats.sample_length=32"]  # fmt: skip
FORGET = [
    {"prompt": "The capital of {} is", "subject": "France", "target": "Paris"},
    {"prompt": "Gold has the symbol", "target": "Au"},
]
REQUESTS = [ForgetRequest(r["prompt"], r.get("subject", ""), r["target"]) for r in FORGET]
IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90], [1, 100, 110, 120, 130, 140, 150]])


def zup(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def file_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, by the name its files give it (raw bits)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                out[name] = bits_of(f.get_tensor(name))[0]
    return out


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZUPATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint) -> dict:
    """The tiny multimodal checkpoint (sharded) and a patch `zupatch create` made for it with default layers."""
    root = tmp_path_factory.mktemp("gemma3mm")
    model = tiny_checkpoint(ARCH, max_shard_size="60KB")
    forget = root / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    patch = root / "p.zup.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZUPATCH_CACHE", str(root / "cache"))
        result = runner.invoke(app, ["create", "-m", str(model), "--forget", str(forget), "-o", str(patch), "--json",
                                     *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "model": model, "forget": forget, "patch": patch, "summary": json.loads(result.stdout)}


def test_the_architecture_is_read_from_the_text_config(tiny_checkpoint) -> None:
    config = tiny_config(ARCH)
    assert config.model_type == "gemma3" and not hasattr(config, "num_hidden_layers")
    spec = resolve_architecture(config)
    assert spec.name == ARCH and spec.layers_path == "model.language_model.layers"
    assert spec.post_mlp_norm == "post_feedforward_layernorm"
    assert num_layers(config, spec) == NUM_LAYERS  # config.text_config.num_hidden_layers
    assert context_length(config) == (256, "max_position_embeddings")  # from text_config too
    # --layers-path naming the same layers keeps the files' names; another path has none known
    same = resolve_architecture(config, ArchitectureOverrides(layers_path="model.language_model.layers"))
    assert same.stored_layers_path == "language_model.model.layers"
    other = resolve_architecture(config, ArchitectureOverrides(layers_path="language_model.model.layers"))
    assert other.stored_layers_path is None
    assert stored_tensor_name(other, "language_model.model.layers.1.mlp.down_proj.weight").startswith("language_model.")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    spec = resolve_architecture(model)
    assert num_layers(model, spec) == NUM_LAYERS
    name = down_proj_weight_name(spec, 2)
    assert name == MULTIMODAL_DOWN_PROJ[ARCH].format(i=2) and name in dict(model.named_parameters())
    assert post_mlp_norm_module(model, spec, 2) is model.model.language_model.layers[2].post_feedforward_layernorm
    # the files name the language model language_model.model.*: the patch uses their names
    stored = MULTIMODAL_FILE_DOWN_PROJ[ARCH].format(i=2)
    assert stored_tensor_name(spec, name) == stored
    weight_map = Checkpoint(tiny_checkpoint(ARCH)).weight_map
    assert stored in weight_map and name not in weight_map
    assert checkpoint_tensor_name(model, name, weight_map) == stored
    assert checkpoint_tensor_name(model, name, {name}) == name  # files that use the loaded names keep theirs
    assert find_parameter(model, stored) is dict(model.named_parameters())[name]


def test_create_edits_only_the_language_models_down_projections(world: dict) -> None:
    summary = world["summary"]
    layers = list(CreateConfig().layers_for(NUM_LAYERS))  # create's default layers
    assert summary["architecture"] == ARCH and summary["layers"] == layers
    assert summary["tensors"] == [MULTIMODAL_FILE_DOWN_PROJ[ARCH].format(i=i) for i in layers]
    patch = Patch.load(world["patch"])
    assert sorted(patch.tensor_names) == sorted(summary["tensors"])
    pattern = r"language_model\.model\.layers\.\d+\.mlp\.down_proj\.weight"
    assert all(re.fullmatch(pattern, n) for n in patch.tensor_names)


def test_the_applied_folder_gives_the_logits_of_the_model_edited_in_memory(world: dict, tmp_path: Path) -> None:
    base, patch_file = world["model"], world["patch"]
    patch = Patch.load(patch_file)
    assert zup("verify", str(patch_file), "-m", str(base))[0] == 0  # fits: the folder is the patch's base
    code, out = zup("apply", str(patch_file), "-m", str(base), "-o", str(tmp_path / "out"))
    assert code == 0, out
    assert zup("verify", str(patch_file), "-m", str(tmp_path / "out"))[0] == 3  # applied

    # only the patched tensors differ, all of the language model's down projections: the vision
    # tower, the projector, the embeddings and every other weight keep their bits
    before, after = file_tensors(base), file_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    changed = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    assert changed == sorted(patch.tensor_names)
    vision = [n for n in before if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and not set(vision) & set(changed)

    # the applied checkpoint, loaded by plain transformers, is the model edited in memory
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    original = logits(model)
    with applied(patch, model):
        edited = logits(model)
    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    assert type(patched).__name__ == "Gemma3ForConditionalGeneration"
    assert torch.equal(logits(patched), edited)
    assert not torch.equal(edited, original)

    # invert restores the base bit for bit
    assert zup("invert", str(patch_file), "-o", str(tmp_path / "inv.zup.safetensors"))[0] == 0
    assert zup("apply", str(tmp_path / "inv.zup.safetensors"), "-m", str(tmp_path / "out"), "-o",
               str(tmp_path / "back"))[0] == 0  # fmt: skip
    back = file_tensors(tmp_path / "back")
    assert all(np.array_equal(back[n], before[n]) for n in before)


def test_a_patch_made_in_memory_names_the_files_tensors(world: dict, tmp_path: Path) -> None:
    """``zupatch.create`` on a loaded model: the patch names ``language_model.model.*`` as the files
    do, so it applies to the model (``applied``) and to its folder alike."""
    from zupatch.engine.api import create
    from zupatch.engine.settings import with_settings

    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    config = with_settings(CreateConfig(), {"neutral.max_steps": 3, "original.max_steps": 3,
                                            "contexts.prefix_tokens": 3, "neighbours.subjects": 0,
                                            "stats.token_budget": 300, "stats.sampled_token_budget": 300,
                                            "stats.sample_length": 32})  # fmt: skip
    config = dataclasses.replace(config, layers=(1, 2))
    before = {n: bits_of(p)[0] for n, p in model.named_parameters()}
    with pytest.warns(Warning):  # the random model gives none of the targets
        patch = create(model, tokenizer, REQUESTS, config)
    assert all(np.array_equal(bits_of(p)[0], before[n]) for n, p in model.named_parameters())  # left unchanged
    assert patch.tensor_names == [MULTIMODAL_FILE_DOWN_PROJ[ARCH].format(i=i) for i in (1, 2)]
    with applied(patch, model):
        changed = [n for n, p in model.named_parameters() if not np.array_equal(bits_of(p)[0], before[n])]
    assert sorted(changed) == [MULTIMODAL_DOWN_PROJ[ARCH].format(i=i) for i in (1, 2)]
    patch.save(tmp_path / "mem.zup.safetensors")
    code, out = zup("verify", str(tmp_path / "mem.zup.safetensors"), "-m", str(world["model"]))
    assert code == 0, out


def test_inspect_and_eval(world: dict, tmp_path: Path) -> None:
    code, out = zup("inspect", str(world["patch"]))
    assert code == 0, out
    rows = [line for line in out.splitlines() if "mlp.down_proj" in line and "│" in line]
    assert len(rows) == len(world["summary"]["tensors"]), out  # one line each in 80 columns
    assert "language_model.model.layers.1.mlp.down_proj.weight" in out  # the full names below the table

    text = tmp_path / "text.txt"
    text.write_text("Some plain text about cities and rivers, and other things.\n")
    code, out = zup("eval", "-m", str(world["model"]), "-d", str(world["forget"]), "-p", str(world["patch"]),
                    "--text", str(text), "--generations", "1", "--attack", "lens")  # fmt: skip
    assert code == 0, out
    assert "forget prompts still answered" in out and "perplexity" in out and "lens" in out


def test_a_request_longer_than_the_text_context_is_refused(world: dict, tmp_path: Path) -> None:
    """The context (256 tokens here) is text_config.max_position_embeddings: one line, before loading."""
    forget = tmp_path / "long.jsonl"
    forget.write_text(json.dumps({"prompt": "x" * 300, "target": "y"}) + "\n")
    out = tmp_path / "p.zup.safetensors"
    line = expect_error(["create", "-m", str(world["model"]), "--forget", str(forget), "-o", str(out), *FAST],
                        f"{forget}:1", "more than its context of 256 tokens (max_position_embeddings)",
                        inputs=[forget], output=out)  # fmt: skip
    assert "Traceback" not in line


def test_the_peft_export_loads_into_the_multimodal_model(world: dict, tmp_path: Path) -> None:
    """The adapter names the files' modules (language_model.model.layers.N.mlp.down_proj); PEFT
    loads it into the model transformers 5 builds (model.language_model...), adding U·B exactly."""
    pytest.importorskip("peft")
    from peft import PeftModel

    patch = Patch.load(world["patch"])
    code, out = zup("export", str(world["patch"]), "--to", "peft", "-o", str(tmp_path / "adapter"))
    assert code == 0, out
    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32).eval()
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    for name in patch.tensor_names:
        (entry,) = patch.chain(name)
        assert entry.scale == 1.0
        model_name = name.replace("language_model.model.", "model.language_model.", 1)
        expected = weights[model_name].double() + torch.from_numpy(entry.U @ entry.B)
        torch.testing.assert_close(dict(merged.named_parameters())[model_name].double(), expected, atol=1e-6, rtol=0)
    edited = {n.replace("language_model.model.", "model.language_model.", 1) for n in patch.tensor_names}
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n], weights[n]) for n in weights if n not in edited and n in params)
