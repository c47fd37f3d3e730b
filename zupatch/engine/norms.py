"""The edit's target through a norm on the MLP output (Gemma 2 and 3, OLMo 2 and 3).

Most families add the down projection's output ``v = W k`` to the residual
stream as it is, so a wanted change ``R`` of the residual at the fact token is
the output target ``V* = W k + R`` (docs/maths.md). Gemma 2/3 add
``N(v) = g ⊙ v / rms(v)`` instead (``post_feedforward_layernorm``, an RMSNorm
with gain ``g = 1 + weight``), and so do OLMo 2/3 (``g = weight``). There the
down projection must produce a ``v*`` with ``N(v*) = N(W k) + R``. The edit is still solved for the down
projection's output, so this module turns the residual share into that
output, through the norm:

* ``N`` only sees the direction of ``v``, so the output keeps its length
  ``‖W k‖`` and only its direction changes (the length also keeps the norm's
  ``eps`` as negligible as it was);
* ``N``'s outputs are the ellipsoid ``{g ⊙ z : ‖z‖² = d}``, and ``N(W k) + R``
  is in general not on it. ``z*`` is the exact closest point,
  ``argmin ‖g ⊙ z − t‖`` subject to ``‖z‖² = d``, a trust-region subproblem:
  ``z_i = g_i t_i / (g_i² − μ)`` with the one ``μ < min g_i²`` where
  ``Σ z_i² = d``, found by bisection in float64. What a layer cannot deliver
  stays in ``Z − H_L`` and falls to the next layers and the refinement passes.

The gain is read from the model's own norm module and checked against the
formula on a random vector, so a norm of another kind is refused instead of
mis-modelled. Before any edit, :func:`check_residual_paths` checks on the model
itself that each edited layer's down projection reaches the layer's output as
the architecture entry says (as it is, or through the named norm), so a norm
or a scale the entry does not name is refused instead of edited wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zupatch.engine.architectures import (
    ArchitectureSpec,
    decoder_layers,
    down_proj_module,
    down_proj_weight_math,
    post_mlp_norm_module,
)
from zupatch.engine.hooks import edit_output, on_outputs, run_until_stopped
from zupatch.engine.placement import model_device
from zupatch.errors import ZupatchError

_BISECTION_STEPS = 200


def rms_norm_gain(module: nn.Module, hidden_size: int, *, where: str = "post-MLP norm") -> torch.Tensor:
    """The gain ``g`` (float64, CPU) of an RMSNorm ``module``: ``module(x) = g ⊙ x / rms(x)``.

    Read by normalising a vector of equal entries (large, so ``eps`` does not
    matter) and checked on a random vector; anything else is a ZupatchError.
    """
    weight = next(module.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    with torch.no_grad():
        probe = torch.full((1, hidden_size), 1e3, dtype=torch.float32, device=device)
        gain = module(probe).to(torch.float64).cpu()[0]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, hidden_size, generator=generator, dtype=torch.float64) * 30.0
        expected = rms_normalise(x, gain)
        actual = module(x.to(torch.float32).to(device)).to(torch.float64).cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    if not torch.isfinite(actual).all() or (actual - expected).abs().max() / scale > 1e-3:
        raise ZupatchError(f"the {where} is not an RMSNorm (g ⊙ x / rms(x)); this architecture cannot be edited")
    return gain


def rms_normalise(outputs: torch.Tensor, gain: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``g ⊙ v / sqrt(mean(v²) + eps)`` for each row of ``outputs`` (…×d); ``eps`` 0 neglects it."""
    rms = (outputs.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt().clamp_min(1e-30)
    return gain.to(outputs) * outputs / rms


def outputs_for_residual(outputs: torch.Tensor, residual: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The outputs ``v*`` (d×n, float64) whose normalised values are closest to
    ``N(outputs) + residual``, each as long as its column of ``outputs`` (d×n).

    A column with a zero residual is returned unchanged (nothing to move).
    """
    Y = outputs.to(torch.float64)
    R = residual.to(Y)
    g = gain.to(Y)[:, None]  # d×1
    d = Y.shape[0]
    wanted = rms_normalise(Y.T, gain.to(Y)).T + R  # d×n, the normalised outputs to get close to
    gt = g * wanted
    floor = (g * g).min()  # μ must stay below the smallest g_i²
    span = gt.norm(dim=0) / math.sqrt(d)  # at μ = floor - span, Σ z_i² <= d
    low, high = floor - span - 1.0, floor.expand_as(span).clone()

    def z_at(mu: torch.Tensor) -> torch.Tensor:
        return gt / (g * g - mu[None, :]).clamp_min(1e-300)

    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        too_long = z_at(mid).pow(2).sum(dim=0) > d
        high = torch.where(too_long, mid, high)
        low = torch.where(too_long, low, mid)
    z = z_at(low)  # Σ z_i² <= d, at the root up to rounding
    missing = (d - z.pow(2).sum(dim=0)).clamp_min(0.0)
    if (missing > 1e-9 * d).any():  # the "hard case": no root below min g², the rest goes on that axis
        axis = int(torch.argmin(g[:, 0] * g[:, 0]))
        sign = torch.where(wanted[axis] * g[axis, 0] < 0, -1.0, 1.0).to(Y)
        z[axis] = torch.where(missing > 1e-9 * d, sign * (z[axis].pow(2) + missing).sqrt(), z[axis])
    targets = z * (Y.norm(dim=0) / z.norm(dim=0).clamp_min(1e-300))
    unchanged = R.abs().amax(dim=0) == 0
    return torch.where(unchanged[None, :], Y, targets)


def post_mlp_norm_gains(model: nn.Module, spec: ArchitectureSpec, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per edited layer, the gain of the norm on its MLP output (Gemma 2/3, OLMo 2/3); empty without one."""
    gains = {}
    for layer in layers:
        module = post_mlp_norm_module(model, spec, layer)
        if module is not None:
            d = down_proj_weight_math(down_proj_module(model, spec, layer), spec).shape[0]
            gains[layer] = rms_norm_gain(module, d, where=f"{spec.post_mlp_norm} of layer {layer}")
    return gains


def check_residual_path(
    block: nn.Module, down_proj: nn.Module, norm: nn.Module | None, gain: torch.Tensor | None,
    forward: Callable[[], Any], where: str,
) -> None:  # fmt: skip
    """Refuse a layer whose down projection does not reach its output as the engine models it.

    ``forward()`` runs the model on a few tokens. A change ``Δ`` of the down
    projection's output at the last of them must change ``block``'s output
    there by ``Δ`` (no ``norm``), or by ``N(v + Δ) − N(v)`` through ``norm``
    with its ``gain`` (its ``eps`` included), up to rounding. A norm or a
    scale between the MLP and the residual stream that the architecture entry
    does not name (a family edited by hand with ``--layers-path``, or a new
    transformers release that changed a layer) would otherwise be edited
    silently wrong; here it is a one-line :class:`ZupatchError`. ``where``
    names the down projection in that message.
    """
    seen: dict[str, Any] = {}

    def shift(hidden: torch.Tensor) -> torch.Tensor:
        seen["v"], seen["dtype"] = hidden[0, -1].detach().to(torch.float64).cpu(), hidden.dtype
        if "delta" not in seen:
            return hidden
        hidden = hidden.clone()
        hidden[0, -1] += seen["delta"].to(device=hidden.device, dtype=hidden.dtype)
        return hidden

    def keep(_key: str, hidden: torch.Tensor) -> None:
        seen["out"] = hidden[0, -1].detach().to(torch.float64).cpu()

    with torch.no_grad(), edit_output(down_proj, shift), on_outputs({"block": block}, keep, stop_at="block"):
        run_until_stopped(forward)
        before, v = seen["out"], seen["v"]
        direction = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        # Behind a norm only the direction counts; as it is, a change as large as the layer's
        # output itself keeps the output's rounding small against it.
        scale = v.norm() if gain is not None else max(float(v.norm()), float(before.norm()))
        seen["delta"] = direction / direction.norm() * scale
        run_until_stopped(forward)
        after = seen["out"]
    delta = seen["delta"]
    if gain is None:
        expected = delta
    else:
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)) or 0.0)
        expected = rms_normalise(v + delta, gain, eps) - rms_normalise(v, gain, eps)
    rounding = 8 * torch.finfo(seen["dtype"]).eps * (float(before.norm()) + float(after.norm()))
    off = float((after - before - expected).norm())
    if off > 0.02 * float(expected.norm()) + rounding:
        how = "as it is" if gain is None else "through the post-MLP norm"
        share = off / max(float(expected.norm()), 1e-30)
        raise ZupatchError(
            f"a change of {where}'s output does not reach the layer's output {how} (off by {share:.0%}): "
            "a norm or a scale between the MLP and the residual stream that zupatch does not model; "
            "name such a norm with --post-mlp-norm, or this layout cannot be edited"
        )


def check_residual_paths(
    model: nn.Module, spec: ArchitectureSpec, layers: Sequence[int], gains: Mapping[int, torch.Tensor]
) -> None:
    """Each edited layer's down projection reaches the layer's output as the architecture
    entry says (:func:`check_residual_path`): two short forwards
    that stop at the layer, before anything is computed from that assumption."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[(7919 * i) % vocab for i in range(1, 9)]], device=model_device(model))
    blocks = decoder_layers(model, spec)
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            check_residual_path(
                blocks[layer], down_proj_module(model, spec, layer), post_mlp_norm_module(model, spec, layer),
                gains.get(layer), lambda: model(input_ids=ids, use_cache=False),
                f"{spec.layers_path}.{layer}.{spec.down_proj}",
            )  # fmt: skip
    finally:
        model.train(was_training)

