"""Stage `paper`: the paper's other comparisons on the embedded default, from the runs `dvc repro` made.

    cca-pipe paper --paper-params pipelines/paper/params.yaml --out data/paper/report   # a stage of pipelines/paper

- Table 3: base, CCA, DPO and Unlearning on the same cached pairs, each baseline at its best point of a grid
  (the paper ablates DPO's beta_d over {0.01, 0.1, 1, 10} and reports the best; Unlearning helps at small
  lambda_u, 0.01-0.1): FID, IS, class accuracy; the whole grid in a second table; and the mean positive
  log-likelihood over training (logps_pos.png), which falls under DPO (paper Sec. 5.3).
- Figures 5/6: FID against IS of CFG on the base model (scale s), CCA over lambda, and CCA+CFG (the lambda-1
  policy trained with unconditional rows, sampled with guidance at each s) -> fid_is.png.
- Table 5: one lambda-conditioned policy sampled at test-time lambdas next to the policies trained at each
  fixed lambda.
- The reference's dropout (the released recipe runs the reference in train mode): the policy trained with
  dropout against the eval-mode cache and against a cache with the same dropout; D, the log-likelihood the
  dropout costs, and the step-0 log-ratios, which start at about -D against the eval-mode cache and at 0
  against the matched one.
Writes table3.md (best points), table3_grid.md (every point), table5.md, dropout.md, fid_is.png, logps_pos.png, results.md
and checks.json (each claim of the paper as measured here, true or false, with the numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import check_ranges, setting
from pipeline.formats import TRAIN_STEP_CSV, read_ref_cache, train_run_file
from pipeline.outputs import StageDir, write_json, write_text
from pipeline.report import Point, headless_pyplot, plot_fid_is, read_log, results_table

from .report import SweepConfig, collect, read_results, trained_settings

log = logging.getLogger(__name__)


@dataclass
class PaperConfig:
    """pipelines/paper/params.yaml's `paper` section: the runs of pipelines/paper the report compares. Numbers
    keep their written type (DVC names the matrix stages' folders with the value as written)."""

    # Table 3: DPO over beta_d, Unlearning over lambda_u (pipelines/paper/params.yaml says how they map to the paper's)
    dpo_betas: list[int | float] = setting(default_factory=lambda: [0.1, 0.25, 2.5, 25, 250], nonempty=True, unique=True, gt=0.0)
    unlearning_lambdas: list[int | float] = setting(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1],
                                                    nonempty=True, unique=True, gt=0.0)
    dropout: int | float = setting(0.1, ge=0.0, lt=1.0)  # the reference-dropout experiment's train.dropout
    cca_cfg_lambda: int | float = setting(1, ge=0.0)  # Figures 5-6: CCA+CFG trained at this lambda
    lambda_min: int | float = setting(1, gt=0.0)  # Table 5: the lambda-conditioned policy's range ...
    lambda_max: int | float = setting(8103, gt=0.0)  # ... e^9, as the paper
    lambda_epochs: int | float = setting(9, gt=0.0)  # ... trained 3x as long as a fixed-lambda policy (the paper's 3 epochs vs 1)
    lambdas: list[int | float] = setting(default_factory=lambda: [1, 10, 30, 100], nonempty=True, unique=True, gt=0.0)  # ... sampled at
    # Table 5's policies trained at one fixed lambda, besides the main run's (train.lambda) and any of the main
    # sweep (sweep.lambdas): pipelines/paper trains them, `make demo` does not (its headline uses the main run alone)
    fixed_lambdas: list[int | float] = setting(default_factory=lambda: [1, 30, 100], unique=True, gt=0.0)
    # DDO vs CCA (stages/ddo_vs_cca.py): each point trained once per fine-tuning seed (train.seed, negatives.seed)
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], nonempty=True, unique=True, ge=0)
    seeds_cca_lambdas: list[int | float] = setting(default_factory=lambda: [10], nonempty=True, unique=True, ge=0.0)
    ddo_alphas: list[int | float] = setting(default_factory=lambda: [1, 4], nonempty=True, unique=True, gt=0.0)
    ddo_betas: list[int | float] = setting(default_factory=lambda: [0.5], nonempty=True, unique=True, gt=0.0)
    ddo_round2_alphas: list[int | float] = setting(default_factory=lambda: [1], nonempty=True, unique=True, gt=0.0)  # round 2
    ddo_round2_betas: list[int | float] = setting(default_factory=lambda: [0.5], nonempty=True, unique=True, gt=0.0)  # continues these

    def __post_init__(self) -> None:
        check_ranges(self, "paper")


def _methods(eval_dir: Path) -> dict[str, dict]:
    return read_results(eval_dir / "metrics.json", ("methods",))["methods"]


def only_method(eval_dir: Path) -> dict:
    """The metrics of an eval that evaluated one method (each point of pipelines/paper has its own folder)."""
    (metrics,) = _methods(eval_dir).values()
    return metrics


def _sampled_lambda(eval_dir: Path) -> Point:
    """The point of an eval of a lambda-conditioned policy at one test-time lambda: the lambda its metrics.json
    records as sampled (a number; the method's name `cca_lam<lambda>` is only its table label)."""
    results = read_results(eval_dir / "metrics.json", ("methods", "sampled"))
    ((name, metrics),) = results["methods"].items()
    return Point("lambda", metrics, lam=float(results["sampled"][name]["lam"]))


def plot_logps(runs: list[tuple[str, Path]], path: Path) -> None:
    """Mean log p_theta(x|c) of the positives over training steps, one line per run (paper Sec. 5.3)."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, log_csv in runs:
        steps = read_log(log_csv)
        ax.plot(steps["step"], steps["logps/pos"], label=label)
    ax.set(xlabel="step", ylabel="mean log p_θ(x|c) of the positives (nats)", title="Positive likelihood during fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(eval_dir: Path, train_dir: Path, sweep_dir: Path, paper_dir: Path, cache: Path, out: Path, sweep: SweepConfig,
        paper: PaperConfig) -> str:
    """`sweep`, `paper`: the settings naming the points (params.yaml, pipelines/paper/params.yaml); `cache`: the
    main run's (eval-mode) reference cache. `out` must be absent, empty or a paper report of ours; built beside
    it and moved in at the end."""
    with StageDir(out, "paper") as claim:
        text = _paper(eval_dir, train_dir, sweep_dir, paper_dir, cache, claim.open_partial(), sweep, paper)
        claim.commit()
    return text


def baseline_grid(paper_dir: Path, paper: PaperConfig) -> list[Point]:
    """Every DPO and Unlearning point of pipelines/paper (`<loss>/beta<b>` and `<loss>/lam<lambda>` folders)."""
    folders = [("dpo", f"beta{b}", None, b) for b in paper.dpo_betas] + \
        [("unlearning", f"lam{lam}", lam, None) for lam in paper.unlearning_lambdas]
    return [Point(loss, only_method(paper_dir / loss / name / "eval"), lam=lam, beta=beta,
                  train_log=train_run_file(paper_dir / loss / name / "train", TRAIN_STEP_CSV)) for loss, name, lam, beta in folders]


def table3(base: Point, main: Point, grid: list[Point], out: Path, checks: dict) -> str:
    """Table 3 (each baseline at its best FID), the whole grid, and DPO's falling positive likelihood."""
    best = [min((p for p in grid if p.kind == loss), key=lambda p: p.metrics["fid"]) for loss in ("dpo", "unlearning")]
    text = results_table([(p.label + (" (best of its grid)" if p in best else ""), p.metrics) for p in [base, main, *best]],
                         first="Table 3: fine-tuning loss")
    write_text(out / "table3_grid.md", results_table([(p.label, p.metrics) for p in grid], first="Table 3: every grid point"))
    checks["table3_best"] = {p.kind: {"point": p.label, "fid": p.metrics["fid"]} for p in best}
    checks["cca_fid_below_dpo_and_unlearning"] = all(main.metrics["fid"] < p.metrics["fid"] for p in best)
    checks["unlearning_best_fid_below_base"] = bool(best[1].metrics["fid"] < base.metrics["fid"])
    plot_logps([(main.label, main.train_log)] + [(p.label, p.train_log) for p in grid if p.kind == "dpo"], out / "logps_pos.png")
    dpo_log = read_log(best[0].train_log)
    checks["dpo_positive_logp_first_last"] = [float(dpo_log["logps/pos"][0]), float(dpo_log["logps/pos"][-1])]
    checks["dpo_positive_logp_falls"] = bool(dpo_log["logps/pos"][-1] < dpo_log["logps/pos"][0])
    return text


def fixed_points(paper_dir: Path, paper: PaperConfig) -> list[Point]:
    """The policies pipelines/paper trained at each paper.fixed_lambdas (`fixed/lam<lambda>/{train,eval}`)."""
    points = []
    for lam in paper.fixed_lambdas:
        folder = paper_dir / "fixed" / f"lam{lam}"
        trained = trained_settings(folder / "train")
        points.append(Point("cca", only_method(folder / "eval"), lam=trained["lambda"], beta=trained["beta"],
                            train_log=folder / "train" / "log.csv"))
    return points


def cca_cfg_points(paper_dir: Path, sweep: SweepConfig) -> list[Point]:
    """CCA+CFG: the policy trained at paper.cca_cfg_lambda, sampled with guidance at each sweep.cfg_scales."""
    trained = trained_settings(paper_dir / "cca_cfg" / "train")
    return [Point("cca_cfg", only_method(paper_dir / "cca_cfg" / "eval" / f"s{s}"), cfg_scale=float(s),
                  lam=trained["lambda"], beta=trained["beta"]) for s in sweep.cfg_scales]


def table5(paper_dir: Path, paper: PaperConfig, cca_points: list[Point], beta: float, checks: dict) -> tuple[str, list[Point]]:
    """One lambda-conditioned policy at each test-time lambda next to the policy trained at that lambda alone."""
    conditioned = sorted((_sampled_lambda(paper_dir / "lambda" / "eval" / f"lam{lam}") for lam in paper.lambdas),
                         key=lambda p: p.lam)
    fixed = {p.lam: p for p in cca_points if p.beta == beta}
    rows, ratios = [], {}
    for p in conditioned:
        rows.append((p.label, p.metrics))
        if p.lam in fixed:
            rows.append((f"  trained at λ={p.lam:g} alone", fixed[p.lam].metrics))
            ratios[f"{p.lam:g}"] = p.metrics["fid"] / fixed[p.lam].metrics["fid"]
    checks["lambda_fid_over_fixed"] = ratios
    checks["lambda_within_15_percent"] = bool(ratios) and all(abs(r - 1) <= 0.15 for r in ratios.values())
    inception = [p.metrics["is"] for p in conditioned]
    checks["lambda_is_rises"] = all(b >= a for a, b in zip(inception, inception[1:], strict=False))
    accuracy = [p.metrics.get("class_accuracy", p.metrics["is"]) for p in conditioned]
    checks["lambda_class_accuracy_rises"] = all(b >= a for a, b in zip(accuracy, accuracy[1:], strict=False))
    return results_table(rows, first="Table 5: λ at test time"), conditioned


DROPOUT_RUNS = {"eval_mode": "eval-mode reference (the cache without dropout)",
                "matched": "reference with the same dropout, drawn anew each epoch (the release)"}


def reference_dropout(paper_dir: Path, cache: Path, paper: PaperConfig, checks: dict) -> str:
    """The policy trained at train.dropout = paper.dropout against the eval-mode cache `cache` and against
    `<paper_dir>/dropout/ref_logp.parquet` (the same rows, with that dropout): D = the mean over the cache
    rows of log p_phi(x|c) without dropout minus with it, and each run's mean step-0 log-ratios."""
    eval_mode, _ = read_ref_cache(cache)
    dropped, _ = read_ref_cache(paper_dir / "dropout" / "ref_logp.parquet")
    for column in ("row", "view", "label", "neg_label"):
        if not np.array_equal(eval_mode[column], dropped[column]):
            raise ValueError(f"{paper_dir / 'dropout' / 'ref_logp.parquet'} and {cache} differ in `{column}`: the two "
                             "caches must hold the same pairs (same tokens and reflogp.seed/views/negatives)")
    cost = eval_mode["ref_logp_pos"] - dropped["ref_logp_pos"]
    checks["dropout"] = {"train_dropout": paper.dropout, "D_nats_mean": float(cost.mean()), "D_nats_std": float(cost.std()),
                         "rows": len(cost)}
    rows = []
    for name, label in DROPOUT_RUNS.items():
        first = read_log(train_run_file(paper_dir / "dropout" / name / "train", TRAIN_STEP_CSV))
        step0 = {"ratio_pos": float(first["rewards/pos"][0]), "ratio_neg": float(first["rewards/neg"][0])}
        metrics = only_method(paper_dir / "dropout" / name / "eval")
        checks["dropout"][name] = {**step0, "fid": metrics["fid"]}
        rows.append((label, {**metrics, **step0}))
    title = f"train.dropout {paper.dropout:g}; D = {cost.mean():.2f} ± {cost.std():.2f} nats over {len(cost)} rows"
    return results_table(rows, first=title, extra={"ratio_pos": "step-0 ratio pos", "ratio_neg": "step-0 ratio neg"})


def _paper(eval_dir: Path, train_dir: Path, sweep_dir: Path, paper_dir: Path, cache: Path, out: Path, sweep: SweepConfig,
           paper: PaperConfig) -> str:
    points = collect(eval_dir, train_dir, sweep_dir, sweep)
    base = next(p for p in points if p.kind == "base")
    main = next(p for p in points if p.kind == "cca" and p.train_log and p.train_log.parent == train_dir)
    known = {(p.lam, p.beta) for p in points if p.kind == "cca"}  # the main run and its sweep come first
    points += [p for p in fixed_points(paper_dir, paper) if (p.lam, p.beta) not in known]
    cca_points = [p for p in points if p.kind == "cca"]
    checks: dict[str, object] = {}
    text3 = table3(base, main, baseline_grid(paper_dir, paper), out, checks)

    guided = cca_cfg_points(paper_dir, sweep)
    best_guided = min(guided, key=lambda p: p.metrics["fid"])
    checks["cca_cfg_best"] = {"point": best_guided.label, "fid": best_guided.metrics["fid"]}
    checks["cca_main_fid"] = main.metrics["fid"]
    checks["cca_cfg_best_fid_at_most_cca_guidance_free"] = bool(best_guided.metrics["fid"] <= main.metrics["fid"])
    checks["cca_cfg_best_fid_at_most_best_cca"] = bool(best_guided.metrics["fid"] <= min(p.metrics["fid"] for p in cca_points))

    text5, conditioned = table5(paper_dir, paper, cca_points, main.beta, checks)
    text_dropout = reference_dropout(paper_dir, cache, paper, checks)
    plot_fid_is([p for p in points if p.kind in ("base", "cfg", "cca")] + guided + conditioned, out / "fid_is.png")
    write_text(out / "table3.md", text3)
    write_text(out / "table5.md", text5)
    write_text(out / "dropout.md", text_dropout)
    write_json(out / "checks.json", checks)
    text = (text3 + "\n" + results_table([(p.label, p.metrics) for p in guided], first="Figures 5/6: CCA+CFG")
            + "\n" + text5 + "\n" + text_dropout)
    write_text(out / "results.md", text)
    log.info("paper comparisons -> %s: %s", out, json.dumps(checks))
    return text + "\n" + json.dumps(checks, indent=1) + "\n"
