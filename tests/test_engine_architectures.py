"""Architecture specs: every supported family resolves and finds its down projection."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny_models import CONV1D_ARCHITECTURES, MLP_DOWN_PROJ, TINY_ARCHITECTURES, tiny_config
from zupatch.engine.architectures import (
    ArchitectureOverrides,
    checkpoint_tensor_name,
    default_layers,
    down_proj_module,
    down_proj_weight_math,
    down_proj_weight_name,
    num_layers,
    resolve_architecture,
)
from zupatch.errors import ZupatchError


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {arch: AutoModelForCausalLM.from_config(tiny_config(arch)) for arch in TINY_ARCHITECTURES}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_spec_finds_the_down_projection(arch: str, tiny_models: dict) -> None:
    model = tiny_models[arch]
    spec = resolve_architecture(model)
    assert resolve_architecture(model.config) == resolve_architecture(model.config)  # config alone works too
    assert num_layers(model, spec) == model.config.num_hidden_layers
    for layer in range(num_layers(model, spec)):
        name = down_proj_weight_name(spec, layer)
        assert name == MLP_DOWN_PROJ[arch].format(i=layer)
        module = down_proj_module(model, spec, layer)
        assert module.weight is model.state_dict(keep_vars=True)[name]
        # Math layout: d×f, v = W k.
        W = down_proj_weight_math(module, spec)
        assert W.shape == (
            model.config.hidden_size,
            model.config.intermediate_size if arch != "gpt2" else model.config.n_inner,
        )
    assert spec.weight_transposed == (arch in CONV1D_ARCHITECTURES)
    assert spec.has_bias == (getattr(down_proj_module(model, spec, 0), "bias", None) is not None)


def test_math_layout_matches_the_module_output(tiny_models: dict) -> None:
    for arch in ("gpt2", "llama", "gpt_neox"):
        model = tiny_models[arch]
        spec = resolve_architecture(model)
        module = down_proj_module(model, spec, 1)
        W = down_proj_weight_math(module, spec)
        k = torch.randn(3, W.shape[1])
        expected = k @ W.T + (module.bias if spec.has_bias else 0)
        torch.testing.assert_close(module(k), expected)


def test_unknown_architecture_names_supported_ones_and_flags() -> None:
    config = AutoConfig.for_model(
        "olmo", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    with pytest.raises(ZupatchError) as error:
        resolve_architecture(config)
    message = str(error.value)
    assert "olmo" in message and "llama" in message and "gpt_neox" in message
    assert "--layers-path" in message and "--down-proj" in message
    assert "\n" not in message


def test_overrides_make_an_unknown_architecture_work() -> None:
    config = AutoConfig.for_model(
        "olmo", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config)
    spec = resolve_architecture(model, ArchitectureOverrides(layers_path="model.layers", down_proj="mlp.down_proj"))
    assert down_proj_module(model, spec, 1) is model.model.layers[1].mlp.down_proj
    assert not spec.weight_transposed and not spec.has_bias


def test_bad_override_path_is_a_one_line_error(tiny_models: dict) -> None:
    with pytest.raises(ZupatchError, match="--down-proj"):
        resolve_architecture(tiny_models["llama"], ArchitectureOverrides(down_proj="mlp.nothing"))


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(28, (4, 5, 6)), (30, (4, 5, 6)), (18, (3, 4, 5)), (32, (4, 5, 6)), (4, (0, 1, 2)), (2, (0,)), (1, (0,))],
)
def test_default_layers_by_relative_depth(layers: int, expected: tuple[int, ...]) -> None:
    assert default_layers(layers) == expected


def test_checkpoint_tensor_name_handles_missing_base_prefix(tiny_models: dict) -> None:
    model = tiny_models["gpt2"]
    name = "transformer.h.1.mlp.c_proj.weight"
    assert checkpoint_tensor_name(model, name, {name}) == name
    assert checkpoint_tensor_name(model, name, {"h.1.mlp.c_proj.weight"}) == "h.1.mlp.c_proj.weight"
    with pytest.raises(ZupatchError):
        checkpoint_tensor_name(model, name, {"other"})
