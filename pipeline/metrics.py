"""Sample-quality metrics through torch-fidelity, with a domain classifier as the feature extractor.

Offline, torch-fidelity's Inception/VGG weights cannot be downloaded, and for 16x16 digits they would
measure the wrong thing anyway. The embedded default therefore trains a small digit classifier on the
training split and registers it with torch-fidelity (`register_feature_extractor`): its penultimate
layer ("features") feeds FID and precision/recall, its logits feed IS. Users with the Inception weights
file pass feature_extractor="inception-v3-compat" and its path instead; the call is the same.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, extract_state_dict, load_file, load_strict, save_checkpoint
from .progress import progress

CLASSIFIER_EXTRACTOR = "cca-pipe-classifier"


@dataclass
class ClassifierConfig:
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


class ImageClassifier(nn.Module):
    """Small CNN: 3 convs -> feature_dim embedding (FID/PR features) -> logits (IS, class accuracy)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.embed = nn.Linear(8 * w, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        self.dropout = nn.Dropout(0.3)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images float (B, 3, H, W) in [-1, 1] -> (features (B, D), logits (B, K))."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            images = F.interpolate(images, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        features = self.embed(self.convs(images))
        return features, self.head(self.dropout(F.relu(features)))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: ClassifierConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> ImageClassifier:
    """Cross-entropy on uint8 (N, H, W, 3) images, optional augmentation per batch."""
    from .images import to_unit_range

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ImageClassifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    x_all, y_all = to_unit_range(images), torch.from_numpy(labels.astype(np.int64))
    steps = epochs * math.ceil(len(x_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in progress(range(epochs), desc="pretrain-classifier"):
        order = torch.randperm(len(x_all), generator=gen)
        for start in range(0, len(x_all), batch_size):
            idx = order[start : start + batch_size]
            x = x_all[idx]
            if augment is not None:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x.to(device))[1], y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: ImageClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class per uint8 (N, H, W, 3) image."""
    from .images import to_unit_range

    device = next(model.parameters()).device
    preds = [model(to_unit_range(images[i : i + batch_size]).to(device))[1].argmax(-1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)


def save_classifier(path: str | os.PathLike, model: ImageClassifier, **extra) -> None:
    save_checkpoint(path, model.state_dict(), model.cfg.to_dict(), family="classifier", **extra)


def load_classifier(path: str | os.PathLike) -> ImageClassifier:
    obj = load_file(path)
    if obj.get("family") != "classifier":
        raise CheckpointError(f"{path} is not a cca-pipe classifier checkpoint (family {obj.get('family')!r})")
    model = ImageClassifier(ClassifierConfig(**obj["config"]))
    load_strict(model, extract_state_dict(obj, path), path)
    return model.eval()


def _classifier_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity adapter: uint8 (B, 3, H, W) -> ("features", "logits")."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path (the classifier checkpoint)")
            self.model = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            features, logits = self.model(x.float() / 127.5 - 1.0)
            out = {"features": features, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    return ClassifierFeatureExtractor


def register_classifier_extractor() -> str:
    """Register the classifier with torch-fidelity once per process; returns its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, _classifier_extractor_class())
    return CLASSIFIER_EXTRACTOR


class UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity input: uint8 (N, H, W, 3) numpy -> uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def content_hash(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).data).hexdigest()[:16]


def fidelity_metrics(
    generated: np.ndarray,
    reference: np.ndarray,
    *,
    feature_extractor: str,
    weights_path: str,
    cache_root: str | os.PathLike,
    cuda: bool = False,
    batch_size: int = 256,
) -> dict[str, float]:
    """FID, IS, precision, recall of uint8 (N, H, W, 3) generated images against reference images.

    The reference statistics are cached by torch-fidelity under a name that includes a content hash of
    the reference images and of the extractor weights, so a changed set never reuses stale statistics.
    """
    import torch_fidelity

    from .checkpoint import file_sha256

    key = f"ref-{content_hash(reference)}-{feature_extractor}-{file_sha256(weights_path)[:16]}"
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    (cache_root / ".gitignore").write_text("# statistics cache, regenerated on demand\n*\n")  # as .pytest_cache does
    result = torch_fidelity.calculate_metrics(
        input1=UInt8Images(generated),
        input2=UInt8Images(reference),
        isc=True, fid=True, prc=True,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights_path,
        input2_cache_name=key,
        cache_root=str(cache_root),
        cuda=cuda, batch_size=batch_size, verbose=False,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
    )
    return {
        "fid": float(result["frechet_inception_distance"]),
        "is": float(result["inception_score_mean"]),
        "precision": float(result["precision"]),
        "recall": float(result["recall"]),
    }
