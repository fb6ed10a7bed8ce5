"""A DDO batch's loss from a policy forward and reference log-probs, cached or online (docs/ddo.md).

Row k of a batch pairs a real sequence x (under its label c) with x_fake, a sample the reference drew for c,
or with r such samples (negatives.ratio r > 1: the fake term is then their mean, pipeline.losses.ddo_loss).
The reference's part is 2 + r log-probs per row, computed once (the cache) or at every step (online) by
the same forward: log p_ref(x|c), log p_ref(x_fake_j|c) per fake and log p_ref(x|null), which a null-label
row reads in place of the first. The pair shares the null-label mask, as the released script does; a masked row's fake
term has weight 0 (pipeline.losses.ddo_loss), so its fake is not forwarded at all (the script forwards and
zero-weights it: the same loss and gradient). With reference dropout, each sequence's masks are keyed by
(seed, cache row, role) as in pipeline.refcache: real "pos", fake "fake" (fake j: slot j,
pipeline.models.layers.noise_keys), real under null "null".

Train reads it with train.loss ddo (pipeline.alignment.AlignmentRun), from a DDO cache (reflogp --negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device import autocast
from .formats import cached_fake_columns, fake_columns
from .logprobs import sequence_logp
from .losses import LossOutput, ddo_loss
from .refcache import ReferenceNoise, row_keys


@dataclass
class DDOBatch:
    rows: np.ndarray  # (B,) cache rows: the reference's dropout keys are a function of them
    real: torch.Tensor  # (B, L) real tokens
    fake: torch.Tensor  # (B, r, L) the reference's r samples for labels[k] (r = 1: the released script's pairing)
    labels: torch.Tensor  # (B,) c: the real row's class, which its fakes were drawn for
    labels_real: torch.Tensor  # (B,) c, or the null class where uncond
    uncond: torch.Tensor  # (B,) bool: the row's null-label mask, shared by its fakes
    ref_logp_real: torch.Tensor  # (B,) float64 log p_ref(x|c), or log p_ref(x|null) where uncond
    ref_logp_fake: torch.Tensor  # (B, r) float64 log p_ref(x_fake_j|c); 0 where uncond (weight 0: never read)
    dropout_keys: torch.Tensor | None = None  # (B + B r,) int64 the policy's keys of the real then the fake
    # sequences (row by row, slot by slot: pipeline.alignment.visit_keys with slots r)


def _slots(fake: torch.Tensor) -> torch.Tensor:
    """Fakes (B, L) (one per row) or (B, r, L) -> (B, r, L)."""
    return fake.unsqueeze(1) if fake.dim() == 2 else fake


def fake_row_keys(noise: ReferenceNoise, cache_rows: np.ndarray, ratio: int, device: torch.device) -> torch.Tensor | None:
    """The reference's dropout keys (B, r) of the cache rows' fakes (role "fake", slot j in column j); None in eval mode."""
    if not noise.active:
        return None
    return torch.stack([row_keys(noise, cache_rows, device, ("fake",), j) for j in range(ratio)], dim=1)


def score_sequences(model, tokens: list[torch.Tensor], labels: torch.Tensor, device: torch.device,
                    keys: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | label) of the sequences of `tokens` (tensors (B_i, L), concatenated) in one forward: labels and
    keys (sum B_i,) -> (sum B_i,) float32."""
    x = torch.cat(tokens).to(device)
    with autocast(device):
        return sequence_logp(model, labels.to(device), x, dropout_keys=None if keys is None else keys.to(device))


@torch.inference_mode()
def reference_columns(model, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor, batch_size: int,
                      device: torch.device, noise: ReferenceNoise = ReferenceNoise(), first_row: int = 0
                      ) -> dict[str, np.ndarray]:
    """The cache's part: ref_logp_pos, the fake columns (formats.fake_columns(r)) and ref_logp_null, float64 per
    row, from real (N, L) and fake (N, L) or (N, r, L) tokens and labels (N,). Row i is cache row first_row + i,
    whose masks (noise active: `model` has the rates set) are the same whatever the batch."""
    fake = _slots(fake)
    ratio = fake.shape[1]
    model.train(noise.active)
    null = torch.full_like(labels, model.cfg.null_class)
    parts = []
    for start in range(0, len(real), batch_size):
        part = slice(start, start + batch_size)
        cache_rows = first_row + np.arange(start, min(start + batch_size, len(real)))
        keys = None  # real|c, each slot's fake|c, real|null
        if noise.active:
            keys = torch.cat([row_keys(noise, cache_rows, device, ("pos",)),
                              fake_row_keys(noise, cache_rows, ratio, device).T.reshape(-1),
                              row_keys(noise, cache_rows, device, ("null",))])
        logp = score_sequences(model, [real[part], *fake[part].unbind(1), real[part]],
                               torch.cat([labels[part].repeat(ratio + 1), null[part]]), device, keys)
        parts.append(logp.view(ratio + 2, -1).double().cpu())
    model.eval()
    out = torch.cat(parts, dim=1).numpy()
    return dict(zip(("ref_logp_pos", *fake_columns(ratio), "ref_logp_null"), out, strict=True))


def make_ddo_batch(rows: np.ndarray, real: torch.Tensor, fake: torch.Tensor, cache: dict[str, np.ndarray],
                   uncond: np.ndarray, null_class: int, dropout_keys: torch.Tensor | None = None) -> DDOBatch:
    """A batch of cache rows `rows` from the cached columns (`label`, ref_logp_pos / null and the fake columns);
    real (B, L) and fake (B, L) or (B, r, L) are those rows' tokens, r the cache's fake columns."""
    labels = cache["label"][rows].astype(np.int64)
    fake, columns = _slots(fake), cached_fake_columns(cache)
    if fake.shape[1] != len(columns):
        raise ValueError(f"{fake.shape[1]} fakes per row, but the cache has {len(columns)} fake columns")
    ref_fake = np.stack([cache[name][rows] for name in columns], axis=1)
    return DDOBatch(
        rows=np.asarray(rows), real=real, fake=fake, labels=torch.from_numpy(labels),
        labels_real=torch.from_numpy(np.where(uncond, null_class, labels)),
        uncond=torch.from_numpy(np.asarray(uncond, dtype=bool)),
        ref_logp_real=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_pos"][rows])),
        ref_logp_fake=torch.from_numpy(np.where(np.asarray(uncond)[:, None], 0.0, ref_fake)),
        dropout_keys=dropout_keys,
    )


def _split(logp: torch.Tensor, batch: DDOBatch, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B + C r,) from score_sequences over the real rows and the C conditional rows' fakes -> real (B,) and
    fake (B, r), masked rows' fake entries taken from `fill` (B, r) (no gradient)."""
    real, fake = logp.split([len(batch.real), len(logp) - len(batch.real)])
    cond = (~batch.uncond).to(fake.device)[:, None].expand(fill.shape)
    return real, fill.to(fake.dtype).masked_scatter(cond, fake)


def _forward(model, batch: DDOBatch, device: torch.device, keys_real: torch.Tensor | None,
             keys_fake: torch.Tensor | None, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real rows (under labels_real) and the conditional rows' fakes (under their c) in one forward;
    keys_fake (B, r)."""
    cond = ~batch.uncond
    ratio = batch.fake.shape[1]
    keys = None if keys_real is None else torch.cat([keys_real, keys_fake[cond.to(keys_fake.device)].reshape(-1)])
    logp = score_sequences(model, [batch.real, batch.fake[cond].flatten(0, 1)],
                           torch.cat([batch.labels_real, batch.labels[cond].repeat_interleave(ratio)]), device, keys)
    return _split(logp, batch, fill.to(device))


@torch.no_grad()
def with_online_reference(reference, batch: DDOBatch, device: torch.device,
                          noise: ReferenceNoise = ReferenceNoise()) -> DDOBatch:
    """The batch with its reference log-probs from a frozen second model forwarded now (the released script's
    design) instead of the cache: the same masks as the cache's rows (noise, batch.rows)."""
    keys = row_keys(noise, batch.rows, device, ("pos", "null"))
    if keys is not None:
        pos, null = keys.view(2, -1)
        keys_real = torch.where(batch.uncond.to(device), null, pos)
        keys_fake = fake_row_keys(noise, batch.rows, batch.fake.shape[1], device)
    else:
        keys_real = keys_fake = None
    reference.train(noise.active)
    real, fake = _forward(reference, batch, device, keys_real, keys_fake, torch.zeros(batch.fake.shape[:2]))
    reference.eval()
    return DDOBatch(batch.rows, batch.real, batch.fake, batch.labels, batch.labels_real, batch.uncond,
                    real.double().cpu(), fake.double().cpu(), batch.dropout_keys)


def policy_logps(policy, batch: DDOBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta of the real rows (B,) and of the fakes (B, r); a masked row's fake entries are their
    reference values (ratio 0, no gradient: their term has weight 0 and they were not forwarded)."""
    keys = batch.dropout_keys
    keys_real, keys_fake = (None, None) if keys is None else keys.split([len(batch.real), len(keys) - len(batch.real)])
    keys_fake = None if keys_fake is None else keys_fake.view(len(batch.real), -1)
    return _forward(policy, batch, device, keys_real, keys_fake, batch.ref_logp_fake)


def ddo_loss_for_batch(policy, batch: DDOBatch, beta: float, alpha: float, device: torch.device) -> LossOutput:
    logp_real, logp_fake = policy_logps(policy, batch, device)
    return ddo_loss(logp_real, logp_fake, batch.ref_logp_real.to(device), batch.ref_logp_fake.to(device),
                    beta=beta, alpha=alpha, uncond=batch.uncond.to(device))
