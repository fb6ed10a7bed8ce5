"""params.yaml -> typed stage configs: strict YAML (duplicate keys and syntax errors named with their
line), `--set section.key=value` overrides, and pipeline.config's strict dataclass building (unknown keys,
wrong types and out-of-range values refused, naming the key)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.config import ConfigError, build_dataclass

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
    """Read params.yaml and apply `section.key=value` overrides (values parsed as YAML)."""
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
    for item in overrides or []:
        if "=" not in item:
            raise ParamsError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {key!r} is a value in {path}, not a section")
        node[leaf] = parse_yaml(value, f"override --set {item}")
    return params


def build(cls: type[T], params: dict, section: str) -> T:
    """cls(**params[section]) with unknown keys refused (listing the valid ones), types and ranges checked."""
    values = params.get(section)
    if values is None:
        raise ParamsError(f"params.yaml has no section {section!r}")
    return build_dataclass(cls, values, f"params.yaml [{section}]", error=ParamsError, source="params.yaml")
