"""The embedded default (the root dvc.yaml) at tiny settings in a git + DVC repository of its own, built once per
test session and copied by the modules that run on it (pytest puts tests/ on sys.path, as for conftest):

- `tiny_upstream` (conftest.py): `dvc repro` up to the pretrained models (prepare, pretrain-vq,
  pretrain-classifier, tokenize, pretrain-ar), what pipelines/ddo starts from (tests/test_ddo_pipeline.py);
- `tiny_pipeline`: a copy of it with the whole pipeline run (tests/test_dvc_smoke.py, and seed 0 of
  tests/test_demo_seeds.py, whose params.yaml is this one).

Each is built by one process under a file lock in the session's shared temporary folder (pytest-xdist's workers
are separate processes: the first to ask builds, the other waits for it), and never changed afterwards: a test
works on its own copy (`copy_of`). Building the tiny pipeline once instead of in each of the three modules saves
two builds of its first five stages (every stage is a process importing torch) and one of the rest.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "pretrain_vq": {"steps": 20, "batch_size": 32},
    "pretrain_classifier": {"epochs": 1},
    "tokenize": {"augment": "shift1"},
    "pretrain_ar": {"epochs": 1, "batch_size": 128},
    "reflogp": {"views": "one"},
    "train": {"epochs": 0.2, "batch_size": 32, "micro_batch_size": 16},
    "eval": {"samples_per_class": 6, "seeds": [0, 1], "cfg_scales": [1.0], "batch_size": 64, "grid_per_class": 4},
    # one point of each sweep (the stages' wiring is what is tested; every stage is a few seconds of process start)
    "sweep": {"lambdas": [30], "cfg_scales": [1.0]},
}
# the stages pipelines/ddo reads the outputs of (its tokens, pretrained GPT, tokenizer and classifier)
UPSTREAM = ("pretrain-ar", "pretrain-classifier")


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def tiny_params() -> dict:
    """The root params.yaml at TINY settings."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    return params


def tiny_repo(repo: Path, *copied: str) -> None:
    """A git + DVC repository at `repo` with the code, the root dvc.yaml and params.yaml at TINY settings, and
    the `copied` folders of ROOT (e.g. a pipeline), committed; nothing run."""
    for name in ("pipeline", "stages", *copied):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "smoke@test"], repo)
    _run(["git", "config", "user.name", "smoke"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "smoke"], repo)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` in this test session's shared temporary folder, built by `build(folder)` in the first
    process that asks (the others wait on the lock) and only read afterwards. A build that failed is started
    again by the next caller."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: popen-gw<k>'s parent, this run's
    folder, done = shared / name, shared / f"{name}.built"  # the mark outside the folder: not in the repo's git status
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def copy_of(folder: Path, to: Path) -> Path:
    """A copy of a built repository at `to` (git, DVC's cache and the outputs: it works like the original)."""
    shutil.copytree(folder, to, symlinks=True)
    return to


def build_upstream(repo: Path) -> None:
    tiny_repo(repo)
    (repo / "repro.log").write_text(_run([str(BIN / "dvc"), "repro", *UPSTREAM], repo))


def build_pipeline_from(upstream: Path) -> Callable[[Path], None]:
    def build(repo: Path) -> None:
        shutil.rmtree(repo)
        copy_of(upstream, repo)
        log = _run([str(BIN / "dvc"), "repro"], repo)
        (repo / "repro.log").write_text((repo / "repro.log").read_text() + log)  # every stage's "Running stage"
    return build
