"""Alignment losses: pure functions of per-sequence log-probabilities.

They take policy log-probs (with grad) and reference log-probs (cached or computed online: the same
tensors either way), so the cached and online reference paths run the same code. CCA (paper Eq. 12) and
the paper's two baselines of Table 3, DPO and Unlearning, as the released LlamaGen_finetune.py computes
them, over the same columns; `train.loss` picks one (LOSSES). DDO (docs/ddo.md), whose negatives are the
reference's own samples rather than other labels, is here too, but not in LOSSES: the train stage's rows
carry CCA's negatives, and DDO on them would be another loss.

`lam` is a float, or a (B,) tensor of per-row lambdas (the lambda-conditioned policy, paper Table 5): each
row's loss is then normalised by its own max(lambda, 1).
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
    logp_pos: torch.Tensor  # (B,) detached log p_theta(x|c): DPO's fall shows here (paper Sec. 5.3, Fig. 10)

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
            "logps/pos": (self.logp_pos[cond] if cond.any() else self.logp_pos).mean().item(),
        }


def cca_loss(
    policy_logp_pos: torch.Tensor,
    policy_logp_neg: torch.Tensor,
    ref_logp_pos: torch.Tensor,
    ref_logp_neg: torch.Tensor,
    beta: float,
    lam: float | torch.Tensor,
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
    positive_twice, ratio_pos, ratio_neg = _ratios(policy_logp_pos, policy_logp_neg, ref_logp_pos, ref_logp_neg, positive_twice)
    loss_pos = -F.logsigmoid(beta * ratio_pos)
    loss_neg = torch.where(positive_twice, -F.logsigmoid(beta * ratio_neg), lam * -F.logsigmoid(-beta * ratio_neg))
    per_row = (loss_pos + loss_neg) / _lambda_norm(lam)
    return _output(per_row, ratio_pos, ratio_neg, policy_logp_pos)


def dpo_loss(
    policy_logp_pos: torch.Tensor,
    policy_logp_neg: torch.Tensor,
    ref_logp_pos: torch.Tensor,
    ref_logp_neg: torch.Tensor,
    beta: float,
    lam: float | torch.Tensor = 1.0,
    positive_twice: torch.Tensor | None = None,
) -> LossOutput:
    """DPO on the condition pairs (paper Sec. 5.3, Table 3), as the released script:

        L = -log sig(beta * (r_pos - r_neg))

    It has no lambda (the argument is ignored) and no unconditional-row rule: in a row that is a positive
    twice the two sequences and labels are the same. Without dropout r_pos = r_neg, so the row costs ln 2
    with no gradient. With dropout or drop path (the recipes') the policy's two forwards draw different
    masks, so d = r_pos - r_neg is noise and the row's gradient, -beta sig(-beta d) grad d, is zero only in
    the mean at first order in beta (the two draws are exchangeable); what is left, about beta^2/8 grad
    E[d^2], pulls the two draws together. Both as in the script. Only the margin is pushed: both likelihoods
    may fall together, which is DPO's failure here (the positive log-likelihood keeps falling)."""
    positive_twice, ratio_pos, ratio_neg = _ratios(policy_logp_pos, policy_logp_neg, ref_logp_pos, ref_logp_neg, positive_twice)
    per_row = -F.logsigmoid(beta * (ratio_pos - ratio_neg))
    return _output(per_row, ratio_pos, ratio_neg, policy_logp_pos)


def unlearning_loss(
    policy_logp_pos: torch.Tensor,
    policy_logp_neg: torch.Tensor,
    ref_logp_pos: torch.Tensor,
    ref_logp_neg: torch.Tensor,
    beta: float,
    lam: float | torch.Tensor,
    positive_twice: torch.Tensor | None = None,
) -> LossOutput:
    """Unlearning (paper Table 3), as the released script's `(-gap_pos.mean() - (w * sign * gap_neg).mean())
    / max(lambda, 1)`: per row

        L = (-r_pos + lam * r_neg) / max(lam, 1)          (a conditional row: push the negative down)
        L = (-r_pos - r_neg) / max(lam, 1)                (a positive twice: weight 1, pulled up)

    linear in the log-ratios (beta is not used), so nothing stops the negatives' likelihood falling
    without bound."""
    positive_twice, ratio_pos, ratio_neg = _ratios(policy_logp_pos, policy_logp_neg, ref_logp_pos, ref_logp_neg, positive_twice)
    per_row = (-ratio_pos + torch.where(positive_twice, -ratio_neg, lam * ratio_neg)) / _lambda_norm(lam)
    return _output(per_row, ratio_pos, ratio_neg, policy_logp_pos)


def ddo_loss(
    policy_logp_real: torch.Tensor,
    policy_logp_fake: torch.Tensor,
    ref_logp_real: torch.Tensor,
    ref_logp_fake: torch.Tensor,
    beta: float,
    alpha: float,
    uncond: torch.Tensor | None = None,
) -> LossOutput:
    """Direct Discriminative Optimization (DDO paper Eq. 13) with the released VAR script's weights
    (docs/ddo.md). Row k pairs a real sequence x with a sample x_fake the reference drew for x's label c:

        L = [ -log sig(beta * r_real) - alpha * log sig(-beta * r_fake) ] / max(alpha, 1)     (conditional)
        L = [ -max(alpha, 1) * log sig(beta * r_real) ] / max(alpha, 1) = -log sig(beta * r_real)   (uncond)

    with r_real = log p_theta(x|c) - log p_ref(x|c) and r_fake = log p_theta(x_fake|c) - log p_ref(x_fake|c).
    Rows with uncond[k] True are null-label rows (c replaced by the null class for the pair): their fake
    term has weight 0 (the paper keeps the unconditional branch mode-covering for CFG), so policy_logp_fake
    and ref_logp_fake are not read there (keep them finite: a NaN would still reach the gradient). The
    per-row values' mean is the loss: with one fake per real row that is the script's mean over reals plus
    alpha times the mean over fakes, divided by max(alpha, 1). With r fakes per real row (the fake inputs
    (B, r), negatives.ratio r) the fake term of a row is the mean over its r fakes, so the loss is still the
    two separate means of Eq. 13 (the reals' and the B r fakes', a null-label row's fakes counted with weight
    0, as the script's mask does), and ratio_neg is each row's mean over its fakes. Same shape as cca_loss
    (docs/ddo.md relates them); ratio_neg / metrics report the fakes. Inputs per-sequence sums, (B,) and the
    fakes' (B,) or (B, r).
    """
    uncond, ratio_real, ratio_fake = _ratios(policy_logp_real, policy_logp_fake, ref_logp_real, ref_logp_fake, uncond)
    norm = _lambda_norm(alpha)
    loss_real = -F.logsigmoid(beta * ratio_real)
    loss_fake = -F.logsigmoid(-beta * ratio_fake)
    if loss_fake.dim() == 2:  # r fakes per row: their mean (the mean over all B r fakes, row by row)
        loss_fake, ratio_fake = loss_fake.mean(1), ratio_fake.mean(1)
    per_row = torch.where(uncond, norm * loss_real, loss_real + alpha * loss_fake) / norm
    return _output(per_row, ratio_real, ratio_fake, policy_logp_real)


def _ratios(policy_pos, policy_neg, ref_pos, ref_neg, positive_twice):
    if positive_twice is None:
        positive_twice = torch.zeros_like(policy_pos, dtype=torch.bool)
    return positive_twice, policy_pos - ref_pos.to(policy_pos.dtype), policy_neg - ref_neg.to(policy_neg.dtype)


def _lambda_norm(lam: float | torch.Tensor):
    """The released scripts' normalisation: the loss divided by max(lambda, 1), so the lr means the same
    across lambdas; per row for per-row lambdas."""
    return lam.clamp(min=1.0) if isinstance(lam, torch.Tensor) else max(lam, 1.0)


def _output(per_row: torch.Tensor, ratio_pos: torch.Tensor, ratio_neg: torch.Tensor, logp_pos: torch.Tensor) -> LossOutput:
    return LossOutput(per_row.mean(), per_row.detach(), ratio_pos.detach(), ratio_neg.detach(), logp_pos.detach())


LOSSES = {"cca": cca_loss, "dpo": dpo_loss, "unlearning": unlearning_loss}
