"""Every DVC stage depends on the source files it runs (derived from the imports, pipeline/codefiles.py, by the
rule of stages/cli/dvcdeps.py), so editing code that computes a stage's output makes DVC rerun it, and tokenize and
reflogp on nothing else (their staleness is versioned: pipeline/versions.py); and `report` a ready `dvc repro`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.codefiles import ROOT, closure
from stages.cli.dvcdeps import DVC_FILES, required_files, rewritten, stage_command


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stage_depends_on_the_code_it_imports(dvc_file: Path):
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage's body
        deps = [Path(os.path.normpath(dvc_file.parent / d)) for d in stage.get("deps", []) if "${" not in str(d)]
        for needed in required_files(stage_command(stage["cmd"])):
            if not any(needed == d or d in needed.parents for d in deps):
                problems.append(f"{name}: {os.path.relpath(needed, dvc_file.parent)}")
    assert not problems, (f"{dvc_file.relative_to(ROOT)} misses code deps (python -m stages.cli.dvcdeps adds them):\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_deps_are_exactly_the_rules(dvc_file: Path):
    """No stale extra code deps either (a file no longer imported, or the CLI on a versioned stage)."""
    assert rewritten(dvc_file) == dvc_file.read_text(), (
        f"{dvc_file.relative_to(ROOT)}: its code deps differ from stages/cli/dvcdeps.py's rule: run python -m stages.cli.dvcdeps")


NOT_COMPUTING = ("stages/cli/main.py", "stages/cli/params.py", "stages/cli/loading.py", "pipeline/outputs.py", "pipeline/formats.py",
                 "pipeline/tokenstore.py", "pipeline/refcache.py", "pipeline/loaders.py", "pipeline/families.py",
                 "pipeline/checkpoint.py", "pipeline/config.py", "pipeline/codefiles.py")


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tokenize_and_reflogp_depend_on_what_computes_their_outputs_only(dvc_file: Path):
    """Editing a --help string (stages/cli/main.py), a message of the cache code or a loader, or a writer reruns neither
    tokenize nor reflogp, in any pipeline (the ImageNet ones included); editing a model or tokenizer, or bumping
    a version (pipeline/versions.py), reruns them."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    seen = set()
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        command = stage_command(stage["cmd"])
        if command not in ("tokenize", "reflogp"):
            continue
        seen.add(command)
        deps = {os.path.relpath(os.path.normpath(dvc_file.parent / d), ROOT) for d in stage["deps"] if "${" not in str(d)}
        assert not deps & set(NOT_COMPUTING), (name, sorted(deps & set(NOT_COMPUTING)))
        assert {"pipeline/versions.py", f"stages/{command}.py", "pipeline/tokenizers/msvq.py"} <= deps, name
        if command == "reflogp":
            assert {"pipeline/models/llamagen.py", "pipeline/models/var.py", "pipeline/logprobs.py"} <= deps, name
        else:
            assert {"pipeline/tokenizers/vq.py", "pipeline/images.py"} <= deps, name
    assert seen, f"{dvc_file.relative_to(ROOT)} runs neither tokenize nor reflogp"


def test_the_derivation_follows_imports():
    files = {str(p.relative_to(ROOT)) for p in required_files("train")}
    assert {"stages/train.py", "pipeline/alignment.py", "pipeline/losses.py", "pipeline/models/llamagen.py",
            "pipeline/models/var.py", "pipeline/formats.py", "pipeline/__init__.py", "stages/cli/main.py"} <= files
    assert "pipeline/report.py" not in files and "stages/eval.py" not in files  # train never runs them


def test_the_memory_planner_is_no_stage_code():
    """`cca-pipe plan` reads the model families, not the other way round: editing the planner reruns no stage, and
    editing a family's memory counts (its object's `memory`, pipeline/models/memory.py) reruns neither tokenize nor
    reflogp: the models never import them."""
    for command in ("tokenize", "reflogp", "train", "eval"):
        assert "pipeline/memplan.py" not in {str(p.relative_to(ROOT)) for p in required_files(command)}, command
    for command in ("tokenize", "reflogp"):
        assert "pipeline/models/memory.py" not in {str(p.relative_to(ROOT)) for p in required_files(command)}, command
    assert "pipeline/memplan.py" in {str(p.relative_to(ROOT)) for p in closure(["stages.plan"])}
    assert "pipeline/models/memory.py" in {str(p.relative_to(ROOT)) for p in closure(["stages.plan"])}


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dvc_parses_every_pipeline(dvc_file: Path):
    """DVC parses every dvc.yaml of the repository on any `dvc repro` (templating included: a `${...}` that
    names a missing parameter fails the root pipeline too), so each must expand into its stages."""
    import subprocess
    import sys

    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([str(dvc), "stage", "list", str(dvc_file.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output, output[-2000:]
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    names = {name for name, stage in stages.items() if not _empty_matrix(stage, dvc_file.parent)}
    listed = {line.split()[0].rsplit(":", 1)[-1].split("@")[0] for line in result.stdout.splitlines() if line.strip()}
    assert listed == names
    # the root pipeline's lambda sweep is empty as shipped (`make paper` trains those points): it expands to nothing
    if dvc_file == ROOT / "dvc.yaml":
        assert names == set(stages) - {"sweep-train", "sweep-eval"}


def _empty_matrix(stage: dict, folder: Path) -> bool:
    """A matrix stage with an axis `${section.key}` naming an empty list (in the pipeline's params.yaml, else the
    root's) expands into no stage at all."""
    for axis in (stage.get("matrix") or {}).values():
        if isinstance(axis, str) and axis.startswith("${"):
            section, key = axis[2:-1].split(".", 1)
            for params_file in (folder / "params.yaml", ROOT / "params.yaml"):
                params = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
                if section in params:
                    if params[section][key] == []:
                        return True
                    break
    return False
