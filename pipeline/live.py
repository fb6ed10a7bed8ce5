"""A stage's metrics as it runs, through DVCLive (docs/imagenet.md, "Watching a run").

    live = LiveLog(run_folder / LIVE_DIR, resume=first_step, total_steps=n, enabled=world.main)
    live.log_step(step, {"loss": ..., "lr": ...}, rows=batch_rows)   # once per step, steps in order
    live.log_summary({"fid": ...})                                   # values without a step (metrics.json)
    live.close()

DVCLive writes `<dir>/plots/metrics/<name>.tsv` (columns step, <name>; one row per logged step, appended as
it goes) and `<dir>/metrics.json` (each metric's latest value and the step): what `dvc plots show`, `dvc exp
show` and DVC's VS Code extension read. `log_step` adds `throughput/rows_per_s` (when given `rows`) and, with
`total_steps`, `eta_s` (seconds left at this process's mean pace): wall-clock figures, so they live here and
never in a stage's own step log, which a resumed run must reproduce exactly.

Resume: `resume=k` continues a run whose steps 0..k-1 are kept (its resume point): rows a killed process
logged past its last resume point are dropped, so the step axis holds each step once, in order. `resume=0`
(or None) starts afresh (DVCLive clears the folder's metrics and plots).

A stage whose output is one file or store that must hold nothing else (negatives' Zarr store, compared byte for
byte) logs beside it, into `live_beside(out)` = `<out>.live`: a DVC out of its own, which `is_live_folder` tells
apart from anything that is not ours.

Mirrors (off by default, never required): "tensorboard" writes the same scalars through
torch.utils.tensorboard into `<dir>/tensorboard`, "wandb" through W&B (offline unless WANDB_MODE says
otherwise) into `<dir>/wandb`. `check_mirrors` refuses, in one line, a mirror whose package is missing.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

from .config import ConfigError
from .outputs import write_text

LIVE_DIR = "live"  # inside a run folder
LIVE_METRICS = "metrics.json"  # DVCLive's summary, in LIVE_DIR (dvc.yaml `metrics:`)
LIVE_PLOTS = "plots/metrics"  # DVCLive's per-metric step files, in LIVE_DIR (dvc.yaml `plots:`)
MIRRORS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # mirror -> the package it needs
LIVE_SUFFIX = ".live"  # live_beside: <out>.live


def live_beside(out: str | os.PathLike) -> Path:
    """The live folder of an output that is a single file or store: `<out>.live`, beside it, outside the output."""
    out = Path(out)
    return out.with_name(out.name + LIVE_SUFFIX)


def is_live_folder(path: Path) -> bool:
    """A folder holding nothing but what LiveLog writes (metrics.json, plots/, the mirrors' folders): ours to rewrite."""
    return path.is_dir() and all(p.name in {LIVE_METRICS, LIVE_PLOTS.split("/")[0], *MIRRORS} for p in path.iterdir())


def check_mirrors(mirrors: dict[str, bool], section: str) -> None:
    """Each enabled mirror's package is importable; else a ConfigError naming the setting and the fix."""
    for name, enabled in mirrors.items():
        if enabled and importlib.util.find_spec(MIRRORS[name]) is None:
            raise ConfigError(f"{section}.{name} is true but the {MIRRORS[name]} package is not installed: "
                              f"`pip install {MIRRORS[name]}`, or set {section}.{name}: false")


def keep_steps_before(folder: Path, step: int) -> None:
    """Drop the rows of step >= `step` from every DVCLive step file under `folder` (a resumed run logs them again)."""
    for path in sorted(folder.rglob("*.tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        at = rows[0].index("step")
        kept = [rows[0], *(r for r in rows[1:] if len(r) > at and int(r[at]) < step)]
        if len(kept) < len(rows):
            write_text(path, "".join("\t".join(r) + os.linesep for r in kept))


def _drop_unreadable_summary(path: Path) -> None:
    """DVCLive rewrites its summary in place (truncate, then write), so a SIGKILL can leave it empty or cut, and
    DVCLive's resume would stop on reading it. Its step is ours to set on resume and its values are the next
    step's, so an unreadable one is removed."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except ValueError:
        path.unlink()


def _files_only_live():
    """DVCLive's Live writing its files only. Its _init_dvc looks up the DVC repo and git for experiments and
    a dvc.yaml of its own, neither of which is used here, and fails outright in a git repo without commits
    (SCMError "Empty git repo", as a fresh `git init; dvc init; dvc repro` is): skipped. Studio still reads
    its own settings from the environment (DVC_STUDIO_TOKEN)."""
    from dvclive import Live  # dvclive imports DVC: only where something is logged

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:
            pass

    return FilesOnlyLive


@contextlib.contextmanager
def _naming(folder: Path):
    """An OSError from DVCLive's writes that names no file (a full disk is raised as the appended file is
    flushed) gets `folder` as its file, so the CLI's one line names the disk (stages/cli.py, _disk_full)."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(folder)) from e


class LiveLog:
    """Per-step metrics of one run through DVCLive, by the main process only (`enabled=False`: nothing is written)."""

    def __init__(self, out_dir: str | os.PathLike, resume: int | None = None, total_steps: int | None = None,
                 mirrors: dict[str, bool] | None = None, enabled: bool = True):
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self._first = resume or 0
        self._started = time.perf_counter()
        self._last = self._started
        self._live = self._tensorboard = self._wandb = None
        if not enabled:
            return
        if self._first and self.dir.is_dir():
            keep_steps_before(self.dir / LIVE_PLOTS, self._first)
            _drop_unreadable_summary(self.dir / LIVE_METRICS)
        # no experiment of its own (a stage under `dvc repro`/`dvc exp run` is DVC's) and no dvc.yaml of its
        # own: the shipped dvc.yaml files declare these files as the stage's plots and metrics
        self._live = _files_only_live()(dir=str(self.dir), resume=bool(self._first), save_dvc_exp=False, dvcyaml=None,
                                        report=None)
        if self._first:
            self._live.step = self._first
        mirrors = mirrors or {}
        if mirrors.get("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=self._first or None)
        if mirrors.get("wandb"):
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network unless the user says so
            (self.dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(dir=str(self.dir / "wandb"), project="cca-pipe", resume="allow",
                                     id=self.dir.resolve().parent.name.replace(".", "-"))

    def log_step(self, step: int, metrics: dict, rows: int | None = None) -> None:
        """One step's numeric metrics (others are skipped), plus rows/s and the ETA."""
        if not self.enabled:
            return
        now = time.perf_counter()
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if rows is not None and now > self._last:
            values["throughput/rows_per_s"] = rows / (now - self._last)
        done = step + 1 - self._first
        if self.total_steps is not None and done > 0:
            values["eta_s"] = (now - self._started) / done * max(self.total_steps - step - 1, 0)
        self._last = now
        self._live.step = step
        with _naming(self.dir / LIVE_PLOTS):
            for name, value in values.items():
                if math.isfinite(value):
                    self._live.log_metric(name, value)
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        self._live.next_step()

    def log_summary(self, metrics: dict) -> None:
        """Values with no step (a run's end, an evaluation point's results) into `<dir>/metrics.json`."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            if isinstance(value, (int, float, str)):
                self._live.log_metric(name, value, plot=False)
        self._summarise()
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})

    def _summarise(self) -> None:
        """metrics.json, with the last step logged (next_step moved past it: Live.end undoes it alike)."""
        if "step" in self._live.summary:
            self._live.step = self._live.summary["step"]
        with _naming(self.dir / LIVE_METRICS):
            self._live.make_summary()

    def close(self) -> None:
        if not self.enabled or self._live is None:
            return
        self._summarise()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._live = None
        self.enabled = False
