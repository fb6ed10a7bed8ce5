"""Pretraining loops for the embedded default, where no public weights exist to download.

Users with LlamaGen checkpoints skip all of this. Here we make, in a few CPU minutes, a VQ tokenizer
of LlamaGen's design and a LlamaGen-style class-conditional GPT with class dropout (so CFG works),
saved in the same formats as the public files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .images import SHIFT_VIEWS, shift, to_unit_range
from .models.llamagen import GPT, GPTConfig
from .progress import progress
from .tokenizers.vq import VQConfig, VQModel

log = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 9 +-1 pixel shifts per batch (cheap augmentation for tiny images)."""
    dy, dx = SHIFT_VIEWS[int(torch.randint(len(SHIFT_VIEWS), (1,), generator=generator))]
    return shift(x, dy, dx)


def train_vq(
    images: np.ndarray,
    cfg: VQConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, dict], None] | None = None,
) -> VQModel:
    """Reconstruction (MSE) + codebook + commitment losses, straight-through; images uint8 (N, H, W, 3).

    Codes unused for `restart_every` steps are re-initialised from random encoder outputs, so that a
    small data set does not leave most of the codebook dead.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VQModel(cfg).to(device)
    data = to_unit_range(images)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    usage = torch.zeros(cfg.codebook_size)
    restart_every = 200
    for step in progress(range(steps), desc="pretrain-vq"):
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        x = random_shift(data[idx], gen).to(device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        recon, vq_loss, codes = model(x)
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.flatten().cpu(), minlength=cfg.codebook_size)
        if (step + 1) % restart_every == 0 and step + 1 < steps * 0.8:
            dead = usage == 0
            if dead.any():
                with torch.no_grad():
                    z = F.normalize(model.encode_latent(x), dim=1).permute(0, 2, 3, 1).reshape(-1, cfg.codebook_embed_dim)
                    pick = torch.randint(len(z), (int(dead.sum()),), generator=gen)
                    model.quantize.embedding.weight[dead.to(device)] = z[pick.to(device)] + 1e-3 * torch.randn_like(z[pick.to(device)])
            usage.zero_()
        if on_step:
            on_step(step, {"loss": loss.item(), "rec_loss": rec_loss.item(), "vq_loss": vq_loss.item()})
    return model.eval()


def train_gpt(
    tokens: np.ndarray,
    labels: np.ndarray,
    cfg: GPTConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    class_dropout: float,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, dict], None] | None = None,
) -> GPT:
    """Next-token cross-entropy on (N, A, L) tokens (an array or a lazy store's, read a batch at a time),
    one random view per row and epoch; labels are
    replaced by the null class with probability `class_dropout` (LlamaGen's recipe, enables CFG)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    labels_t = torch.from_numpy(labels.astype(np.int64))
    N, A, _ = tokens.shape
    steps_per_epoch = math.ceil(N / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    model.train()
    with progress(total=total, desc="pretrain-ar") as bar:
        for _ in range(epochs):
            order = torch.randperm(N, generator=gen)
            for start in range(0, N, batch_size):
                rows = order[start : start + batch_size]
                views = torch.randint(A, (len(rows),), generator=gen)
                x = torch.from_numpy(np.asarray(tokens[rows.numpy(), views.numpy()]).astype(np.int64)).to(device)
                c = labels_t[rows].clone()
                drop = torch.rand(len(rows), generator=gen) < class_dropout
                c[drop] = cfg.null_class
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, total, lr, warmup=max(1, total // 20))
                loss = -model(x, c.to(device)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if on_step:
                    on_step(step, {"loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
                step += 1
                bar.update(1)
    return model.eval()
