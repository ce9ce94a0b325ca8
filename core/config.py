"""YAML experiment configs loaded into dataclasses, with `key=value` overrides and strict keys."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from .errors import InputError
from .io import atomic_write_text


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


class ConfigError(InputError):
    """A config names a key that does not exist or gives a value of the wrong kind."""


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 as a string
        except ValueError:
            pass
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        (inner, *_) = typing.get_args(tp) or (typing.Any,)
        items = [_coerce(v, inner, where) for v in value] if inner is not Ellipsis else list(value)
        return tuple(items) if origin is tuple else items
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a mapping; an unknown key is an error naming the valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)} "
            f"for {cls.__name__}; valid keys: {', '.join(prefix + k for k in sorted(types_))}"
        )
    return cls(**{k: _coerce(v, types_[k], prefix + k) for k, v in data.items()})


def to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_overrides(overrides: list[str]) -> dict:
    """['a=1', 'unet.width=32'] -> {'a': 1, 'unet': {'width': 32}} with YAML-typed values."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _load_yaml(raw) if raw != "" else ""
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, base=None):
    """Read YAML `path` over `base` (default: the dataclass defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _load_yaml(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    base = to_dict(base if base is not None else cls())
    return from_dict(cls, _merge(_merge(base, data), parse_overrides(overrides or [])))


def replace(cfg, changes: dict):
    """A copy of dataclass `cfg` with nested `changes` merged in, validated like a loaded config."""
    return from_dict(type(cfg), _merge(to_dict(cfg), changes))


def save_config(cfg, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
