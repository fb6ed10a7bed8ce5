"""Stage `eval`: sample, decode and score the base model (without and with CFG) and the CCA policy.

    cca-pipe eval --vq data/vq/vq.pt --base data/ar/gpt.pt --policy data/train/policy.pt \
                  --reference data/images/test --classifier data/classifier/classifier.pt --out data/eval
Methods: `base` (no guidance), `cfg_<s>` (base with guidance l_c + s (l_c - l_u); LlamaGen's
cfg-scale = 1 + s), `cca` (the policy, no guidance), `cca_cfg_<s>` (the policy with guidance: CCA+CFG,
paper Fig. 5-6; its training kept the unconditional rows). Each is sampled with every seed in eval.seeds and
scored with torch-fidelity (FID, IS, precision, recall) against the held-out reference images, plus
class accuracy (the classifier's agreement with the intended label) and sampling throughput.
Writes metrics.json (mean and std over seeds; `sampled`: each method's model, cfg_scale and lam as numbers),
results.md, grids/<method>.png, samples/<method>_seed<k>.npz (ADM-evaluator layout: arr_0 uint8 NHWC images,
arr_1 intended labels, rows in a seeded random order: sample_order). Every rank samples its share of each unit;
the main process alone scores (Scorer), the rows in the file's order: `cca-pipe score` of the file gives its numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting, settings_digest
from pipeline.device import OutOfMemory, is_out_of_memory
from pipeline.distributed import World
from pipeline.families import FamilyContract, Model, ModelSource, Tokenizer, load_model, load_tokenizer
from pipeline.formats import FormatError, write_sample_batch
from pipeline.images import IMAGE_EXTENSIONS, center_crop_arr, open_rgb
from pipeline.metrics import (
    FeatureExtractor,
    classify,
    content_hash,
    extract_features,
    fidelity_scores,
    load_classifier,
    load_feature_extractor,
    reference_features,
)
from pipeline.outputs import StageDir, atomic_file, read_json, write_json, write_text
from pipeline.progress import SampleCounter, StepCounter, progress, significant
from pipeline.report import GRID_CLASSES, grid_canvas, grid_classes, results_table, tile_scale
from pipeline.sampling import generate_images

from .params import save_settings

log = logging.getLogger(__name__)

METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall", "class_accuracy", "images_per_s")  # sfid: Inception only
METHODS = ("base", "cfg", "cca", "cca_cfg")
DEFAULT_METHODS = ("base", "cfg", "cca")  # cca_cfg on request: the CCA+CFG experiment


@dataclass
class EvalConfig:
    samples_per_class: int = setting(100, ge=1)
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], nonempty=True, unique=True, ge=0)
    # base (no guidance), cfg (base at each cfg_scales), cca (the policy), cca_cfg (the policy at each cfg_scales);
    # `--methods` overrides it
    methods: list[str] = setting(default_factory=lambda: list(DEFAULT_METHODS), nonempty=True, unique=True, choices=METHODS)
    cfg_scales: list[float] = setting(default_factory=lambda: [1.0], unique=True, gt=0.0)  # s > 0 (s = 0 is `base`)
    # a lambda-conditioned policy (train.lambda_conditioning) is sampled at each of these: methods cca_lam<lambda>
    lambdas: list[float] = setting(default_factory=list, unique=True, gt=0.0)
    temperature: float = setting(1.0, gt=0.0)
    top_k: int = setting(0, ge=0)
    top_p: float = setting(1.0, ge=0.0, le=1.0)  # 1.0 (LlamaGen) or 0.0 (VAR): off
    # guidance t per step: "constant" s, or "linear" s * si/(S-1) (VAR's, CFGv2; VAR only)
    cfg_schedule: str = setting("constant", choices=("constant", "linear"))
    batch_size: int = setting(500, ge=1)
    grid_per_class: int = setting(8, ge=0)
    grid_classes: int = setting(GRID_CLASSES, ge=1)  # rows of grids/<method>.png: every class up to this, else evenly spaced
    num_classes: int = setting(0, ge=0)  # 0: every class of the model
    image_size: int = setting(0, ge=0)  # 0: the checkpoint's own; with a named gpt model, its resolution (256 or 384)
    resize_to: int = setting(0, ge=0)  # resize samples before scoring/export (LlamaGen: 384 -> 256); 0: keep
    feature_extractor: str = setting("classifier", choices=("classifier", "inception-v3-compat"))  # inception needs inception_weights
    inception_weights: str = ""  # path of weights-inception-2015-12-05-6726825d.pth (or .safetensors)

    def __post_init__(self) -> None:
        check_ranges(self, "eval")
        # here, not in the eval stage: every stage builds this config first, so tokenize already refuses it
        for guided in ("cfg", "cca_cfg"):
            if guided in self.methods and not self.cfg_scales:
                raise ConfigError(f"eval.methods includes {guided} but eval.cfg_scales is empty: list the guidance scales to "
                                  f"evaluate (e.g. eval.cfg_scales: [1.0], or --cfg-scale 1.0), or drop {guided} from "
                                  "eval.methods (or --methods)")
        if self.lambdas and "cca_cfg" in self.methods:
            raise ConfigError("eval.lambdas samples a lambda-conditioned policy, which is evaluated without guidance: "
                              "drop cca_cfg from eval.methods (or --methods), or empty eval.lambdas")

    def sampling_settings(self) -> dict:
        """The settings that determine a unit's samples and scores (its resume key): not which methods are
        evaluated (adding one reuses the units of the others) nor which classes its grid shows."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "grid_classes")}


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


def scorer_weights(settings: EvalConfig, classifier_path: Path | None) -> Path:
    """The feature extractor's weights file, with a clear error when it is missing."""
    if settings.feature_extractor == "classifier":
        if classifier_path is None or not classifier_path.is_file():
            raise FileNotFoundError(f"eval.feature_extractor is 'classifier' but the classifier checkpoint {classifier_path} "
                                    "does not exist: run `cca-pipe pretrain-classifier` or pass --classifier")
        return classifier_path
    weights = Path(settings.inception_weights) if settings.inception_weights else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights {settings.inception_weights!r} is not a file. Inception weights cannot be downloaded "
            "here: copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth to this machine and set "
            "eval.inception_weights to its path")
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


def plan_units(settings: EvalConfig) -> list[Unit]:
    """Every (method, scale, seed) of eval.methods, seed-major (the first seed's units write the grids)."""
    methods = settings.methods
    per_seed = ([("base", "base", 0.0, None)] if "base" in methods else []) \
        + ([(f"cfg_{s:g}", "base", s, None) for s in settings.cfg_scales] if "cfg" in methods else []) \
        + ([("cca", "cca", 0.0, None)] if "cca" in methods and not settings.lambdas else []) \
        + ([(f"cca_lam{lam:g}", "cca", 0.0, lam) for lam in settings.lambdas] if "cca" in methods else []) \
        + ([(f"cca_cfg_{s:g}", "cca", s, None) for s in settings.cfg_scales] if "cca_cfg" in methods else [])
    return [Unit(name, model, scale, seed, lam) for seed in settings.seeds for name, model, scale, lam in per_seed]


# ---------------------------------------------------------------------------------------------- every rank: sampling


@dataclass
class EvalModels:
    """What every rank samples with: the tokenizer, the models the units sample ("base", "cca"), on this
    rank's device, and the labels of each unit's set in sampling order (eval.samples_per_class of each class,
    class by class; the file's order is shuffled when it is written: sample_order)."""

    family: FamilyContract
    vq: Tokenizer
    by_role: dict[str, Model]
    labels: torch.Tensor


def on_device(model: torch.nn.Module, device: torch.device, role: str) -> torch.nn.Module:
    """The model on `device` in eval mode, or one clear error if it does not fit there: sampling is not
    sharded (one token at a time with KV caches; FSDP is train's and reflogp's strategy)."""
    try:
        return model.to(device).eval()
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        gigabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        raise OutOfMemory(f"{role} ({gigabytes:.1f} GB of weights) does not fit on {device} beside what is already there: eval "
                          "holds each model whole on every GPU (sampling is not sharded; train.strategy / reflogp.strategy "
                          "fsdp are for training and scoring). Evaluate one model at a time (--methods cca, then "
                          "--methods base,cfg) or use GPUs with more memory") from e


def check_eval_classes(settings: EvalConfig, classes: int, role: str, path: Path | None) -> None:
    """eval.num_classes must be classes the model knows; also `cca-pipe check`'s, from the file's shapes."""
    if settings.num_classes > classes:
        raise ValueError(f"eval.num_classes = {settings.num_classes} but {role} {path} has {classes} classes: "
                         f"set eval.num_classes to at most {classes} (0: every class of the model)")


def check_models_fit(models: dict, roles: dict[str, tuple[str, Path | None]], vq, vq_path: Path, settings: EvalConfig) -> None:
    """Before any sampling: every model's codes must be ones the tokenizer decodes, and eval.num_classes
    classes the model knows (else an IndexError after the first batch was drawn)."""
    for name, model in models.items():
        role, path = roles[name]
        if model.cfg.vocab_size > vq.cfg.codebook_size:
            raise ValueError(f"{role} {path} draws codes from a vocabulary of {model.cfg.vocab_size} but the tokenizer {vq_path} "
                             f"decodes only {vq.cfg.codebook_size}: pass the tokenizer the model was trained with (--vq)")
        check_eval_classes(settings, model.cfg.num_classes, role, path)
    counts = {name: model.cfg.num_classes for name, model in models.items()}
    if not settings.num_classes and len(set(counts.values())) > 1:  # 0 means the first model's classes: an IndexError
        (a, b) = sorted(counts, key=counts.get)[:2]
        raise ValueError(f"{roles[a][0]} {roles[a][1]} has {counts[a]} classes but {roles[b][0]} {roles[b][1]} has "
                         f"{counts[b]}: compare models of the same classes (the policy fine-tuned from the base), or set "
                         f"eval.num_classes to at most {counts[a]} to sample their first {counts[a]} classes")


def check_lambda_conditioning(policy: torch.nn.Module, policy_path: Path | None, settings: EvalConfig) -> None:
    """eval.lambdas lists the lambdas a lambda-conditioned policy is sampled at; any other policy takes none."""
    conditioned = policy.cfg.lambda_conditioning
    if conditioned != bool(settings.lambdas) or (conditioned and "cca_cfg" in settings.methods):
        raise ValueError(f"--policy {policy_path} is {'' if conditioned else 'not '}lambda-conditioned but eval.lambdas "
                         f"is {settings.lambdas}: list the lambdas to sample a lambda-conditioned policy at (and only "
                         "for one, without cca_cfg)")


def load_models(settings: EvalConfig, units: list[Unit], vq_path: Path, vq_model: str | None, paths: dict[str, Path | None],
                source: ModelSource, device: torch.device) -> EvalModels:
    """The tokenizer and the models of `units` (`paths`: "base" -> --base, "cca" -> --policy), checked to fit
    together. The tokenizer is passed on: VAR builds its input with the loaded VQVAE's quantiser (no re-read)."""
    family, vq = load_tokenizer(vq_path, vq_model)
    vq = vq.to(device).eval()
    layout = family.sampling_layout(vq, settings.image_size) if settings.image_size else None
    models = {}
    if any(u.model == "base" for u in units):
        models["base"] = on_device(load_model(paths["base"], "--base", source, layout=layout, tokenizer=vq)[1], device, "--base")
    if any(u.model == "cca" for u in units):
        models["cca"] = on_device(load_model(paths["cca"], "--policy", source.for_own_checkpoint(), tokenizer=vq)[1], device,
                                  "--policy")
        check_lambda_conditioning(models["cca"], paths["cca"], settings)
    check_models_fit(models, {"base": ("--base", paths["base"]), "cca": ("--policy", paths["cca"])}, vq, vq_path, settings)
    num_classes = settings.num_classes or next(iter(models.values())).cfg.num_classes
    return EvalModels(family, vq, models, torch.arange(num_classes).repeat_interleave(settings.samples_per_class))


def sample_unit(unit: Unit, models: EvalModels, settings: EvalConfig, work: Path, world: World) -> tuple[np.ndarray, float] | None:
    """Draw the unit's samples, this rank its share (sample i from its own stream: the set is the same for
    any number of processes); on the main process -> (all images uint8 in sample order, images/s)."""
    labels = models.labels
    mine = world.share(list(range(len(labels))))
    started = time.perf_counter()
    counter = SampleCounter(len(labels), world.size, desc=f"{unit.name} seed {unit.seed}")
    steps = StepCounter(models.family.step_unit, desc="batch")
    try:
        images, _ = generate_images(
            models.family, models.by_role[unit.model], models.vq, labels[mine], seed=unit.seed,
            batch_size=settings.batch_size, indices=mine, on_batch=counter, on_step=steps, resize_to=settings.resize_to,
            cfg_scale=unit.scale,
            lam=unit.lam, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, cfg_schedule=settings.cfg_schedule,
        )
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory sampling or decoding {unit.name} on {world.device} with eval.batch_size = {settings.batch_size} "
                          f"({'2 x ' if unit.scale else ''}{settings.batch_size} sequences with KV caches, then {settings.batch_size} images "
                          f"decoded at once): lower eval.batch_size, e.g. to {max(1, settings.batch_size // 2)}; `cca-pipe plan "
                          "--stage eval` gives the memory of each part (the images drawn are kept on the host)") from e
    finally:
        steps.close()
        counter.close()
    seconds = max(world.gather(time.perf_counter() - started))
    full = gather_samples(images, len(labels), work / "samples" / f".{unit.stem}", world)
    return None if full is None else (full, len(labels) / seconds)


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


def evaluate_units(units: list[Unit], models: EvalModels, settings: EvalConfig, scorer: Scorer | None, work: Path,
                   world: World) -> dict[str, list[dict]]:
    """Every unit in turn, on every rank: the main process (`scorer`) says whether it was evaluated already,
    else every rank draws its share and the main process scores the set. -> each method's scores per seed (on
    the main process; empty on the others)."""
    per_seed: dict[str, list[dict]] = {}
    for unit in progress(units, desc="eval", unit="unit"):
        scores = world.broadcast(scorer.finished(unit) if scorer else None)
        if scores is not None:
            log.info("seed %d %-8s already evaluated, reusing it", unit.seed, unit.name)
        else:
            drawn = sample_unit(unit, models, settings, work, world)
            scores = scorer.score(unit, *drawn) if scorer else None
        if scorer:
            per_seed.setdefault(unit.name, []).append(scores)
    return per_seed


# ------------------------------------------------------------------------------------- main process only: scoring


@dataclass
class Scorer:
    """The main process's part: the feature extractor, the classifier (class accuracy), the reference and
    its features, and the digests of the inputs that key each unit's results in the output being built."""

    settings: EvalConfig
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


def open_scorer(settings: EvalConfig, claim: StageDir, models: EvalModels, inputs: dict[str, Path], weights: Path,
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


def score_unit(unit: Unit, images: np.ndarray, images_per_s: float, settings: EvalConfig, labels: torch.Tensor,
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


def summarise(per_seed: dict[str, list[dict]], units: list[Unit], seeds: list[int], samples_per_method: int,
              reference: str) -> dict:
    """Mean and std over seeds per method, what each method sampled (its model, guidance scale and lambda:
    numbers, not parsed back from its name), and CCA's FID relative to the base model's and the best CFG's."""
    summary = {
        name: {
            **{k: float(np.mean([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
            **{f"{k}_std": float(np.std([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
        }
        for name, runs in per_seed.items()
    }
    sampled = {u.name: {"model": u.model, "cfg_scale": u.scale, "lam": u.lam} for u in units}
    cfg_names = [n for n in summary if n.startswith("cfg_")]
    best_cfg = min(cfg_names, key=lambda n: summary[n]["fid"]) if cfg_names else None
    checks = {}
    if "cca" in summary and "base" in summary:
        checks["cca_fid_over_base_fid"] = summary["cca"]["fid"] / summary["base"]["fid"]
    if "cca" in summary and best_cfg:
        checks["best_cfg"] = best_cfg
        checks["cca_fid_over_best_cfg_fid"] = summary["cca"]["fid"] / summary[best_cfg]["fid"]
    return {"methods": summary, "sampled": sampled, "checks": checks, "seeds": list(seeds),
            "samples_per_method": samples_per_method, "fid_reference": reference, "per_seed": per_seed,
            "npz_order": {"order": NPZ_ORDER, "permutation_seed": "the set's eval seed (stages/eval.py sample_order)",
                          "sample_index": "each npz's array: row i is sample sample_index[i] of the sampling order"}}


# ------------------------------------------------------------------------------------------------------------ the stage


def run(settings: EvalConfig, vq_path: Path, base_path: Path | None, policy_path: Path | None, reference: Path,
        classifier_path: Path | None, out: Path, source: ModelSource = ModelSource(), vq_model: str | None = None,
        fidelity_cache: Path | None = None, world: World | None = None) -> dict | None:
    """Evaluate eval.methods: base (no guidance), cfg (base at each eval.cfg_scales), cca (the policy), cca_cfg.
    Either family: with VAR, `vq_path` is the VQVAE (it decodes, and its quantiser builds VAR's input).
    `source`: how to read the base model (--gpt-model, --depth). `out` must be absent, empty or an eval
    directory of ours; it is built in `<out>.partial`. Under torchrun (`world`) every rank samples its share
    of each unit; the main process alone scores and writes, and returns the metrics (the others None)."""
    world = world or World()
    units = plan_units(settings)
    weights = scorer_weights(settings, classifier_path)
    with world.main_only(StageDir(out, "eval")) as claim:
        paths = {"base": base_path, "cca": policy_path}
        models = load_models(settings, units, vq_path, vq_model, paths, source, world.device)
        inputs = {"vq": vq_path, **{role: paths[role] for role in models.by_role}, "reference": reference}
        scorer = open_scorer(settings, claim, models, inputs, weights, classifier_path, fidelity_cache, world.device) \
            if world.main else None
        world.barrier()  # the others write their shards into the partial the main process prepared
        per_seed = evaluate_units(units, models, settings, scorer, claim.partial, world)
        if scorer is None:
            return None
        metrics = summarise(per_seed, units, settings.seeds, len(models.labels), scorer.ref.describe())
        write_json(claim.partial / "metrics.json", metrics)
        write_text(claim.partial / "results.md", format_results(metrics))
        save_settings(claim.partial, "eval", settings)
        claim.commit()
    return metrics


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
