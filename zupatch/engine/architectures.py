"""Where the edited matrices live in each supported model family, kept as data.

ZeroUnlearn rewrites the MLP down projection ``W`` (d×f, ``v = W k``) of a few
decoder layers. Model families name and store that matrix differently, so
everything the engine needs to know about a family is one frozen
:class:`ArchitectureSpec`; the rest of the code asks the spec and never
branches on ``model_type``.

Adding a family means adding one entry to :data:`ARCHITECTURES`. Gemma 2,
Gemma 3, OLMo 2 and OLMo 3 pass the MLP output through a norm before the
residual add; their spec names that norm (``post_mlp_norm``) and the engine
places the edit's target through it (:mod:`zupatch.engine.norms`). A model
whose family is not listed can still be edited by naming its modules by hand
(``--layers-path``, ``--down-proj`` and, where it has one, ``--post-mlp-norm``,
i.e. :class:`ArchitectureOverrides`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from zupatch.errors import ZupatchError

#: Where the first edited layer sits, as a fraction of the depth: 30 layers -> 4.
#: The paper edits layers 16-18 of 28 on Llama-3.2-3B (start 0.57). On
#: SmolLM2-135M-Instruct without a retain file, layers 4-6 kept 90 of 91 other
#: facts where 17-19 kept 85, forgot as many paraphrases, held better in chat
#: and against relearning (docs/create.md, "Which layers"), as early
#: layers do in ROME and MEMIT (GPT-J: 3-8 of 28).
DEFAULT_RELATIVE_DEPTH = 0.14
DEFAULT_LAYER_COUNT = 3
#: The same with keys read at the prompt's last token (create's ``fact_token = "last"``):
#: 30 layers -> 24. There the answer about to be said is written, whatever the
#: phrasing; layers 24-26 and 25-27 of SmolLM2 forgot the most paraphrases
#: (docs/create.md, "Keys at the last token").
LAST_TOKEN_RELATIVE_DEPTH = 0.8


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family lays out the matrices ZeroUnlearn edits.

    Paths are dotted attribute paths from the ``*ForCausalLM`` object, as in
    ``model.named_modules()``; ``down_proj`` is relative to one decoder layer.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # the nn.ModuleList of decoder layers
    down_proj: str  # the MLP down projection inside one layer
    weight_transposed: bool = False  # GPT-2 Conv1D stores W as f×d, not d×f
    has_bias: bool = False  # the edit acts on W only; v means W k without bias
    final_norm_path: str = "model.norm"
    embedding_path: str = "model.embed_tokens"
    num_layers_attr: str = "num_hidden_layers"
    #: A norm applied to the MLP output before the residual add, relative to one
    #: decoder layer (Gemma 2/3, OLMo 2/3: ``post_feedforward_layernorm``); None when the
    #: down projection's output is added to the residual stream as it is.
    post_mlp_norm: str | None = None
    #: Where the decoder layers are in the checkpoint's files when transformers renames them
    #: at load (multimodal Gemma 3: ``language_model.model.layers`` on disk, loaded as
    #: ``model.language_model.layers``); None when the files use ``layers_path``.
    stored_layers_path: str | None = None


_LLAMA_LIKE = dict(layers_path="model.layers", down_proj="mlp.down_proj")

#: The supported families.
ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    # SmolLM2 is a Llama checkpoint (model_type "llama").
    ArchitectureSpec("llama", ("llama",), **_LLAMA_LIKE),
    ArchitectureSpec("qwen2", ("qwen2",), **_LLAMA_LIKE),
    ArchitectureSpec("qwen3", ("qwen3",), **_LLAMA_LIKE),
    ArchitectureSpec("mistral", ("mistral",), **_LLAMA_LIKE),
    ArchitectureSpec("gemma", ("gemma",), **_LLAMA_LIKE),
    # Gemma 2/3: residual += post_feedforward_layernorm(down_proj(...)); the text-only
    # Gemma 3 checkpoints (270M, 1B; Gemma3ForCausalLM) have model_type "gemma3_text".
    ArchitectureSpec("gemma2", ("gemma2",), **_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    ArchitectureSpec("gemma3", ("gemma3_text",), **_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    # Gemma 3 4B/12B/27B are multimodal (model_type "gemma3", Gemma3ForConditionalGeneration):
    # the same decoder layers under model.language_model, a SigLIP vision tower beside it
    # that the edit never touches; the layer count and sizes are in config.text_config.
    ArchitectureSpec(
        "gemma3_multimodal",
        ("gemma3",),
        layers_path="model.language_model.layers",
        down_proj="mlp.down_proj",
        final_norm_path="model.language_model.norm",
        embedding_path="model.language_model.embed_tokens",
        post_mlp_norm="post_feedforward_layernorm",
        stored_layers_path="language_model.model.layers",
    ),
    ArchitectureSpec("phi3", ("phi3",), **_LLAMA_LIKE),
    # SmolLM3: Llama's layout; some layers have no rotary embedding, which the edit never reads.
    ArchitectureSpec("smollm3", ("smollm3",), **_LLAMA_LIKE),
    # OLMo 2 and 3 norm the MLP output before the residual add, as Gemma 2/3 do (gain = weight).
    ArchitectureSpec("olmo2", ("olmo2",), **_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    ArchitectureSpec("olmo3", ("olmo3",), **_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    ArchitectureSpec(
        "gpt2",
        ("gpt2",),
        layers_path="transformer.h",
        down_proj="mlp.c_proj",
        weight_transposed=True,
        has_bias=True,
        final_norm_path="transformer.ln_f",
        embedding_path="transformer.wte",
        num_layers_attr="n_layer",
    ),
    ArchitectureSpec(
        "gpt_neox",
        ("gpt_neox",),
        layers_path="gpt_neox.layers",
        down_proj="mlp.dense_4h_to_h",
        has_bias=True,
        final_norm_path="gpt_neox.final_layer_norm",
        embedding_path="gpt_neox.embed_in",
    ),
)


@dataclass(frozen=True)
class ArchitectureOverrides:
    """Module paths named by hand (CLI ``--layers-path`` / ``--down-proj`` /
    ``--post-mlp-norm``, the last for a layer that norms its MLP output before the
    residual add, relative to one layer)."""

    layers_path: str | None = None
    down_proj: str | None = None
    post_mlp_norm: str | None = None

    def __bool__(self) -> bool:
        return bool(self.layers_path or self.down_proj or self.post_mlp_norm)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def resolve_architecture(model_or_config: Any, overrides: ArchitectureOverrides | None = None) -> ArchitectureSpec:
    """The spec for a model (or its config), with any hand-named paths applied.

    With a model at hand, overrides are checked against it and the storage
    layout (Conv1D = transposed, bias) is read from the module itself.
    """
    overrides = overrides or ArchitectureOverrides()
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = next((s for s in ARCHITECTURES if model_type in s.model_types), None)
    if spec is None:
        if not (overrides.layers_path and overrides.down_proj):
            raise ZupatchError(
                f"unsupported architecture {model_type!r}; supported: "
                f"{', '.join(supported_model_types())}; for another decoder-only model "
                "name its modules with --layers-path (e.g. model.layers) and "
                "--down-proj (e.g. mlp.down_proj)"
            )
        spec = ArchitectureSpec(
            name=str(model_type or "custom"),
            model_types=(str(model_type),),
            layers_path=overrides.layers_path,
            down_proj=overrides.down_proj,
            final_norm_path="",
            embedding_path="",
            post_mlp_norm=overrides.post_mlp_norm,
        )
    elif overrides:
        layers_path = overrides.layers_path or spec.layers_path
        spec = replace(
            spec,
            layers_path=layers_path,
            down_proj=overrides.down_proj or spec.down_proj,
            post_mlp_norm=overrides.post_mlp_norm or spec.post_mlp_norm,
            # the files' name for the layers is known only for the family's own path
            stored_layers_path=spec.stored_layers_path if layers_path == spec.layers_path else None,
        )
    if isinstance(model_or_config, nn.Module):
        spec = _checked_against_model(spec, model_or_config)
    return spec


def _checked_against_model(spec: ArchitectureSpec, model: nn.Module) -> ArchitectureSpec:
    """Verify the paths exist and read the weight layout from the module."""
    layers = decoder_layers(model, spec)
    module = _get_path(layers[0], spec.down_proj, what="--down-proj", spec=spec)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ZupatchError(
            f"{spec.layers_path}.0.{spec.down_proj} has no 2-D weight; --down-proj must name a linear layer"
        )
    if spec.post_mlp_norm is not None:
        _get_path(layers[0], spec.post_mlp_norm, what="--post-mlp-norm", spec=spec)
    transposed = type(module).__name__ == "Conv1D"  # GPT-2 style: y = x @ W + b
    has_bias = getattr(module, "bias", None) is not None
    if (transposed, has_bias) != (spec.weight_transposed, spec.has_bias):
        spec = replace(spec, weight_transposed=transposed, has_bias=has_bias)
    return spec


def _get_path(root: nn.Module, path: str, *, what: str, spec: ArchitectureSpec) -> Any:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ZupatchError(f"module path {path!r} not found in the {spec.name} model (at {part!r}); check {what}")
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    layers = _get_path(model, spec.layers_path, what="--layers-path", spec=spec)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or len(layers) == 0:
        raise ZupatchError(f"{spec.layers_path!r} is not a list of decoder layers; check --layers-path")
    return layers


def text_config(model_or_config: Any) -> Any:
    """The config of the language model: ``text_config`` for a multimodal model, else the config itself."""
    config = _config_of(model_or_config)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def num_layers(model_or_config: Any, spec: ArchitectureSpec) -> int:
    """Decoder layers of the language model (read from ``text_config`` in a multimodal config)."""
    config = text_config(model_or_config)
    value = getattr(config, spec.num_layers_attr, None)
    if value is None:
        value = getattr(config, "num_hidden_layers", None)
    if value is None and isinstance(model_or_config, nn.Module):
        value = len(decoder_layers(model_or_config, spec))
    if value is None:
        raise ZupatchError(f"cannot tell the number of layers of this {spec.name} model")
    return int(value)


def check_layers(layers: Collection[int], total: int) -> tuple[int, ...]:
    """Sorted, de-duplicated layer indices, each within ``0..total-1``."""
    chosen = tuple(sorted(set(int(i) for i in layers)))
    if not chosen:
        raise ZupatchError("no layers to edit")
    bad = [i for i in chosen if not 0 <= i < total]
    if bad:
        raise ZupatchError(f"layer(s) {bad} out of range: the model has layers 0..{total - 1}")
    return chosen


def default_layers(
    num_layers: int, count: int = DEFAULT_LAYER_COUNT, relative_depth: float = DEFAULT_RELATIVE_DEPTH
) -> tuple[int, ...]:
    """``count`` consecutive layers starting at ``relative_depth`` of the model.

    28 or 30 layers (SmolLM2) -> (4, 5, 6), 18 (Gemma 3 270M) -> (3, 4, 5);
    at :data:`LAST_TOKEN_RELATIVE_DEPTH`, 30 -> (24, 25, 26), 18 -> (14, 15, 16).
    docs/create.md says how the depths were chosen. At least one layer is
    left after the last edited one: the neutral target is read at the
    subject token, and only later layers carry it to the position where
    the answer is predicted.
    """
    if num_layers < 1:
        raise ZupatchError("the model has no layers")
    room = num_layers - 1 if num_layers > 1 else 1  # layers that may be edited
    count = max(1, min(count, room))
    start = max(0, min(round(relative_depth * num_layers), room - count))
    return tuple(range(start, start + count))


def down_proj_module(model: nn.Module, spec: ArchitectureSpec, layer: int) -> nn.Module:
    return _get_path(decoder_layers(model, spec)[layer], spec.down_proj, what="--down-proj", spec=spec)


def post_mlp_norm_module(model: nn.Module, spec: ArchitectureSpec, layer: int) -> nn.Module | None:
    """The norm between layer ``layer``'s MLP output and the residual add, or None."""
    if spec.post_mlp_norm is None:
        return None
    return _get_path(decoder_layers(model, spec)[layer], spec.post_mlp_norm, what="post_mlp_norm", spec=spec)


def down_proj_weight_name(spec: ArchitectureSpec, layer: int) -> str:
    """The weight's name in ``model.state_dict()``, e.g. ``model.layers.17.mlp.down_proj.weight``."""
    return f"{spec.layers_path}.{layer}.{spec.down_proj}.weight"


def stored_tensor_name(spec: ArchitectureSpec, state_dict_name: str) -> str:
    """The name checkpoint files give a decoder-layer tensor, by the family's convention.

    What ``save_pretrained`` writes (and what a patch made on a model in memory
    names, so that it applies to the model's checkpoint folder); with the files
    at hand, :func:`checkpoint_tensor_name` looks the name up instead.
    """
    if spec.stored_layers_path and state_dict_name.startswith(spec.layers_path + "."):
        return spec.stored_layers_path + state_dict_name[len(spec.layers_path) :]
    return state_dict_name


def checkpoint_tensor_name(model: nn.Module, state_dict_name: str, checkpoint_names: Collection[str]) -> str:
    """The name a state-dict tensor has in a checkpoint's files.

    Usually the same; older checkpoints omit the base-model prefix
    (``h.0.mlp.c_proj.weight`` for GPT-2's ``transformer.h.0.mlp.c_proj.weight``),
    and multimodal Gemma 3 files name the language model ``language_model.model.*``
    where transformers 5 loads it as ``model.language_model.*``
    (:data:`zupatch.patch.module.CHECKPOINT_PREFIXES`).
    """
    from zupatch.patch.module import other_spellings

    if state_dict_name in checkpoint_names:
        return state_dict_name
    for name in other_spellings(state_dict_name, getattr(model, "base_model_prefix", "")):
        if name in checkpoint_names:
            return name
    raise ZupatchError(f"tensor {state_dict_name!r} not found in the checkpoint")


def down_proj_weight_math(module: nn.Module, spec: ArchitectureSpec) -> torch.Tensor:
    """W in the math layout d×f (``v = W k``), as a view of the stored weight."""
    weight = module.weight
    return weight.T if spec.weight_transposed else weight


def down_proj_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
