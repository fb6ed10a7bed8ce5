"""Stage `prepare` (embedded default only): scikit-learn's digits as an ImageNet-style folder tree.

    cca-pipe prepare --out data/images
writes data/images/{train,test}/<digit>/<index>.png (RGB, image_size x image_size); the test split is
held out for evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import check_ranges, setting
from pipeline.digits import write_digits
from pipeline.outputs import StageDir

from .cli.params import save_settings

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    image_size: int = setting(16, ge=8)
    test_fraction: float = setting(0.2, gt=0.0, lt=1.0)
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self, "prepare")


def run(cfg: PrepareConfig, out: Path) -> None:
    """`out` must be absent, empty or a prepare output of ours; written beside it and moved in at the end."""
    with StageDir(out, "prepare") as claim:
        claim.discard_partial()  # cheap to redo: never resumed
        counts = write_digits(claim.open_partial(), cfg.image_size, cfg.test_fraction, cfg.seed)
        save_settings(claim.partial, "prepare", cfg)
        claim.commit()
    log.info("wrote %d train and %d test images to %s", counts["train"], counts["test"], out)
