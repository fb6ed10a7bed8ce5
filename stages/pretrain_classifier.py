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

from pipeline.images import list_image_folder, load_images
from pipeline.metrics import ClassifierConfig, classify, save_classifier, train_classifier
from pipeline.pretraining import random_shift

from .common import write_json

log = logging.getLogger(__name__)


@dataclass
class PretrainClassifierConfig:
    image_size: int = 16
    width: int = 32
    feature_dim: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def run(cfg: PretrainClassifierConfig, train: Path, test: Path, out: Path, device: torch.device) -> None:
    paths, labels, class_names = list_image_folder(train)
    model_cfg = ClassifierConfig(image_size=cfg.image_size, num_classes=len(class_names), width=cfg.width, feature_dim=cfg.feature_dim)
    model = train_classifier(
        load_images(paths, cfg.image_size), labels, model_cfg, epochs=cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, seed=cfg.seed, device=device, augment=random_shift,
    )
    test_paths, test_labels, _ = list_image_folder(test)
    accuracy = float((classify(model, load_images(test_paths, cfg.image_size)) == test_labels).mean())
    save_classifier(out, model.cpu(), class_names=class_names)
    write_json(out.with_name("metrics.json"), {"test_accuracy": accuracy})
    log.info("classifier test accuracy %.4f -> %s", accuracy, out)
