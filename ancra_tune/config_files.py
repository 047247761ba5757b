"""Configuration files: the shipped presets, YAML files with ``--set KEY=VALUE`` overrides (values are
YAML; fractions such as ``8/255`` are numbers), and merging a study's overrides into a base."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config_fields import ConfigError, merge_nested, nest_keys


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` (nested or dotted keys) laid over ``base``: a nested dict for ``from_dict``."""
    return merge_nested(nest_keys(base), nest_keys(overrides))


PRESETS = ("quickstart", "paper_cifar10_resnet18", "mnist_small_cnn")


def resolve_config_path(name: str | None) -> Path | None:
    """A YAML path, or the name of a preset shipped with the package (``ancra_tune/presets``)."""
    if name is None:
        return None
    p = Path(name)
    if p.is_file():
        return p
    if name in PRESETS:
        return Path(str(resources.files("ancra_tune") / "presets" / f"{name}.yaml"))
    raise ConfigError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(PRESETS)}")


def parse_override(item: str) -> tuple[str, Any]:
    """``"method.alpha=0.5"`` -> ``("method.alpha", 0.5)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. method.alpha=0.5")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_yaml_with_overrides(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    base: dict[str, Any] = {}
    if path is not None:
        base = nest_keys(read_yaml_mapping(path))
    for item in overrides:
        k, v = parse_override(item)
        base = merge_nested(base, nest_keys({k: v}))
    return base
