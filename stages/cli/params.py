"""params.yaml -> typed stage configs: strict YAML (duplicate keys and syntax errors named with their
line), `--set section.key=value` overrides, and pipeline.config's strict dataclass building (unknown keys,
wrong types and out-of-range values refused, naming the key)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.config import ConfigError, build_dataclass, key_of

T = TypeVar("T")


class ParamsError(ConfigError):
    pass


# Every section a params file may hold (a `--set` into any other is a typo, e.g. `trian.lambda`); a project's
# params.yaml may add top-level entries of its own (pipelines/*: data_dir, vq_ckpt, ...).
SECTIONS = ("launch", "prepare", "pretrain_vq", "pretrain_classifier", "tokenize", "import_codes", "pretrain_ar",
            "reflogp", "negatives", "train", "eval", "select", "sweep", "paper")
# A params file is a few hundred values; a document whose aliases (*name) expand to more is a "billion laughs"
# bomb: every later step (merging, checking, the settings digest, an error's repr) would expand it.
MAX_EXPANDED_NODES = 100_000
# Numbers are read as YAML 1.2 (its core schema) reads them, not as PyYAML's YAML 1.1: DVC reads the same
# params.yaml with ruamel.yaml (YAML 1.2) for `${...}` and `dvc params diff`, and both must see one number.
# YAML 1.1 reads `010` as octal 8 and `1:30` as base 60 (90); 1.2 reads 10 and the text '1:30' (which a
# numeric setting then refuses, naming its key), and `0o10` for octal. 1e-5, 1E5, .5e1 are floats (1.1: text).
# Underscores (1_000) are kept: both readers take them as digit separators.
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$")
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                           |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                           |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML silently keeps the last) and keys
    that are not plain values, and reads numbers as YAML 1.2 does (_INT_12, _FLOAT_12)."""


_StrictLoader.yaml_implicit_resolvers = {  # SafeLoader's, less its YAML 1.1 int and float forms
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.add_implicit_resolver(_INT, _INT_12, list("-+0123456789"))
_StrictLoader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def _int_12(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    """An int as YAML 1.2 reads it: `010` is 10 (SafeLoader's constructor: octal 8), 0o/0x prefixes."""
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16, "0b": 2}.get(digits[:2].lower())  # 0b: only through an explicit !!int tag
    try:
        return sign * (int(digits[2:], base) if base else int(digits, 10))
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_StrictLoader.add_constructor(_INT, _int_12)


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *common`: construct_mapping merges it
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value (a name or a number), not a list or a mapping", key_node.start_mark)
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice (first on line {seen[key] + 1}); the last would silently win",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _expanded_size(root: yaml.Node, where: str) -> int:
    """How many nodes the document holds with every alias expanded (counted once per node, so the count of
    a bomb costs what its text does); refuses more than MAX_EXPANDED_NODES and recursive aliases."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise ParamsError(f"{where} line {node.start_mark.line + 1}: an alias refers to a value that contains it "
                              "(a recursive structure); write the values out")
        open_nodes.add(id(node))
        children = node.value if isinstance(node.value, list) else []
        total = 1 + sum(size(c) for item in children for c in (item if isinstance(item, tuple) else (item,)))
        if total > MAX_EXPANDED_NODES:
            raise ParamsError(f"{where}: its aliases (*name) expand to more than {MAX_EXPANDED_NODES} values (an alias bomb?); "
                              "a params file needs far fewer: write the values out or use fewer aliases")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def parse_yaml(text: str, where: str):
    """YAML -> Python with duplicate keys, non-scalar keys and alias bombs refused; errors name `where` and the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except RecursionError:  # lists nested thousands deep: PyYAML composes recursively
        raise ParamsError(f"{where}: values nested too deeply to read (thousands of levels); a params file needs a "
                          "few: write the values out") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        hint = " (YAML indents with spaces, never tabs)" if "\t" in text and "tab" in str(problem).lower() or \
            "found character '\\t'" in str(e) else ""
        raise ParamsError(f"{where}{at}: invalid YAML: {' '.join(str(problem).split())}{hint}") from None
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """Read params.yaml (and apply `section.key=value` overrides, values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the project root, or pass --params)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"params file {path} cannot be read: {e}") from e
    params = parse_yaml(text, str(path))
    if params is None:  # an empty file (or comments only) would silently run every stage on its defaults
        raise ParamsError(f"params file {path} is empty: write the sections to set (prepare:, train:, ...), e.g. start "
                          "from the project's params.yaml")
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (prepare:, train:, ...), found {type(params).__name__}")
    _check_sections(text, params, path)
    return merge(params, parse_overrides(overrides or [], params, path))


def _check_sections(text: str, params: dict, path: Path) -> None:
    """A top-level mapping that no stage reads is a misspelt section (`trian:`), whose settings would be
    ignored: refused, unless it only holds values for aliases elsewhere (`common: &common`, merged with
    `<<: *common`). Top-level plain values (a pipeline's data_dir, vq_ckpt) are DVC's, and stay allowed."""
    import difflib

    unknown = [k for k, v in params.items() if isinstance(v, dict) and k not in SECTIONS]
    if not unknown:
        return
    root = yaml.compose(text, Loader=_StrictLoader)  # already checked by parse_yaml: no bomb, no recursion
    referenced: dict[int, int] = {}
    stack, seen = [root], {id(root)}
    while stack:
        node = stack.pop()
        for item in node.value if isinstance(node.value, list) else []:
            for child in item if isinstance(item, tuple) else (item,):
                referenced[id(child)] = referenced.get(id(child), 0) + 1
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    values = {key.value: value for key, value in root.value if isinstance(key, yaml.ScalarNode)}
    for name in unknown:
        if name in values and referenced.get(id(values[name]), 0) > 1:
            continue  # an anchor's holder
        close = difflib.get_close_matches(str(name), SECTIONS, n=1)
        raise ParamsError(f"{path}: unknown section {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; no stage reads "
                          f"it, so its settings would be ignored. Sections: {', '.join(SECTIONS)}: rename it, or remove it")


def parse_overrides(items: list[str], params: dict | None = None, path: Path | str = "params.yaml") -> dict:
    """`section.key=value` items (values parsed as YAML) as a nested dict. Refused: a section no params file
    has (a typo), a key that is a value in params.yaml given keys, a section given a value."""
    out: dict = {}
    params = params or {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ParamsError(f"override {item!r} is not of the form section.key=value")
        dotted, value = item.split("=", 1)
        node, existing = out, params
        *parents, leaf = dotted.split(".")
        top = dotted.split(".")[0]
        if parents and top not in params and top not in SECTIONS:
            raise ParamsError(f"override {item!r}: {path} has no section {top!r}; sections: "
                              f"{', '.join(sorted(set(SECTIONS) | {k for k, v in params.items() if isinstance(v, dict)}))}")
        for key in parents:
            existing = existing.get(key, {}) if isinstance(existing, dict) else None
            if not isinstance(existing, dict):
                raise ParamsError(f"override {item!r}: {key!r} is a value in {path}, not a section")
            node = node.setdefault(key, {})
        parsed = parse_yaml(value, f"override --set {item}")
        is_section = not parents and (isinstance(params.get(leaf), dict) or leaf in SECTIONS)  # not a mapping setting
        if is_section and not isinstance(parsed, dict):
            raise ParamsError(f"override {item!r}: {dotted!r} is a section of settings, not a value; set one of its keys: "
                              f"--set {dotted}.KEY=VALUE")
        node[leaf] = parsed
    return out


def merge(base: dict, top: dict) -> dict:
    """base with top's keys written over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(cls: type[T], params: dict, section: str, preset: str | None = None, overrides: dict | None = None,
          source: str | Path = "params.yaml") -> T:
    """The section's config: defaults <- preset <- params.yaml <- --preset <- --set (stages/cli/presets.py), with
    unknown keys refused (listing the valid ones), types and ranges checked; errors name `source`, the
    params file the values came from (--params)."""
    from .presets import resolve

    if overrides and "profile" in overrides:  # `--set profile=trial`: a top-level value, not a section's
        params = {**params, "profile": overrides["profile"]}
    try:
        values = resolve(section, params, preset, (overrides or {}).get(section), source=str(source))
    except ConfigError as e:
        raise ParamsError(str(e)) from e
    return build_dataclass(cls, values, f"{source} [{section}]", error=ParamsError, source=str(source))


def as_params(cfg) -> dict:
    """A config as its params.yaml section: keys spelled as there (`lambda`), tuples as lists."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return {key_of(f): plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


SETTINGS_FILE = "settings.yaml"


class _SettingsDumper(yaml.SafeDumper):
    """params.yaml's own layout: one key per line (a section of scalars too), lists on one line ([0.5, 1.0])."""


_SettingsDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def settings_yaml(settings: dict[str, object], preset: str | None = None) -> str:
    """Resolved settings as params.yaml text: {section: config} (and the preset they were resolved with)."""
    record = {"preset": preset} if preset else {}
    record.update({section: as_params(cfg) for section, cfg in settings.items()})
    return yaml.dump(record, Dumper=_SettingsDumper, sort_keys=False, default_flow_style=False)


def save_settings(directory: Path, section: str, cfg, preset: str | None = None) -> None:
    """The resolved settings a stage ran with, saved beside its outputs (`cca-pipe config` prints the same)."""
    from pipeline.hub import inputs_record
    from pipeline.outputs import write_text

    text = settings_yaml({section: cfg}, preset)
    if hub := inputs_record():  # the Hub files this run read: {repo, file, revision, commit} each (pipeline/hub.py)
        text += yaml.dump({"hub_inputs": hub}, Dumper=_SettingsDumper, sort_keys=False, default_flow_style=False)
    write_text(Path(directory) / SETTINGS_FILE, text)
