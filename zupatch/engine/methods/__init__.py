"""Unlearning methods, for ``zupatch create --method NAME``.

Each method is one module with its settings and one entry point
(:class:`~zupatch.engine.methods.base.Method`): the ZeroUnlearn methods
(:mod:`.zerounlearn`, :mod:`.zerounlearn_gd`) solve one layer inside the
shared layer loop of :mod:`zupatch.engine.create`; the fine-tuning baselines
(:mod:`.ga`, :mod:`.npo`) train the same layers. :data:`METHODS` maps the
names to them; :func:`get_method` gives a one-line error for a bad name. A
new method is a new module here and one line in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from zupatch.engine.methods import ga, npo, zerounlearn, zerounlearn_gd
from zupatch.engine.methods.base import Method
from zupatch.errors import ZupatchError

METHODS: Mapping[str, Method] = MappingProxyType(
    {m.METHOD.name: m.METHOD for m in (zerounlearn, zerounlearn_gd, ga, npo)}
)


def get_method(name: str) -> Method:
    """The registered method called ``name``; a :class:`ZupatchError` lists the others."""
    method = METHODS.get(name)
    if method is None:
        raise ZupatchError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return method


__all__ = ["METHODS", "Method", "get_method"]
