"""A DDO batch's loss from a policy forward and reference log-probs, cached or online (docs/ddo.md).

Row k of a batch pairs a real sequence x (under its label c) with x_fake, a sample the reference drew for c.
The reference's part is three log-probs per row, computed once (the cache) or at every step (online) by
the same forward: log p_ref(x|c), log p_ref(x_fake|c) and log p_ref(x|null), which a null-label row reads in
place of the first. The pair shares the null-label mask, as the released script does; a masked row's fake
term has weight 0 (pipeline.losses.ddo_loss), so its fake is not forwarded at all (the script forwards and
zero-weights it: the same loss and gradient). With reference dropout, each sequence's masks are keyed by
(seed, cache row, role) as in pipeline.refcache: real "pos", fake "fake", real under null "null".

Train reads it with train.loss ddo (pipeline.alignment.AlignmentRun), from a DDO cache (reflogp --negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device import autocast
from .logprobs import sequence_logp
from .losses import LossOutput, ddo_loss
from .refcache import ReferenceNoise, row_keys

DDO_COLUMNS = ("ref_logp_pos", "ref_logp_fake", "ref_logp_null")  # reference_columns' output, in score order


@dataclass
class DDOBatch:
    rows: np.ndarray  # (B,) cache rows: the reference's dropout keys are a function of them
    real: torch.Tensor  # (B, L) real tokens
    fake: torch.Tensor  # (B, L) the reference's sample for labels[k]
    labels: torch.Tensor  # (B,) c: the real row's class, which its fake was drawn for
    labels_real: torch.Tensor  # (B,) c, or the null class where uncond
    uncond: torch.Tensor  # (B,) bool: the pair's null-label mask
    ref_logp_real: torch.Tensor  # (B,) float64 log p_ref(x|c), or log p_ref(x|null) where uncond
    ref_logp_fake: torch.Tensor  # (B,) float64 log p_ref(x_fake|c); 0 where uncond (weight 0: never read)
    dropout_keys: torch.Tensor | None = None  # (2B,) int64 the policy's keys of the real then the fake sequences


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
    """The cache's part: DDO_COLUMNS float64 per row, from real and fake (N, L) tokens and labels (N,). Row i
    is cache row first_row + i, whose masks (noise active: `model` has the rates set) are the same whatever
    the batch."""
    model.train(noise.active)
    null = torch.full_like(labels, model.cfg.null_class)
    parts = []
    for start in range(0, len(real), batch_size):
        part = slice(start, start + batch_size)
        cache_rows = first_row + np.arange(start, min(start + batch_size, len(real)))
        keys = row_keys(noise, cache_rows, device, ("pos", "fake", "null"))  # real|c, fake|c, real|null
        logp = score_sequences(model, [real[part], fake[part], real[part]],
                               torch.cat([labels[part], labels[part], null[part]]), device, keys)
        parts.append(logp.view(3, -1).double().cpu())
    model.eval()
    out = torch.cat(parts, dim=1).numpy()
    return dict(zip(DDO_COLUMNS, out, strict=True))


def make_ddo_batch(rows: np.ndarray, real: torch.Tensor, fake: torch.Tensor, cache: dict[str, np.ndarray],
                   uncond: np.ndarray, null_class: int, dropout_keys: torch.Tensor | None = None) -> DDOBatch:
    """A batch of cache rows `rows` from the cached columns (`label` and DDO_COLUMNS); real and fake (B, L)
    are those rows' tokens."""
    labels = cache["label"][rows].astype(np.int64)
    return DDOBatch(
        rows=np.asarray(rows), real=real, fake=fake, labels=torch.from_numpy(labels),
        labels_real=torch.from_numpy(np.where(uncond, null_class, labels)),
        uncond=torch.from_numpy(np.asarray(uncond, dtype=bool)),
        ref_logp_real=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_pos"][rows])),
        ref_logp_fake=torch.from_numpy(np.where(uncond, 0.0, cache["ref_logp_fake"][rows])),
        dropout_keys=dropout_keys,
    )


def _split(logp: torch.Tensor, batch: DDOBatch, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B + C,) from score_sequences over the real rows and the C conditional rows' fakes -> real (B,) and fake
    (B,), masked rows' fake entries taken from `fill` (no gradient)."""
    real, fake = logp.split([len(batch.real), len(logp) - len(batch.real)])
    return real, fill.to(fake.dtype).masked_scatter(~batch.uncond.to(fake.device), fake)


def _forward(model, batch: DDOBatch, device: torch.device, keys_real: torch.Tensor | None,
             keys_fake: torch.Tensor | None, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real rows (under labels_real) and the conditional rows' fakes (under their c) in one forward."""
    cond = ~batch.uncond
    keys = None if keys_real is None else torch.cat([keys_real, keys_fake[cond.to(keys_fake.device)]])
    logp = score_sequences(model, [batch.real, batch.fake[cond]], torch.cat([batch.labels_real, batch.labels[cond]]),
                           device, keys)
    return _split(logp, batch, fill.to(device))


@torch.no_grad()
def with_online_reference(reference, batch: DDOBatch, device: torch.device,
                          noise: ReferenceNoise = ReferenceNoise()) -> DDOBatch:
    """The batch with its reference log-probs from a frozen second model forwarded now (the released script's
    design) instead of the cache: the same masks as the cache's rows (noise, batch.rows)."""
    keys = row_keys(noise, batch.rows, device, ("pos", "fake", "null"))
    if keys is not None:
        pos, fake, null = keys.view(3, -1)
        keys_real, keys_fake = torch.where(batch.uncond.to(device), null, pos), fake
    else:
        keys_real = keys_fake = None
    reference.train(noise.active)
    real, fake = _forward(reference, batch, device, keys_real, keys_fake, torch.zeros(len(batch.real)))
    reference.eval()
    return DDOBatch(batch.rows, batch.real, batch.fake, batch.labels, batch.labels_real, batch.uncond,
                    real.double().cpu(), fake.double().cpu(), batch.dropout_keys)


def policy_logps(policy, batch: DDOBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta of the real rows and of the fakes (B,) each; a masked row's fake entry is its reference
    value (ratio 0, no gradient: its term has weight 0 and it was not forwarded)."""
    keys = batch.dropout_keys
    keys_real, keys_fake = (None, None) if keys is None else keys.split(len(batch.real))
    return _forward(policy, batch, device, keys_real, keys_fake, batch.ref_logp_fake)


def ddo_loss_for_batch(policy, batch: DDOBatch, beta: float, alpha: float, device: torch.device) -> LossOutput:
    logp_real, logp_fake = policy_logps(policy, batch, device)
    return ddo_loss(logp_real, logp_fake, batch.ref_logp_real.to(device), batch.ref_logp_fake.to(device),
                    beta=beta, alpha=alpha, uncond=batch.uncond.to(device))
