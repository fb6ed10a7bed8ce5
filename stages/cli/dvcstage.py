"""What `dvc repro` passes to a stage: the options written on a dvc.yaml stage's `cca-pipe` command line.

Resolution order, one for every command (`cca-pipe config` shows its result): a stage config's defaults <-
the preset named in params.yaml <- the keys written in params.yaml's section <- `--preset` <- `--set`, where
the `--preset`/`--set` options are first those written on the dvc.yaml stage's command line (e.g. the
ImageNet pipelines' `--set tokenize.image_size=${image_size}`), then those typed. `cca-pipe config STAGE`
run in a folder with a dvc.yaml applies that stage's options, so it prints what `dvc repro` runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from pipeline.config import ConfigError

from .params import parse_yaml

# global options of `cca-pipe` that take a value (stages/cli/main.py main)
_VALUED = {"--params", "--set", "--preset", "--device", "--nproc-per-node", "--nnodes", "--rdzv-endpoint"}


def _variables(folder: Path, spec: dict) -> dict:
    """The variables dvc.yaml's ${...} see: its folder's params.yaml, which DVC always loads, then its `vars`
    (files of variables, relative to its folder), merged in order; read as cca-pipe reads params (YAML 1.2
    numbers, as DVC's ruamel.yaml does: `010` is 10)."""
    default = folder / "params.yaml"
    values: dict = dict(parse_yaml(default.read_text(encoding="utf-8"), str(default)) or {}) if default.is_file() else {}
    for entry in spec.get("vars") or []:
        if isinstance(entry, str):
            path = folder / entry.split(":")[0]
            values.update(parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {} if path.is_file() else {})
        elif isinstance(entry, dict):
            values.update(entry)
    return values


def _lookup(values: dict, dotted: str, where: str):
    node = values
    for key in dotted.strip().split("."):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"{where}: ${{{dotted}}} is not a variable of its params file")
        node = node[key]
    return json.dumps(node) if isinstance(node, (list, dict)) else str(node)


def _split(args: list[str]) -> int | None:
    """The index of the subcommand in `cca-pipe ...` arguments (after the global options), or None."""
    i = 1
    while i < len(args) and args[i].startswith("-"):
        i += 1 if "=" in args[i] or args[i] not in _VALUED else 2
    return i if i < len(args) else None


def _subcommand_overrides(args: list[str]) -> list[str]:
    """eval's `--methods` / `--cfg-scale` as the `--set` overrides they stand for (stages/cli/main.py eval_)."""
    out, scales = [], []
    for flag, value in zip(args, args[1:]):
        if flag == "--methods":
            out.append(f"eval.methods={json.dumps([m.strip() for m in value.split(',') if m.strip()])}")
        elif flag == "--cfg-scale":
            scales.append(float(value))
    return out + ([f"eval.cfg_scales={scales}"] if scales else [])


def _cca_pipe_stages(folder: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(stage name, subcommand, its global options as written, the subcommand's own arguments) of every dvc.yaml
    stage in `folder` that runs `cca-pipe`, in file order, with ${...} resolved; foreach/matrix stages (sweeps,
    not the main run) left out. [] without a dvc.yaml."""
    dvc_yaml = folder / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    values = _variables(folder, spec)
    out = []
    for name, stage in (spec.get("stages") or {}).items():
        cmd = stage.get("cmd") if isinstance(stage, dict) else None
        if not isinstance(cmd, str) or "foreach" in stage or "matrix" in stage:
            continue
        resolved = re.sub(r"\$\{([^}]+)\}", lambda m: _lookup(values, m.group(1), str(dvc_yaml)), cmd)
        args = shlex.split(resolved)
        at = _split(args) if args and Path(args[0]).name == "cca-pipe" else None
        if at is not None:
            out.append((name, args[at], args[1:at], args[at + 1 :]))
    return out


def _with_overrides(options: list[str], arguments: list[str]) -> list[str]:
    """The global options with the `--set`s the subcommand's own options stand for."""
    for override in _subcommand_overrides(arguments):
        options = [*options, "--set", override]
    return options


def stage_commands(folder: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(stage name, subcommand, global options with the overrides its subcommand options stand for, the
    subcommand's own arguments) of every dvc.yaml stage in `folder` that runs `cca-pipe`, in file order."""
    return [(name, sub, _with_overrides(options, arguments), arguments)
            for name, sub, options, arguments in _cca_pipe_stages(folder)]


def stage_arguments(folder: Path, command: str) -> tuple[str, list[str], list[str]] | None:
    """(the stage's name, its global options as written, its subcommand's arguments) of the dvc.yaml stage in
    `folder` that runs `cca-pipe <command>` (the stage named like the command first, else the first in file
    order), with ${...} resolved; None without one."""
    found = [(name, options, arguments) for name, sub, options, arguments in _cca_pipe_stages(folder) if sub == command]
    return next((f for f in found if f[0] == command), found[0] if found else None)


def stage_options(folder: Path, command: str) -> tuple[str, list[str]] | None:
    """(the stage's name, its global options with the overrides its subcommand options stand for) of the
    dvc.yaml stage that runs `cca-pipe <command>` (stage_arguments), None without one."""
    found = stage_arguments(folder, command)
    return None if found is None else (found[0], _with_overrides(found[1], found[2]))


def subcommand_option(arguments: list[str], flag: str) -> str | None:
    """The value of `flag` (e.g. --tokens) among a stage's subcommand arguments, or None."""
    for i, arg in enumerate(arguments):
        if arg == flag and i + 1 < len(arguments):
            return arguments[i + 1]
        if arg.startswith(flag + "="):
            return arg.partition("=")[2]
    return None


def with_stage_options(obj: dict, options: list[str]) -> dict:
    """The command's settings context (stages/cli/main.py ctx.obj) as if the stage's options were typed before the
    user's: its --params unless one was typed, a typed --preset over its, its --set overrides under the typed."""
    pairs = []
    i = 0
    while i < len(options):
        flag, _, value = options[i].partition("=")
        if not value and flag in _VALUED:
            value, i = options[i + 1], i + 1
        pairs.append((flag, value))
        i += 1
    out = dict(obj)
    given = dict(pairs)
    if "--params" in given and str(obj["params"]) == "params.yaml":
        out["params"] = Path(given["--params"])
    out["preset"] = obj["preset"] or given.get("--preset")
    out["overrides"] = [v for f, v in pairs if f == "--set"] + list(obj["overrides"])
    return out
