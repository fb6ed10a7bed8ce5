"""Small helpers shared by stage modules (logging of step metrics)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from pipeline.outputs import write_text


class StepLog:
    """Per-step metrics to `<name>.jsonl` and a CSV that `dvc plots` reads (x = step)."""

    def __init__(self, out_dir: str | os.PathLike, name: str = "log"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.name = name

    @staticmethod
    def owns(path: Path) -> bool:
        """Whether an existing file is a step log (a CSV or JSONL whose first record starts with "step")."""
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except (OSError, UnicodeDecodeError):
            return False
        return first.startswith("step,") or first.startswith('{"step":')

    def __call__(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})

    def save(self) -> None:
        if not self.rows:
            return
        write_text(self.out_dir / f"{self.name}.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.out_dir / f"{self.name}.csv", text.getvalue())
