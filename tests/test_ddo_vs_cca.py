"""DDO vs CCA over fine-tuning seeds (stages/ddo_vs_cca.py) from a synthetic set of runs laid out as
pipelines/paper's seeds-* stages write them; every aggregated number is worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.report import over_seeds
from stages import ddo_vs_cca
from stages.paper import PaperConfig
from stages.report import SweepConfig


def _eval(folder: Path, methods: dict[str, tuple[float, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"seeds": [0], "methods": {
        name: {"fid": fid, "fid_std": 0.5, "is": is_, "class_accuracy": 0.9} for name, (fid, is_) in methods.items()}}))


def _run(folder: Path, fid: float, is_: float, seconds: float, steps: int, ratios: tuple[float, float]) -> None:
    """One seed's run: train/metrics.json (steps, seconds, the last step) and eval/metrics.json (one method)."""
    (folder / "train").mkdir(parents=True)
    (folder / "train/metrics.json").write_text(json.dumps({"steps": steps, "seconds": seconds, "params": {},
                                                          "final": {"rewards/pos": ratios[0], "rewards/neg": ratios[1]}}))
    _eval(folder / "eval", {"cca": (fid, is_)})


def test_over_seeds_is_the_mean_and_range_of_each_number():
    # fid: (4 + 5 + 9) / 3 = 6; is: (1 + 2 + 6) / 3 = 3; fid_std (a run's own, over sampling seeds) dropped; "n" is
    # missing from one run: dropped
    summary = over_seeds([{"fid": 4.0, "fid_std": 1.0, "is": 1, "n": 3}, {"fid": 5.0, "fid_std": 1.0, "is": 2},
                          {"fid": 9.0, "fid_std": 1.0, "is": 6, "n": 3}])
    assert summary == {"fid": 6.0, "fid_min": 4.0, "fid_max": 9.0, "is": 3.0, "is_min": 1.0, "is_max": 6.0}
    with pytest.raises(ValueError, match="no runs"):
        over_seeds([])


def test_each_method_at_its_best_grid_point_by_mean_fid(tmp_path: Path):
    data = tmp_path / "data"
    _eval(data / "eval", {"base": (12.0, 6.0), "cfg_1": (5.5, 7.8)})
    _eval(data / "sweep/cfg/s0.5", {"cfg_0.5": (4.5, 7.0)})  # the best CFG: the sweep's s=0.5
    _eval(data / "sweep/cfg/s1.0", {"cfg_1": (5.5, 7.8)})
    sweep = SweepConfig(lambdas=[], cfg_scales=[0.5, 1.0])
    paper = PaperConfig(seeds=[0, 1, 2], seeds_cca_lambdas=[10, 30], ddo_alphas=[1, 4], ddo_betas=[0.5],
                        ddo_round2_alphas=[4], ddo_round2_betas=[0.5])
    seeds = data / "paper/seeds"
    # CCA lambda 10: FID 5, 6, 7 -> mean 6; lambda 30: 4, 5.5, 7.5 -> mean 17/3 = 5.667, the best, though its worst
    # seed is worse than lambda 10's; train seconds 100, 110, 120 -> 110 [100, 120]
    for lam, fids in ((10, (5.0, 6.0, 7.0)), (30, (4.0, 5.5, 7.5))):
        for seed, fid in enumerate(fids):
            _run(seeds / f"cca/lam{lam}/seed{seed}", fid, 8.0 + seed, 100.0 + 10 * seed, 607, (1.0, -8.0))
    # DDO round 1: alpha 1: 10, 11, 12 -> 11; alpha 4: 8, 9, 13 -> 10, the best; its last-step fake ratio
    # -2, -3, -4 -> -3 [-4, -2]; round 2 (alpha 4 only): 9, 9, 9 -> 9
    for alpha, fids in ((1, (10.0, 11.0, 12.0)), (4, (8.0, 9.0, 13.0))):
        for seed, fid in enumerate(fids):
            _run(seeds / f"ddo/round1/a{alpha}-b0.5/seed{seed}", fid, 6.0, 8.0, 23, (0.5, -2.0 - seed))
    for seed in range(3):
        _run(seeds / f"ddo/round2/a4-b0.5/seed{seed}", 9.0, 6.5, 9.0, 23, (0.4, -1.0))

    text = ddo_vs_cca.run(data / "eval", data / "sweep", seeds, data / "paper/seeds/report", sweep, paper)
    out = data / "paper/seeds/report"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] == {"CCA": "CCA λ=30", "DDO round 1": "DDO round 1 α=4 β=0.5", "DDO round 2": "DDO round 2 α=4 β=0.5"}
    assert summary["best_cfg"] == {"point": "CFG s=0.5", "fid": 4.5} and summary["base_fid"] == 12.0
    assert summary["points"]["CCA λ=10"]["metrics"]["fid"] == pytest.approx(6.0)
    assert summary["points"]["CCA λ=30"]["cost"] == pytest.approx({"steps": 607, "steps_min": 607, "steps_max": 607,
                                                                   "seconds": 110.0, "seconds_min": 100.0, "seconds_max": 120.0})
    best = (out / "best.md").read_text()
    assert "| base (no guidance), the main run | 12.000 ± 0.500 |" in best
    assert "| CFG s=0.5 (best CFG), the main run | 4.500 ± 0.500 |" in best
    assert "| CCA λ=30 (best of its grid) | 5.667 [4.000, 7.500] | 9.000 [8.000, 10.000] |" in best
    assert "| DDO round 1 α=4 β=0.5 (best of its grid) | 10.000 [8.000, 13.000] |" in best
    assert "CCA λ=10" not in best and "α=1" not in best
    grid = (out / "grid.md").read_text()
    assert "| DDO round 1 α=4 β=0.5 | 0.500 [0.500, 0.500] | -3.000 [-4.000, -2.000] | 10.000 [8.000, 13.000] |" in grid
    assert "| CCA λ=10 | 1.000 [1.000, 1.000] | -8.000 [-8.000, -8.000] | 6.000 [5.000, 7.000] |" in grid
    cost = (out / "cost.md").read_text()
    assert "| CCA λ=30 | 607 | 110.0 [100.0, 120.0] |" in cost and "| DDO round 2 α=4 β=0.5 | 23 | 9.0 [9.0, 9.0] |" in cost
    assert text.startswith(best)


def test_a_missing_seed_run_is_named(tmp_path: Path):
    paper = PaperConfig(seeds=[0, 1], seeds_cca_lambdas=[10])
    _run(tmp_path / "cca/lam10/seed0", 5.0, 8.0, 100.0, 607, (1.0, -8.0))
    with pytest.raises(FileNotFoundError, match="seed1"):
        ddo_vs_cca.seed_point("CCA", "CCA λ=10", tmp_path / "cca/lam10", paper.seeds)
