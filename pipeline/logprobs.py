"""Per-token and per-sequence log-likelihoods: the one function reflogp, train and eval all use.

CCA's ratio log p_theta(x|c) - log p_phi(x|c) (paper Eq. 10/12) is a difference of two sums over
hundreds of tokens, each in the thousands of nats. The cache (reflogp) and the policy (train) must
compute it identically, so both call `sequence_logp` (the model's forward): float32 log-softmax even under
bf16 autocast (docs/upstream.md, "Precision of the log-probs": a bf16 sum over 256 tokens is off by ~4 nats), summed in float32.
"""

from __future__ import annotations

import torch


def token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] in float32 without materialising the full log-softmax.

    logits (B, T, V), targets (B, T) -> (B, T).
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logp(model, labels: torch.Tensor, tokens: torch.Tensor, lam: torch.Tensor | None = None,
                  dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | c) = sum over the N image tokens: labels (B,), tokens (B, N) -> (B,) float32. `model` is any
    family's model, or a DDP/FSDP wrapper of one: its forward(tokens, labels) gives the per-token log-probs
    (and forward(tokens, labels, lam) those of a lambda-conditioned policy at each row's lambda).
    `dropout_keys` (B,) int64: each sequence's dropout / drop-path key (pipeline.models.layers.noise_keys),
    for a model in train mode with dropout on: its masks are a function of the key, not of the batch."""
    if dropout_keys is None:  # the call every model and wrapper has always taken
        return (model(tokens, labels) if lam is None else model(tokens, labels, lam)).sum(-1)
    return model(tokens, labels, lam, dropout_keys).sum(-1)
