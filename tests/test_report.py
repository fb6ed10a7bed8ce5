"""The report stage on a small fixture of metric files, and the sweep's expansion into DVC stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import report

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _metrics(fid: float, is_: float) -> dict:
    return {"fid": fid, "fid_std": 0.1, "is": is_, "is_std": 0.01, "precision": 0.5, "precision_std": 0.0,
            "recall": 0.9, "recall_std": 0.0, "class_accuracy": 0.8, "class_accuracy_std": 0.0, "images_per_s": 1000.0}


def _eval_dir(path: Path, methods: dict[str, dict]) -> None:
    (path / "samples").mkdir(parents=True)
    labels = np.repeat(np.arange(3), 4)
    for name in methods:
        images = np.random.default_rng(len(name)).integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
        np.savez(path / "samples" / f"{name}_seed0.npz", arr_0=images, arr_1=labels)
    (path / "metrics.json").write_text(json.dumps({"methods": methods, "seeds": [0], "checks": {}}))


def _train_dir(path: Path, lam: float, beta: float, lambda_key: str = "lambda") -> None:
    """lambda_key "lam": a summary.json written before train spelled its params as params.yaml does."""
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"params": {lambda_key: lam, "beta": beta}}))
    rows = ["step,loss,rewards/pos,rewards/neg"] + [f"{s},{1 / (s + 1)},{0.1 * s},{-s}" for s in range(5)]
    (path / "log.csv").write_text("\n".join(rows) + "\n")


def test_report_draws_figures_and_tabulates_every_point(tmp_path: Path):
    _eval_dir(tmp_path / "eval", {"base": _metrics(12.0, 6.0), "cfg_1": _metrics(6.0, 7.7), "cca": _metrics(4.5, 7.9)})
    _train_dir(tmp_path / "train", 10, 0.5)
    for s, fid in ((0.5, 7.0), (1.0, 6.1), (3.0, 9.0)):
        _eval_dir(tmp_path / f"sweep/cfg/s{s}", {f"cfg_{s:g}": _metrics(fid, 7 + s)})
    for lam, fid in ((1, 8.0), (30, 5.0)):
        _eval_dir(tmp_path / f"sweep/cca/lam{lam}-beta0.5/eval", {"cca": _metrics(fid, 7 + lam / 100)})
        _train_dir(tmp_path / f"sweep/cca/lam{lam}-beta0.5/train", lam, 0.5, "lam" if lam == 30 else "lambda")

    _eval_dir(tmp_path / "sweep/cca/lam5-beta0.5/eval", {"cca": _metrics(99.0, 1.0)})  # stale: not in params
    _train_dir(tmp_path / "sweep/cca/lam5-beta0.5/train", 5, 0.5)
    sweep = report.SweepConfig(lambdas=[1, 30], betas=[0.5], cfg_scales=[0.5, 1.0, 3.0])
    text = report.run(tmp_path / "eval", tmp_path / "train", tmp_path / "sweep", tmp_path / "report", sweep)
    with pytest.raises(FileNotFoundError, match="lam300-beta0.5"):
        report.run(tmp_path / "eval", tmp_path / "train", tmp_path / "sweep", tmp_path / "r2", report.SweepConfig(lambdas=[1, 300], betas=[0.5], cfg_scales=[0.5, 1.0, 3.0]))

    for name in ("fid_is.png", "training_curves.png", "comparison.png"):
        with Image.open(tmp_path / "report" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| point")]
    labels = [r.split("|")[1].strip() for r in rows]
    # cfg s=1 appears in the main eval and in the sweep: kept once; sorted base, CFG by s, CCA by lambda
    assert labels == ["base (no guidance)", "CFG s=0.5", "CFG s=1", "CFG s=3", "CCA λ=1 β=0.5", "CCA λ=10 β=0.5", "CCA λ=30 β=0.5"]
    assert rows[0].split("|")[2].strip() == "12.000 ± 0.100"
    # main CCA (4.5) against base (12.0) and the best CFG (6.0, from the main eval's s=1)
    assert "FID / base FID: 0.375" in text and "best CFG FID (CFG s=1): 0.750" in text
    assert (tmp_path / "report/results.md").read_text() == text


def test_sweep_expands_into_named_stages(tmp_path: Path):
    """`dvc stage list` on the real dvc.yaml with a 2 x 2 sweep and two CFG scales."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"] = {"lambdas": [3, 30], "betas": [0.5, 1.0], "cfg_scales": [0.5, 2.0]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    expected = {f"sweep-{kind}@{lam}-{beta}" for kind in ("train", "eval") for lam in (3, 30) for beta in (0.5, 1.0)}
    expected |= {"sweep-cfg@0.5", "sweep-cfg@2.0", "report"}
    assert expected <= set(out)
    assert len([s for s in out if s.startswith("sweep-")]) == 10
    # stages 1-2 depend on no sweep.* parameter and no train.* one a sweep sets: a sweep never recomputes them;
    # reflogp tracks train.epochs alone (reflogp.visits: epochs, a draw per epoch)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not [p for p in stages["tokenize"].get("params", []) if str(p).startswith(("train", "sweep"))]
    assert [p for p in stages["reflogp"].get("params", []) if str(p).startswith(("train", "sweep"))] == ["train.epochs"]


def test_sweep_train_depends_on_every_train_setting_that_changes_the_policy():
    """dvc.yaml's sweep-train stage lists its train.* params by hand (the matrix sets lambda and beta): every
    other key of TrainConfig must be there, except those that cannot change the trained weights beyond float
    rounding (named here, with why), so that editing a setting reruns the sweep as it reruns `train`."""
    import dataclasses

    from pipeline.config import key_of
    from stages.train import TrainConfig

    not_numbers = {
        "save_every": "how often intermediate checkpoints are written",
        "num_workers": "how many processes read the token store (same batches)",
        "strategy": "DDP or FSDP: the same one-process gradient (tests/test_fsdp.py, within 1e-5)",
        "activation_checkpointing": "recomputes activations, same gradients (tests/test_fsdp.py)",
        "step0_rows": "rows the step-0 check reads before training (tests/test_integrity.py: same weights)",
        "tensorboard": "a copy of the live metrics for TensorBoard (pipeline/live.py)",
        "wandb": "a copy of the live metrics for W&B (pipeline/live.py)",
    }
    listed = {p.split(".", 1)[1] for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["sweep-train"]["params"]}
    every = {key_of(f) for f in dataclasses.fields(TrainConfig)}
    assert listed == every - {"lambda", "beta"} - set(not_numbers), (every - listed, listed - every)


def test_eval_grid_at_imagenet_scale_is_bounded(tmp_path: Path):
    """1000 classes x 4 samples of 256 px: 16 evenly spaced classes, tiles not upscaled (it was a 12.6 GB canvas).
    The 4000 images are one image broadcast (no memory), so only the grid itself is allocated."""
    from pipeline.evaluation import save_grid
    from pipeline.report import grid_classes, grid_shape, tile_scale

    labels = np.arange(1000).repeat(4)
    classes = grid_classes(labels)
    assert len(classes) == 16 and classes[0] == 0 and classes[-1] == 999
    assert tile_scale(256) == 1 and tile_scale(16) == 4  # the digits' 16 px tiles are upscaled as before
    height, width, _ = grid_shape(len(classes), 4, 256, 256, tile_scale(256), gap=2)
    assert height * width * 3 < 20e6
    images = np.broadcast_to(np.full((256, 256, 3), 7, np.uint8), (4000, 256, 256, 3))
    save_grid(tmp_path / "grid.png", images, labels, per_class=4)
    assert Image.open(tmp_path / "grid.png").size == (width, height)


def test_comparison_grid_shows_a_bounded_number_of_classes(tmp_path: Path):
    from pipeline.report import comparison_grid

    labels = np.arange(200).repeat(2)
    images = np.broadcast_to(np.zeros((8, 8, 3), np.uint8), (400, 8, 8, 3))
    comparison_grid([("base", images, labels), ("cca", images, labels)], tmp_path / "comparison.png", per_class=2)
    assert Image.open(tmp_path / "comparison.png").size[1] < 1500  # 16 rows (200 would be ~10,700 px tall)
