"""Pieces of the tiny worlds several test modules build (pytest puts tests/ on sys.path, as for conftest)."""

from __future__ import annotations

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
