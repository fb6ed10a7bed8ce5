"""Images to codes: what tokenize computes per batch (its stage, stages/tokenize.py, reads, batches and writes)."""

from __future__ import annotations

import numpy as np
import torch

from ..device import OutOfMemory, is_out_of_memory


def encode_views(vq, views: torch.Tensor, device: torch.device) -> np.ndarray:
    """uint8 (B, A, H, W, 3) views -> uint16 codes (B, A, L), in float32 as LlamaGen's extract_codes_c2i.py."""
    try:
        x = views.flatten(0, 1).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0  # (B*A, 3, H, W) in [-1, 1]
        with torch.inference_mode():
            return vq.encode(x).view(views.shape[0], views.shape[1], -1).cpu().numpy().astype(np.uint16)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise encode_out_of_memory(views.shape, device) from e


def encode_out_of_memory(shape: tuple[int, ...], device: torch.device) -> OutOfMemory:
    batch, views, size = shape[0], shape[1], shape[2]
    return OutOfMemory(f"out of memory on {device} encoding {batch} images x {views} views = {batch * views} per forward at "
                       f"{size}px: lower tokenize.batch_size, e.g. to {max(1, batch // 2)} (tokenize.chunk_rows must stay a "
                       "multiple of it); `cca-pipe plan --stage tokenize` gives the memory of a batch")
