"""DDO's negatives: the reference's own samples for the labels of real rows (docs/ddo.md, "Negatives").

Fake i of a set drawn with `seed` is drawn from its own stream (pipeline.sampling.sample_uniforms), so the
set is the same however its rows are split over batches or processes. With `reencode` the samples are
decoded to uint8 pixels and encoded again by the tokenizer, as the released script scores re-encoded tokens
(docs/ddo.md): the fakes then lie in the token space tokenize gives the real rows (the same encoder call).
"""

from __future__ import annotations

import numpy as np
import torch

from .sampling import generate_images
from .tokenizers.encode import encode_views


def draw_fakes(family, model, tokenizer, labels: torch.Tensor, indices: list[int], *, seed: int, batch_size: int,
               reencode: bool, **sampler) -> np.ndarray:
    """uint16 (len(labels), L) fakes: sample indices[i] of the set drawn with `seed` for labels[i], with the
    family's sampler (`sampler`: cfg_scale, temperature, top_k, top_p, cfg_schedule), re-encoded or not."""
    seq_len = int(model.cfg.seq_len)
    if not len(labels):
        return np.zeros((0, seq_len), np.uint16)
    device = next(model.parameters()).device
    images, codes = generate_images(family, model, tokenizer, labels, seed=seed, batch_size=batch_size, indices=indices,
                                    **sampler)
    if not reencode:
        return codes.numpy().astype(np.uint16)
    parts = [encode_views(tokenizer, torch.from_numpy(images[s : s + batch_size])[:, None], device)[:, 0]
             for s in range(0, len(images), batch_size)]
    return np.concatenate(parts)
