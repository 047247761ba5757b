"""Typed configuration fields: the one error type, the two validation helpers every config, study
file and suite uses (so every message reads ``<section>.<name> = <value> is invalid: must be ...``),
and building a frozen dataclass from nested or dotted mappings with values coerced to its types."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _where(section: str, name: str) -> str:
    return name if section in ("", "config") else f"{section}.{name}"


def check_choice(section: str, name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``. Configs, study files and
    evaluation suites all validate with these two helpers, so every error reads the same:
    ``<section>.<name> = <value> is invalid: must be <rule>``."""
    if value not in allowed:
        raise ConfigError(f"{_where(section, name)} = {value!r} is invalid: must be one of {', '.join(allowed)}")


def check_field(cond: bool, section: str, name: str, value: Any, rule: str) -> None:
    """Raise :class:`ConfigError` unless ``cond``; ``rule`` says what is allowed."""
    if not cond:
        raise ConfigError(f"{_where(section, name)} = {value!r} is invalid: must be {rule}")


_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def nest_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    """Expand dotted keys into nested dicts and merge them with nested ones."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            value = nest_keys(value)
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"key {key!r} goes inside {p!r}, which is not a section")
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = merge_nested(node[leaf], value)
        else:
            node[leaf] = value
    return out


def merge_nested(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_nested(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_builtin(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type; ``"8/255"`` is accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} is invalid: must be a list")
        return tuple(_coerce(v, args[0], where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r} is invalid: must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where} = {value!r} is invalid: must be an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str) and (m := _FRACTION.match(value)):
            return float(m.group(1)) / float(m.group(2))
        if isinstance(value, str):
            try:  # "1e-3" (YAML 1.1 reads it as a string) or a flattened list item
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r} is invalid: must be a number (or a fraction like 8/255)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r} is invalid: must be a string")
        return value
    return value


def build_dataclass(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    """An instance of the (frozen, validated) dataclass ``cls`` from a mapping: unknown keys are
    refused with the allowed ones, values are coerced to the annotated types (``"8/255"`` for a
    float), nested dataclasses are built recursively; ``prefix`` names the section in errors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = prefix or "config"
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)
