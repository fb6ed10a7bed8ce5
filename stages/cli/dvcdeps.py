"""The code deps of the stages in the project's dvc.yaml files, derived from the imports (pipeline/codefiles.py).

`python -m stages.cli.dvcdeps` rewrites them (data deps, comments and everything else kept as written), and the
train params of a stage that lists them one by one (dvc.yaml's sweep-train: tracked_train_params);
`python -m stages.cli.dvcdeps --check` only names the stages whose lists differ (tests/test_dvc_deps.py checks the
same). A developer tool beside stages/cli/dvcstage.py, which reads the same files for `cca-pipe config`.

The rule:
- tokenize and reflogp, whose outputs cost GPU-hours on ImageNet: their own stage module (with their settings'
  defaults), stages/cli/presets.py (the released recipes' values, which the ImageNet pipelines' presets set), the
  modules that compute what they write (VERSIONED: the tokenizers and the image views; the models, their layers
  and the log-prob sum) and pipeline/versions.py. Whether their outputs are stale is decided on purpose by the versions
  there (docs/safety.md, "Stale caches and stores"), so the CLI, the settings plumbing, the writers, the
  loaders and their messages are no deps: editing them reruns neither, and bumping a version reruns both.
- every other stage: the whole import closure of its module, with the CLI. No version guards their outputs,
  so any code they run may change them, and rerunning one of them costs less than a result silently made
  by other code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from pipeline.codefiles import PACKAGES, ROOT, closure
from pipeline.outputs import write_text

from .main import STAGES, verb

DVC_FILES = [ROOT / "dvc.yaml", ROOT / "pipelines/imagenet-llamagen/dvc.yaml", ROOT / "pipelines/imagenet-var/dvc.yaml",
             ROOT / "pipelines/paper/dvc.yaml", ROOT / "pipelines/ddo/dvc.yaml",
             ROOT / "pipelines/imagenet-llamagen/ddo/dvc.yaml", ROOT / "pipelines/imagenet-var/ddo/dvc.yaml"]
MODULES = {command: module for command, (module, _, _) in STAGES.items()} | {"report": "report", "import-codes": "import_codes",
                                                                             "paper": "paper", "ddo-vs-cca": "ddo_vs_cca", "check": "check",
                                                                             "fetch": "fetch"}
# command -> the modules that compute what it writes; their imports are followed within COMPUTING only
VERSIONED = {
    "tokenize": ("pipeline.tokenizers.vq", "pipeline.tokenizers.msvq", "pipeline.images", "pipeline.versions"),
    "reflogp": ("pipeline.models.llamagen", "pipeline.models.var", "pipeline.logprobs", "pipeline.versions"),
}
COMPUTING = ("pipeline.models", "pipeline.tokenizers", "pipeline.logprobs", "pipeline.images", "pipeline.versions",
             "stages.cli.presets")


def required_files(command: str) -> list[Path]:
    """The code files `cca-pipe <command>`'s DVC stage depends on (the rule above)."""
    module = f"stages.{MODULES[command]}"
    if command in VERSIONED:
        return closure([module, "stages.cli.presets", *VERSIONED[command]], within=(module, *COMPUTING))
    return sorted({*closure([module, "stages.cli.params"]), ROOT / "stages/cli/main.py"})


def tracked_train_params(stage: dict) -> list[str]:
    """The train params a DVC stage listing them one by one (dvc.yaml's sweep-train) tracks: every key of
    TrainConfig but those its command sets (`--set train.KEY=`: the sweep's matrix) and those whose every value
    gives the same weights (`setting(same_result=True)`): a new setting is a field and a params.yaml line."""
    from pipeline.config import key_of

    TrainConfig = verb("train").TrainConfig
    set_by_command = set(re.findall(r"--set\s+[\"']?train\.(\w+)=", stage["cmd"]))
    return [f"train.{key_of(f)}" for f in dataclasses.fields(TrainConfig)
            if key_of(f) not in set_by_command and not f.metadata.get("same_result")]


def lists_train_params(stage: dict) -> bool:
    """A stage running `cca-pipe train` that lists train params one by one (others track a key or two of them,
    e.g. reflogp's train.epochs)."""
    return stage_command(stage["cmd"]) == "train" and any(isinstance(p, str) and p.startswith("train.")
                                                          for p in stage.get("params", []))


def stage_command(cmd: str) -> str:
    words = shlex.split(cmd.replace("\n", " "))
    return next(w for w in words[1:] if w in MODULES)


def is_code(dep: str, base: Path) -> bool:
    path = Path(os.path.normpath(base / dep))
    return "${" not in dep and path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES


_STAGE = re.compile(r"^  ([^\s#:][^:]*):\s*(#.*)?$")  # a stage's name, under `stages:`
_DEPS = re.compile(r"^(\s+)deps:\s*(#.*)?$")
_PARAMS = re.compile(r"^(\s+)params:\s*(#.*)?$")


def rewritten(dvc_file: Path) -> str:
    """The text of `dvc_file` with each stage's code deps replaced by required_files (after its data deps)."""
    stages = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    lines = dvc_file.read_text(encoding="utf-8").splitlines()
    out, stage, in_stages, i, done = [], None, False, 0, set()
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if re.match(r"^\S", line):
            in_stages = line.startswith("stages:")
            continue
        if in_stages and _STAGE.match(line):
            stage = _STAGE.match(line).group(1).strip()
            continue
        params = _PARAMS.match(line)
        if in_stages and params and stage in stages and lists_train_params(stages[stage].get("do", stages[stage])):
            item = f"{params.group(1)}  - "
            others = []
            while i < len(lines) and lines[i].startswith(item):
                if not lines[i][len(item):].startswith("train."):
                    others.append(lines[i])
                i += 1
            out += others + [f"{item}{key}" for key in tracked_train_params(stages[stage].get("do", stages[stage]))]
            continue
        deps = _DEPS.match(line)
        if not (in_stages and deps and stage in stages):
            continue
        item = f"{deps.group(1)}  - "
        data = []
        while i < len(lines) and lines[i].startswith(item):
            if not is_code(yaml.safe_load(lines[i][len(item):]), dvc_file.parent):
                data.append(lines[i])
            i += 1
        body = stages[stage].get("do", stages[stage])  # a foreach stage's body
        code = [os.path.relpath(p, dvc_file.parent) for p in required_files(stage_command(body["cmd"]))]
        out += data + [f"{item}{path}" for path in code]
        done.add(stage)
    if set(stages) - done:  # a layout this reader does not know: say so rather than leave lists unchecked
        raise ValueError(f"{dvc_file}: no `deps:` list found for stage(s) {', '.join(sorted(set(stages) - done))}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    differ = []
    for dvc_file in DVC_FILES:
        text = rewritten(dvc_file)
        if text != dvc_file.read_text(encoding="utf-8"):
            differ.append(str(dvc_file.relative_to(ROOT)))
            if "--check" not in argv:
                write_text(dvc_file, text)  # atomic: an interrupted rewrite never leaves half a dvc.yaml
    verb = "differ from the imports" if "--check" in argv else "updated"
    print(f"{verb}: {', '.join(differ)}" if differ else "the code deps of every dvc.yaml are up to date")
    return 1 if differ and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
