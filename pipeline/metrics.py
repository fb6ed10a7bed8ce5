"""Sample-quality metrics through torch-fidelity, with a domain classifier as the feature extractor.

Offline, torch-fidelity's Inception/VGG weights cannot be downloaded, and for 16x16 digits they would
measure the wrong thing anyway. The embedded default therefore trains a small digit classifier on the
training split and registers it with torch-fidelity (`register_feature_extractor`): its penultimate
layer ("features") feeds FID and precision/recall, its logits feed IS. Users with the Inception weights
file pass feature_extractor="inception-v3-compat" and its path instead; the call is the same.

With Inception, sFID (Nash et al. 2021, as the ADM evaluator computes it; Table 3 of the CCA paper) is
reported beside FID: the Frechet distance of the first 7 channels of the `mixed_6/conv` output (17 x 17 x 7
= 2023 features per image, flattened in TF's NHWC order) to the reference batch's `mu_s`/`sigma_s`, or to
the reference images' own spatial features when the reference carries no statistics. The classifier has no
such layer: no sfid is reported with it.
"""

from __future__ import annotations

import errno
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

from .checkpoint import KIND_KEY, CheckpointError, extract_state_dict, load_file, load_strict, save_checkpoint
from .config import build_dataclass
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
    save_checkpoint(path, model.state_dict(), model.cfg.to_dict(), kind="classifier", **extra)


def load_classifier(path: str | os.PathLike) -> ImageClassifier:
    obj = load_file(path)
    if obj.get(KIND_KEY) != "classifier":
        raise CheckpointError(f"{path} is not a cca-pipe classifier checkpoint (kind {obj.get(KIND_KEY)!r})")
    model = ImageClassifier(build_dataclass(ClassifierConfig, obj.get("config"), f"checkpoint {path}: its config", CheckpointError))
    load_strict(model, extract_state_dict(obj, path), path)
    return model.eval()


def _classifier_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity adapter of our classifier: uint8 (B, 3, H, W) -> ("features", "logits")."""

        def __init__(self, name, features_list, model: ImageClassifier):
            super().__init__(name, features_list)
            self.model = model.eval()

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


# ----------------------------------------------------------------------------------------------------
# Scoring with torch-fidelity's extractors and metric functions, but never its loaders or its cache:
# both unpickle with torch.load(weights_only=False) (its Inception weights, its statistics cache), so a
# planted file would run code. We load the weights ourselves (weights_only=True), hand torch-fidelity the
# module, and cache reference features as .npz read with allow_pickle=False.

EXTRACTORS = ("classifier", "inception-v3-compat")


@dataclass
class FeatureExtractor:
    module: torch.nn.Module  # a torch_fidelity FeatureExtractorBase
    layers: dict[str, str]  # metric (isc, fid, prc; sfid with Inception) -> feature layer
    name: str
    weights_sha256: str


SFID_FEATURES = "mixed_6_conv_7"  # the feature layer sFID uses (a plain name: it is a key of the .npz cache)
SFID_CHANNELS = 7  # the ADM evaluator keeps spatial[..., :7] of mixed_6/conv


def sfid_spatial_module(inception: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is TF's `mixed_6/conv:0`. The 2015 graph names its 11 inception blocks mixed,
    mixed_1 .. mixed_10 and torch-fidelity's port Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c in the same
    order, so mixed_6 is Mixed_6d; a block's plain `conv` (no tower) is its 1x1 branch, and BasicConv2d
    returns relu(bn(conv)) as the graph's node does: (B, 192, 17, 17)."""
    return inception.Mixed_6d.branch1x1


def adm_spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(B, 192, 17, 17) NCHW -> (B, 2023): the first 7 channels, flattened in TF's NHWC order (h, w, c) as
    the ADM evaluator's reshape of spatial[..., :7] does (the order matters for nothing but the covariance's
    layout, yet mu_s/sigma_s of the ADM batches are in that layout)."""
    return mixed_6_conv[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1).float()


def _sfid_inception_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class SfidInception(FeatureExtractorBase):
        """torch-fidelity's InceptionV3 plus the sFID features, read with a forward hook (the port's forward
        returns only its own feature list)."""

        def __init__(self, inception: FeatureExtractorInceptionV3):
            super().__init__(inception.name, [*inception.features_list, SFID_FEATURES])
            self.inception = inception
            self._mixed_6_conv: torch.Tensor | None = None
            sfid_spatial_module(inception).register_forward_hook(self._keep)

        def _keep(self, module, inputs, output):
            self._mixed_6_conv = output

        @staticmethod
        def get_provided_features_list():
            return (*FeatureExtractorInceptionV3.get_provided_features_list(), SFID_FEATURES)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return SFID_FEATURES if metric == "sfid" else FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return FeatureExtractorInceptionV3.get_dummy_input_for_compile()

        def forward(self, x):
            features = self.inception(x)
            spatial, self._mixed_6_conv = self._mixed_6_conv, None
            return (*features, adm_spatial_features(spatial))

    return SfidInception


def _inception_module(path: Path, features: list[str]):
    """torch-fidelity's InceptionV3 with weights read safely. Its constructor only takes a file path, which it
    unpickles; we give it a private copy that we wrote from the tensors we loaded with weights_only=True."""
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from .checkpoint import expect_kind

    expect_kind(path, ("inception",), "eval.inception_weights")
    state = extract_state_dict(load_file(path), path)
    with tempfile.TemporaryDirectory() as tmp:
        safe = Path(tmp) / "inception.pt"
        torch.save(state, safe)  # only tensors, written by us
        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=str(safe))
        except RuntimeError as e:
            raise CheckpointError(f"eval.inception_weights {path} does not fit torch-fidelity's InceptionV3: "
                                  f"{' '.join(str(e).split())[:300]}") from e


def load_feature_extractor(kind: str, weights: str | os.PathLike, device: torch.device) -> FeatureExtractor:
    """The evaluator: our digit classifier ("classifier", its checkpoint) or torch-fidelity's Inception-v3
    port of the TF graph the ADM evaluator uses ("inception-v3-compat", its weights file)."""
    from .checkpoint import file_sha256

    weights = Path(weights)
    if kind == "classifier":
        cls = _classifier_extractor_class()
        layers = {m: cls.get_default_feature_layer_for_metric(m) for m in ("isc", "fid", "prc")}
        module = cls(CLASSIFIER_EXTRACTOR, sorted(set(layers.values())), load_classifier(weights))
    elif kind == "inception-v3-compat":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        layers = {m: FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(m) for m in ("isc", "fid", "prc")}
        module = _sfid_inception_class()(_inception_module(weights, sorted(set(layers.values()))))
        layers["sfid"] = SFID_FEATURES
        if device.type == "cpu":  # oneDNN's convolutions and poolings in NHWC: 25% less CPU per image (docs/performance.md)
            module = module.to(memory_format=torch.channels_last)
    else:
        raise ValueError(f"feature extractor {kind!r}: valid are {', '.join(EXTRACTORS)}")
    return FeatureExtractor(module.to(device).eval(), layers, kind, file_sha256(weights))


def extract_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Features of uint8 (N, H, W, 3) images per layer, by torch-fidelity's own loop."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = next(extractor.module.parameters()).device.type == "cuda"
    return get_featuresdict_from_dataset(UInt8Images(images), extractor.module, batch_size, cuda, True, False)


def reference_features(extractor: FeatureExtractor, images: np.ndarray, cache_dir: str | os.PathLike,
                       batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Features of the real images, computed once per (image set, extractor) and cached as
    `<cache_dir>/ref-<images hash>-<extractor>-<weights hash>.npz` (plain arrays, never unpickled)."""
    from .formats import FormatError
    from .outputs import atomic_file

    cache = Path(cache_dir) / f"ref-{content_hash(images)}-{extractor.name}-{extractor.weights_sha256[:16]}.npz"
    layers = sorted(set(extractor.layers.values()))
    if cache.is_file():
        import zipfile

        try:
            with np.load(cache, allow_pickle=False) as f:
                if set(layers) <= set(f.files):  # else written before a layer was scored (sfid): recompute
                    cached = {layer: f[layer] for layer in layers}
                    _check_cached_features(cached, extractor, images, cache)
                    return {layer: torch.from_numpy(v) for layer, v in cached.items()}
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a truncated npz: BadZipFile
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"fidelity statistics cache {cache} is not a file cca-pipe wrote ({type(e).__name__}: {e}); "
                              "delete it and it will be recomputed") from e
    features = extract_features(extractor, images, batch_size)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        (cache.parent / ".gitignore").write_text("# statistics cache, regenerated on demand\n*\n", encoding="utf-8")  # as .pytest_cache does
        with atomic_file(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{layer: features[layer].numpy() for layer in layers})
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        from .outputs import OutputError

        raise OutputError(f"cannot write the fidelity statistics cache {cache.parent} ({e.strerror}: {e.filename}): choose "
                          "a writable cache folder: cca-pipe eval --fidelity-cache DIR, or set XDG_CACHE_HOME") from e
    return {layer: features[layer] for layer in layers}


def _check_cached_features(cached: dict[str, np.ndarray], extractor: FeatureExtractor, images: np.ndarray, cache: Path) -> None:
    """Cached features must be what this extractor gives these images: one finite row per image, as wide as
    its features of the first image (computed now: one forward), else FID would assert or be NaN later."""
    from .formats import FormatError

    first = extract_features(extractor, images[:1])
    for layer, values in cached.items():
        want = (len(images), *first[layer].shape[1:])
        problem = (f"{layer} has shape {values.shape}, not {want}" if values.shape != want else
                   f"{layer} holds {np.size(values) - np.isfinite(values).sum()} non-finite values"
                   if values.dtype.kind == "f" and not np.isfinite(values).all() else None)
        if problem:
            raise FormatError(f"fidelity statistics cache {cache} is damaged ({problem}); delete it and it will be recomputed")


def frechet_distance(metric: str, extractor: FeatureExtractor, generated: torch.Tensor, reference: torch.Tensor,
                     reference_stats: dict[str, np.ndarray] | None) -> float:
    """FID or sFID (`metric`) by torch-fidelity's Frechet distance: generated features (N, D) against the
    reference features' statistics, or against `reference_stats` ({"mu", "sigma"}: e.g. an ADM batch's
    mu/sigma or mu_s/sigma_s), then in float64 as the ADM evaluator."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    if reference_stats is None and min(len(generated), len(reference)) >= 2 and \
            len(generated) * len(reference) <= generated.shape[1] ** 2:
        return frechet_distance_of_few(generated.numpy(), reference.numpy())
    stats = fid_features_to_statistics(generated)
    if reference_stats is None:
        ref_stats = fid_features_to_statistics(reference)
    else:
        if reference_stats["mu"].shape != stats["mu"].shape:
            label = {"fid": "FID", "sfid": "sFID"}[metric]
            raise ValueError(f"the reference {label} statistics have {reference_stats['mu'].shape[0]} dimensions but the "
                             f"{extractor.name} extractor's {label} features {stats['mu'].shape[0]}: use the extractor they "
                             "were computed with (the ADM batches: eval.feature_extractor inception-v3-compat)")
        stats = {k: v.astype(np.float64) for k, v in stats.items()}
        ref_stats = {k: reference_stats[k].astype(np.float64) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(stats, ref_stats, False)["frechet_inception_distance"])


def frechet_distance_of_few(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """The Frechet distance of two feature sets (N1, D), (N2, D) with N1 * N2 <= D^2, in float64, without a D x D
    matrix: the same quantity as torch-fidelity's fid_statistics_to_metric of their statistics (np.cov, ddof 1).

    Why not torch-fidelity's: its trace term takes the eigenvalues of sigma1 @ sigma2 (D = 2048 for Inception: 2.2 s
    of a core per FID, the bulk of a small eval's scoring). With centred features X1, X2 the covariances are
    X1^T X1 / (N1 - 1) and X2^T X2 / (N2 - 1), and the nonzero eigenvalues of their product are the squared singular
    values of X1 X2^T / sqrt((N1 - 1)(N2 - 1)), an N1 x N2 matrix: tr sqrt(sigma1 sigma2) is its nuclear norm, exactly.
    (The eigenvalue route also sums the square roots of its rounding noise on the D - N zero eigenvalues: the two
    agree to ~1e-6 relative, tests/test_fid_protocol.py.)"""
    x1, x2 = features_1.astype(np.float64), features_2.astype(np.float64)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    x1, x2 = x1 - mu1, x2 - mu2
    n1, n2 = len(x1) - 1, len(x2) - 1
    tr_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / math.sqrt(n1 * n2)
    diff = mu1 - mu2
    return float(diff @ diff + (x1 * x1).sum() / n1 + (x2 * x2).sum() / n2 - 2 * tr_covmean)


def fidelity_scores(extractor: FeatureExtractor, generated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    reference_stats: dict[str, np.ndarray] | None = None,
                    reference_sfid_stats: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """FID, IS, precision, recall (and sFID when the extractor has its layer: Inception) of generated against
    reference features, by torch-fidelity's functions with its default settings (10 IS splits, shuffled with
    seed 2020; 3-NN precision/recall).

    `reference_stats` ({"mu", "sigma"}, e.g. an ADM reference batch's full-train statistics): FID is the
    Frechet distance to those instead of to the reference features'; `reference_sfid_stats` (the batch's
    mu_s/sigma_s as {"mu", "sigma"}) likewise for sFID."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    layer = extractor.layers
    isc = isc_features_to_metric(generated[layer["isc"]], DEFAULTS["isc_splits"], DEFAULTS["samples_shuffle"], DEFAULTS["rng_seed"])
    scores = {"fid": frechet_distance("fid", extractor, generated[layer["fid"]], reference[layer["fid"]], reference_stats)}
    if "sfid" in layer:
        scores["sfid"] = frechet_distance("sfid", extractor, generated[layer["sfid"]], reference[layer["sfid"]],
                                          reference_sfid_stats)
    precision, recall = calculate_precision_recall_part(generated[layer["prc"]], reference[layer["prc"]],
                                                        DEFAULTS["prc_neighborhood"], DEFAULTS["prc_batch_size"])
    return {**scores, "is": float(isc["inception_score_mean"]), "precision": float(precision), "recall": float(recall)}
