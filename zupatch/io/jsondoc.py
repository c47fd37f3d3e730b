"""Strict JSON parsing for untrusted documents.

Python's ``json`` accepts duplicate keys (the last one wins, so two readers
can disagree about a document), ``NaN`` and ``Infinity``, integers of any
length (5000 digits raise a bare ``ValueError``), nesting until the
interpreter's recursion limit, and lone UTF-16 surrogates (``"\\ud800"``), which
later fail to encode. Every document zupatch reads from a user
(patch metadata, safetensors headers, shard indexes, request files, settings,
eval reports) goes through :func:`loads`, which refuses all of these with a
:class:`JSONDocumentError` whose message fits in one line. The bounds are
stated in docs/format.md ("Limits").
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # objects and arrays nested in each other
MAX_INT_DIGITS = 20  # every 64-bit integer fits; longer ones are refused


_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONDocumentError(ValueError):
    """The text is not JSON, or breaks one of the rules above; the message says which."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONDocumentError(f"JSON with the key {dup[:60]!r} twice in one object")
    return doc


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONDocumentError(f"JSON integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONDocumentError(f"JSON number {text[:30]} out of range")
    return value


def _constant(name: str) -> float:
    raise JSONDocumentError(f"JSON with {name}, which is not a number")


def _check_text(s: str) -> None:
    if not s.isascii() and _SURROGATE.search(s):
        raise JSONDocumentError("JSON string with a lone UTF-16 surrogate, which is not text")


def _check_tree(doc: Any, max_depth: int) -> None:
    """Depth and strings; iterative, so a deep document cannot exhaust the stack here."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if isinstance(node, dict):
            for key in node:
                _check_text(key)
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise JSONDocumentError(f"JSON nested more than {max_depth} levels deep")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, str)))


def decoder() -> json.JSONDecoder:
    """A decoder enforcing the rules above, except depth and strings: pass results to :func:`check`."""
    return json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant)


def check(doc: Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """Depth and strings of an already decoded document; returns it."""
    _check_tree(doc, max_depth)
    return doc


def raw_decode(text: str, index: int, *, max_depth: int = MAX_DEPTH) -> tuple[Any, int]:
    """One document starting at ``text[index]`` and the index after it (for lists read record by record)."""
    try:
        doc, end = decoder().raw_decode(text, index)
    except RecursionError:
        raise JSONDocumentError(f"JSON nested more than {max_depth} levels deep") from None
    return check(doc, max_depth=max_depth), end


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON document under the rules above.

    Raises :class:`JSONDocumentError`; a syntax error is also a
    :class:`json.JSONDecodeError` turned into the same one-line form.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise JSONDocumentError("not UTF-8 text") from None
    try:
        doc = decoder().decode(text)
    except json.JSONDecodeError as exc:
        raise JSONDocumentError(f"malformed JSON ({describe(exc)})") from None
    except RecursionError:
        raise JSONDocumentError(f"JSON nested more than {max_depth} levels deep") from None
    return check(doc, max_depth=max_depth)


def describe(exc: json.JSONDecodeError) -> str:
    """A syntax error in a few words: what and where."""
    return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
