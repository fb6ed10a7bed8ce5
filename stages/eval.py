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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.images import list_image_folder, load_images, to_uint8
from pipeline.metrics import classify, fidelity_metrics, load_classifier, register_classifier_extractor
from pipeline.models.llamagen import load_gpt
from pipeline.progress import progress
from pipeline.sampling import generate_images
from pipeline.tokenizers.vq import load_vq

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
    top_p: float = 1.0
    batch_size: int = 500
    grid_per_class: int = 8


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
        cells = [f"{m[k]:.3f} ± {m[k + '_std']:.3f}" if k != "images_per_s" else f"{m[k]:.0f}" for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def run(cfg: EvalConfig, vq_path: Path, base_path: Path, policy_path: Path, reference: Path,
        classifier_path: Path, out: Path, device: torch.device) -> dict:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    vq = load_vq(vq_path).to(device).eval()
    models = {"base": load_gpt(base_path).to(device).eval(), "cca": load_gpt(policy_path).to(device).eval()}
    classifier = load_classifier(classifier_path).to(device)
    extractor = register_classifier_extractor()
    ref_paths, _, _ = list_image_folder(reference)
    image_size = vq.cfg.downsample * int(round(models["base"].cfg.block_size ** 0.5))
    ref_images = load_images(ref_paths, image_size)
    num_classes = models["base"].cfg.num_classes
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    methods = [("base", "base", 0.0)] + [(f"cfg_{s:g}", "base", s) for s in cfg.cfg_scales] + [("cca", "cca", 0.0)]

    per_seed: dict[str, list[dict]] = {name: [] for name, _, _ in methods}
    for seed in cfg.seeds:
        for name, model_key, scale in progress(methods, desc=f"eval seed {seed}", unit="method"):
            started = time.perf_counter()
            images, _ = generate_images(
                models[model_key], vq, labels, seed=seed, batch_size=cfg.batch_size, cfg_scale=scale,
                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            )
            seconds = time.perf_counter() - started
            images = to_uint8(images)
            np.savez(out / "samples" / f"{name}_seed{seed}.npz", arr_0=images, arr_1=labels.numpy())
            if seed == cfg.seeds[0]:
                save_grid(out / "grids" / f"{name}.png", images, labels.numpy(), cfg.grid_per_class)
            scores = fidelity_metrics(
                images, ref_images, feature_extractor=extractor, weights_path=str(classifier_path),
                cache_root=out / "fidelity_cache", cuda=device.type == "cuda",
            )
            scores["class_accuracy"] = float((classify(classifier, images) == labels.numpy()).mean())
            scores["images_per_s"] = len(images) / seconds
            per_seed[name].append(scores)
            log.info("seed %d %-8s FID %.3f IS %.3f acc %.3f (%.0f images/s)", seed, name, scores["fid"], scores["is"],
                     scores["class_accuracy"], scores["images_per_s"])

    summary = {
        name: {
            **{k: float(np.mean([r[k] for r in runs])) for k in METRIC_KEYS},
            **{f"{k}_std": float(np.std([r[k] for r in runs])) for k in METRIC_KEYS},
        }
        for name, runs in per_seed.items()
    }
    cfg_names = [n for n in summary if n.startswith("cfg_")]
    best_cfg = min(cfg_names, key=lambda n: summary[n]["fid"]) if cfg_names else None
    checks = {"cca_fid_over_base_fid": summary["cca"]["fid"] / summary["base"]["fid"]}
    if best_cfg:
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
            + results_table(metrics["methods"])
            + f"\nCCA FID / base FID: {checks['cca_fid_over_base_fid']:.3f}")
    if "best_cfg" in checks:
        text += f"; CCA FID / best CFG FID ({checks['best_cfg']}): {checks['cca_fid_over_best_cfg_fid']:.3f}"
    return text + "\n"
