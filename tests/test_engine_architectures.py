"""Architecture specs: every supported family resolves and finds its down projection."""

from __future__ import annotations

import copy

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
    post_mlp_norm_module,
    resolve_architecture,
)
from zupatch.engine.norms import rms_norm_gain, rms_normalise
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


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_the_down_projection_reaches_the_residual_as_the_spec_says(arch: str, tiny_models: dict) -> None:
    """What the engine assumes of every family: a change Δ of the down projection's output v
    at one token changes that decoder layer's output there by Δ, or by N(v + Δ) − N(v) behind
    the spec's post-MLP norm N, and nowhere else. A spec that missed a norm or a scale between
    the MLP and the residual stream (OLMo 2 without its post-feed-forward norm) fails here."""
    model = copy.deepcopy(tiny_models[arch]).eval()
    spec = resolve_architecture(model)
    layer, at = 2, 5
    module, block = down_proj_module(model, spec, layer), model.get_submodule(spec.layers_path)[layer]
    norm = post_mlp_norm_module(model, spec, layer)
    with torch.no_grad():  # outputs far above the norm's eps, as in a trained model (here rms² ≈ eps)
        module.weight.mul_(100.0)
        if norm is not None:  # and a gain that is not all ones
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    seen: dict[str, torch.Tensor] = {}

    def shift(_module, _inputs, output):
        seen["v"] = output[0, at].detach().double()
        if seen.get("shift"):
            output = output.clone()
            output[0, at] += delta.to(output.dtype) * seen["v"].norm().to(output.dtype)
        return output

    def keep(_module, _inputs, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().double()

    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    handles = [module.register_forward_hook(shift), block.register_forward_hook(keep)]
    try:
        outputs = []
        for shifted in (False, True):
            seen["shift"] = shifted
            with torch.no_grad():
                model(input_ids=ids)
            outputs.append(seen["out"][0])
    finally:
        for handle in handles:
            handle.remove()
    v, change = seen["v"], delta.double() * seen["v"].norm()
    if norm is None:
        expected = change
    else:
        gain = rms_norm_gain(norm, model.config.hidden_size)
        expected = rms_normalise(v + change, gain) - rms_normalise(v, gain)
    moved = outputs[1] - outputs[0]
    torch.testing.assert_close(moved[at], expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(outputs[1][:at], outputs[0][:at]) and torch.equal(outputs[1][at + 1 :], outputs[0][at + 1 :])


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
