"""Config trees (nested mappings, as YAML and the command line give them): built into a validated
:class:`~fastclip.config.Config`, each value coerced to its field's type with an error naming the field; and two
trees compared field by field."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Union

from fastclip.config import Config
from fastclip.errors import ConfigError


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def differences(old: dict, new: dict, *, skip: tuple[str, ...] = ()) -> list[str]:
    """'section.field old -> new' for every field of two (nested) config dicts that differs, ``skip`` left out."""
    a, b = flatten(old), flatten(new)
    return [f"{key} {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
            if key not in skip and a.get(key) != b.get(key)]  # fmt: skip


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the field's declared type, or say which field wants what."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values like [0.9, 1.0], got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        # inf and nan pass every `x > 0` style check below them and poison the run much later
        if not math.isfinite(number):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def unknown(kind: str, name: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(choices))}")


def build_config(tree: dict[str, Any]) -> Config:
    """Build a validated Config from a nested dict ({'data': {'batch_size': 64}, ...})."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for section, body in tree.items():
        if section not in sections:
            raise unknown("config section", section, list(sections))
        tp = hints[section]
        if not dataclasses.is_dataclass(tp):
            kwargs[section] = _coerce(body, tp, section)
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of fields, got {body!r}")
        field_types = typing.get_type_hints(tp)
        values = {}
        for key, value in body.items():
            if key not in field_types:
                raise unknown("config field", f"{section}.{key}", [f"{section}.{k}" for k in field_types])
            values[key] = _coerce(value, field_types[key], f"{section}.{key}")
        kwargs[section] = tp(**values)
    return Config(**kwargs)
