"""Attacks on forgetting, for ``zupatch eval --attack NAME[:PARAM]``.

A patch that passes ``eval`` has made greedy decoding stop producing the
answers. Users do more to a published model than greedy decoding: they
quantize it, chat with it, sample from it, read its hidden layers and
fine-tune it. Each attack here does one of those to the base and to every
patched variant and scores the result with the same measures, so you see
before pushing whether the forgetting survives what users will do.

Each attack is one module with a frozen settings dataclass (``parse`` reads
the ``:PARAM`` part, ``label`` writes the canonical name) and one entry
point, ``run(settings, subject, base)`` (see :mod:`.base`). :data:`ATTACKS`
maps the names to them; :func:`parse_attacks` turns the ``--attack``
strings into settings, with a one-line error for a bad name or parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from zupatch.errors import ZupatchError
from zupatch.eval.attacks import chat, lens, mention, quant, relearn, topk
from zupatch.eval.attacks.base import Outcome, Subject


@dataclass(frozen=True)
class Attack:
    """One registered attack: its settings class, its entry point, what it measures."""

    name: str
    settings: type
    run: Callable[[Any, Subject, Outcome | None], Outcome]
    summary: str


ATTACKS: Mapping[str, Attack] = MappingProxyType({
    "quant": Attack("quant", quant.QuantSettings, quant.run,
                    "GGUF quantization round trip of the decoder weights (TYPE: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)"),
    "chat": Attack("chat", chat.ChatSettings, chat.run,
                   "the facts asked as questions through the chat template, greedy answer"),
    "topk": Attack("topk", topk.TopKSettings, topk.run, "the answer's first token among the top K (default 5)"),
    "lens": Attack("lens", lens.LensSettings, lens.run,
                   "logit lens: the answer top-1 at any layer from the first edited one"),
    "mention": Attack("mention", mention.MentionSettings, mention.run,
                      "each forget prompt after a sentence that names its subject, greedy answer"),
    "relearn": Attack("relearn", relearn.RelearnSettings, relearn.run,
                      "STEPS Adam steps (default 20, lr 2e-5) on unrelated text, then every figure"),
})  # fmt: skip

#: What ``--attack all`` runs, in this order.
ALL = ("quant:Q8_0", "quant:Q4_0", "chat", "topk:5", "lens", "mention", "relearn:20")


def parse_attack(text: str) -> Any:
    """The settings of one ``NAME[:PARAM]`` string; a :class:`ZupatchError` names what is wrong."""
    name, sep, param = text.strip().partition(":")
    attack = ATTACKS.get(name.strip().lower())
    if attack is None:
        raise ZupatchError(f"unknown attack {text!r}; choose from {', '.join(ATTACKS)} or all (NAME[:PARAM])")
    if sep and not param.strip():
        raise ZupatchError(f"attack {text!r}: empty parameter after ':'")
    try:
        return attack.settings.parse(param.strip() if sep else None)
    except ZupatchError as error:
        raise ZupatchError(f"attack {text!r}: {error.message}") from None


def parse_attacks(texts: Iterable[str]) -> list[Any]:
    """Settings for each ``--attack`` value, ``all`` expanded to :data:`ALL`, duplicates dropped."""
    chosen: list[Any] = []
    for text in texts:
        for one in ALL if text.strip().lower() == "all" else (text,):
            settings = parse_attack(one)
            if settings not in chosen:
                chosen.append(settings)
    return chosen


def attack_of(settings: Any) -> Attack:
    """The registry entry a settings object belongs to."""
    return next(a for a in ATTACKS.values() if isinstance(settings, a.settings))


__all__ = ["ALL", "ATTACKS", "Attack", "Outcome", "Subject", "attack_of", "parse_attack", "parse_attacks"]
