"""Computing the reference log-prob cache: the frozen model runs once over every training row.

For each row the view and the negative label are fixed here (seeded), so every training run of a
sweep sees the same pairs, and the cached values are exactly what the loss needs (formats.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .device import OutOfMemory, autocast, is_out_of_memory
from .logprobs import sequence_logp
from .progress import progress

NEGATIVES = ("other", "roll")


def draw_pairs(labels: np.ndarray, num_views: int, num_classes: int, seed: int, views: str = "one",
               negatives: str = "other") -> dict[str, np.ndarray]:
    """The cache's rows: which token-store row and view each uses, and its negative label.

    views="one": one cache row per image with a seeded random view; views="all": one cache row per
    (image, view), so an epoch sees every augmentation once. negatives="other": uniform over the other
    classes (!= label), drawn per cache row; "roll": the released scripts' torch.roll(labels, -1), as
    closely as a cache allows: the cache rows in a seeded global permutation, each row's negative is the
    label of the next row in it; where that equals the row's own label the row is a positive twice
    (pipeline.losses; the scripts' `shuffled_c_indices == c_indices`).
    """
    rng = np.random.default_rng(seed)
    n, labels = len(labels), labels.astype(np.int64)
    if views == "one":
        rows = np.arange(n)
        view = rng.integers(0, num_views, size=n)
    elif views == "all":
        rows = np.repeat(np.arange(n), num_views)
        view = np.tile(np.arange(num_views), n)
    else:
        raise ValueError(f"unknown views mode {views!r}; valid: 'one', 'all'")
    row_labels = labels[rows]
    if negatives == "other":
        neg = (row_labels + rng.integers(1, num_classes, size=len(rows))) % num_classes
    elif negatives == "roll":
        order = rng.permutation(len(rows))
        neg = np.empty_like(row_labels)
        neg[order] = row_labels[np.roll(order, -1)]
    else:
        raise ValueError(f"unknown negatives rule {negatives!r}; valid: {', '.join(NEGATIVES)}")
    return {
        "row": rows.astype(np.int64),
        "label": row_labels.astype(np.int32),
        "neg_label": neg.astype(np.int32),
        "view": view.astype(np.int16),
    }


@torch.inference_mode()
def reference_logps(
    model, tokens: np.ndarray, pairs: dict[str, np.ndarray], batch_size: int, device: torch.device,
    forwards: int | None = None,
) -> dict[str, np.ndarray]:
    """log p(x|c), log p(x|c_neg), log p(x|null) per cache row (float64 from float32 sums).

    One forward per batch covers all three conditions (the batch is the rows tiled three times).
    `forwards`: run exactly this many forwards, the extra ones on the first batch, their results dropped:
    a sharded (FSDP) model's processes must all run each forward together, whatever their share of rows.
    """
    model.eval()
    n = len(pairs["row"])
    out = {k: np.zeros(n, dtype=np.float64) for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null")}
    starts = list(range(0, n, batch_size))
    if forwards is not None:
        if forwards < len(starts):
            raise ValueError(f"{forwards} forwards cannot cover {len(starts)} batches")
        starts += [None] * (forwards - len(starts))
    for start in progress(starts, desc="reflogp", unit="batch"):
        padding = start is None
        part = slice(0, min(batch_size, n)) if padding else slice(start, min(start + batch_size, n))
        b = part.stop - part.start
        x = torch.from_numpy(np.asarray(tokens[pairs["row"][part], pairs["view"][part]]).astype(np.int64)).to(device)
        conds = np.concatenate([pairs["label"][part], pairs["neg_label"][part], np.full(b, model.cfg.null_class)])
        try:
            with autocast(device):
                logp = sequence_logp(model, torch.from_numpy(conds.astype(np.int64)).to(device), x.repeat(3, 1))
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise OutOfMemory(f"out of memory computing {3 * b} sequences per forward: lower reflogp.batch_size "
                              f"(now {batch_size}; part_rows must stay a multiple of it)") from e
        if padding:
            continue
        logp = logp.double().cpu().numpy()
        for i, key in enumerate(out):
            out[key][part] = logp[i * b : (i + 1) * b]
    return out
