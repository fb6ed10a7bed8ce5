"""Stage `tokenize`: class-folder images -> frozen VQ tokenizer -> Zarr token store.

    cca-pipe tokenize --images data/images/train --vq data/vq/vq.pt --out data/tokens/train.zarr
Format: pipeline/formats.py (tokens (N, A, L) uint16, labels (N,) int32, provenance attributes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import file_sha256
from pipeline.device import autocast
from pipeline.formats import write_token_store
from pipeline.images import list_image_folder, load_images, make_views, to_unit_range, view_names
from pipeline.progress import progress
from pipeline.tokenizers.vq import load_vq

log = logging.getLogger(__name__)


@dataclass
class TokenizeConfig:
    image_size: int = 16
    augment: str = "shift1"  # "none" (A=1) or "shift1" (A=9: every +-1 pixel shift)
    batch_size: int = 256


def run(cfg: TokenizeConfig, images: Path, vq_path: Path, out: Path, device: torch.device) -> None:
    names = view_names(cfg.augment)
    paths, labels, class_names = list_image_folder(images)
    vq = load_vq(vq_path).to(device).eval()
    grid = cfg.image_size // vq.cfg.downsample
    tokens = np.zeros((len(paths), len(names), grid * grid), dtype=np.uint16)
    for start in progress(range(0, len(paths), cfg.batch_size), desc="tokenize", unit="batch"):
        batch = to_unit_range(load_images(paths[start : start + cfg.batch_size], cfg.image_size))
        views = make_views(batch, cfg.augment).flatten(0, 1).to(device)  # (B*A, 3, H, W)
        with torch.inference_mode(), autocast(device):
            codes = vq.encode(views)
        tokens[start : start + len(batch)] = codes.view(len(batch), len(names), -1).cpu().numpy().astype(np.uint16)
    attrs = {
        "tokenizer_sha256": file_sha256(vq_path),
        "codebook_size": vq.cfg.codebook_size,
        "image_size": cfg.image_size,
        "grid": grid,
        "augmentations": names,
        "class_names": class_names,
        "source": str(images),
    }
    fingerprint = write_token_store(out, tokens, labels, attrs)
    log.info("tokenized %d images x %d views x %d tokens -> %s (fingerprint %s)", *tokens.shape, out, fingerprint[:12])
