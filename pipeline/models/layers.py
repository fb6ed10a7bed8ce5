"""Layers both model families use."""

from __future__ import annotations

import torch
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
