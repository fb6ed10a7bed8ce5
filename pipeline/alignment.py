"""Fine-tuning a policy with an alignment loss over cached reference log-probs (CCA, paper Sec. 3.2).

`policy` is any family's model (pipeline.families: LlamaGen GPT or VAR). Only the policy is resident: the reference model's log-probs come from the `reflogp` cache, whose rows
fix each image's augmentation view and negative label. The loss function is pure (pipeline.losses), so
an online reference model would feed it the same tensors (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .device import OutOfMemory, autocast, is_out_of_memory
from .logprobs import sequence_logp
from .losses import LOSSES


@dataclass
class AlignBatch:
    """One (micro-)batch in the loss's terms; uncond rows already carry the null label and log-prob."""

    tokens: torch.Tensor  # (B, L) the row's cached view
    labels_pos: torch.Tensor  # (B,) c, or null where uncond
    labels_neg: torch.Tensor  # (B,) c_neg, or null where uncond
    ref_logp_pos: torch.Tensor  # (B,) float64
    ref_logp_neg: torch.Tensor  # (B,) float64
    uncond: torch.Tensor  # (B,) bool


def make_batch(rows: np.ndarray, tokens: np.ndarray, cache: dict[str, np.ndarray], uncond: np.ndarray, null_class: int) -> AlignBatch:
    """Assemble a batch from cache rows (indices into the cache's columns)."""
    store_rows, views = cache["row"][rows], cache["view"][rows]
    null = np.full(len(rows), null_class)
    return AlignBatch(
        tokens=torch.from_numpy(tokens[store_rows, views].astype(np.int64)),
        labels_pos=torch.from_numpy(np.where(uncond, null, cache["label"][rows]).astype(np.int64)),
        labels_neg=torch.from_numpy(np.where(uncond, null, cache["neg_label"][rows]).astype(np.int64)),
        ref_logp_pos=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_pos"][rows])),
        ref_logp_neg=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_neg"][rows])),
        uncond=torch.from_numpy(uncond),
    )


def policy_logps(policy, batch: AlignBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta(x|c) and log p_theta(x|c_neg) in one forward over the concatenated batch."""
    x = batch.tokens.to(device)
    labels = torch.cat([batch.labels_pos, batch.labels_neg]).to(device)
    with autocast(device):
        logp = sequence_logp(policy, labels, torch.cat([x, x]))
    return logp.split(len(x))


@torch.no_grad()
def with_online_reference(reference, batch: AlignBatch, device: torch.device) -> AlignBatch:
    """The official CCA design, for comparison: a second, frozen model forwarded every step fills in the
    reference log-probs that the cache would otherwise provide (same function, same layout)."""
    x = batch.tokens.to(device)
    labels = torch.cat([batch.labels_pos, batch.labels_neg]).to(device)
    with autocast(device):
        ref = sequence_logp(reference, labels, torch.cat([x, x])).double()
    pos, neg = ref.split(len(x))
    return AlignBatch(batch.tokens, batch.labels_pos, batch.labels_neg, pos.cpu(), neg.cpu(), batch.uncond)


def loss_for_batch(policy, batch: AlignBatch, loss_name: str, beta: float, lam: float, device: torch.device):
    logp_pos, logp_neg = policy_logps(policy, batch, device)
    return LOSSES[loss_name](
        logp_pos, logp_neg, batch.ref_logp_pos.to(device), batch.ref_logp_neg.to(device),
        beta=beta, lam=lam, uncond=batch.uncond.to(device),
    )


@dataclass
class AlignConfig:
    loss: str = "cca"
    beta: float = 0.02
    lam: float = 1000.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    epochs: float = 1.0
    batch_size: int = 256  # global batch (rows); each row gives one positive and one negative sequence
    micro_batch_size: int = 256  # rows per forward; batch_size / micro_batch_size accumulation steps
    uncond_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def train_policy(
    policy,
    tokens: np.ndarray,
    cache: dict[str, np.ndarray],
    cfg: AlignConfig,
    device: torch.device,
    on_step: Callable[[int, dict], None] | None = None,
    progress: Callable[[int], object] | None = None,  # total steps -> a bar with update()/close()
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    resume: dict | None = None,
) -> torch.nn.Module:
    """Fine-tune `policy` in place for cfg.epochs passes over the cache rows; returns it.

    Row order and unconditional rows are drawn from a generator seeded with cfg.seed, so a run is
    reproducible on CPU. Every `checkpoint_every` steps `on_checkpoint` receives the training state
    ({"step", "model", "optimizer", "rng"}); passing such a state as `resume` (with the policy's weights
    already loaded from it) continues exactly where it stopped: same data order, same unconditional rows,
    same optimizer moments, hence the same final weights as an uninterrupted run.
    A non-finite loss or gradient raises FloatingPointError naming the step, before the update is applied.
    """
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; known: {sorted(LOSSES)}")
    if cfg.uncond_ratio > 0 and not policy.cfg.has_null_class:
        raise ValueError("train.uncond_ratio > 0 needs a model with a null class (trained with class dropout); set it to 0")
    rng = np.random.default_rng(cfg.seed)
    n_rows = len(cache["row"])
    total_steps = max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size))
    order = np.concatenate([rng.permutation(n_rows) for _ in range(math.ceil(cfg.epochs) + 1)])
    trainable = [p for p in policy.parameters() if p.requires_grad]  # VAR: not its frozen quantiser
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    first_step = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        first_step = int(resume["step"])
    policy.train()
    bar = progress(total_steps) if progress else None
    if bar is not None and first_step:
        bar.update(first_step)
    for step in range(first_step, total_steps):
        rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        uncond = rng.random(len(rows)) < cfg.uncond_ratio
        opt.zero_grad(set_to_none=True)
        outs, masks = [], []
        for start in range(0, len(rows), cfg.micro_batch_size):
            part = slice(start, start + cfg.micro_batch_size)
            batch = make_batch(rows[part], tokens, cache, uncond[part], policy.cfg.null_class)
            try:
                out = loss_for_batch(policy, batch, cfg.loss, cfg.beta, cfg.lam, device)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"non-finite loss at step {step}; lower train.lr or train.beta")
                (out.loss * len(batch.uncond) / len(rows)).backward()
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemory(
                    f"out of memory at step {step} with train.micro_batch_size = {cfg.micro_batch_size} rows per forward "
                    f"({2 * cfg.micro_batch_size} sequences): lower train.micro_batch_size, e.g. to {max(1, cfg.micro_batch_size // 2)}; "
                    f"the global train.batch_size ({cfg.batch_size}) is kept by gradient accumulation") from e
            outs.append(out)
            masks.append(batch.uncond)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step}; lower train.lr or train.beta")
        opt.step()
        if on_step:
            on_step(step, _step_metrics(outs, masks, grad_norm.item(), cfg.lr))
        if bar is not None:
            bar.update(1)
        if on_checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
            on_checkpoint({"step": step + 1, "model": policy.state_dict(), "optimizer": opt.state_dict(),
                           "rng": rng.bit_generator.state})
    if bar is not None:
        bar.close()
    policy.eval()
    return policy


def _step_metrics(outs, masks, grad_norm: float, lr: float) -> dict[str, float]:
    from .losses import LossOutput

    per_row = torch.cat([o.per_row for o in outs])
    merged = LossOutput(
        loss=per_row.mean(),
        per_row=per_row,
        ratio_pos=torch.cat([o.ratio_pos for o in outs]),
        ratio_neg=torch.cat([o.ratio_neg for o in outs]),
    )
    return {**merged.metrics(torch.cat(masks).to(merged.ratio_pos.device)), "lr": lr, "grad_norm": grad_norm}
