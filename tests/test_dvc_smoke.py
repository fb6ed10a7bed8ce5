"""End to end: `dvc repro` of the real dvc.yaml at tiny scale in a temporary git repo (built once per session:
tests/tiny_pipeline.py), then pipelines/paper as shipped on its outputs (`make paper`). The lambda experiment on
the same pipeline is tests/test_lambda_experiment.py (a copy of its own, so the other worker runs it meanwhile)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import BIN, ROOT, TINY, _run, copy_of, tiny_repo  # noqa: F401 (`from test_dvc_smoke import` them still works)


@pytest.fixture(scope="module")
def repo(tiny_pipeline: Path, tmp_path_factory) -> Path:
    """This module's copy of the session's tiny pipeline (tests/tiny_pipeline.py: the root dvc.yaml at TINY
    settings, `dvc repro` done; its repro.log holds every stage's log)."""
    return copy_of(tiny_pipeline, tmp_path_factory.mktemp("smoke") / "repo")


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
    way `make paper` runs it; every table of the report is written and each training stage ran. Every list of its
    `paper` section (the grids a foreach or matrix expands) is cut to its first point, and Table 5's policy trains
    1.2 epochs instead of 9: every stage still expands and runs (a grid's wiring is the same at any length; the
    policy's cache still holds 2 visits, its second read), where as shipped 16 trainings and ~25 evaluations took
    541 s, over half of the suite's budget, and the 9 epochs alone 405 of the tiny pipeline's training steps."""
    shutil.copytree(ROOT / "pipelines/paper", repo / "pipelines/paper", ignore=shutil.ignore_patterns("dvc.lock"))
    paper_dir = repo / "pipelines/paper"
    params = yaml.safe_load((paper_dir / "params.yaml").read_text(encoding="utf-8"))
    grids = [key for key, value in params["paper"].items() if isinstance(value, list)]
    assert {"dpo_betas", "unlearning_lambdas", "lambdas", "fixed_lambdas", "seeds", "seeds_cca_lambdas", "ddo_alphas",
            "ddo_round2_alphas"} <= set(grids), grids
    for key in grids:
        params["paper"][key] = params["paper"][key][:1]
    assert params["paper"]["lambda_epochs"] > 1.2
    params["paper"]["lambda_epochs"] = 1.2
    (paper_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
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
