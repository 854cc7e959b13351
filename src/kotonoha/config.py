"""Configuration: dataclasses filled from YAML files and `key=value` overrides.

Every verb has a dataclass of its settings. `load_config(Cls, path, ["a.b=3", ...])` reads the
YAML file (if any), applies dotted overrides on top, and builds the dataclass recursively,
rejecting unknown keys with a sentence that names them. Values in overrides are parsed as
YAML scalars, so `lr=3e-4`, `compile=true` and `betas=[0.9,0.95]` all do what you expect.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kotonoha.errors import UserError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, 'problem', e)
        raise UserError(f"Config file {p} is not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Config file {p} must contain a mapping of settings, not a {type(data).__name__}.")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["model.n_layer=4", "lr=1e-3"] -> {"model": {"n_layer": 4}, "lr": 0.001}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"Override '{item}' must look like key=value (for example lr=3e-4).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"Override '{item}' conflicts with an earlier override of {part}.")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Build nested dataclasses and check simple scalar types, with a readable error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where} has an invalid value {value!r}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of settings, got {value!r}.")
        return build(tp, value, where)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise UserError(f"{where} must be a {tp.__name__}, got {value!r}.")
        return value
    if origin in (list, tuple) and not isinstance(value, list | tuple):
        raise UserError(f"{where} must be a list, got {value!r}.")
    if (tp is dict or origin is dict) and not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of settings, got {value!r}.")
    return value


def build(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"Unknown setting(s) in {where}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(names))}."
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in
              _over_field_defaults(cls, data).items()}
    return cls(**kwargs)


def _over_field_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A partial mapping for a nested dataclass field goes on top of that field's own default.

    `RLConfig.train` defaults to RL's learning rate and batch size; `rl: {train: {steps: 8}}`
    must change the steps only, not fall back to `TrainConfig()`'s generic values.
    """
    out = dict(data)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
            continue
        default = f.default_factory()
        if dataclasses.is_dataclass(default):
            out[f.name] = merge(dataclasses.asdict(default), value)
    return out


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> T:
    data = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(path))
    data = merge(data, parse_overrides(overrides or []))
    return build(cls, data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any) -> str:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
