"""The edit's target through a post-MLP RMSNorm (Gemma 2/3, OLMo 2/3): zupatch.engine.norms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.tiny_models import MULTIMODAL_ARCHITECTURES, TINY_ARCHITECTURES, tiny_config
from zupatch.engine.architectures import num_layers, post_mlp_norm_module, resolve_architecture
from zupatch.engine.norms import (
    check_residual_paths,
    outputs_for_residual,
    post_mlp_norm_gains,
    rms_norm_gain,
    rms_normalise,
)
from zupatch.errors import ZupatchError

D = 32


def gain(seed: int = 0) -> torch.Tensor:
    g = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 1.0 + 0.5 * g  # like Gemma's 1 + weight, some entries near 0 or negative


def outputs(n: int, seed: int = 1) -> torch.Tensor:
    return 4.0 * torch.randn(D, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def N(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return rms_normalise(v.T, g).T


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "olmo2", "olmo3"])
def test_the_gain_is_read_from_the_model_norm(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    spec = resolve_architecture(model)
    assert spec.post_mlp_norm == "post_feedforward_layernorm"
    module = post_mlp_norm_module(model, spec, 1)
    with torch.no_grad():
        module.weight.normal_()
    g = rms_norm_gain(module, model.config.hidden_size)
    offset = 1.0 if arch.startswith("gemma") else 0.0  # Gemma's gain is 1 + weight, OLMo's the weight
    torch.testing.assert_close(g, offset + module.weight.detach().double(), atol=1e-6, rtol=1e-6)
    x = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(module(x).double(), rms_normalise(x.double(), g), atol=1e-5, rtol=1e-5)
    assert post_mlp_norm_module(AutoModelForCausalLM.from_config(tiny_config("llama")),
                                resolve_architecture(tiny_config("llama")), 1) is None  # fmt: skip


def test_a_norm_of_another_kind_is_refused() -> None:
    with pytest.raises(ZupatchError, match="not an RMSNorm"):
        rms_norm_gain(nn.LayerNorm(D), D)  # subtracts the mean: not g ⊙ x / rms(x)


def test_a_reachable_residual_is_delivered_exactly_at_the_same_length() -> None:
    g, Y = gain(), outputs(4)
    wanted = outputs(4, seed=2)
    R = N(wanted, g) - N(Y, g)
    V = outputs_for_residual(Y, R, g)
    torch.testing.assert_close(N(V, g), N(Y, g) + R, atol=1e-10, rtol=0)
    torch.testing.assert_close(V.norm(dim=0), Y.norm(dim=0), atol=1e-10, rtol=0)


def test_nothing_to_move_is_the_identity() -> None:
    g, Y = gain(), outputs(3)
    R = torch.zeros(D, 3, dtype=torch.float64)
    R[:, 1] = 0.3
    V = outputs_for_residual(Y, R, g)
    assert torch.equal(V[:, 0], Y[:, 0]) and torch.equal(V[:, 2], Y[:, 2])
    assert not torch.equal(V[:, 1], Y[:, 1])


def test_an_unreachable_residual_gets_the_closest_normalised_output() -> None:
    """N's outputs are the ellipsoid {g ⊙ z : ‖z‖² = d}; the result is its point nearest
    to N(Y) + R: no point on it is nearer (random points and a local search from ours)."""
    g, Y = gain(), outputs(3)
    R = 3.0 * torch.randn(D, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wanted = N(Y, g) + R
    V = outputs_for_residual(Y, R, g)
    best = (N(V, g) - wanted).norm(dim=0)
    others = torch.randn(D, 4000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for i in range(3):
        assert ((N(others, g) - wanted[:, i : i + 1]).norm(dim=0) >= best[i] - 1e-9).all()
        for step in (1e-2, 1e-4):  # small moves of the direction never get nearer
            moved = V[:, i : i + 1] + step * V[:, i].norm() * others[:, :200] / math.sqrt(D)
            assert ((N(moved, g) - wanted[:, i : i + 1]).norm(dim=0) >= best[i] - 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", [*TINY_ARCHITECTURES, *MULTIMODAL_ARCHITECTURES])
def test_the_layout_check_passes_every_family_and_refuses_a_missing_norm(arch: str, dtype: torch.dtype) -> None:
    """check_residual_paths, which create runs before any work: every layer of every supported
    family passes, in float32 and bfloat16; a family with a post-MLP norm whose entry is stripped
    of it is refused at every layer, in one line naming the down projection."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype).eval()
    spec = resolve_architecture(model)
    layers = list(range(num_layers(model, spec)))
    check_residual_paths(model, spec, layers, post_mlp_norm_gains(model, spec, layers))
    if spec.post_mlp_norm is None:
        return
    stripped = dataclasses.replace(spec, post_mlp_norm=None)
    for layer in layers:
        with pytest.raises(ZupatchError, match=rf"layers\.{layer}\.mlp\.down_proj's output does not reach .* as it is"):
            check_residual_paths(model, stripped, [layer], {})
