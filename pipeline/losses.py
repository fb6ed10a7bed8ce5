"""Alignment losses: pure functions of per-sequence log-probabilities.

They take policy log-probs (with grad) and reference log-probs (cached or computed online: the same
tensors either way), so the cached and online reference paths run the same code. Later baselines
(DPO, unlearning, CCA+CFG) are further functions over the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    per_row: torch.Tensor  # (B,) loss per row, before the batch mean
    ratio_pos: torch.Tensor  # (B,) detached log p_theta(x|c) - log p_phi(x|c)
    ratio_neg: torch.Tensor  # (B,) detached log p_theta(x|c_neg) - log p_phi(x|c_neg)

    def metrics(self, positive_twice: torch.Tensor) -> dict[str, float]:
        """Logged per step (paper Fig. 10 plots the mean ratios); negatives exclude the rows whose negative
        term is a second positive (unconditional rows, rolled negatives equal to the label)."""
        cond = ~positive_twice
        neg = self.ratio_neg[cond] if cond.any() else self.ratio_neg.new_zeros(1)
        pos = self.ratio_pos[cond] if cond.any() else self.ratio_pos
        return {
            "loss": self.loss.item(),
            "rewards/pos": self.ratio_pos.mean().item(),
            "rewards/neg": neg.mean().item(),
            "rewards/margin": (pos - neg).mean().item(),
            "rewards/accuracy": (pos > neg).float().mean().item(),
        }


def cca_loss(
    policy_logp_pos: torch.Tensor,
    policy_logp_neg: torch.Tensor,
    ref_logp_pos: torch.Tensor,
    ref_logp_neg: torch.Tensor,
    beta: float,
    lam: float,
    positive_twice: torch.Tensor | None = None,
) -> LossOutput:
    """Condition Contrastive Alignment, paper Eq. 12 with the official recipe's details.

        L = -log sig(beta * r_pos) - lam * log sig(-beta * r_neg),   r = log p_theta - log p_phi

    Rows with positive_twice[k] True are positives twice: their "negative" term is -log sig(beta * r_neg),
    weight 1. They are the unconditional rows (both labels replaced by the null class, Algorithm 1 in
    Appendix D) and, with rolled negatives, rows whose negative label equals their own (the scripts'
    `neg_weight = TBM | (shuffled_c_indices == c_indices)`). The
    batch mean is divided by max(lam, 1) as the official code does, so the lr means the same across lam.
    All inputs (B,) per-sequence sums; returns the scalar loss and detached diagnostics.
    """
    if positive_twice is None:
        positive_twice = torch.zeros_like(policy_logp_pos, dtype=torch.bool)
    ratio_pos = policy_logp_pos - ref_logp_pos.to(policy_logp_pos.dtype)
    ratio_neg = policy_logp_neg - ref_logp_neg.to(policy_logp_neg.dtype)
    loss_pos = -F.logsigmoid(beta * ratio_pos)
    loss_neg = torch.where(positive_twice, -F.logsigmoid(beta * ratio_neg), lam * -F.logsigmoid(-beta * ratio_neg))
    per_row = (loss_pos + loss_neg) / max(lam, 1.0)
    return LossOutput(per_row.mean(), per_row.detach(), ratio_pos.detach(), ratio_neg.detach())


LOSSES = {"cca": cca_loss}
