"""`cca-pipe score`: FID, sFID, IS, precision and recall of a sample file made anywhere, as eval scores its own.

    cca-pipe score samples.npz --reference VIRTUAL_imagenet256_labeled.npz [--classifier clf.pt] [--json out.json]

`samples.npz` is an ADM-evaluator sample batch (arr_0 uint8 N x H x W x 3: the release's own npz, another
sampler's, or eval's samples/<method>_seed<k>.npz). It is scored by eval's own code (pipeline/evaluation.py
load_reference and score_images, pipeline/metrics.py) with eval's settings (params.yaml's eval section:
feature_extractor, inception_weights) and the same reference-feature cache, its rows in the file's order:
scoring eval's npz gives eval's numbers. Class accuracy too when a classifier is given and the file has arr_1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.evaluation import default_fidelity_cache, load_reference, score_images, scorer_weights
from pipeline.formats import FormatError, read_sample_batch
from pipeline.hub import inputs_record
from pipeline.metrics import load_classifier, load_feature_extractor, reference_features
from pipeline.outputs import write_json
from pipeline.report import results_table

from .eval import EvalConfig

log = logging.getLogger(__name__)


def run(settings: EvalConfig, samples: Path, reference: Path, classifier_path: Path | None, device: torch.device,
        fidelity_cache: Path | None = None, json_out: Path | None = None) -> dict:
    """Score `samples` against `reference` (an ADM reference batch or a folder of real images, center-cropped
    to the samples' size) -> {"samples", "num_samples", "reference", "feature_extractor", "scores"} and, when
    any was read from the Hub, "hub_inputs" (the reference, the extractor's weights, the classifier); also
    written to `json_out` when given."""
    weights = scorer_weights(settings, classifier_path)
    if not samples.is_file():
        raise FileNotFoundError(f"samples {samples} not found: pass an ADM sample batch .npz (arr_0 uint8 N x H x W x 3)")
    images, labels = read_sample_batch(samples, labels=classifier_path is not None)
    ref = load_reference(reference, images.shape[1])
    if ref.images.shape[1:3] != images.shape[1:3]:
        h, w = ref.images.shape[1:3]
        raise FormatError(f"samples {samples}: arr_0 holds {images.shape[1]} x {images.shape[2]} images but the reference "
                          f"{reference} {h} x {w}: resize the samples to {h} x {w} before saving (eval does it with "
                          "eval.resize_to; LlamaGen's 384px samples are scored at 256)")
    extractor = load_feature_extractor(settings.feature_extractor, weights, device)
    classifier = load_classifier(classifier_path).to(device) if classifier_path is not None else None
    ref_features = reference_features(extractor, ref.images, fidelity_cache or default_fidelity_cache())
    scores = score_images(images, labels, extractor, ref_features, ref, classifier, str(samples))
    result = {"samples": str(samples), "num_samples": len(images), "reference": ref.describe(),
              "feature_extractor": extractor.name, "scores": scores}
    # the Hub files read ({repo, file, revision, commit}: pipeline/hub.py), each once (the classifier may be the extractor)
    if hub := inputs_record(*dict.fromkeys(p for p in (reference, weights, classifier_path) if p is not None)):
        result["hub_inputs"] = hub
    if json_out is not None:
        write_json(json_out, result)
    log.info("scored %d images of %s", len(images), samples)
    return result


def format_scores(result: dict) -> str:
    return (f"{result['num_samples']} images of {result['samples']}; {result['feature_extractor']} features; "
            f"reference: {result['reference']}.\n\n" + results_table([(Path(result["samples"]).name, result["scores"])],
                                                                      first="samples"))
