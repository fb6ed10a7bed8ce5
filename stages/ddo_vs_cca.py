"""Stage `ddo-vs-cca`: DDO against CCA over fine-tuning seeds on the embedded default (issue 32), from the runs of
pipelines/paper's `seeds-*` stages.

    cca-pipe ddo-vs-cca --paper-params pipelines/paper/params.yaml --seeds-dir data/paper/seeds --out data/paper/seeds/report

Every setting (CCA at a lambda; DDO's round r at an (alpha, beta)) was trained once per `paper.seeds` and
evaluated without guidance; its row gives each metric's mean over the seeds and their range [min, max]. Writes
- best.md: the main pipeline's base model and best CFG scale (one run each: mean ± std over eval's sampling
  seeds), then CCA and DDO's every round at their best grid point by mean FID;
- grid.md: every grid point, with the last training step's mean log-ratios (real rows; CCA's mismatched
  negatives, DDO's fakes);
- cost.md: per method and round, the train steps and the train stage's recorded seconds;
- results.md (the three) and summary.json (the best points and every point's numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.formats import TRAIN_METRICS, train_run_file
from pipeline.outputs import StageDir, write_json, write_text
from pipeline.report import over_seeds, results_table

from .paper import PaperConfig, only_method
from .report import SweepConfig, collect, read_results

log = logging.getLogger(__name__)

# the last training step's mean log-ratios, beside the scores in grid.md
RATIO_HEADS = {"ratio_real": "last-step ratio real", "ratio_negative": "last-step ratio neg./fake"}


@dataclass
class SeedPoint:
    """One grid point of one method, trained once per seed: `metrics` (eval's, over_seeds) and `cost` (train's
    steps and seconds, over_seeds)."""

    method: str  # "CCA" | "DDO round <r>"
    label: str
    metrics: dict[str, float]
    cost: dict[str, float]
    seeds: list[int]


def _run_numbers(run: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(scores with the last step's log-ratios, cost) of one seed's run folder (`train/` and `eval/`)."""
    trained = read_results(train_run_file(run / "train", TRAIN_METRICS), ("steps", "seconds", "final"))
    last = trained["final"]
    scores = {**only_method(run / "eval"), "ratio_real": last["rewards/pos"], "ratio_negative": last["rewards/neg"]}
    return scores, {"steps": trained["steps"], "seconds": trained["seconds"]}


def seed_point(method: str, label: str, folder: Path, seeds: list[int]) -> SeedPoint:
    """The point whose runs are `<folder>/seed<s>` for each of `seeds`."""
    numbers = [_run_numbers(folder / f"seed{s}") for s in seeds]
    return SeedPoint(method, label, over_seeds([n[0] for n in numbers]), over_seeds([n[1] for n in numbers]), list(seeds))


def grid_points(seeds_dir: Path, paper: PaperConfig) -> list[SeedPoint]:
    """Every point pipelines/paper's seeds-* stages trained and evaluated, in the folders they write."""
    points = [seed_point("CCA", f"CCA λ={lam:g}", seeds_dir / "cca" / f"lam{lam}", paper.seeds) for lam in paper.seeds_cca_lambdas]
    for r, alphas, betas in ((1, paper.ddo_alphas, paper.ddo_betas), (2, paper.ddo_round2_alphas, paper.ddo_round2_betas)):
        points += [seed_point(f"DDO round {r}", f"DDO round {r} α={a:g} β={b:g}", seeds_dir / "ddo" / f"round{r}" / f"a{a}-b{b}",
                              paper.seeds) for a in alphas for b in betas]
    return points


def best_points(points: list[SeedPoint]) -> list[SeedPoint]:
    """Each method's point of lowest mean FID over the seeds, in the order the methods first appear."""
    methods = list(dict.fromkeys(p.method for p in points))
    return [min((p for p in points if p.method == m), key=lambda p: p.metrics["fid"]) for m in methods]


def cost_table(points: list[SeedPoint]) -> str:
    heads = "| point | train steps | train s, mean [min, max] |\n|---|---|---|\n"
    return heads + "\n".join(f"| {p.label} | {p.cost['steps']:.0f} | {p.cost['seconds']:.1f} [{p.cost['seconds_min']:.1f}, "
                             f"{p.cost['seconds_max']:.1f}] |" for p in points) + "\n"


def run(eval_dir: Path, sweep_dir: Path, seeds_dir: Path, out: Path, sweep: SweepConfig, paper: PaperConfig) -> str:
    """`eval_dir`, `sweep_dir`: the main pipeline's eval and sweep (its base and CFG points); `seeds_dir`: where
    pipelines/paper's seeds-* stages write. `out` must be absent, empty or a report of ours."""
    main = collect(eval_dir, None, sweep_dir, sweep)
    base = next(p for p in main if p.kind == "base")
    best_cfg = min((p for p in main if p.kind == "cfg"), key=lambda p: p.metrics["fid"])
    points = grid_points(seeds_dir, paper)
    best = best_points(points)
    spread = f"mean [min, max] over fine-tuning seeds {', '.join(map(str, paper.seeds))}"
    text_best = results_table([(f"{base.label}, the main run", base.metrics), (f"{best_cfg.label} (best CFG), the main run", best_cfg.metrics)]
                              + [(f"{p.label} (best of its grid)", p.metrics) for p in best],
                              first=f"guidance-free unless CFG; {spread}")
    text_grid = results_table([(p.label, p.metrics) for p in points], first=f"every grid point; {spread}", extra=RATIO_HEADS)
    text_cost = cost_table(best)
    summary = {"seeds": paper.seeds, "best": {p.method: p.label for p in best},
               "base_fid": base.metrics["fid"], "best_cfg": {"point": best_cfg.label, "fid": best_cfg.metrics["fid"]},
               "points": {p.label: {"metrics": p.metrics, "cost": p.cost} for p in points}}
    text = text_best + "\n" + text_grid + "\n" + text_cost
    with StageDir(out, "ddo-vs-cca") as claim:
        folder = claim.open_partial()
        write_text(folder / "best.md", text_best)
        write_text(folder / "grid.md", text_grid)
        write_text(folder / "cost.md", text_cost)
        write_text(folder / "results.md", text)
        write_json(folder / "summary.json", summary)
        claim.commit()
    log.info("DDO vs CCA over seeds -> %s: best %s", out, json.dumps(summary["best"]))
    return text
