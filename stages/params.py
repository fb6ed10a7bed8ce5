"""params.yaml -> typed stage configs: strict YAML (duplicate keys and syntax errors named with their
line), `--set section.key=value` overrides, and pipeline.config's strict dataclass building (unknown keys,
wrong types and out-of-range values refused, naming the key)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.config import ConfigError, build_dataclass, key_of

T = TypeVar("T")


class ParamsError(ConfigError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML silently keeps the last)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice (first on line {seen[key] + 1}); the last would silently win",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, where: str):
    """YAML -> Python with duplicate keys refused; errors name `where` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        hint = " (YAML indents with spaces, never tabs)" if "\t" in text and "tab" in str(problem).lower() or \
            "found character '\\t'" in str(e) else ""
        raise ParamsError(f"{where}{at}: invalid YAML: {' '.join(str(problem).split())}{hint}") from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Read params.yaml (and apply `section.key=value` overrides, values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the project root, or pass --params)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"params file {path} cannot be read: {e}") from e
    params = parse_yaml(text, str(path)) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (prepare:, train:, ...), found {type(params).__name__}")
    return merge(params, parse_overrides(overrides or [], params, path))


def parse_overrides(items: list[str], params: dict | None = None, path: Path | str = "params.yaml") -> dict:
    """`section.key=value` items (values parsed as YAML) as a nested dict; a key that is a value in params.yaml
    cannot hold keys."""
    out: dict = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ParamsError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        node, existing = out, params or {}
        *parents, leaf = dotted.split(".")
        for key in parents:
            existing = existing.get(key, {}) if isinstance(existing, dict) else None
            if not isinstance(existing, dict):
                raise ParamsError(f"override {item!r}: {key!r} is a value in {path}, not a section")
            node = node.setdefault(key, {})
        node[leaf] = parse_yaml(value, f"override --set {item}")
    return out


def merge(base: dict, top: dict) -> dict:
    """base with top's keys written over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(cls: type[T], params: dict, section: str, preset: str | None = None, overrides: dict | None = None) -> T:
    """The section's config: defaults <- preset <- params.yaml <- --preset <- --set (stages/presets.py), with
    unknown keys refused (listing the valid ones), types and ranges checked."""
    from .presets import resolve

    try:
        values = resolve(section, params, preset, (overrides or {}).get(section))
    except ConfigError as e:
        raise ParamsError(str(e)) from e
    return build_dataclass(cls, values, f"params.yaml [{section}]", error=ParamsError, source="params.yaml")


def as_params(cfg) -> dict:
    """A config as its params.yaml section: keys spelled as there (`lambda`), tuples as lists."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {key_of(f): plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


SETTINGS_FILE = "settings.yaml"


def settings_yaml(settings: dict[str, object], preset: str | None = None) -> str:
    """Resolved settings as params.yaml text: {section: config} (and the preset they were resolved with)."""
    record = {"preset": preset} if preset else {}
    record.update({section: as_params(cfg) for section, cfg in settings.items()})
    return yaml.safe_dump(record, sort_keys=False, default_flow_style=None)


def save_settings(directory: Path, section: str, cfg, preset: str | None = None) -> None:
    """The resolved settings a stage ran with, saved beside its outputs (`cca-pipe config` prints the same)."""
    from pipeline.outputs import write_text

    write_text(Path(directory) / SETTINGS_FILE, settings_yaml({section: cfg}, preset))
