"""Strict construction of config dataclasses from plain dicts (params.yaml sections, JSON model configs, the
configs stored in checkpoints): unknown keys and wrong types are refused with one message naming where
the value came from, and declared ranges are checked.

A field declares its range with `setting(default, ge=..., gt=..., le=..., lt=..., choices=..., nonempty=...,
unique=..., key=...)`; `check_ranges(obj, section)` enforces them (config classes call it from
`__post_init__`, so a config built in code is checked too). Floats must be finite unless `finite=False`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names where it came from and what is valid."""


class JobError(ConfigError):
    """A ConfigError that every process of a torchrun job raises alike (it follows from the settings and the
    number of processes alone): rank 0 reports it, in one line for the job, the others exit quietly (stages/cli/main.py)."""


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, key: str | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple | None = None, nonempty: bool = False, unique: bool = False, finite: bool = True,
            multiple_of: str | None = None, same_result: bool = False):
    """A dataclass field with its valid range (checked by check_ranges). `key`: the name in params.yaml when it
    differs (e.g. `lambda`, a Python keyword). `multiple_of`: the name of another field this one divides into.
    `same_result`: every value gives the same output, up to float rounding (how the work runs: processes,
    memory, checkpoint cadence), so a DVC stage that lists its params one by one leaves it out (python -m stages.cli.dvcdeps)."""
    meta = {k: v for k, v in dict(key=key, ge=ge, gt=gt, le=le, lt=lt, choices=choices, nonempty=nonempty,
                                  unique=unique, finite=finite, multiple_of=multiple_of, same_result=same_result).items()}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def key_of(field: dataclasses.Field) -> str:
    return field.metadata.get("key") or field.name


def _bounds(meta: dict) -> str:
    parts = [f"{op} {meta[name]:g}" for name, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if meta.get(name) is not None]
    return " and ".join(parts)


def _check_value(value: Any, meta: dict) -> str | None:
    """Why `value` is outside the field's declared range, or None."""
    if isinstance(value, dict):  # e.g. train.lambda_conditioning {min, max}: the class checks the rest
        bad = [k for k, v in value.items() if isinstance(v, float) and meta.get("finite", True) and not math.isfinite(v)]
        return f"{bad[0]} must be a finite number" if bad else None
    items = value if isinstance(value, (list, tuple)) else [value]
    if meta.get("nonempty") and isinstance(value, (list, tuple, str)) and len(value) == 0:
        return "must not be empty"
    if meta.get("unique") and isinstance(value, (list, tuple)) and len(set(value)) != len(value):
        return "must not repeat a value"
    for item in items:
        if isinstance(item, float) and meta.get("finite", True) and not math.isfinite(item):
            return "must be a finite number"
        if meta.get("choices") is not None and item not in meta["choices"]:
            return f"must be one of {', '.join(map(repr, meta['choices']))}"
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            lo_ok = (meta.get("ge") is None or item >= meta["ge"]) and (meta.get("gt") is None or item > meta["gt"])
            hi_ok = (meta.get("le") is None or item <= meta["le"]) and (meta.get("lt") is None or item < meta["lt"])
            if not (lo_ok and hi_ok):
                return f"must be {_bounds(meta)}"
    return None


def check_ranges(obj: Any, section: str) -> None:
    """Raise ConfigError for the first field of dataclass `obj` outside its declared range."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        problem = _check_value(value, field.metadata)
        if problem is None and field.metadata.get("multiple_of"):
            other = field.metadata["multiple_of"]
            divisor = getattr(obj, other)
            if isinstance(divisor, int) and divisor > 0 and value % divisor:
                problem = f"must be a multiple of {section}.{other} ({divisor})"
        if problem:
            raise ConfigError(f"{section}.{key_of(field)} = {value!r}: {problem}")


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """`value` converted to `annotation` where that is lossless (int -> float, list -> tuple), else ConfigError."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {annotation}")
    return value


def build_dataclass(cls: type[T], values: Any, where: str, error: type[ValueError] = ConfigError, source: str | None = None) -> T:
    """cls(**values) with unknown keys refused (listing the valid ones), types checked and ranges enforced
    (in the class's __post_init__); every problem raised as `error` prefixed with `where` (range errors,
    which name their key themselves, with `source` when given, e.g. "params.yaml")."""
    if not isinstance(values, dict):
        raise error(f"{where} must be a mapping of settings, not {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {key_of(f): f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    try:
        kwargs = {fields[k]: check_type(v, hints[fields[k]], f"{where}.{k}") for k, v in values.items()}
        return cls(**kwargs)
    except ConfigError as e:
        raise error(str(e) if str(e).startswith(where) else f"{source or where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise error(f"{where}: {e}") from e


def config_from_json(cls: type[T], path: str, error: type[ValueError] = ConfigError) -> T:
    """A config dataclass from a JSON file of its fields (a user's `--gpt-model my.json`), strictly."""
    import json
    from pathlib import Path

    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"model config {path} cannot be read: {e.strerror or e}") from e
    except ValueError as e:
        raise error(f"model config {path} is not valid JSON: {e}") from e
    return build_dataclass(cls, values, f"model config {path}", error)


def named_config(cls: type[T], name: str, table: dict[str, dict], what: str, **overrides) -> T:
    """A named config (table[name] + overrides), or a ConfigError listing the known names."""
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}, or a .json file of {cls.__name__} fields")
    return cls(**{**table[name], **overrides})


def settings_digest(obj: Any) -> str:
    """sha256 of a JSON rendering of settings (dataclasses as dicts, keys sorted, paths as strings): the one
    way resumable work, caches and outputs are keyed by what determines them."""
    import hashlib
    import json

    def plain(x):
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else str(x)

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=plain).encode()).hexdigest()
