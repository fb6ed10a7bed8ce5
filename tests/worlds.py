"""Pieces of the tiny worlds several test modules build (pytest puts tests/ on sys.path, as for conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_reference_images(folder: Path, rng: np.random.Generator, classes: int = 3, per_class: int = 4,
                           size: int = 16) -> Path:
    """An image folder as eval reads a reference: `folder/<class>/<i>.png`, random RGB drawn from `rng`
    class by class (so a caller's later draws from `rng` stay what they were)."""
    for c in range(classes):
        (folder / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / str(c) / f"{i}.png")
    return folder


def invoke(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """Run `cca-pipe argv` in this process, as its console script does (errors become one line and an exit
    status): (exit status, stderr)."""
    from stages import cli

    monkeypatch.setattr(sys, "argv", ["cca-pipe", *map(str, argv)])
    code = 0
    try:
        cli.run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err
