"""Every hyperparameter by name: dotted keys over nested config dataclasses.

``closed_form.lambda_retain = 2000`` in a config file (JSON or TOML, nested
tables or dotted keys) or ``--set closed_form.lambda_retain=2000`` on the
command line both land here, with one validation: unknown keys are errors
that list the valid ones, values must have the field's type.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from zupatch.errors import ZupatchError
from zupatch.io import jsondoc

C = TypeVar("C")


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def setting_names(config: Any, prefix: str = "") -> list[str]:
    """All dotted keys a config accepts."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names += setting_names(value, f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names


def _coerce(current: Any, value: Any, key: str, where: str) -> Any:
    if current is None:  # optional fields (layers, neutral_target, ...): any JSON value
        return tuple(value) if isinstance(value, list) else value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(current, int) and not isinstance(current, bool):
            ok = float(value).is_integer()
            value = int(value) if ok else value
        elif ok:
            value = float(value)
    elif isinstance(current, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise ZupatchError(f"setting {key!r} expects a value like {current!r}, got {value!r}", where)
    return value


def with_settings(config: C, settings: Mapping[str, Any], where: str = "settings", prefix: str = "") -> C:
    """A copy of ``config`` with dotted ``settings`` applied (validated)."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    valid = {f.name for f in dataclasses.fields(config)}
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if head not in valid:
            raise ZupatchError(
                f"unknown setting {prefix + key!r}; valid settings: {', '.join(setting_names(config, prefix))}", where
            )
        current = getattr(config, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ZupatchError(f"unknown setting {prefix + key!r}: {head!r} has no sub-settings", where)
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ZupatchError(f"setting {prefix + key!r} is a group; set its fields ({prefix + key}.NAME)", where)
            nested.setdefault(head, {}).update(flatten(value))
        else:
            direct[head] = _coerce(current, value, prefix + key, where)
    for head, sub in nested.items():
        direct[head] = with_settings(getattr(config, head), sub, where, f"{prefix}{head}.")
    try:
        return dataclasses.replace(config, **direct)
    except (TypeError, ValueError) as exc:
        raise ZupatchError(f"invalid settings: {exc}", where) from None
    except ZupatchError as exc:
        raise ZupatchError(exc.message, where) from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` with ``value`` read as JSON when it parses (numbers, true, lists), else text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ZupatchError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = jsondoc.loads(raw)
    except jsondoc.JSONDocumentError:
        value = raw
    return key.strip(), value


def load_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """Dotted settings from a JSON or TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ZupatchError("config file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZupatchError(f"cannot read the config file ({exc.__class__.__name__})", path) from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ZupatchError("TOML config files need Python 3.11 or later; use JSON", path) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ZupatchError(f"not valid TOML ({exc})", path) from None
    else:
        try:
            data = jsondoc.loads(text)
        except jsondoc.JSONDocumentError as exc:
            raise ZupatchError(str(exc), path) from None
    if not isinstance(data, dict):
        raise ZupatchError("a config file must hold an object of settings", path)
    return flatten(data)
