"""Enumerated option values, so ``--help`` lists them and a typo is an error naming the choices.

Kept here rather than imported from the engine: the engine brings torch, and
``zupatch --help`` must start fast. A test checks that these match the
engine's own lists.
"""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    zerounlearn = "zerounlearn"
    zerounlearn_gd = "zerounlearn-gd"
    ga = "ga"
    npo = "npo"


class Preset(str, Enum):
    measured = "measured"
    robust = "robust"
    fast = "fast"
    paper = "paper"


class Projection(str, Enum):
    everywhere = "everywhere"
    forget = "forget"
    off = "off"


class FactToken(str, Enum):
    subject = "subject"
    last = "last"


class DeviceMap(str, Enum):
    auto = "auto"
    balanced = "balanced"
    balanced_low_0 = "balanced_low_0"
    sequential = "sequential"


class Encoding(str, Enum):
    auto = "auto"
    arithmetic = "arithmetic"
    bits = "bits"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def value(choice: Enum | None) -> str | None:
    """The plain string of a choice (None stays None)."""
    return None if choice is None else str(choice.value)
