"""Stage `pretrain-classifier` (embedded default only): the evaluator's feature extractor.

    cca-pipe pretrain-classifier --train data/images/train --test data/images/test --out data/classifier/classifier.pt
A small CNN trained on the training split; registered with torch-fidelity by `eval` (FID/PR on its
penultimate features, IS on its logits), since Inception weights cannot be downloaded offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import owned_checkpoint
from pipeline.config import check_ranges, setting
from pipeline.images import list_image_folder, load_images
from pipeline.metrics import ClassifierConfig, classify, save_classifier, train_classifier
from pipeline.outputs import Claim, stage_json, write_json, written_by
from pipeline.pretraining import random_shift

from .cli.params import as_params

log = logging.getLogger(__name__)


@dataclass
class PretrainClassifierConfig:
    image_size: int = setting(16, ge=4)
    width: int = setting(32, ge=1)
    feature_dim: int = setting(64, ge=1)
    epochs: int = setting(15, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(3e-3, gt=0.0)
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self, "pretrain_classifier")


def run(cfg: PretrainClassifierConfig, train: Path, test: Path, out: Path, device: torch.device) -> None:
    """Writes `out` and `metrics.json` beside it; both must be absent or ours."""
    metrics = out.with_name("metrics.json")
    with Claim(out, what="cca-pipe pretrain-classifier", owned=owned_checkpoint("classifier"),
               sidecars={metrics: written_by("pretrain-classifier")}) as claim:
        _pretrain(cfg, train, test, out, metrics, device)
        claim.committed = True


def _pretrain(cfg: PretrainClassifierConfig, train: Path, test: Path, out: Path, metrics: Path, device: torch.device) -> None:
    paths, labels, class_names = list_image_folder(train)
    model_cfg = ClassifierConfig(image_size=cfg.image_size, num_classes=len(class_names), width=cfg.width, feature_dim=cfg.feature_dim)
    model = train_classifier(
        load_images(paths, cfg.image_size), labels, model_cfg, epochs=cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, seed=cfg.seed, device=device, augment=random_shift,
    )
    test_paths, test_labels, _ = list_image_folder(test)
    accuracy = float((classify(model, load_images(test_paths, cfg.image_size)) == test_labels).mean())
    save_classifier(out, model.cpu(), class_names=class_names, settings=as_params(cfg))
    write_json(metrics, stage_json("pretrain-classifier", {"test_accuracy": accuracy}))
    log.info("classifier test accuracy %.4f -> %s", accuracy, out)
