"""Small helpers shared by stage modules (output files, logging of step metrics)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomic JSON write (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StepLog:
    """Per-step metrics to `metrics.jsonl` and a CSV that `dvc plots` reads (x = step)."""

    def __init__(self, out_dir: str | os.PathLike, name: str = "log"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.name = name

    def __call__(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})

    def save(self) -> None:
        if not self.rows:
            return
        jsonl = self.out_dir / f"{self.name}.jsonl"
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, jsonl)
        csv_path = self.out_dir / f"{self.name}.csv"
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, csv_path)
