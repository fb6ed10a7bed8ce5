"""Strict params.yaml sections -> typed config dataclasses (unknown keys and wrong types fail)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    pass


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Read params.yaml and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the project root, or pass --params)")
    params = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return params


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ParamsError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ParamsError:
                pass
        raise ParamsError(f"{where}: {value!r} is not a {annotation}")
    return value


def build(cls: type[T], params: dict, section: str) -> T:
    """cls(**params[section]) with unknown keys refused (listing the valid ones) and types checked."""
    values = params.get(section)
    if values is None:
        raise ParamsError(f"params.yaml has no section {section!r}")
    if not isinstance(values, dict):
        raise ParamsError(f"params.yaml section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    # A field may be spelled differently in params.yaml (metadata "key"), e.g. `lambda`, a Python keyword.
    fields = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml [{section}]: unknown keys {unknown}; valid keys: {sorted(fields)}")
    kwargs = {fields[k]: _check_type(v, hints[fields[k]], f"params.yaml [{section}].{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ParamsError(f"params.yaml [{section}]: {e}") from e
