"""Layers both model families use."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

# Dropout and drop-path masks are a pure function of (a 64-bit key per sequence, the dropout site, the
# element's index in its sequence): a counter-based integer hash in torch integer ops, so CPU and CUDA draw
# the same masks, and a sequence's masks do not depend on the batch it is in (batch or micro-batch size,
# world size, DDP/FSDP) nor on when they are drawn (activation checkpointing recomputes the same ones).
# The reference cache (reflogp) and train key them by (seed, row, role): pipeline.refcache.

_WORD = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit word times it stays below 2**63, so int64 products never overflow
# the sequences a key is for: a cache row scored three ways (reflogp), a visit of train's epoch order
# scored twice (the policy's own draw, never the cache's whatever the seeds)
ROLES = {"pos": 0, "neg": 1, "null": 2, "visit_pos": 3, "visit_neg": 4}
# roles added after ROLES' keys were fixed (their count enters every key): each hashes its positions on a base of
# its own, so the keys of ROLES, and every cache computed with them, stay as they were. "fake": DDO's fake of a
# cache row under its real row's label (docs/ddo.md), never the mask of the CCA negative of the same row.
SEPARATE_ROLES = {"fake": 0xDD0FA4E}


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit words held in int64 (non-negative, < 2**32), in place: the
    per-element masks of a forward are (B, T, C) int64, so at most one temporary as large is made."""
    h ^= h >> 16
    h.mul_(_MIX).bitwise_and_(_WORD)
    h ^= h >> 16
    h.mul_(_MIX).bitwise_and_(_WORD)
    h ^= h >> 16
    return h


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (numpy wraps uint64 arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


SLOT_SHIFT = 40  # slot s of a position hashes as position + s 2^40: beyond any cache row or visit


def noise_keys(seed: int, positions: np.ndarray, role: str, slot: int = 0) -> torch.Tensor:
    """The dropout key (B,) int64 of each sequence: a hash of (seed, position, role), where position is a
    cache row (reflogp) or a visit of the epoch order (train) and role one of ROLES or SEPARATE_ROLES.
    `slot` s > 0: the s-th of several sequences of one role at a position (DDO's fakes of a row with
    negatives.ratio > 1), hashed as position + s 2^SLOT_SHIFT, so slot 0 is the key without slots."""
    positions = np.asarray(positions, dtype=np.uint64) + np.uint64(slot << SLOT_SHIFT)
    with np.errstate(over="ignore"):
        base = _splitmix64(np.asarray([seed], dtype=np.uint64))
        if role in SEPARATE_ROLES:
            base = _splitmix64(base ^ np.uint64(SEPARATE_ROLES[role]))
            keys = _splitmix64(base ^ positions)
        else:
            keys = _splitmix64(base ^ (positions * np.uint64(len(ROLES)) + np.uint64(ROLES[role])))
    return torch.from_numpy(keys.view(np.int64).copy())


_HASH_CHUNK = 2**25  # elements hashed at once: bounds the int64 temporaries (2 x 256 MiB) of a large batch


def keep_mask(keys: torch.Tensor, site: int, per_row: int, rate: float) -> torch.Tensor:
    """(B, per_row) bool: element i of sequence b is kept, with probability 1 - rate, from (keys[b], site, i)."""
    lo, hi = keys & _WORD, (keys >> 32) & _WORD
    row = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(keys, site & _WORD))))  # (B,) a word per (key, site)
    index = _mix32(torch.arange(per_row, device=keys.device, dtype=torch.int64).mul_(0x9E3779B9).bitwise_and_(_WORD))
    threshold = round(rate * 2**32)
    rows = max(1, _HASH_CHUNK // max(per_row, 1))
    return torch.cat([_mix32(r[:, None] ^ index[None, :]) >= threshold for r in row.split(rows)])


def _check_keys(keys: torch.Tensor | None, x: torch.Tensor, what: str) -> torch.Tensor:
    if keys is None:  # an unseeded mask would make the cache and train irreproducible
        raise ValueError(f"{what} is active (train mode, rate > 0) but no dropout_keys were given: pass the "
                         "sequences' keys (pipeline.models.layers.noise_keys) to the model's forward")
    if keys.shape != (x.shape[0],):
        raise ValueError(f"dropout_keys has shape {tuple(keys.shape)}, expected ({x.shape[0]},): one key per sequence")
    return keys.to(x.device)


class KeyedDropout(nn.Module):
    """nn.Dropout whose mask comes from each sequence's key (keep_mask) instead of torch's generator: in
    train mode with p > 0, x (B, ...) elements are zeroed with probability p and kept ones scaled by
    1/(1 - p). `site` (set by number_sites) tells this layer's masks from every other's."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p, self.site = p, 0

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keys = _check_keys(keys, x, "dropout")
        keep = keep_mask(keys, self.site, x[0].numel(), self.p).view(x.shape)
        return torch.where(keep, x / (1 - self.p), 0.0)  # saves only the bool mask for backward


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's, which LlamaGen and VAR both use): in train mode with rate > 0,
    a residual branch is dropped for a whole sample with probability `rate` and kept ones scaled by
    1/(1 - rate); the decision comes from the sample's key (keep_mask). `call` tells the sites of a module
    applied more than once per forward (a block's attention and feed-forward branches)."""

    CALLS = 2  # sites reserved per module

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate, self.site = rate, 0

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None, call: int = 0) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keys = _check_keys(keys, x, "drop path")
        keep = keep_mask(keys, self.site + call, 1, self.rate).view((x.shape[0],) + (1,) * (x.ndim - 1))
        return torch.where(keep, x / (1 - self.rate), 0.0)


@contextlib.contextmanager
def noise_rates(model: nn.Module, dropout: float, drop_path: float, section: str):
    """`model` with these dropout / drop-path rates (its family's set_dropout) inside, its own after."""
    saved = [(m, m.p if isinstance(m, KeyedDropout) else m.rate) for m in model.modules() if isinstance(m, (KeyedDropout, DropPath))]
    cfg_rate = getattr(model.cfg, "drop_path_rate", None)  # VAR keeps its rate in its config too
    model.set_dropout(dropout, drop_path, section=section)
    try:
        yield model
    finally:
        for module, rate in saved:
            setattr(module, "p" if isinstance(module, KeyedDropout) else "rate", rate)
        if cfg_rate is not None:
            model.cfg.drop_path_rate = cfg_rate


def number_sites(model: nn.Module) -> None:
    """Give every KeyedDropout / DropPath of `model` its own site ids, in module order (a fixed function of
    the architecture, so the reference and the policy of one architecture number them alike)."""
    site = 1
    for module in model.modules():
        if isinstance(module, (KeyedDropout, DropPath)):
            module.site = site
            site += DropPath.CALLS if isinstance(module, DropPath) else 1


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
    kept for backward and each block's forward is recomputed there; dropout and drop path masks are keyed
    (KeyedDropout), so the recomputation draws the same masks and the gradients are those of the plain forward."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x
