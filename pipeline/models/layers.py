"""Layers both model families use."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's, which LlamaGen and VAR both use): in train mode with rate > 0,
    a residual branch is dropped for a whole sample with probability `rate` and kept ones scaled by 1/(1 - rate)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


def linear_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to `rate` (torch.linspace(0, rate, depth), as upstream)."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class LambdaEmbedding(nn.Module):
    """lambda -> a vector added to the class embedding, for one policy trained over a range of lambdas
    (paper Table 5): the DiT way (its TimestepEmbedder), sinusoidal features of log lambda -> Linear -> SiLU
    -> Linear. The last layer starts at zero, so a new embedding adds exactly nothing: the policy at step 0
    is the reference, for any lambda, and the cache stays valid."""

    def __init__(self, dim: int, features: int = 256, max_period: float = 10000.0, seed: int = 0):
        super().__init__()
        self.features, self.max_period = features, max_period
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        # The first layer from `seed`, not from torch's global generator (unseeded when train adds the
        # embedding): a new embedding is the same in every run and on every rank, whatever came before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mlp[0].reset_parameters()
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        """lam (B,) > 0 -> (B, dim)."""
        half = self.features // 2
        freqs = torch.exp(-torch.log(torch.tensor(self.max_period)) * torch.arange(half, dtype=torch.float32) / half)
        args = torch.log(lam.float())[:, None] * freqs.to(lam.device)[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointing: bool = False) -> torch.Tensor:
    """x through each block in turn. `checkpointing` (train.activation_checkpointing, when gradients are
    taken): PyTorch's activation checkpointing of each block (non-reentrant), so only the blocks' inputs are
    kept for backward and each block's forward is recomputed there; the RNG state is replayed, so dropout and
    drop path draw the same masks and the gradients are those of the plain forward."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x
