"""``lens``: is the forgotten answer still readable from a hidden layer?

An edit can suppress an answer in the last layers while the residual stream
still carries it higher up; the *logit lens* reads it there (Patil et al.,
arXiv 2309.17410, recover facts "deleted" by ROME this way). For each forget
prompt and paraphrase, the residual stream at the prompt's last token after
each decoder layer is put through the model's final norm and LM head; the
fact counts as extracted when the answer's first token is the top-1 at *any*
layer from the first edited layer on (the layers before it are the base's,
so they would flag the base's knowledge, not the patch's). After the last
layer this is the model's own prediction.

The first layer is the lowest layer any evaluated patch edits (0 when no
patch is given), the same for the base and every patch, so the figures are
comparable; ``details`` names the range. The model is not changed:
specificity and fluency are those of the unattacked model. A model whose
final norm is unknown (an unlisted architecture named with --layers-path)
is reported as skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from zupatch.engine.architectures import decoder_layers, resolve_architecture
from zupatch.errors import ZupatchError
from zupatch.eval.attacks.base import (
    NoParameterSettings,
    Outcome,
    Subject,
    first_answer_tokens,
    hit_figures,
    last_position_batches,
)
from zupatch.eval.data import Item


@dataclass(frozen=True)
class LensSettings(NoParameterSettings):
    """``lens`` takes no parameter."""

    name: ClassVar[str] = "lens"


def _module(model: nn.Module, path: str) -> nn.Module | None:
    obj: Any = model
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, nn.Module) and path else None


def lens_top1(subject: Subject, items: Sequence[Item], first_layer: int) -> list[list[bool]]:
    """For each item, per layer from ``first_layer`` on: is the answer's first token the lens's top-1?"""
    model = subject.model
    spec = resolve_architecture(model)
    layers = decoder_layers(model, spec)
    norm, head = _module(model, spec.final_norm_path), model.get_output_embeddings()
    if norm is None or head is None:
        raise ZupatchError("the logit lens needs the model's final norm and LM head")
    pairs = first_answer_tokens(subject.tokenizer, [i.prompt for i in items], [i.answer for i in items])
    targets = [token for _, token in pairs]
    offset = 0

    def hits(ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> list[list[bool]]:
        nonlocal offset
        states: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden[torch.arange(len(last), device=hidden.device), last])

        handles = [layers[i].register_forward_hook(keep) for i in range(first_layer, len(layers))]
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        wanted = torch.tensor(targets[offset : offset + len(last)], device=ids.device)
        offset += len(last)
        top1 = torch.stack([head(norm(state)).float().argmax(dim=-1) for state in states], dim=1)  # (batch, layers)
        return (top1 == wanted[:, None].to(top1.device)).tolist()

    if not items:
        return []
    return last_position_batches(model, subject.tokenizer, [ids for ids, _ in pairs], subject.batch_size, hits)


def run(settings: LensSettings, subject: Subject, base: Outcome | None) -> Outcome:
    spec = resolve_architecture(subject.model)
    if _module(subject.model, spec.final_norm_path) is None or subject.model.get_output_embeddings() is None:
        return Outcome(skipped="the model's final norm or LM head is unknown (not a listed architecture)")
    total = len(decoder_layers(subject.model, resolve_architecture(subject.model)))
    first = min(subject.first_edited_layer, total - 1)
    figures: dict[str, Any] = {}
    for section, items in (("efficacy", subject.data.forget), ("generalization", subject.data.paraphrases)):
        figures[section] = hit_figures([any(layers) for layers in lens_top1(subject, items, first)],
                                       [i.line for i in items])  # fmt: skip
    details = {"from_layer": first, "to_layer": total - 1}
    return Outcome(figures={**figures, "specificity": None, "fluency": None}, details=details)
