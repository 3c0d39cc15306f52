"""Build a :class:`RunConfig` from a preset, YAML files and ``--set key=value`` overrides.

Layering, last wins: preset -> YAML run file(s) -> ``--set``. Unknown keys and values of the wrong
type are errors that name the key as the user writes it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from modsquad_ds.config.presets import PRESETS
from modsquad_ds.config.schema import ConfigError, RunConfig


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(k, key_hint, key): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of {hint.__name__} fields, got {value!r}")
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; users mean the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .inf and .nan; no setting here means them
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from a plain mapping; errors name ``prefix.key``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(path, f"unknown key (known here: {known})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) if prefix else err


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"moe.mlp.top_k=2"`` -> (["moe", "mlp", "top_k"], 2); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(key or text, f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(key, f"value {raw!r} is not valid YAML ({err.problem})") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    return data


def load_config(
    files: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
    preset: str | None = None,
) -> RunConfig:
    """Resolve preset -> files -> overrides into a validated :class:`RunConfig`.

    The preset comes from, in order: the ``preset`` argument, a ``preset=`` override, the last file
    that names one, else ``tiny``.
    """
    layers = [load_yaml(f) for f in files]
    parsed = [parse_override(o) for o in overrides]
    for path, value in parsed:
        layers.append(_nest(path, value))
    chosen = preset
    if chosen is None:
        for layer in layers:
            chosen = layer.get("preset", chosen)
    chosen = chosen or "tiny"
    if chosen not in PRESETS:
        raise ConfigError("preset", f"unknown preset {chosen!r}; known: {', '.join(PRESETS)}")
    merged = PRESETS[chosen]
    for layer in layers:
        merged = _merge(merged, layer)
    merged["preset"] = chosen
    return build(RunConfig, merged)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config; loading it back with :func:`load_config` gives the same config."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
