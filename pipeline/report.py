"""Figures and tables of a sweep: the paper's Figures 3, 4 and 10 from our own runs.

Pure functions of collected points (dicts) and sample arrays; they draw with matplotlib's Agg backend
to PNG, so they run headless and offline (DVC's own plots need a CDN).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .progress import significant

TABLE_KEYS = ("fid", "is", "precision", "recall", "class_accuracy", "images_per_s")
TABLE_HEADS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "precision", "recall": "recall",
               "class_accuracy": "class acc.", "images_per_s": "images/s"}


@dataclass
class Point:
    """One evaluated setting: the base model, CFG at scale s, a CCA policy at (lambda, beta) without guidance
    or with (CCA+CFG at scale s), a lambda-conditioned policy at a test-time lambda, or a baseline loss."""

    kind: str  # "base" | "cfg" | "cca" | "cca_cfg" | "lambda" | "dpo" | "unlearning"
    metrics: dict[str, float]
    cfg_scale: float | None = None
    lam: float | None = None
    beta: float | None = None
    train_log: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "cfg":
            return f"CFG s={self.cfg_scale:g}"
        if self.kind == "cca":
            return f"CCA λ={self.lam:g} β={self.beta:g}"
        if self.kind == "cca_cfg":
            return f"CCA+CFG λ={self.lam:g} s={self.cfg_scale:g}"
        if self.kind == "lambda":
            return f"λ-conditioned CCA at λ={self.lam:g}"
        if self.kind == "dpo":  # no lambda in DPO's loss
            return f"DPO β={self.beta:g}"
        if self.kind == "unlearning":  # linear in the log-ratios: no beta
            return f"Unlearning λ={self.lam:g}"
        return "base (no guidance)"


def headless_pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, no display is needed (the stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fid_is(points: list[Point], path: str | os.PathLike) -> None:
    """Paper Fig. 4: FID against IS; CCA over lambda (one line per beta) vs CFG over the guidance scale."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    cfg = sorted((p for p in points if p.kind == "cfg"), key=lambda p: p.cfg_scale)
    if cfg:
        ax.plot([p.metrics["is"] for p in cfg], [p.metrics["fid"] for p in cfg], "s--", color="tab:orange", label="base + CFG (scale s)")
        for p in cfg:
            ax.annotate(f"s={p.cfg_scale:g}", (p.metrics["is"], p.metrics["fid"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for beta in sorted({p.beta for p in points if p.kind == "cca"}):
        cca = sorted((p for p in points if p.kind == "cca" and p.beta == beta), key=lambda p: p.lam)
        ax.plot([p.metrics["is"] for p in cca], [p.metrics["fid"] for p in cca], "o-", label=f"CCA, no guidance (β={beta:g}, λ)")
        for p in cca:
            ax.annotate(f"λ={p.lam:g}", (p.metrics["is"], p.metrics["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    guided = sorted((p for p in points if p.kind == "cca_cfg"), key=lambda p: p.cfg_scale)
    if guided:
        ax.plot([p.metrics["is"] for p in guided], [p.metrics["fid"] for p in guided], "D-.", color="tab:green",
                label=f"CCA+CFG (λ={guided[0].lam:g}, scale s)")
        for p in guided:
            ax.annotate(f"s={p.cfg_scale:g}", (p.metrics["is"], p.metrics["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    conditioned = sorted((p for p in points if p.kind == "lambda"), key=lambda p: p.lam)
    if conditioned:
        ax.plot([p.metrics["is"] for p in conditioned], [p.metrics["fid"] for p in conditioned], "v:", color="tab:purple",
                label="one λ-conditioned policy (test-time λ)")
    for p in points:
        if p.kind == "base":
            ax.plot([p.metrics["is"]], [p.metrics["fid"]], "k*", markersize=14, label="base, no guidance")
    ax.set_xlabel("IS (higher: more class-distinct)")
    ax.set_ylabel("FID (lower: closer to real data)")
    ax.set_title("Fidelity-diversity trade-off: CCA's λ vs CFG's scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]} if rows else {}


def plot_training_curves(points: list[Point], path: str | os.PathLike) -> None:
    """Paper Fig. 10: CCA loss, and log p_theta/p_phi of positive and negative pairs, over steps."""
    plt = headless_pyplot()
    fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    runs = sorted((p for p in points if p.kind == "cca" and p.train_log and Path(p.train_log).is_file()),
                  key=lambda p: (p.beta, p.lam))
    for i, p in enumerate(runs):
        log = read_log(p.train_log)
        color = plt.cm.viridis(i / max(1, len(runs) - 1))
        ax_loss.plot(log["step"], log["loss"], color=color, label=p.label)
        ax_ratio.plot(log["step"], log["rewards/pos"], color=color, label=f"{p.label}: positive")
        ax_ratio.plot(log["step"], log["rewards/neg"], color=color, linestyle="--", label=f"{p.label}: negative")
    ax_loss.set(xlabel="step", ylabel="CCA loss", title="CCA loss")
    ax_ratio.set(xlabel="step", ylabel="log p_θ(x|c) - log p_φ(x|c)", title="Relative likelihood: positive (solid), negative (dashed)")
    ax_ratio.axhline(0, color="grey", linewidth=0.5)
    for ax in (ax_loss, ax_ratio):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


GRID_CLASSES = 16  # rows of a sample grid: every class up to this many, else this many spread over the classes
MIN_TILE = 64  # small tiles are upscaled (nearest) to at least this many pixels; larger ones are never upscaled


def grid_classes(labels: np.ndarray, limit: int = GRID_CLASSES) -> list[int]:
    """The classes a grid shows: all of `labels`' classes when there are at most `limit`, else `limit` of them
    evenly spaced from the first to the last (fixed, so every method's grid shows the same classes)."""
    classes = sorted(set(np.asarray(labels).tolist()))
    if len(classes) <= limit:
        return classes
    picks = np.linspace(0, len(classes) - 1, limit).round().astype(int)
    return [classes[i] for i in picks]


def tile_scale(tile: int, min_tile: int = MIN_TILE) -> int:
    """The nearest-neighbour upscale that makes a `tile`-pixel sample at least `min_tile` pixels: 16 px -> 4,
    256 px -> 1 (never upscaled: a grid of ImageNet samples stays the samples' size)."""
    return max(1, math.ceil(min_tile / max(tile, 1)))


def grid_shape(rows: int, per_class: int, tile_h: int, tile_w: int, scale: int = 1, gap: int = 1) -> tuple[int, int, int]:
    """(height, width, 3) of a grid_canvas, computable before it is allocated."""
    h, w = tile_h * scale, tile_w * scale
    return rows * (h + gap) + gap, per_class * (w + gap) + gap, 3


def grid_canvas(images: np.ndarray, labels: np.ndarray, per_class: int, classes: list[int] | None = None,
                scale: int = 1, gap: int = 1, fill: int = 255) -> np.ndarray:
    """One row per class (default: grid_classes(labels), at most GRID_CLASSES rows), `per_class` samples each
    (uint8 (N, H, W, 3) images), upscaled `scale`x (nearest), `gap` pixels of `fill` between tiles: the
    sample grids of eval and the report's comparison figure."""
    classes = classes if classes is not None else grid_classes(labels)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    canvas = np.full(grid_shape(len(classes), per_class, images.shape[1], images.shape[2], scale, gap), fill, np.uint8)
    for r, c in enumerate(classes):
        for k, image in enumerate(images[labels == c][:per_class]):
            y, x = gap + r * (h + gap), gap + k * (w + gap)
            canvas[y : y + h, x : x + w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def comparison_grid(panels: list[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike, per_class: int = 6,
                    classes: list[int] | None = None) -> None:
    """Paper Fig. 3: side-by-side sample grids (same classes, same seed), one panel per method.

    panels: (title, images uint8 (N, H, W, 3), labels (N,)).
    """
    plt = headless_pyplot()
    classes = classes if classes is not None else grid_classes(panels[0][2])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.35 * len(classes) + 1.2))
    for ax, (title, images, labels) in zip(np.atleast_1d(axes), panels):
        ax.imshow(grid_canvas(images, labels, per_class, classes), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def results_table(rows: list[tuple[str, dict[str, float]]], first: str = "point",
                  extra: dict[str, str] | None = None) -> str:
    """Markdown table, one row per (name, metrics); mean ± std where the std is known. An sFID column only
    when some row has one (Inception scoring: the classifier of the embedded default has no sFID layer).
    `extra`: {metric key: column head} of more columns, shown before the scores."""
    heads = {**(extra or {}), **TABLE_HEADS}
    keys = (*(extra or {}), *(("fid", "sfid", *TABLE_KEYS[1:]) if any("sfid" in m for _, m in rows) else TABLE_KEYS))
    head = f"| {first} | " + " | ".join(heads[k] for k in keys) + " |\n|---" + "|---" * len(keys) + "|\n"
    lines = []
    for name, metrics in rows:
        cells = []
        for k in keys:
            if k not in metrics:
                cells.append("n/a")
            elif k == "images_per_s":
                cells.append(significant(metrics[k]))
            elif f"{k}_min" in metrics:  # over_seeds: a mean over runs and their range
                cells.append(f"{metrics[k]:.3f} [{metrics[k + '_min']:.3f}, {metrics[k + '_max']:.3f}]")
            elif f"{k}_std" in metrics:
                cells.append(f"{metrics[k]:.3f} ± {metrics[k + '_std']:.3f}")
            else:
                cells.append(f"{metrics[k]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def over_seeds(runs: list[dict[str, float]]) -> dict[str, float]:
    """One setting trained once per seed: for every number all `runs` hold, the mean over the runs and their range
    (`<key>_min`, `<key>_max`; results_table writes `mean [min, max]`). A run's own `<key>_std` (over eval's
    sampling seeds) is left out: the spread shown is the fine-tuning seeds'."""
    if not runs:
        raise ValueError("over_seeds: no runs to aggregate")
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool) and not k.endswith("_std")
            and all(k in r for r in runs)]
    summary: dict[str, float] = {}
    for k in keys:
        values = np.array([r[k] for r in runs], dtype=np.float64)
        summary |= {k: float(values.mean()), f"{k}_min": float(values.min()), f"{k}_max": float(values.max())}
    return summary


def markdown_table(points: list[Point]) -> str:
    """All points, one row each."""
    return results_table([(p.label, p.metrics) for p in points])


# ------------------------------------------------------------------ the demo's headline over recorded runs
# docs/demo_runs.csv records each measured `make demo` (or seeded run of it, bench/demo_seeds.py): the three FIDs
# of the headline claim. The range the verdict quotes, the table in docs/paper.md and the README's headline are
# all computed from it (tests/test_verdict.py checks the two documents against it).

DEMO_RUNS_FIELDS = ("date", "set", "run", "base_fid", "cfg_scale", "cfg_fid", "cca_fid")


@dataclass(frozen=True)
class DemoRun:
    """One recorded run: the base model's FID, the best CFG scale's (and that scale), the main CCA policy's."""

    date: str
    set: str  # the runs measured together: "history" (runs of the code of each day), "seeds <date>" (bench/demo_seeds.py)
    run: str  # what ran (code, threads, seeds)
    base_fid: float
    cfg_scale: float
    cfg_fid: float
    cca_fid: float

    @property
    def over_cfg(self) -> float:
        return self.cca_fid / self.cfg_fid

    @property
    def over_base(self) -> float:
        return self.cca_fid / self.base_fid


def read_demo_runs(path: str | os.PathLike) -> list[DemoRun]:
    """The rows of a demo-runs CSV (DEMO_RUNS_FIELDS), or one error naming the file, the row and the key."""
    from .formats import FormatError

    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: it records the measured runs the verdict compares with; restore it "
                                f"(git checkout -- {path}) or pass --runs") from None
    runs = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        missing = [k for k in DEMO_RUNS_FIELDS if not (row.get(k) or "").strip()]
        if missing:
            raise FormatError(f"{path} line {i}: no {missing[0]!r}: every row needs {', '.join(DEMO_RUNS_FIELDS)}")
        values = {}
        for key in DEMO_RUNS_FIELDS[3:]:
            try:
                values[key] = float(row[key])
            except ValueError:
                raise FormatError(f"{path} line {i}: {key} = {row[key]!r} is not a number; write it as e.g. 5.29") from None
            if not values[key] > 0:
                raise FormatError(f"{path} line {i}: {key} = {row[key]!r} must be > 0")
        runs.append(DemoRun(row["date"].strip(), row["set"].strip(), row["run"].strip(), **values))
    if not runs:
        raise FormatError(f"{path} holds no run: it needs a header ({','.join(DEMO_RUNS_FIELDS)}) and one row per run")
    return runs


def write_demo_runs(path: str | os.PathLike, runs: list[DemoRun]) -> None:
    from .outputs import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(DEMO_RUNS_FIELDS)
        for r in runs:
            writer.writerow([r.date, r.set, r.run, *map(repr, (r.base_fid, r.cfg_scale, r.cfg_fid, r.cca_fid))])  # read back equal


@dataclass(frozen=True)
class RatioRange:
    """CCA / best CFG over the runs of one set, as printed (two decimals), and CCA / base: a run whose models did
    not learn has CCA, CFG and base alike, CCA / best CFG about 1, and only the second ratio tells it apart."""

    set: str
    low: float
    high: float
    median: float
    runs: int
    first: str  # dates of the first and last run
    last: str
    base_low: float
    base_high: float

    def holds(self, over_cfg: float, over_base: float) -> bool:
        return (round(self.low, 2) <= round(over_cfg, 2) <= round(self.high, 2)
                and round(self.base_low, 2) <= round(over_base, 2) <= round(self.base_high, 2))

    @property
    def phrase(self) -> str:
        """How the README's headline and the verdict quote it."""
        return f"{self.low:.2f}-{self.high:.2f}x over {self.runs} runs (median {self.median:.2f}x)"


def ratio_range(runs: list[DemoRun]) -> RatioRange:
    """The range of the latest set (that of the file's last row): the runs measured together most recently."""
    latest = [r for r in runs if r.set == runs[-1].set]
    ratios = [r.over_cfg for r in latest]
    dates = sorted(r.date for r in latest)
    return RatioRange(runs[-1].set, min(ratios), max(ratios), float(np.median(ratios)), len(latest), dates[0], dates[-1],
                      min(r.over_base for r in latest), max(r.over_base for r in latest))


def _spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}} (median {float(np.median(values)):{fmt}})"


def demo_runs_table(runs: list[DemoRun]) -> str:
    """docs/paper.md's table of the recorded runs, set by set, each set closed by the spread of every column."""
    head = ("| date | run | base FID | best CFG FID (s) | CCA FID | CCA / best CFG | CCA / base |\n"
            "|---|---|---|---|---|---|---|\n")
    text = ""
    for name in dict.fromkeys(r.set for r in runs):
        rows = [r for r in runs if r.set == name]
        text += f"\n**{name}** ({len(rows)} runs)\n\n" + head
        for r in rows:
            text += (f"| {r.date} | {r.run} | {r.base_fid:.2f} | {r.cfg_fid:.2f} (s={r.cfg_scale:g}) | {r.cca_fid:.2f} | "
                     f"{r.over_cfg:.2f}x | {r.over_base:.2f}x |\n")
        text += (f"| spread | min-max (median) | {_spread([r.base_fid for r in rows])} | {_spread([r.cfg_fid for r in rows])} | "
                 f"{_spread([r.cca_fid for r in rows])} | {_spread([r.over_cfg for r in rows])} | "
                 f"{_spread([r.over_base for r in rows])} |\n")
    return text.lstrip("\n")


def _edge_note(scale: float, scanned: list[float]) -> str:
    """Said when the best CFG scale is the smallest or largest evaluated: the best may lie beyond it."""
    scanned = sorted(set(scanned))
    if len(scanned) == 1:
        return "; the only scale evaluated"
    if scale == scanned[0] or scale == scanned[-1]:
        return f"; the {'smallest' if scale == scanned[0] else 'largest'} scale evaluated, the best may lie beyond"
    return ""


def verdict_line(base: Point, cfg_points: list[Point], cca: Point, expected: RatioRange, where: str = "docs/paper.md") -> str:
    """One line: the main CCA policy's FID against the best CFG scale's and the base model's, and whether both
    ratios lie in the ranges of the recorded runs (`expected`)."""
    best = min(cfg_points, key=lambda p: p.metrics["fid"])
    over_cfg, over_base = cca.metrics["fid"] / best.metrics["fid"], cca.metrics["fid"] / base.metrics["fid"]
    line = (f"CCA without guidance (λ={cca.lam:g}): FID {cca.metrics['fid']:.2f} = {over_cfg:.2f}x the best CFG scale "
            f"(s={best.cfg_scale:g}, FID {best.metrics['fid']:.2f}{_edge_note(best.cfg_scale, [p.cfg_scale for p in cfg_points])}), "
            f"{over_base:.2f}x the base (FID {base.metrics['fid']:.2f}); runs on this machine gave {expected.low:.2f}-"
            f"{expected.high:.2f}x and {expected.base_low:.2f}-{expected.base_high:.2f}x ({where}): ")
    if expected.holds(over_cfg, over_base):
        return line + "a normal run"
    return line + f'outside that range: see {where}, "What make demo prints"'
