"""End to end: `dvc repro` of the real dvc.yaml at tiny scale in a temporary git repo, then pipelines/paper as
shipped on its outputs (`make paper`), then a lambda experiment that must reuse the tokens and the reference
cache (only train and eval rerun)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def tiny_repo(repo: Path, *copied: str) -> None:
    """A git + DVC repository at `repo` with the code, the root dvc.yaml and params.yaml at TINY settings, and
    the `copied` folders of ROOT (e.g. a pipeline), committed; nothing run."""
    for name in ("pipeline", "stages", *copied):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "smoke@test"], repo)
    _run(["git", "config", "user.name", "smoke"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "smoke"], repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("smoke")
    tiny_repo(repo)
    log = _run([str(BIN / "dvc"), "repro"], repo)
    (repo / "repro.log").write_text(log)
    return repo


@pytest.mark.slow
def test_repro_writes_every_output(repo: Path):
    log = (repo / "repro.log").read_text()
    for stage in ("prepare", "pretrain-vq", "pretrain-classifier", "tokenize", "pretrain-ar", "reflogp", "train", "eval",
                  "sweep-train@30-0.5", "sweep-eval@30-0.5", "sweep-cfg@1.0", "report"):
        assert f"Running stage '{stage}'" in log
    data = repo / "data"
    for path in ("vq/vq.pt", "ar/gpt.pt", "classifier/classifier.pt", "tokens/train.zarr/zarr.json",
                 "reflogp/ref_logp.parquet", "train/policy.pt", "train/metrics.csv", "eval/results.md"):
        assert (data / path).exists(), path
    metrics = json.loads((data / "eval/metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "cfg_1", "cca"}
    for name in ("base", "cfg_1", "cca"):
        m = metrics["methods"][name]
        assert m["fid"] > 0 and 1.0 <= m["is"] <= 10.0 and 0 <= m["class_accuracy"] <= 1
        assert len(metrics["per_seed"][name]) == 2
        for seed in (0, 1):
            npz = __import__("numpy").load(data / f"eval/samples/{name}_seed{seed}.npz")
            assert npz["arr_0"].shape == (60, 16, 16, 3) and npz["arr_0"].dtype.name == "uint8"
            in_sampling_order = npz["arr_1"][npz["sample_index"].argsort()]  # written shuffled (the ADM evaluator's IS)
            assert list(in_sampling_order) == [c for c in range(10) for _ in range(6)]
        assert (data / f"eval/grids/{name}.png").is_file()
    # 1438 training images, one cache row each ("one" view), 0.2 epochs of 32 rows -> ceil(287.6 / 32) steps
    steps = (data / "train/metrics.csv").read_text().strip().splitlines()[1:]
    assert len(steps) == 9
    # generated data stays out of git: DVC wrote .gitignore entries for every output
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo)
    assert not [line for line in status.splitlines() if line.startswith("??") and "/.gitignore" not in line and "dvc.lock" not in line
                and "repro.log" not in line]


@pytest.mark.slow
def test_the_paper_pipeline_runs_as_shipped(repo: Path):
    """pipelines/paper with its own params.yaml as shipped (only the main pipeline's settings are tiny), run the
    way `make paper` runs it; every table of the report is written and each training stage ran. Its grids are
    cut to one or two points each (every foreach still expands and runs; a grid's wiring is the same at any
    length): as shipped, 16 trainings and ~25 evaluations took 541 s, over half of the suite's budget."""
    shutil.copytree(ROOT / "pipelines/paper", repo / "pipelines/paper", ignore=shutil.ignore_patterns("dvc.lock"))
    paper_dir = repo / "pipelines/paper"
    text = (paper_dir / "params.yaml").read_text(encoding="utf-8")
    for key, points in {"dpo_betas": "[0.25]", "unlearning_lambdas": "[0.03]", "lambdas": "[1, 30]",
                        "fixed_lambdas": "[30]", "seeds": "[0]", "seeds_cca_lambdas": "[10]", "ddo_alphas": "[1]",
                        "ddo_round2_alphas": "[1]"}.items():
        text, n = re.subn(rf"^(  {key}: )\[[^\]]*\]", rf"\g<1>{points}", text, flags=re.M)
        assert n == 1, key
    (paper_dir / "params.yaml").write_text(text, encoding="utf-8")
    ddo = yaml.safe_load((ROOT / "pipelines/ddo/params.yaml").read_text())  # the DDO settings the seeds-ddo-* stages read
    ddo["train"]["epochs"] = TINY["train"]["epochs"]
    (repo / "pipelines/ddo").mkdir()
    (repo / "pipelines/ddo/params.yaml").write_text(yaml.safe_dump(ddo, sort_keys=False))
    log = _run([str(BIN / "dvc"), "repro"], paper_dir)
    shipped = yaml.safe_load((paper_dir / "params.yaml").read_text())["paper"]
    runs = [f"dpo/beta{b}" for b in shipped["dpo_betas"]] + [f"unlearning/lam{lam}" for lam in shipped["unlearning_lambdas"]] \
        + ["cca_cfg", "lambda", "dropout/eval_mode", "dropout/matched"] + [f"fixed/lam{lam}" for lam in shipped["fixed_lambdas"]]
    for run in runs:
        assert (repo / "data/paper" / run / "train/policy.pt").is_file(), run
    assert "Running stage 'dropout-reflogp'" in log and "Running stage 'paper'" in log
    assert not any(f"Running stage '{stage}'" in log for stage in ("tokenize", "reflogp", "train", "eval"))
    report = repo / "data/paper/report"
    checks = json.loads((report / "checks.json").read_text())
    assert set(checks["dropout"]) >= {"D_nats_mean", "eval_mode", "matched"} and checks["dropout"]["D_nats_mean"] > 0
    assert set(checks["table3_best"]) == {"dpo", "unlearning"}
    assert set(checks["lambda_fid_over_fixed"]) <= {f"{lam:g}" for lam in shipped["lambdas"]}
    for name in ("table3.md", "table3_grid.md", "table5.md", "dropout.md", "fid_is.png", "logps_pos.png", "results.md"):
        assert (report / name).is_file(), name
    seeds = json.loads((repo / "data/paper/seeds/report/summary.json").read_text())
    assert set(seeds["best"]) == {"CCA", "DDO round 1", "DDO round 2"} and seeds["seeds"] == shipped["seeds"]


@pytest.mark.slow
def test_lambda_experiment_reuses_reference_cache(repo: Path):
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    cache_before = (repo / "data/reflogp/ref_logp.parquet").stat().st_mtime_ns
    log = _run([str(BIN / "dvc"), "exp", "run", "-S", "train.lambda=3"], repo)
    for stage in ("prepare", "pretrain-vq", "tokenize", "pretrain-ar", "reflogp"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'eval'" in log
    assert (repo / "data/reflogp/ref_logp.parquet").stat().st_mtime_ns == cache_before
