"""Stage `paper`: the paper's other comparisons on the embedded default, from the runs `dvc repro` made.

    cca-pipe paper --paper-params pipelines/paper/params.yaml --out data/paper/report   # a stage of pipelines/paper

- Table 3: base, CCA, DPO and Unlearning on the same cached pairs: FID, IS, class accuracy; and the mean
  positive log-likelihood over training (logps_pos.png), which falls under DPO (paper Sec. 5.3).
- Figures 5/6: FID against IS of CFG on the base model (scale s), CCA over lambda, and CCA+CFG (the lambda-1
  policy trained with unconditional rows, sampled with guidance at each s) -> fid_is.png.
- Table 5: one lambda-conditioned policy sampled at test-time lambdas next to the policies trained at each
  fixed lambda.
Writes table3.md, table5.md, fid_is.png, logps_pos.png, results.md (all three tables) and checks.json (each
claim of the paper as measured here, true or false, with the numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check_ranges, setting
from pipeline.losses import LOSSES
from pipeline.outputs import StageDir, write_json, write_text
from pipeline.report import Point, plot_fid_is, read_log, results_table

from .report import SweepConfig, collect

log = logging.getLogger(__name__)


@dataclass
class PaperConfig:
    """pipelines/paper/params.yaml's `paper` section: which runs of pipelines/paper the report compares."""

    losses: list[str] = setting(default_factory=lambda: ["dpo", "unlearning"], unique=True, choices=tuple(LOSSES))  # Table 3
    cca_cfg_lambda: int | float = setting(1, ge=0.0)  # Figures 5-6: CCA+CFG trained at this lambda
    lambda_min: int | float = setting(1, gt=0.0)  # Table 5: the lambda-conditioned policy's range ...
    lambda_max: int | float = setting(1000, gt=0.0)
    lambdas: list[int | float] = setting(default_factory=lambda: [1, 10, 30, 100], nonempty=True, unique=True, gt=0.0)  # ... sampled at

    def __post_init__(self) -> None:
        check_ranges(self, "paper")


def _methods(eval_dir: Path) -> dict[str, dict]:
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro` (or `make paper`) first")
    return json.loads(path.read_text())["methods"]


def _params(train_dir: Path) -> dict:
    return json.loads((train_dir / "summary.json").read_text())["params"]


def plot_logps(runs: list[tuple[str, Path]], path: Path) -> None:
    """Mean log p_theta(x|c) of the positives over training steps, one line per loss (paper Sec. 5.3)."""
    from pipeline.report import _agg

    plt = _agg()
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


def run(eval_dir: Path, train_dir: Path, sweep_dir: Path, paper_dir: Path, out: Path, sweep: SweepConfig,
        paper: PaperConfig) -> str:
    """`sweep`, `paper`: the settings naming the points (params.yaml, pipelines/paper/params.yaml). `out` must be
    absent, empty or a paper report of ours; built beside it and moved in at the end."""
    with StageDir(out, "paper") as claim:
        text = _paper(eval_dir, train_dir, sweep_dir, paper_dir, claim.open_partial(), sweep, paper)
        claim.commit()
    return text


def _paper(eval_dir: Path, train_dir: Path, sweep_dir: Path, paper_dir: Path, out: Path, sweep: SweepConfig,
           paper: PaperConfig) -> str:
    points = collect(eval_dir, train_dir, sweep_dir, sweep)
    base = next(p for p in points if p.kind == "base")
    main = next(p for p in points if p.kind == "cca" and p.train_log and p.train_log.parent == train_dir)
    checks: dict[str, object] = {}

    # Table 3: the same pairs, three losses
    baselines = []
    for loss in paper.losses:
        params = _params(paper_dir / loss / "train")
        baselines.append(Point(loss, _methods(paper_dir / loss / "eval")["cca"], lam=params["lam"], beta=params["beta"],
                               train_log=paper_dir / loss / "train" / "log.csv"))
    table3 = results_table([(p.label, p.metrics) for p in [base, main, *baselines]], first="Table 3: fine-tuning loss")
    checks["cca_fid_below_dpo_and_unlearning"] = all(main.metrics["fid"] < b.metrics["fid"] for b in baselines)
    runs = [(main.label, main.train_log)] + [(b.label, b.train_log) for b in baselines]
    plot_logps(runs, out / "logps_pos.png")
    dpo_log = read_log(baselines[0].train_log)
    checks["dpo_positive_logp_first_last"] = [float(dpo_log["logps/pos"][0]), float(dpo_log["logps/pos"][-1])]
    checks["dpo_positive_logp_falls"] = bool(dpo_log["logps/pos"][-1] < dpo_log["logps/pos"][0])

    # Figures 5/6: CFG, CCA over lambda, CCA+CFG
    guided_train = _params(paper_dir / "cca_cfg" / "train")
    guided = [Point("cca_cfg", m, cfg_scale=float(name[len("cca_cfg_"):]), lam=guided_train["lam"], beta=guided_train["beta"])
              for s in sweep.cfg_scales for name, m in _methods(paper_dir / "cca_cfg" / "eval" / f"s{s}").items()]
    best_guided = min(guided, key=lambda p: p.metrics["fid"])
    cca_points = [p for p in points if p.kind == "cca"]
    best_cca = min(cca_points, key=lambda p: p.metrics["fid"])
    checks["cca_cfg_best"] = {"point": best_guided.label, "fid": best_guided.metrics["fid"]}
    checks["cca_main_fid"] = main.metrics["fid"]
    checks["cca_cfg_best_fid_at_most_cca_guidance_free"] = bool(best_guided.metrics["fid"] <= main.metrics["fid"])
    checks["cca_cfg_best_fid_at_most_best_cca"] = bool(best_guided.metrics["fid"] <= best_cca.metrics["fid"])

    # Table 5: one lambda-conditioned policy at test-time lambdas vs a policy trained at each lambda
    conditioned = [Point("lambda", m, lam=float(name[len("cca_lam"):])) for lam in paper.lambdas
                   for name, m in _methods(paper_dir / "lambda" / "eval" / f"lam{lam}").items()]
    conditioned.sort(key=lambda p: p.lam)
    fixed = {p.lam: p for p in cca_points if p.beta == main.beta}
    rows, ratios = [], {}
    for p in conditioned:
        rows.append((p.label, p.metrics))
        if p.lam in fixed:
            rows.append((f"  trained at λ={p.lam:g} alone", fixed[p.lam].metrics))
            ratios[f"{p.lam:g}"] = p.metrics["fid"] / fixed[p.lam].metrics["fid"]
    table5 = results_table(rows, first="Table 5: λ at test time")
    checks["lambda_fid_over_fixed"] = ratios
    checks["lambda_within_15_percent"] = bool(ratios) and all(abs(r - 1) <= 0.15 for r in ratios.values())
    accuracy = [p.metrics.get("class_accuracy", p.metrics["is"]) for p in conditioned]
    checks["lambda_class_accuracy_rises"] = all(b >= a for a, b in zip(accuracy, accuracy[1:], strict=False))

    plot_fid_is([p for p in points if p.kind in ("base", "cfg", "cca")] + guided + conditioned, out / "fid_is.png")
    write_text(out / "table3.md", table3)
    write_text(out / "table5.md", table5)
    write_json(out / "checks.json", checks)
    text = (table3 + "\n" + results_table([(p.label, p.metrics) for p in sorted(guided, key=lambda p: p.cfg_scale)],
                                          first="Figures 5/6: CCA+CFG") + "\n" + table5)
    write_text(out / "results.md", text)
    log.info("paper comparisons -> %s: %s", out, json.dumps(checks))
    return text + "\n" + json.dumps(checks, indent=1) + "\n"
