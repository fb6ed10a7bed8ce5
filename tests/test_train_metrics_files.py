"""A train folder's files are metrics.jsonl / metrics.csv (per step) and metrics.json (the run's end): DVC's
`metrics:` convention, as eval's metrics.json. Runs written before, as log.jsonl / log.csv / summary.json,
are still read by the report and the paper's tables (pipeline/formats.py train_run_file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.formats import TRAIN_METRICS, TRAIN_STEP_CSV, train_run_file
from pipeline.report import read_log
from stages import paper, report
from stages.info import describe

NEW = {"end": "metrics.json", "steps": "metrics.csv"}
OLD = {"end": "summary.json", "steps": "log.csv"}  # the names before 2026-12-07


def _train_folder(folder: Path, names: dict, lam: float, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / names["end"]).write_text(json.dumps({"steps": len(losses), "params": {"loss": "cca", "lambda": lam, "beta": 0.5}}))
    rows = ["step,loss,rewards/pos,rewards/neg,logps/pos"] + [f"{i},{v},0.0,0.0,-50.0" for i, v in enumerate(losses)]
    (folder / names["steps"]).write_text("\n".join(rows) + "\n")


def _eval_folder(folder: Path, methods: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"seeds": [0], "methods": {
        name: {"fid": fid, "is": 7.0, "class_accuracy": 0.8} for name, fid in methods.items()}}))


def test_the_names_are_dvcs_metrics_names():
    assert (TRAIN_METRICS, TRAIN_STEP_CSV) == ("metrics.json", "metrics.csv")


@pytest.mark.parametrize("name, old", [("metrics.json", "summary.json"), ("metrics.jsonl", "log.jsonl"), ("metrics.csv", "log.csv")])
def test_a_run_folder_file_is_the_current_name_unless_only_the_old_one_exists(tmp_path: Path, name: str, old: str):
    assert train_run_file(tmp_path, name) == tmp_path / name  # neither: the current name, for the error to say
    (tmp_path / old).write_text("old")
    assert train_run_file(tmp_path, name) == tmp_path / old
    (tmp_path / name).write_text("new")
    assert train_run_file(tmp_path, name) == tmp_path / name


def test_report_reads_train_folders_of_either_naming(tmp_path: Path):
    """The main run written now (lambda 10), a sweep point written before the rename (lambda 1) and one after
    (lambda 30): each CCA point has its lambda from its end-of-run file and its own step log."""
    _eval_folder(tmp_path / "eval", {"base": 12.0, "cca": 5.0})
    _train_folder(tmp_path / "train", NEW, 10.0, [0.9, 0.7])
    for lam, names, losses in ((1, OLD, [0.8, 0.6, 0.5]), (30, NEW, [0.95, 0.4])):
        _eval_folder(tmp_path / f"sweep/cca/lam{lam}-beta0.5/eval", {"cca": 6.0 + lam / 100})
        _train_folder(tmp_path / f"sweep/cca/lam{lam}-beta0.5/train", names, float(lam), losses)
    sweep = report.SweepConfig(lambdas=[1, 30], betas=[0.5], cfg_scales=[])
    cca = {p.lam: p for p in report.collect(tmp_path / "eval", tmp_path / "train", tmp_path / "sweep", sweep) if p.kind == "cca"}
    assert sorted(cca) == [1.0, 10.0, 30.0]
    assert {lam: p.train_log.name for lam, p in cca.items()} == {1.0: "log.csv", 10.0: "metrics.csv", 30.0: "metrics.csv"}
    assert read_log(cca[1.0].train_log)["loss"].tolist() == [0.8, 0.6, 0.5]
    assert read_log(cca[30.0].train_log)["loss"].tolist() == [0.95, 0.4]


def test_paper_reads_baseline_runs_of_either_naming(tmp_path: Path):
    """pipelines/paper's DPO point written now and Unlearning's written before the rename: each grid point's
    step log is its own folder's, under the name it was written with."""
    cfg = paper.PaperConfig(dpo_betas=[2.5], unlearning_lambdas=[0.1])
    _train_folder(tmp_path / "dpo/beta2.5/train", NEW, 10.0, [0.7, 0.9])
    _eval_folder(tmp_path / "dpo/beta2.5/eval", {"cca": 9.0})
    _train_folder(tmp_path / "unlearning/lam0.1/train", OLD, 0.1, [0.6, 0.2])
    _eval_folder(tmp_path / "unlearning/lam0.1/eval", {"cca": 11.0})
    grid = {p.kind: p for p in paper.baseline_grid(tmp_path, cfg)}
    assert grid["dpo"].train_log == tmp_path / "dpo/beta2.5/train/metrics.csv"
    assert grid["unlearning"].train_log == tmp_path / "unlearning/lam0.1/train/log.csv"
    assert read_log(grid["unlearning"].train_log)["loss"].tolist() == [0.6, 0.2]


@pytest.mark.parametrize("names", [NEW, OLD], ids=["metrics", "before the rename"])
def test_info_describes_a_train_folder_of_either_naming(tmp_path: Path, names: dict):
    """`cca-pipe info data/train`: steps, time, memory, the last step and the settings, from the end-of-run file
    under either name; the step log named as the run wrote it."""
    (tmp_path / names["end"]).write_text(json.dumps({
        "steps": 607, "seconds": 95.31, "peak_rss_mb": 920.4, "params": {"loss": "cca", "lambda": 10.0, "beta": 0.5, "lr": 1e-4},
        "final": {"step": 606, "loss": 0.30121, "rewards/pos": 1.5, "rewards/neg": -3.25, "rewards/accuracy": 0.96}}))
    (tmp_path / names["steps"]).write_text("step,loss\n0,0.9\n")
    assert describe(tmp_path).splitlines() == [
        f"train output {tmp_path}",
        "  steps              607 in 95.3 s, peak RSS 920 MB",
        "  final step         loss 0.3012, rewards/pos 1.5, rewards/neg -3.25, rewards/accuracy 0.96",
        "  settings           loss cca, lambda 10.0, beta 0.5, lr 0.0001",
        f"  run record         {names['end']}, step log {names['steps']}"]


def test_info_refuses_a_folder_whose_metrics_json_is_no_runs(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(json.dumps({"fid": 3.0}))
    with pytest.raises(ValueError, match="eval output folder or train output folder"):
        describe(tmp_path)
