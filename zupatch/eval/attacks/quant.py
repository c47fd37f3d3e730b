"""``quant:TYPE``: does the forgetting survive a GGUF quantization?

The first thing people do with a published model is convert it to GGUF and
quantize it. Quantization moves every weight by up to half a quantization
step; an edit smaller than that noise can vanish, and with it the forgetting
(Zhang et al., ICLR 2025, saw 4-bit quantization bring back most of what
fine-tuning-based unlearning removed).

The attack round-trips every linear weight of the decoder layers (attention
and MLP projections; not the embeddings, the final norm or the LM head, which
llama.cpp keeps at higher precision) through the ``gguf`` package's
``quantize`` and ``dequantize``, the code llama.cpp's converter uses, then
scores the model as ``zupatch eval`` does. The weights are quantized along
their input dimension, as GGUF stores them (GPT-2's transposed ``Conv1D``
weights are transposed first). A weight whose rows are not a multiple of the
type's block size is stored as F16 by llama.cpp's converter; it is rounded
through float16 here too, and counted in ``details.f16_fallback``.

The model's weights are changed in place and restored from a copy (kept on
the CPU) before the attack returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zupatch.engine.architectures import decoder_layers, resolve_architecture
from zupatch.errors import ZupatchError
from zupatch.eval.attacks.base import Outcome, Subject

#: The GGUF types offered: those the ``gguf`` package can quantize (the
#: k-quants can only be dequantized there), from near-lossless to 4 bits.
QUANT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@dataclass(frozen=True)
class QuantSettings:
    """``quant:TYPE``: the GGUF type every decoder linear weight goes through."""

    type: str = "Q8_0"

    @classmethod
    def parse(cls, param: str | None) -> QuantSettings:
        if param is None:
            return cls()
        chosen = param.strip().upper()
        if chosen not in QUANT_TYPES:
            raise ZupatchError(f"unknown GGUF type {param!r}; choose one of {', '.join(QUANT_TYPES)}")
        return cls(chosen)

    @property
    def label(self) -> str:
        return f"quant:{self.type}"


def round_trip(weight: np.ndarray, qtype: str) -> np.ndarray:
    """``dequantize(quantize(weight))`` for a 2-D float32 array, rows quantized in blocks.

    Rows whose length is not a multiple of the block size go through float16
    instead (what llama.cpp's converter stores them as).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[kind][0]
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.shape[-1] % block:
        return weight.astype(np.float16).astype(np.float32)
    return dequantize(quantize(weight, kind), kind).reshape(weight.shape).astype(np.float32)


def decoder_linear_weights(model: nn.Module) -> Iterator[tuple[nn.Parameter, bool]]:
    """Every linear weight inside the decoder layers, and whether it is stored transposed (Conv1D)."""
    spec = resolve_architecture(model)
    for layer in decoder_layers(model, spec):
        for module in layer.modules():
            transposed = type(module).__name__ == "Conv1D"
            if isinstance(module, nn.Linear) or transposed:
                yield module.weight, transposed


@contextmanager
def quantized(model: nn.Module, qtype: str) -> Iterator[dict[str, int]]:
    """The model with its decoder linear weights round-tripped through ``qtype``; restored on exit.

    Yields ``{"tensors": quantized, "f16_fallback": rounded through float16}``.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    originals: list[tuple[nn.Parameter, torch.Tensor]] = []
    counts = {"tensors": 0, "f16_fallback": 0}
    try:
        with torch.no_grad():
            for weight, transposed in decoder_linear_weights(model):
                originals.append((weight, weight.detach().to("cpu", copy=True)))
                rows = weight.detach().float().cpu().numpy()
                rows = rows.T if transposed else rows
                result = round_trip(rows, qtype)
                result = result.T if transposed else result
                weight.copy_(torch.from_numpy(np.ascontiguousarray(result)).to(weight.device, weight.dtype))
                counts["tensors"] += 1
                counts["f16_fallback"] += rows.shape[-1] % block != 0
        yield counts
    finally:
        with torch.no_grad():
            for weight, original in originals:
                weight.copy_(original.to(weight.device))


def run(settings: QuantSettings, subject: Subject, base: Outcome | None) -> Outcome:
    """Score the model after the round trip: every figure ``eval`` reports without attack."""
    if any(weight.device.type == "meta" for weight, _ in decoder_linear_weights(subject.model)):
        return Outcome(skipped="the device map offloaded decoder weights, which the round trip rewrites")
    with quantized(subject.model, settings.type) as counts:
        figures, raw = subject.score(subject.model, base.raw if base else None)
    return Outcome(figures=figures, details={"type": settings.type, **counts}, raw=raw)
