"""Evaluation's library part: the sample files in the ADM evaluator's order, the reference images and
statistics scored against, the gather of every rank's samples, and the main process's scoring (Scorer) that
`cca-pipe eval` (stages/eval.py) and `cca-pipe score` (stages/score.py) share.

`settings` below is eval's stage settings (stages/eval.py EvalConfig; this library never imports a stage):
it reads their `feature_extractor`, `inception_weights`, `seeds`, `grid_per_class`, `grid_classes` and
`sampling_settings()`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import file_sha256
from .config import settings_digest
from .device import OutOfMemory, is_out_of_memory
from .distributed import World
from .formats import FormatError, write_sample_batch
from .hub import local_path
from .images import IMAGE_EXTENSIONS, center_crop_arr, open_rgb
from .metrics import (
    FeatureExtractor,
    classify,
    content_hash,
    extract_features,
    fidelity_scores,
    load_classifier,
    load_feature_extractor,
    reference_features,
)
from .outputs import StageDir, atomic_file, read_json, write_json
from .progress import significant
from .report import GRID_CLASSES, grid_canvas, grid_classes, results_table, tile_scale

log = logging.getLogger(__name__)

EvalSettings = Any  # stages/eval.py EvalConfig (see the module docstring)


# Written in each unit's key: files of the class-sorted order (before 2026-12-07) are sampled and scored again.
NPZ_ORDER = "shuffled"


ORDER_STREAM = 0x5A3D  # keeps the order's random stream apart from the samples' own (seeded by the same eval seed)



def sample_order(n: int, seed: int) -> np.ndarray:
    """The order a set of n samples is written and scored in: a permutation seeded by the eval seed (a rerun
    writes the same bytes, another seed another order; every method of a seed the same one, so their rows
    pair up). The sampling order is class by class, and the ADM evaluator's IS averages over contiguous
    splits of 5,000 rows: on a class-sorted file each split would hold 100 classes (docs/imagenet.md)."""
    return np.random.default_rng([ORDER_STREAM, seed]).permutation(n)



def permute_rows(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """rows[:] = rows[order], in place: no second copy of the set (9.8 GB at 50,000 256px images). Follows
    each cycle of the permutation holding one row aside."""
    done = np.zeros(len(order), bool)
    for start in range(len(order)):
        if done[start]:
            continue
        held, i = rows[start].copy(), start
        while True:
            done[i], j = True, order[i]
            if j == start:
                rows[i] = held
                break
            rows[i] = rows[j]
            i = j
    return rows



def save_npz(path: Path, images: np.ndarray, labels: np.ndarray, sample_index: np.ndarray) -> None:
    """ADM-evaluator layout (arr_0 uint8 NHWC images, arr_1 labels, sample_index: pipeline/formats.py), written
    atomically. Same samples => same bytes (np.savez dates its zip entries 1980-01-01)."""
    write_sample_batch(path, images, labels, sample_index)



def save_grid(path: Path, images: np.ndarray, labels: np.ndarray, per_class: int, max_classes: int = GRID_CLASSES) -> None:
    """One row per class (at most `max_classes`, evenly spaced: 1000 classes would make a canvas of gigabytes),
    `per_class` samples each, small tiles upscaled to at least 64 px, grey gaps between tiles."""
    canvas = grid_canvas(images, labels, per_class, grid_classes(labels, max_classes), scale=tile_scale(images.shape[1]),
                         gap=2, fill=128)
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")



@dataclass
class Reference:
    """The real data scored against: images (precision/recall, and FID/sFID when no statistics are given)
    and, from an ADM reference batch, the precomputed statistics of the full training set that FID (mu/sigma)
    and sFID (mu_s/sigma_s) use."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    fid_stats: dict[str, np.ndarray] | None  # {"mu": (D,), "sigma": (D, D)} float64, or None
    source: str
    sfid_stats: dict[str, np.ndarray] | None = None  # the batch's mu_s/sigma_s as {"mu", "sigma"} (2023-d), or None

    def describe(self) -> str:
        text = f"features of the {len(self.images)} reference images of {self.source}"
        if self.fid_stats is not None:
            text = f"precomputed mu/sigma of {self.source} (FID); its {len(self.images)} arr_0 images (precision/recall)"
        if self.sfid_stats is not None:
            text += "; its mu_s/sigma_s (sFID, Inception only)"
        return text

    def digest(self) -> str:
        h = content_hash(self.images)
        for stats in (self.fid_stats, self.sfid_stats):
            for name in ("mu", "sigma"):
                if stats is not None:
                    h += content_hash(np.ascontiguousarray(stats[name]))
        return h



def _batch_stats(f, path: Path, mu: str, sigma: str) -> dict[str, np.ndarray] | None:
    """An ADM batch's (mu, sigma) pair (mu/sigma for FID, mu_s/sigma_s for sFID) as float64, checked; None if absent."""
    if mu not in f or sigma not in f:
        return None
    stats = {"mu": f[mu].astype(np.float64), "sigma": f[sigma].astype(np.float64)}
    if stats["mu"].ndim != 1 or stats["sigma"].shape != (len(stats["mu"]),) * 2:
        raise FormatError(f"reference batch {path}: {mu} {stats['mu'].shape} and {sigma} {stats['sigma'].shape} are not "
                          "(D,) and (D, D) statistics")
    return stats



def load_reference(path: Path, size: int) -> Reference:
    """Real images to score against: a class-folder tree / folder of images (ADM center crop to size), or an
    ADM reference batch `.npz` (arr_0 uint8 NHWC; with `mu`/`sigma`, e.g. VIRTUAL_imagenet256_labeled.npz,
    FID is computed against those statistics, and sFID against `mu_s`/`sigma_s`, as the ADM evaluator does)."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if "arr_0" not in f:
                    raise FormatError(f"reference batch {path} has no arr_0 (expected uint8 N x H x W x 3 images)")
                images = f["arr_0"]
                stats, sfid_stats = _batch_stats(f, path, "mu", "sigma"), _batch_stats(f, path, "mu_s", "sigma_s")
        except (OSError, ValueError, EOFError) as e:
            raise FormatError(f"reference batch {path} is not a readable .npz of arrays ({e}); pass the ADM reference "
                              "batch (e.g. VIRTUAL_imagenet256_labeled.npz) or a folder of images") from e
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise FormatError(f"reference batch {path}: arr_0 is {images.dtype} {images.shape}, expected uint8 N x H x W x 3")
        return Reference(images, stats, str(path), sfid_stats)
    if not path.is_dir():
        raise FileNotFoundError(f"reference images {path} not found (a folder of images or an ADM .npz batch)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"reference folder {path} holds no images")
    out = np.zeros((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        out[i] = np.asarray(center_crop_arr(open_rgb(f, fix="replace or remove it in the reference folder"), size))
    return Reference(out, None, str(path))



def scorer_weights(settings: EvalSettings, classifier_path: Path | None) -> Path:
    """The feature extractor's weights file, with a clear error when it is missing."""
    if settings.feature_extractor == "classifier":
        if classifier_path is None or not classifier_path.is_file():
            raise FileNotFoundError(f"eval.feature_extractor is 'classifier' but the classifier checkpoint {classifier_path} "
                                    "does not exist: run `cca-pipe pretrain-classifier` or pass --classifier")
        return classifier_path
    # a Hub id (hf://org/repo/file[@revision]) is the file in huggingface_hub's cache, as every checkpoint option's
    # (pipeline/hub.py; a HubError is one line naming repo, file and the fix) and recorded in the provenance
    weights = local_path(settings.inception_weights) if settings.inception_weights else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights {settings.inception_weights!r} is not a file. Inception weights cannot be downloaded "
            "here: copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth to this machine and set "
            "eval.inception_weights to its path (or to a Hub id hf://org/repo/file@<commit> of a repo holding it)")
    return weights



@dataclass
class Unit:
    """One resume unit: a method (model + guidance scale) sampled with one seed."""

    name: str  # "base", "cfg_<s>", "cca", "cca_cfg_<s>" (the policy sampled with guidance: CCA+CFG, paper Fig. 5-6)
    model: str  # "base" | "cca": which checkpoint
    scale: float
    seed: int
    lam: float | None = None  # the lambda a lambda-conditioned policy is sampled at

    @property
    def stem(self) -> str:  # names like cfg_1.5_seed0 contain dots: build file names, never Path.with_suffix
        return f"{self.name}_seed{self.seed}"



def gather_samples(images: np.ndarray, total: int, shard_stem: Path, world: World) -> np.ndarray | None:
    """Every rank's share (round robin) of a set of `total` images, in sample order, on the main process (None
    on the others). The other ranks' shares come through files `<shard_stem>.rank<r>.npy` in the output the
    main process prepared (a filesystem every node sees): no collective of the whole set's size."""
    if world.size == 1:
        return images
    shard = lambda r: shard_stem.with_name(f"{shard_stem.name}.rank{r}.npy")  # noqa: E731
    if not world.main:
        with atomic_file(shard(world.rank)) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
    world.barrier()
    if not world.main:
        return None
    full = np.empty((total, *images.shape[1:]), np.uint8)
    full[0 :: world.size] = images
    for r in range(1, world.size):
        full[r :: world.size] = np.load(shard(r), allow_pickle=False)
        shard(r).unlink()
    return full



@dataclass
class Scorer:
    """The main process's part: the feature extractor, the classifier (class accuracy), the reference and
    its features, and the digests of the inputs that key each unit's results in the output being built."""

    settings: EvalSettings
    labels: torch.Tensor
    extractor: FeatureExtractor
    classifier: torch.nn.Module | None
    ref: Reference
    ref_features: dict
    digests: dict[str, str]  # "vq", the models ("base", "cca"), "reference", "extractor"
    work: Path  # the partial output
    committed: Path  # the previous run's output (its finished units are reused)

    def key(self, unit: Unit) -> str:
        """Everything that determines a unit's samples and scores."""
        d = self.digests
        return settings_digest([self.settings.sampling_settings(), d["vq"], d[unit.model], d["reference"], d["extractor"],
                                unit.scale, unit.seed, NPZ_ORDER])

    def finished(self, unit: Unit) -> dict | None:
        return finished_unit(unit, self.key(unit), self.work, self.committed)

    def score(self, unit: Unit, images: np.ndarray, images_per_s: float) -> dict:
        """Save, score and record the unit (atomically: a rerun after an interruption skips it)."""
        scores = score_unit(unit, images, images_per_s, self.settings, self.labels, self.extractor, self.ref_features, self.ref,
                            self.classifier, self.work)
        write_json(self.work / "samples" / f"{unit.stem}.json", {"key": self.key(unit), "scores": scores})
        accuracy = f" acc {scores['class_accuracy']:.3f}" if "class_accuracy" in scores else ""  # no classifier: none
        log.info("seed %d %-8s FID %.3f IS %.3f%s (%s images/s)", unit.seed, unit.name, scores["fid"], scores["is"], accuracy,
                 significant(scores["images_per_s"]))
        return scores



def open_scorer(settings: EvalSettings, claim: StageDir, models, inputs: dict[str, Path], weights: Path,
                classifier_path: Path | None, fidelity_cache: Path | None, device: torch.device) -> Scorer:
    """Load what scores, key the output by every input (`inputs`: "vq", "reference" and the models sampled:
    a sweep-cfg point must not depend on whether a policy exists yet) and open its partial directory."""
    extractor = load_feature_extractor(settings.feature_extractor, weights, device)
    classifier = load_classifier(classifier_path).to(device) if classifier_path and classifier_path.is_file() else None
    some_model = next(iter(models.by_role.values()))
    ref = load_reference(inputs["reference"], settings.resize_to or models.family.image_size(some_model, models.vq))
    digests = {k: file_sha256(v) for k, v in inputs.items() if k != "reference"}
    digests.update(reference=ref.digest(), extractor=extractor.weights_sha256)
    claim.key = settings_digest([settings.sampling_settings(), digests, list(settings.methods)])
    ref_features = reference_features(extractor, ref.images, fidelity_cache or default_fidelity_cache())  # may fail: first
    work = claim.open_partial()
    return Scorer(settings, models.labels, extractor, classifier, ref, ref_features, digests, work, claim.target)



def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)



def finished_unit(unit: Unit, key: str, work: Path, committed: Path) -> dict | None:
    """Scores of a unit already evaluated with this key: in this run's work directory, or in the previous
    run's committed output (linked into the work directory, so the new output holds it too)."""
    for where in (work, committed):
        done = read_json(where / "samples" / f"{unit.stem}.json")
        samples = where / "samples" / f"{unit.stem}.npz"
        if done and done.get("key") == key and samples.is_file():
            if where is committed:
                for suffix in (".npz", ".json"):
                    _link_or_copy(committed / "samples" / f"{unit.stem}{suffix}", work / "samples" / f"{unit.stem}{suffix}")
            return done["scores"]
    return None



def score_unit(unit: Unit, images: np.ndarray, images_per_s: float, settings: EvalSettings, labels: torch.Tensor,
               extractor: FeatureExtractor, ref_features: dict, ref: Reference, classifier, work: Path) -> dict:
    """Save the grid (first seed; sampling order) and the unit's ADM npz, its rows (`images`, permuted in
    place) in sample_order, and score them in that order."""
    labels = labels.numpy()
    if unit.seed == settings.seeds[0] and settings.grid_per_class:
        save_grid(work / "grids" / f"{unit.name}.png", images, labels, settings.grid_per_class, settings.grid_classes)
    order = sample_order(len(images), unit.seed)
    images, labels = permute_rows(images, order), labels[order]
    save_npz(work / "samples" / f"{unit.stem}.npz", images, labels, order)
    scores = score_images(images, labels, extractor, ref_features, ref, classifier, unit.name)
    scores["images_per_s"] = images_per_s
    return scores



def score_images(images: np.ndarray, labels: np.ndarray | None, extractor: FeatureExtractor, ref_features: dict,
                 ref: Reference, classifier, what: str) -> dict:
    """FID (sFID with Inception), IS, precision and recall of uint8 NHWC images in the order given (torch-fidelity's
    IS splits depend on it), and class accuracy against `labels` with a classifier: eval's scores of a unit and
    `cca-pipe score`'s of a file (stages/score.py)."""
    try:
        features = extract_features(extractor, images)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory scoring {what}: the feature extractor ({extractor.name}) runs batches of 256 "
                          "images at 299px (InceptionV3: 3.5 GB in float32 beside the models eval holds; `cca-pipe plan "
                          "--stage eval`): free that memory on the device, or evaluate one model at a time (--methods cca, "
                          "then --methods base,cfg)") from e
    scores = fidelity_scores(extractor, features, ref_features, ref.fid_stats, ref.sfid_stats)
    if classifier is not None and labels is not None:
        scores["class_accuracy"] = float((classify(classifier, images) == labels).mean())
    return scores



def default_fidelity_cache() -> Path:
    """Reference features are a cache (recomputable): the user's cache directory, as torch-fidelity's own:
    $XDG_CACHE_HOME (an absolute path; the XDG spec ignores a relative one), else $HOME/.cache. An empty or
    relative HOME is refused (it would put the cache at /.cache or under the working directory)."""
    from pipeline.config import ConfigError

    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "cca-pipe" / "fidelity"
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        raise ConfigError(f"HOME is {home!r}, not an absolute path, so eval has no cache folder for the reference "
                          "features: pass --fidelity-cache DIR or set XDG_CACHE_HOME to a writable folder")
    return Path.home() / ".cache" / "cca-pipe" / "fidelity"



def format_results(metrics: dict) -> str:
    checks = metrics["checks"]
    text = (f"Mean ± std over seeds {metrics['seeds']}, {metrics['samples_per_method']} samples per method and seed.\n\n"
            + results_table(list(metrics["methods"].items()), first="method"))
    if "cca_fid_over_base_fid" in checks:
        text += f"\nCCA FID / base FID: {checks['cca_fid_over_base_fid']:.3f}"
    if "best_cfg" in checks:
        text += f"; CCA FID / best CFG FID ({checks['best_cfg']}): {checks['cca_fid_over_best_cfg_fid']:.3f}"
    return text + "\n"
