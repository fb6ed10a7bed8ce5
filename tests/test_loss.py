"""pipeline.losses.cca_loss against hand computations (paper Eq. 12, Algorithm 1, the official recipe)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import cca_loss


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_ratio_zero_gives_ln2_terms():
    """At initialisation the policy equals the reference, every ratio is 0 and -log sig(0) = ln 2:
    a conditional row costs (1 + lambda) ln 2, an unconditional one 2 ln 2; both / max(lambda, 1)."""
    logp = torch.tensor([-50.0, -60.0, -70.0])
    out = cca_loss(logp, logp - 3, logp, logp - 3, beta=0.5, lam=10.0, positive_twice=torch.tensor([False, True, False]))
    expected = torch.tensor([11 * math.log(2), 2 * math.log(2), 11 * math.log(2)]) / 10
    torch.testing.assert_close(out.per_row, expected)
    torch.testing.assert_close(out.loss, expected.mean())


@pytest.mark.parametrize("lam", [0.5, 4.0])
def test_worked_example(lam: float):
    """Two rows, beta = 0.5.
    Row 0 (conditional): r_pos = -9 - (-10) = 1, r_neg = -12 - (-11) = -1
        loss = -log sig(0.5) - lam log sig(0.5) = (1 + lam) * log(1 + e^-0.5)
    Row 1 (unconditional): r_pos = -19 - (-20) = 1, r_neg (same null pair) = 1, treated as positive:
        loss = -log sig(0.5) - log sig(0.5) = 2 * log(1 + e^-0.5)
    then / max(lam, 1): lam = 0.5 -> / 1 ; lam = 4 -> / 4.
    """
    a = math.log(1 + math.exp(-0.5))
    out = cca_loss(torch.tensor([-9.0, -19.0]), torch.tensor([-12.0, -19.0]), torch.tensor([-10.0, -20.0]),
                   torch.tensor([-11.0, -20.0]), beta=0.5, lam=lam, positive_twice=torch.tensor([False, True]))
    norm = max(lam, 1.0)
    assert out.per_row[0].item() == pytest.approx((1 + lam) * a / norm, rel=1e-6)
    assert out.per_row[1].item() == pytest.approx(2 * a / norm, rel=1e-6)
    assert out.loss.item() == pytest.approx(((1 + lam) * a + 2 * a) / 2 / norm, rel=1e-6)


def test_asymmetric_example_separates_the_two_terms():
    """r_pos = 2, r_neg = 3, beta = 0.25, lam = 2: -log sig(0.5) - 2 log sig(-0.75), / 2."""
    out = cca_loss(torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.25, lam=2.0)
    expected = (neg_log_sigmoid(0.5) + 2 * neg_log_sigmoid(-0.75)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_gradients_raise_positives_and_lower_negatives():
    pos = torch.tensor([-5.0, -7.0], requires_grad=True)
    neg = torch.tensor([-6.0, -4.0], requires_grad=True)
    cca_loss(pos, neg, torch.tensor([-5.5, -7.0]), torch.tensor([-6.0, -4.5]), beta=0.5, lam=3.0).loss.backward()
    assert (pos.grad < 0).all() and (neg.grad > 0).all()


def test_reference_tensors_get_no_gradient_and_float64_cache_is_accepted():
    pos = torch.tensor([-5.0], requires_grad=True)
    ref = torch.tensor([-5.0], dtype=torch.float64)
    out = cca_loss(pos, pos.detach() - 1, ref, ref - 1, beta=1.0, lam=1.0)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert pos.grad is not None


def test_logged_metrics():
    """rewards/pos averages all rows; negatives (and margin, accuracy) only the conditional rows."""
    out = cca_loss(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([-1.0, 3.0, 5.0]), torch.zeros(3), torch.zeros(3),
                   beta=1.0, lam=1.0, positive_twice=torch.tensor([False, False, True]))
    m = out.metrics(torch.tensor([False, False, True]))
    assert m["rewards/pos"] == pytest.approx(8 / 3)
    assert m["rewards/neg"] == pytest.approx(1.0)  # (-1 + 3) / 2
    assert m["rewards/margin"] == pytest.approx(((1 + 1) + (2 - 3)) / 2)
    assert m["rewards/accuracy"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ DPO and Unlearning


def test_dpo_by_hand():
    """beta = 0.5. Row 0: r_pos = -9 - (-10) = 1, r_neg = -12 - (-11) = -1 -> -log sig(0.5 * 2) = log(1 + e^-1).
    Row 1 (a positive twice: the unconditional pair is one sequence, one label, so r_pos = r_neg = 2):
    -log sig(0) = ln 2 whatever lambda; DPO has no lambda and no normalisation."""
    from pipeline.losses import dpo_loss

    for lam in (1.0, 300.0):
        out = dpo_loss(torch.tensor([-9.0, -18.0]), torch.tensor([-12.0, -18.0]), torch.tensor([-10.0, -20.0]),
                       torch.tensor([-11.0, -20.0]), beta=0.5, lam=lam, positive_twice=torch.tensor([False, True]))
        torch.testing.assert_close(out.per_row, torch.tensor([neg_log_sigmoid(1.0), math.log(2)]))
        torch.testing.assert_close(out.logp_pos, torch.tensor([-9.0, -18.0]))


def test_dpo_positive_twice_row_has_a_gradient_only_with_dropout(tiny_gpt):
    """A positive-twice row's two sequences are one sequence and one label: without dropout r_pos = r_neg and
    the row has no gradient; with dropout (the recipes') the policy's two forwards draw different masks, so
    it has one (zero only in the mean, to first order in beta)."""
    from pipeline.logprobs import sequence_logp
    from pipeline.losses import dpo_loss

    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    labels, keys, ref = torch.tensor([2, 2]), torch.tensor([11, 12]), torch.tensor([-40.0])
    norms = []
    for rate in (0.0, 0.1):
        tiny_gpt.set_dropout(rate)
        tiny_gpt.train().zero_grad()
        pos, neg = sequence_logp(tiny_gpt, labels, tokens, dropout_keys=keys).split(1)
        dpo_loss(pos, neg, ref, ref, beta=0.5, positive_twice=torch.tensor([True])).loss.backward()
        norms.append(sum(p.grad.abs().sum().item() for p in tiny_gpt.parameters() if p.grad is not None))
        assert (pos == neg).item() == (rate == 0.0)
    # without dropout the two rows' backward contributions cancel up to float32 rounding (3e-5 summed over
    # every parameter, against 307 with dropout)
    assert norms[1] > 1.0 and norms[0] < 1e-6 * norms[1]


def test_dpo_pushes_only_the_margin():
    """d/dr_pos = -beta sig(-beta m) and d/dr_neg = +beta sig(-beta m), m = r_pos - r_neg: equal and opposite,
    so lowering both likelihoods by the same amount changes nothing (DPO's failure mode, Sec. 5.3)."""
    from pipeline.losses import dpo_loss

    pos = torch.tensor([-9.0], requires_grad=True)
    neg = torch.tensor([-12.0], requires_grad=True)
    dpo_loss(pos, neg, torch.tensor([-10.0]), torch.tensor([-11.0]), beta=0.5).loss.backward()
    expected = 0.5 / (1 + math.exp(1.0))  # beta sig(-beta m) with m = 2
    torch.testing.assert_close(pos.grad, torch.tensor([-expected]))
    torch.testing.assert_close(neg.grad, torch.tensor([expected]))
    shifted = dpo_loss(torch.tensor([-19.0]), torch.tensor([-22.0]), torch.tensor([-10.0]), torch.tensor([-11.0]), beta=0.5)
    base = dpo_loss(torch.tensor([-9.0]), torch.tensor([-12.0]), torch.tensor([-10.0]), torch.tensor([-11.0]), beta=0.5)
    torch.testing.assert_close(shifted.loss, base.loss)


@pytest.mark.parametrize("lam", [0.5, 10.0])
def test_unlearning_by_hand(lam: float):
    """Row 0 (conditional): r_pos = 1, r_neg = -1 -> (-1 + lam * (-1)) / max(lam, 1).
    Row 1 (a positive twice): r_pos = 2, r_neg = 2 -> (-2 - 2) / max(lam, 1). beta plays no part."""
    from pipeline.losses import unlearning_loss

    norm = max(lam, 1.0)
    for beta in (0.02, 5.0):
        out = unlearning_loss(torch.tensor([-9.0, -18.0]), torch.tensor([-12.0, -18.0]), torch.tensor([-10.0, -20.0]),
                              torch.tensor([-11.0, -20.0]), beta=beta, lam=lam, positive_twice=torch.tensor([False, True]))
        torch.testing.assert_close(out.per_row, torch.tensor([(-1 - lam) / norm, -4 / norm]))
        torch.testing.assert_close(out.loss, torch.tensor([(-1 - lam) / norm, -4 / norm]).mean())


def test_per_row_lambdas_normalise_each_row_by_its_own():
    """The lambda-conditioned policy: row k's CCA loss uses lambda_k and is divided by max(lambda_k, 1);
    a tensor of equal lambdas gives the float result exactly."""
    logp = torch.tensor([-50.0, -60.0])
    lams = torch.tensor([0.5, 100.0])
    out = cca_loss(logp, logp - 3, logp, logp - 3, beta=0.5, lam=lams)
    torch.testing.assert_close(out.per_row, torch.tensor([1.5 * math.log(2) / 1.0, 101 * math.log(2) / 100]))
    same = cca_loss(logp, logp - 3, logp, logp - 3, beta=0.5, lam=torch.tensor([10.0, 10.0]))
    assert torch.equal(same.per_row, cca_loss(logp, logp - 3, logp, logp - 3, beta=0.5, lam=10.0).per_row)
