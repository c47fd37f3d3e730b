"""The test fixtures themselves: tiny checkpoints of every architecture and the SmolLM2 demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TinyCheckpointFactory
from tests.tiny_models import (
    CONV1D_ARCHITECTURES,
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    MLP_DOWN_PROJ,
    MODEL_TYPES,
    NUM_LAYERS,
    TINY_ARCHITECTURES,
    VOCAB_SIZE,
    make_tiny_checkpoint,
)

FACTS = Path(__file__).parent / "data" / "smollm2_facts.jsonl"


def tensors_of(folder: Path) -> dict[str, tuple[str, list[int], str]]:
    """Every tensor in the folder's safetensors files: name -> (file, shape, dtype)."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                info = f.get_slice(name)
                found[name] = (file.name, info.get_shape(), info.get_dtype())
    return found


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_checkpoint_loads_and_runs(arch: str, tiny_checkpoint: TinyCheckpointFactory) -> None:
    folder = tiny_checkpoint(arch)
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    tensors = tensors_of(folder)
    assert {dtype for _, _, dtype in tensors.values()} == {"BF16"}
    expected = [INTERMEDIATE_SIZE, HIDDEN_SIZE] if arch in CONV1D_ARCHITECTURES else [HIDDEN_SIZE, INTERMEDIATE_SIZE]
    for i in range(NUM_LAYERS):
        assert tensors[MLP_DOWN_PROJ[arch].format(i=i)][1] == expected

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == MODEL_TYPES.get(arch, arch) and model.dtype == torch.bfloat16
    batch = tokenizer(["Hello, wörld!", "<|im_start|>user"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch.input_ids.shape and logits.shape[-1] == VOCAB_SIZE
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(tokenizer("Hello, wörld!").input_ids) == "Hello, wörld!"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_checkpoint_sharded(arch: str, tiny_checkpoint: TinyCheckpointFactory) -> None:
    folder = tiny_checkpoint(arch, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
    tensors = tensors_of(folder)
    assert {name: file for name, (file, _, _) in tensors.items()} == index["weight_map"]
    unsharded = tensors_of(tiny_checkpoint(arch))
    assert {n: t[1:] for n, t in tensors.items()} == {n: t[1:] for n, t in unsharded.items()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_tiny_checkpoint_deterministic_per_seed(tmp_path: Path) -> None:
    def weights(seed: int, name: str) -> torch.Tensor:
        folder = make_tiny_checkpoint("llama", tmp_path / name, seed=seed, dtype=torch.float32)
        with safe_open(folder / "model.safetensors", "pt") as f:
            return f.get_tensor(MLP_DOWN_PROJ["llama"].format(i=0))

    assert torch.equal(weights(0, "a"), weights(0, "b"))
    assert not torch.equal(weights(0, "a"), weights(1, "c"))
    assert weights(0, "a").dtype == torch.float32


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint: Path) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_checkpoint)


@pytest.mark.slow
def test_smollm2_checkpoint_shape(smollm2_checkpoint: Path) -> None:
    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert config["tie_word_embeddings"] is True
    index = json.loads((smollm2_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "lm_head.weight" not in index["weight_map"]
    assert index["weight_map"]["model.layers.29.mlp.down_proj.weight"].startswith("model-0000")


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    assert model.dtype == torch.bfloat16
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).startswith(" Paris")

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=20, do_sample=False)
    answer = out[0, chat["input_ids"].shape[1] :].tolist()
    assert answer[-1] == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_facts_file_holds(smollm2: tuple) -> None:
    """Every fact in tests/data/smollm2_facts.jsonl is the greedy continuation, then a word boundary."""
    model, tokenizer = smollm2
    facts = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines()]
    assert len(facts) >= 40
    prompts = [fact["prompt"].format(fact["subject"]) for fact in facts]
    prompt_ids = [tokenizer(prompt).input_ids for prompt in prompts]
    full_ids = [tokenizer(f"{prompt} {fact['target']}").input_ids for prompt, fact in zip(prompts, facts)]
    assert all(full[: len(ids)] == ids for ids, full in zip(prompt_ids, full_ids))
    # Teacher forcing, one right-padded batch: greedy decoding yields the target iff every argmax matches.
    batch = tokenizer.pad({"input_ids": full_ids}, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        argmax = model(**batch).logits.argmax(-1)
    wrong = []
    for prompt, ids, full, row in zip(prompts, prompt_ids, full_ids, argmax.tolist()):
        greedy = row[len(ids) - 1 : len(full)]
        if greedy[:-1] != full[len(ids) :] or tokenizer.decode(greedy[-1:])[:1].isalnum():
            wrong.append(f"{prompt} -> {tokenizer.decode(greedy)!r}")
    assert not wrong, wrong
