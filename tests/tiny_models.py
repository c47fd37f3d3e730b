"""Tiny random-initialised Hugging Face checkpoints for architecture plumbing tests.

Each checkpoint is a complete folder as ``save_pretrained`` writes it: config,
generation config, safetensors weights (sharded on request) and a small but
real byte-level tokenizer, so ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` both work offline. Building one takes well
under a second once transformers is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

TINY_ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "smollm3",
    "olmo2",
    "olmo3",
    "gpt2",
    "gpt_neox",
)

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 4
NUM_HEADS = 4
VOCAB_SIZE = 320  # 3 special tokens + 256 bytes, padded to a multiple of 64

#: Name of layer ``i``'s MLP down projection (intermediate -> hidden) per architecture.
MLP_DOWN_PROJ: dict[str, str] = {
    "llama": "model.layers.{i}.mlp.down_proj.weight",
    "qwen2": "model.layers.{i}.mlp.down_proj.weight",
    "qwen3": "model.layers.{i}.mlp.down_proj.weight",
    "mistral": "model.layers.{i}.mlp.down_proj.weight",
    "gemma": "model.layers.{i}.mlp.down_proj.weight",
    "gemma2": "model.layers.{i}.mlp.down_proj.weight",
    "gemma3": "model.layers.{i}.mlp.down_proj.weight",
    "phi3": "model.layers.{i}.mlp.down_proj.weight",
    "smollm3": "model.layers.{i}.mlp.down_proj.weight",
    "olmo2": "model.layers.{i}.mlp.down_proj.weight",
    "olmo3": "model.layers.{i}.mlp.down_proj.weight",
    "gpt2": "transformer.h.{i}.mlp.c_proj.weight",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
}

#: Multimodal checkpoints (kept out of :data:`TINY_ARCHITECTURES`: their files name the
#: language model's tensors differently from the loaded model's ``state_dict``). A tiny
#: Gemma 3 4B/12B/27B: ``Gemma3Config`` with a tiny text config (as "gemma3" above) and a
#: tiny SigLIP vision tower; transformers 5 loads it as Gemma3ForConditionalGeneration.
MULTIMODAL_ARCHITECTURES: tuple[str, ...] = ("gemma3_multimodal",)

#: Layer ``i``'s down projection in a multimodal checkpoint, as the loaded model names it
#: and as ``save_pretrained`` (and Google's checkpoints) name it in the files.
MULTIMODAL_DOWN_PROJ = {"gemma3_multimodal": "model.language_model.layers.{i}.mlp.down_proj.weight"}
MULTIMODAL_FILE_DOWN_PROJ = {"gemma3_multimodal": "language_model.model.layers.{i}.mlp.down_proj.weight"}
VISION_HIDDEN_SIZE = 32

#: The ``model_type`` of each tiny architecture where it differs from its name (the
#: text-only Gemma 3, ``Gemma3ForCausalLM``, is "gemma3_text").
MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text", "gemma3_multimodal": "gemma3"}

#: Architectures whose projections are GPT-2 ``Conv1D`` modules, stored as
#: ``(in_features, out_features)``: the down projection is ``(intermediate, hidden)``
#: instead of the ``nn.Linear`` layout ``(hidden, intermediate)``.
CONV1D_ARCHITECTURES: frozenset[str] = frozenset({"gpt2"})

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOKEN_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
_LLAMA_LIKE = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_LLAMA_LIKE, "tie_word_embeddings": False},
    "qwen2": {**_LLAMA_LIKE, "tie_word_embeddings": False},
    "qwen3": {**_LLAMA_LIKE, "head_dim": 16, "tie_word_embeddings": True},
    "mistral": {**_LLAMA_LIKE, "sliding_window": 128, "tie_word_embeddings": False},
    "gemma": {**_LLAMA_LIKE, "head_dim": 16, "num_key_value_heads": 1, "tie_word_embeddings": True},
    # Gemma 2/3: a norm on the MLP output before the residual add (post_feedforward_layernorm).
    "gemma2": {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 128, "tie_word_embeddings": True},
    "gemma3": {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 128, "tie_word_embeddings": True},
    "phi3": {**_LLAMA_LIKE, "original_max_position_embeddings": 256, "tie_word_embeddings": False},
    # SmolLM3: no rotary embedding in every fourth layer (here the last).
    "smollm3": {**_LLAMA_LIKE, "tie_word_embeddings": True},
    # OLMo 2/3: a norm on the MLP output before the residual add; OLMo 3 slides its window
    # in three layers of four.
    "olmo2": {**_LLAMA_LIKE, "tie_word_embeddings": False},
    "olmo3": {**_LLAMA_LIKE, "sliding_window": 128, "tie_word_embeddings": False},
    "gpt2": {
        "n_embd": HIDDEN_SIZE,
        "n_inner": INTERMEDIATE_SIZE,
        "n_layer": NUM_LAYERS,
        "n_head": NUM_HEADS,
        "n_positions": 256,
    },
    "gpt_neox": {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": 256,
        "rotary_pct": 0.5,
        "tie_word_embeddings": False,
    },
}


def tiny_config(arch: str) -> PretrainedConfig:
    """The config of the tiny model for ``arch`` (:data:`TINY_ARCHITECTURES`, :data:`MULTIMODAL_ARCHITECTURES`)."""
    if arch == "gemma3_multimodal":
        from transformers import Gemma3Config

        # 28-pixel images in 14-pixel patches: 2×2 patches, pooled to mm_tokens_per_image = 4.
        # The image tokens keep Gemma 3's ids, beyond this vocabulary: text never contains them.
        vision = {"hidden_size": VISION_HIDDEN_SIZE, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "image_size": 28, "patch_size": 14}  # fmt: skip
        text = tiny_config("gemma3").to_dict()
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **_TOKEN_IDS)
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {TINY_ARCHITECTURES}")
    return AutoConfig.for_model(MODEL_TYPES.get(arch, arch), vocab_size=VOCAB_SIZE, **_TOKEN_IDS, **_CONFIGS[arch])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer: three ChatML special tokens, then the 256 bytes, no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS[UNK_ID]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS[UNK_ID],
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[EOS_ID],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def make_tiny_checkpoint(
    arch: str,
    path: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = None,
    seed: int = 0,
) -> Path:
    """Build a random tiny ``arch`` model and save it with its tokenizer into ``path``.

    The weights depend only on ``arch`` and ``seed``. With ``max_shard_size``
    (e.g. ``"100KB"``; the model is about 0.4 MB in bf16) the weights are split
    into ``model-0000X-of-0000N.safetensors`` shards plus an index.
    """
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    path = Path(path)
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path
