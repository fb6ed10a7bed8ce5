"""Stage `report`: every evaluated point of the pipeline and its sweep, as figures and one table.

    cca-pipe report --eval data/eval --train data/train --sweep data/sweep --out data/report

Reads data/eval/metrics.json (base, CFG, main CCA policy), data/sweep/cfg/*/metrics.json (CFG points) and
data/sweep/cca/*/{eval/metrics.json,train/metrics.json,train/metrics.csv} (CCA points), and writes
fid_is.png (paper Fig. 4), training_curves.png (Fig. 10), comparison.png (Fig. 3: base | CCA | CFG, same
classes and seed) and results.md (all points: FID, IS, precision, recall, class accuracy, images/s).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check_ranges, setting
from pipeline.formats import TRAIN_METRICS, TRAIN_STEP_CSV, FormatError, read_sample_batch, train_run_file
from pipeline.outputs import StageDir, write_text
from pipeline.report import Point, comparison_grid, markdown_table, plot_fid_is, plot_training_curves

log = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """params.yaml's `sweep` section: the points dvc.yaml's matrix stages train and evaluate, which `report`
    collects. Numbers keep the type they are written with (int or float), because DVC names each expanded
    stage's folder with the value as written (`lam1-beta0.5`, `s1.0`)."""

    lambdas: list[int | float] = setting(default_factory=list, unique=True, ge=0.0)  # with train.lambda: the CCA curve
    betas: list[int | float] = setting(default_factory=lambda: [0.5], nonempty=True, unique=True, gt=0.0)
    cfg_scales: list[int | float] = setting(default_factory=lambda: [0.25, 0.5, 1.0, 1.5], unique=True, gt=0.0)

    def __post_init__(self) -> None:
        check_ranges(self, "sweep")


def read_results(path: Path, needs: tuple[str, ...] = ()) -> dict:
    """A JSON object another stage wrote (eval's or train's metrics.json) holding the keys `needs`, or one error
    naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `dvc repro` (or the stage that writes it) first") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} cannot be read as JSON ({e}): it is damaged; rerun the stage that wrote it "
                          "(e.g. `dvc repro -f` of it) or restore the file") from None
    missing = [k for k in needs if not isinstance(data, dict) or k not in data]
    if missing:
        raise FormatError(f"{path} is not a results file of cca-pipe (no {missing}): rerun the stage that wrote it")
    return data


def _points_from_eval(eval_dir: Path, train_dir: Path | None) -> list[Point]:
    metrics = read_results(eval_dir / "metrics.json", ("methods", "seeds"))
    points = []
    for name, m in metrics["methods"].items():
        extra = {"samples": eval_dir / "samples" / f"{name}_seed{metrics['seeds'][0]}.npz"}
        if name == "base":
            points.append(Point("base", m, extra=extra))
        elif name.startswith("cfg_"):
            points.append(Point("cfg", m, cfg_scale=float(name[4:]), extra=extra))
        elif name == "cca" and train_dir is not None and train_run_file(train_dir, TRAIN_METRICS).is_file():
            params = trained_settings(train_dir)
            points.append(Point("cca", m, lam=params["lambda"], beta=params["beta"], train_log=train_run_file(train_dir, TRAIN_STEP_CSV), extra=extra))
    return points


def trained_settings(train_dir: Path) -> dict:
    """The train settings a train folder's metrics.json records, keyed as in params.yaml (`lambda`); a summary
    written before it spelled them so has `lam`, read the same."""
    params = read_results(train_run_file(train_dir, TRAIN_METRICS), ("params",))["params"]
    if "lam" in params and "lambda" not in params:
        params = {("lambda" if k == "lam" else k): v for k, v in params.items()}
    return params


def sweep_dirs(sweep_dir: Path, sweep: SweepConfig | None) -> tuple[list[Path], list[Path]]:
    """The CFG and CCA point folders: those of the `sweep` params when given (stale folders of points no
    longer in params.yaml are ignored, a missing one is an error), else every folder present."""
    if sweep is None:
        return sorted((sweep_dir / "cfg").glob("*/")), sorted((sweep_dir / "cca").glob("*/"))
    cfg_dirs = [sweep_dir / "cfg" / f"s{s}" for s in sweep.cfg_scales]
    cca_dirs = [sweep_dir / "cca" / f"lam{lam}-beta{beta}" for lam in sweep.lambdas for beta in sweep.betas]
    missing = [d for d in cfg_dirs if not (d / "metrics.json").is_file()] + \
        [d for d in cca_dirs if not (d / "eval/metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"sweep points in params.yaml have no results yet: {[str(d) for d in missing]}; run `dvc repro`")
    return cfg_dirs, cca_dirs


def collect(eval_dir: Path, train_dir: Path | None, sweep_dir: Path | None, sweep: SweepConfig | None = None) -> list[Point]:
    """All points; a setting evaluated twice (main run and sweep) is kept once, main run first."""
    points = _points_from_eval(eval_dir, train_dir)
    if sweep_dir is not None and sweep_dir.is_dir():
        cfg_dirs, cca_dirs = sweep_dirs(sweep_dir, sweep)
        for cfg_dir in cfg_dirs:
            if (cfg_dir / "metrics.json").is_file():
                points += [p for p in _points_from_eval(cfg_dir, None) if p.kind == "cfg"]
        for point_dir in cca_dirs:
            if (point_dir / "eval/metrics.json").is_file():
                points += [p for p in _points_from_eval(point_dir / "eval", point_dir / "train") if p.kind == "cca"]
    unique: dict[tuple, Point] = {}
    for p in points:
        unique.setdefault((p.kind, p.cfg_scale, p.lam, p.beta), p)
    order = {"base": 0, "cfg": 1, "cca": 2}
    return sorted(unique.values(), key=lambda p: (order[p.kind], p.cfg_scale or 0, p.beta or 0, p.lam or 0))


def run(eval_dir: Path, train_dir: Path | None, sweep_dir: Path | None, out: Path, sweep: SweepConfig | None = None) -> str:
    """`out` must be absent, empty or a report directory of ours; built beside it and moved in at the end."""
    points = collect(eval_dir, train_dir, sweep_dir, sweep)  # before the output is claimed: a damaged input changes nothing
    with StageDir(out, "report") as claim:
        text = _report(points, train_dir, claim.open_partial())
        claim.commit()
    log.info("report -> %s", out)
    return text


def _report(points: list[Point], train_dir: Path | None, out: Path) -> str:
    plot_fid_is(points, out / "fid_is.png")
    plot_training_curves(points, out / "training_curves.png")
    base = next(p for p in points if p.kind == "base")
    cfg_points = [p for p in points if p.kind == "cfg"]
    cca_points = [p for p in points if p.kind == "cca"]
    best_cfg = min(cfg_points, key=lambda p: p.metrics["fid"]) if cfg_points else None
    main_cca = next((p for p in cca_points if p.train_log and p.train_log.parent == train_dir), cca_points[0] if cca_points else None)
    panels = [("base, no guidance", base)] + ([(f"CCA, no guidance (λ={main_cca.lam:g})", main_cca)] if main_cca else []) \
        + ([(f"base + CFG (s={best_cfg.cfg_scale:g}, best FID)", best_cfg)] if best_cfg else [])
    arrays = []
    for title, p in panels:  # in sampling order: each panel shows the first samples of each class, as eval's grids
        arrays.append((title, *read_sample_batch(p.extra["samples"], labels=True, sample_order=True)))
    comparison_grid(arrays, out / "comparison.png")
    text = "All evaluated points (mean ± std over sampling seeds).\n\n" + markdown_table(points)
    if main_cca is not None:
        text += f"\nCCA ({main_cca.label}) FID / base FID: {main_cca.metrics['fid'] / base.metrics['fid']:.3f}"
        if best_cfg is not None:
            text += f"; / best CFG FID ({best_cfg.label}): {main_cca.metrics['fid'] / best_cfg.metrics['fid']:.3f}"
        text += "\n"
    write_text(out / "results.md", text)
    log.info("report of %d points", len(points))
    return text


DEMO_RUNS = Path("docs/demo_runs.csv")  # the recorded runs of the embedded default (docs/paper.md, "What make demo prints")


def headline_points(points: list[Point], eval_dir: Path, train_dir: Path | None) -> tuple[Point, list[Point], Point]:
    """The headline's points: the base model, every CFG point, and the main run's CCA policy (the one trained in
    `train_dir`); a missing one is one error naming what to evaluate."""
    cfg = [p for p in points if p.kind == "cfg"]
    cca = [p for p in points if p.kind == "cca"]
    main = next((p for p in cca if p.train_log and p.train_log.parent == train_dir), None)
    missing = [name for name, found in (("base", any(p.kind == "base" for p in points)), ("cfg", cfg), ("cca", main)) if not found]
    if missing:
        raise FormatError(f"{eval_dir}/metrics.json (and the sweep) hold no {' and no '.join(missing)} point: the verdict compares "
                          f"the main CCA policy ({train_dir}) with the base model and the best CFG scale; evaluate "
                          f"{', '.join(missing)} (eval.methods, sweep.cfg_scales) and rerun `dvc repro`")
    return next(p for p in points if p.kind == "base"), cfg, main


def verdict(eval_dir: Path, train_dir: Path, sweep_dir: Path | None, sweep: SweepConfig | None = None,
            runs_path: Path | None = None) -> str:
    """The one-line verdict `make demo` ends with: this run's CCA / best CFG against the recorded runs' range."""
    from pipeline.report import ratio_range, read_demo_runs, verdict_line  # only the verdict needs them

    expected = ratio_range(read_demo_runs(runs_path or DEMO_RUNS))
    base, cfg, cca = headline_points(collect(eval_dir, train_dir, sweep_dir, sweep), eval_dir, train_dir)
    return verdict_line(base, cfg, cca, expected)
