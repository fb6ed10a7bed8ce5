"""Stage `eval`: sample, decode and score the base model (without and with CFG) and the CCA policy.

    cca-pipe eval --vq data/vq/vq.pt --base data/ar/gpt.pt --policy data/train/policy.pt \
                  --reference data/images/test --classifier data/classifier/classifier.pt --out data/eval
Methods: `base` (no guidance), `cfg_<s>` (base with guidance l_c + s (l_c - l_u); LlamaGen's
cfg-scale = 1 + s), `cca` (the policy, no guidance). Each is sampled with every seed in eval.seeds and
scored with torch-fidelity (FID, IS, precision, recall) against the held-out reference images, plus
class accuracy (the classifier's agreement with the intended label) and sampling throughput.
Writes metrics.json (mean and std over seeds), results.md, grids/<method>.png, samples/<method>_seed<k>.npz
(ADM-evaluator layout: arr_0 uint8 NHWC images, arr_1 intended labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.checkpoint import file_sha256
from pipeline.families import image_size as family_image_size
from pipeline.families import load_model, load_tokenizer
from pipeline.images import IMAGE_EXTENSIONS, center_crop_arr, to_uint8
from pipeline.metrics import classify, content_hash, fidelity_metrics, load_classifier, register_classifier_extractor
from pipeline.progress import progress
from pipeline.sampling import generate_images
from pipeline.tokenizers.msvq import MSVQModel

from .common import write_json

log = logging.getLogger(__name__)

METRIC_KEYS = ("fid", "is", "precision", "recall", "class_accuracy", "images_per_s")


@dataclass
class EvalConfig:
    samples_per_class: int = 100
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    cfg_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0  # 1.0 (LlamaGen) or 0.0 (VAR): off
    cfg_schedule: str = "constant"  # guidance t per step: "constant" s, or "linear" s * si/(S-1) (VAR's, CFGv2; VAR only)
    batch_size: int = 500
    grid_per_class: int = 8
    num_classes: int = 0  # 0: every class of the model
    image_size: int = 0  # 0: the checkpoint's own; with a named gpt model, its resolution (256 or 384)
    resize_to: int = 0  # resize samples before scoring/export (LlamaGen: 384 -> 256); 0: keep
    feature_extractor: str = "classifier"  # or "inception-v3-compat" (needs inception_weights)
    inception_weights: str = ""  # path of weights-inception-2015-12-05-6726825d.pth


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM-evaluator layout (arr_0 uint8 NHWC images, arr_1 labels), written atomically."""
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, arr_0=images, arr_1=labels)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_grid(path: Path, images: np.ndarray, labels: np.ndarray, per_class: int, scale: int = 4, gap: int = 2) -> None:
    """One row per class, `per_class` samples each, upscaled `scale`x (nearest), grey gaps between tiles."""
    h, w = images.shape[1] * scale, images.shape[2] * scale
    classes = np.unique(labels)
    grid = np.full((len(classes) * (h + gap) + gap, per_class * (w + gap) + gap, 3), 128, np.uint8)
    for r, c in enumerate(classes):
        for k, image in enumerate(images[labels == c][:per_class]):
            y, x = gap + r * (h + gap), gap + k * (w + gap)
            grid[y : y + h, x : x + w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def results_table(summary: dict[str, dict]) -> str:
    head = "| method | FID | IS | precision | recall | class acc. | images/s |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for name, m in summary.items():
        cells = ["n/a" if k not in m else f"{m[k]:.0f}" if k == "images_per_s" else f"{m[k]:.3f} ± {m[k + '_std']:.3f}"
                 for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def load_reference(path: Path, size: int) -> np.ndarray:
    """Real images to score against: a class-folder tree / folder of images (ADM center crop to size), or an
    ADM reference batch `.npz` (arr_0 uint8 NHWC, e.g. VIRTUAL_imagenet256_labeled.npz)."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"reference batch {path} has no arr_0 (expected uint8 N x H x W x 3 images)")
            images = f["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"reference batch {path}: arr_0 is {images.dtype} {images.shape}, expected uint8 N x H x W x 3")
        return images
    if not path.is_dir():
        raise FileNotFoundError(f"reference images {path} not found (a folder of images or an ADM .npz batch)")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"reference folder {path} holds no images")
    out = np.zeros((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            out[i] = np.asarray(center_crop_arr(im.convert("RGB"), size))
    return out


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """LlamaGen's evaluation resize (e.g. 384 -> 256): bicubic on [-1, 1] floats."""
    if size <= 0 or images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


def scorer(cfg: EvalConfig, classifier_path: Path | None) -> tuple[str, str]:
    """(torch-fidelity feature extractor name, its weights file), with a clear error when the file is missing."""
    if cfg.feature_extractor == "classifier":
        if classifier_path is None or not classifier_path.is_file():
            raise FileNotFoundError(f"eval.feature_extractor is 'classifier' but the classifier checkpoint {classifier_path} "
                                    "does not exist: run `cca-pipe pretrain-classifier` or pass --classifier")
        return register_classifier_extractor(), str(classifier_path)
    if cfg.feature_extractor == "inception-v3-compat":
        weights = Path(cfg.inception_weights) if cfg.inception_weights else None
        if weights is None or not weights.is_file():
            raise FileNotFoundError(
                f"eval.inception_weights {cfg.inception_weights!r} is not a file. Inception weights cannot be downloaded "
                "here: copy torch-fidelity's weights-inception-2015-12-05-6726825d.pth to this machine and set "
                "eval.inception_weights to its path")
        return "inception-v3-compat", str(weights)
    raise ValueError(f"eval.feature_extractor {cfg.feature_extractor!r}: valid are 'classifier', 'inception-v3-compat'")


METHODS = ("base", "cfg", "cca")


def run(cfg: EvalConfig, vq_path: Path, base_path: Path | None, policy_path: Path | None, reference: Path,
        classifier_path: Path | None, out: Path, device: torch.device,
        gpt_model: str | None = None, vq_model: str | None = None,
        methods: tuple[str, ...] = METHODS, fidelity_cache: Path | None = None, depth: int | None = None) -> dict:
    """Evaluate `methods`: base (no guidance), cfg (base at each eval.cfg_scales), cca (the policy).
    Either family: with VAR, `vq_path` is the VQVAE (it decodes, and its quantiser builds VAR's input)."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"unknown eval methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    extractor, weights = scorer(cfg, classifier_path)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    vq = load_tokenizer(vq_path, vq_model).to(device).eval()
    grid = cfg.image_size // vq.cfg.downsample if cfg.image_size else None
    quantizer = vq.quantize if isinstance(vq, MSVQModel) else None  # VAR: reuse the loaded VQVAE's, no re-read
    models = {}
    if {"base", "cfg"} & set(methods):
        models["base"] = load_model(base_path, gpt_model=gpt_model, seq_len=grid * grid if grid else None, vae=quantizer,
                                    depth=depth).to(device).eval()
    if "cca" in methods:
        models["cca"] = load_model(policy_path, vae=quantizer, depth=depth).to(device).eval()
    some_model = next(iter(models.values()))
    classifier = load_classifier(classifier_path).to(device) if classifier_path and classifier_path.is_file() else None
    image_size = family_image_size(some_model, vq)
    ref_images = load_reference(reference, cfg.resize_to or image_size)
    num_classes = cfg.num_classes or some_model.cfg.num_classes
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    plan = ([("base", "base", 0.0)] if "base" in methods else []) \
        + ([(f"cfg_{s:g}", "base", s) for s in cfg.cfg_scales] if "cfg" in methods else []) \
        + ([("cca", "cca", 0.0)] if "cca" in methods else [])
    cache_root = fidelity_cache or out / "fidelity_cache"

    # Resume unit: one (method, seed). Its samples (.npz) and scores (.json) are written atomically, keyed
    # by everything that determines them, so a rerun after an interruption skips finished units.
    paths = {"vq": vq_path, "base": base_path, "cca": policy_path, "extractor": Path(weights)}
    digests = {k: file_sha256(v) if v is not None and Path(v).is_file() else str(v) for k, v in paths.items()}
    digests["reference"] = content_hash(ref_images)
    per_seed: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for seed in cfg.seeds:
        for name, model_key, scale in progress(plan, desc=f"eval seed {seed}", unit="method"):
            # names like cfg_1.5_seed0 contain dots: build the file names, never Path.with_suffix
            samples_file, done = out / "samples" / f"{name}_seed{seed}.npz", out / "samples" / f"{name}_seed{seed}.json"
            key = hashlib.sha256(json.dumps([asdict(cfg), digests["vq"], digests[model_key], digests["reference"],
                                             digests["extractor"], scale, seed]).encode()).hexdigest()
            if done.is_file() and samples_file.is_file() and json.loads(done.read_text()).get("key") == key:
                per_seed[name].append(json.loads(done.read_text())["scores"])
                log.info("seed %d %-8s already evaluated (%s), reusing it", seed, name, done)
                continue
            started = time.perf_counter()
            images, _ = generate_images(
                models[model_key], vq, labels, seed=seed, batch_size=cfg.batch_size, cfg_scale=scale,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, cfg_schedule=cfg.cfg_schedule,
            )
            seconds = time.perf_counter() - started
            images = to_uint8(resize_images(images, cfg.resize_to))
            save_npz(samples_file, images, labels.numpy())
            if seed == cfg.seeds[0]:
                save_grid(out / "grids" / f"{name}.png", images, labels.numpy(), cfg.grid_per_class)
            scores = fidelity_metrics(images, ref_images, feature_extractor=extractor, weights_path=weights,
                                      cache_root=cache_root, cuda=device.type == "cuda")
            if classifier is not None:
                scores["class_accuracy"] = float((classify(classifier, images) == labels.numpy()).mean())
            scores["images_per_s"] = len(images) / seconds
            per_seed[name].append(scores)
            write_json(done, {"key": key, "scores": scores})
            log.info("seed %d %-8s FID %.3f IS %.3f acc %.3f (%.0f images/s)", seed, name, scores["fid"], scores["is"],
                     scores.get("class_accuracy", float("nan")), scores["images_per_s"])

    summary = {
        name: {
            **{k: float(np.mean([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
            **{f"{k}_std": float(np.std([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
        }
        for name, runs in per_seed.items()
    }
    cfg_names = [n for n in summary if n.startswith("cfg_")]
    best_cfg = min(cfg_names, key=lambda n: summary[n]["fid"]) if cfg_names else None
    checks = {}
    if "cca" in summary and "base" in summary:
        checks["cca_fid_over_base_fid"] = summary["cca"]["fid"] / summary["base"]["fid"]
    if "cca" in summary and best_cfg:
        checks["best_cfg"] = best_cfg
        checks["cca_fid_over_best_cfg_fid"] = summary["cca"]["fid"] / summary[best_cfg]["fid"]
    metrics = {"methods": summary, "checks": checks, "seeds": list(cfg.seeds), "samples_per_method": len(labels),
               "per_seed": per_seed}
    write_json(out / "metrics.json", metrics)
    (out / "results.md").write_text(format_results(metrics))
    return metrics


def format_results(metrics: dict) -> str:
    checks = metrics["checks"]
    text = (f"Mean ± std over seeds {metrics['seeds']}, {metrics['samples_per_method']} samples per method and seed.\n\n"
            + results_table(metrics["methods"]))
    if "cca_fid_over_base_fid" in checks:
        text += f"\nCCA FID / base FID: {checks['cca_fid_over_base_fid']:.3f}"
    if "best_cfg" in checks:
        text += f"; CCA FID / best CFG FID ({checks['best_cfg']}): {checks['cca_fid_over_best_cfg_fid']:.3f}"
    return text + "\n"
