"""Stage `prepare` (embedded default only): scikit-learn's digits as an ImageNet-style folder tree.

    cca-pipe prepare --out data/images
writes data/images/{train,test}/<digit>/<index>.png (RGB, image_size x image_size); the test split is
held out for evaluation.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.digits import write_digits

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    image_size: int = 16
    test_fraction: float = 0.2
    seed: int = 0


def run(cfg: PrepareConfig, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = write_digits(tmp, cfg.image_size, cfg.test_fraction, cfg.seed)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("wrote %d train and %d test images to %s", counts["train"], counts["test"], out)
