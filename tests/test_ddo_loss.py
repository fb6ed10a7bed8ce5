"""pipeline.losses.ddo_loss against hand computations (DDO paper Eq. 13 with the released VAR script's weights,
docs/ddo.md)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import cca_loss, ddo_loss

LN2, LN3 = math.log(2), math.log(3)


def test_ratio_zero_gives_ln2_terms():
    """At step 0 the policy is the reference: every ratio is 0 and -log sig(0) = ln 2. alpha = 50 (the VAR
    script's): a conditional row costs (1 + 50) ln 2 / 50; a null-label row 50 ln 2 / 50 = ln 2 (its fake term
    has weight 0). alpha = 0.5: (1 + 0.5) ln 2 / 1 and ln 2."""
    logp = torch.tensor([-50.0, -60.0, -70.0])
    uncond = torch.tensor([False, True, False])
    for alpha, cond_row in ((50.0, 51 * LN2 / 50), (0.5, 1.5 * LN2)):
        out = ddo_loss(logp, logp - 3, logp, logp - 3, beta=0.02, alpha=alpha, uncond=uncond)
        expected = torch.tensor([cond_row, LN2, cond_row])
        torch.testing.assert_close(out.per_row, expected)
        torch.testing.assert_close(out.loss, expected.mean())


# Three rows, beta = 0.5, log-ratios of +-2 ln 3 so that beta r = +-ln 3, where sig(ln 3) = 3/4, sig(-ln 3) = 1/4:
#   -log sig(ln 3) = ln(4/3) and -log sig(-ln 3) = ln 4.
# Row 0 (conditional): r_real = +2 ln 3 -> real term ln(4/3); r_fake = +2 ln 3 -> fake term -log sig(-ln 3) = ln 4
# Row 1 (conditional): r_real = -2 ln 3 -> ln 4;               r_fake = -2 ln 3 -> -log sig(ln 3) = ln(4/3)
# Row 2 (null label):  r_real = +2 ln 3 -> ln(4/3); its fake (r_fake = 1000) has weight 0
REF_REAL = torch.tensor([-10.0, -20.0, -30.0], dtype=torch.float64)
REF_FAKE = torch.tensor([-40.0, -50.0, -60.0], dtype=torch.float64)
R_REAL = torch.tensor([2 * LN3, -2 * LN3, 2 * LN3], dtype=torch.float64)
R_FAKE = torch.tensor([2 * LN3, -2 * LN3, 1000.0], dtype=torch.float64)
UNCOND = torch.tensor([False, False, True])


@pytest.mark.parametrize(("alpha", "rows"), [
    # alpha = 0.5 < 1: divided by max(0.5, 1) = 1
    #   row 0: ln(4/3) + 0.5 ln 4 = ln(4/3) + ln 2 = ln(8/3);  row 1: ln 4 + 0.5 ln(4/3);  row 2: 1 * ln(4/3) / 1
    (0.5, [math.log(8 / 3), 2 * LN2 + 0.5 * math.log(4 / 3), math.log(4 / 3)]),
    # alpha = 4 > 1: divided by 4
    #   row 0: (ln(4/3) + 4 ln 4) / 4 = ln(4/3)/4 + 2 ln 2;  row 1: (ln 4 + 4 ln(4/3)) / 4 = ln(2)/2 + ln(4/3);
    #   row 2: 4 ln(4/3) / 4 = ln(4/3): a null-label row is a plain positive term whatever alpha
    (4.0, [math.log(4 / 3) / 4 + 2 * LN2, LN2 / 2 + math.log(4 / 3), math.log(4 / 3)]),
])
def test_worked_example(alpha: float, rows: list[float]):
    out = ddo_loss(REF_REAL + R_REAL, REF_FAKE + R_FAKE, REF_REAL, REF_FAKE, beta=0.5, alpha=alpha, uncond=UNCOND)
    expected = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(out.per_row, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.ratio_pos, R_REAL)
    torch.testing.assert_close(out.ratio_neg, R_FAKE)


@pytest.mark.parametrize("alpha", [0.5, 4.0])
def test_gradients_by_hand(alpha: float):
    """d/dr of -log sig(beta r) is -beta sig(-beta r); d/dr of -alpha log sig(-beta r) is +alpha beta sig(beta r);
    each divided by max(alpha, 1) (a null-label row: max(alpha, 1) / max(alpha, 1) = 1) and by B = 3 (the mean).
        real: row 0 -0.5 * 1/4 = -1/8, row 1 -0.5 * 3/4 = -3/8, row 2 (null label) -1/8 with no division
        fake: row 0 +alpha 0.5 * 3/4 = 3 alpha/8, row 1 +alpha 0.5 * 1/4 = alpha/8, row 2 exactly 0
    Signs: the real rows' likelihood is pushed up, the fakes' down."""
    real = (REF_REAL + R_REAL).requires_grad_()
    fake = (REF_FAKE + R_FAKE).requires_grad_()
    ref_real, ref_fake = REF_REAL.clone().requires_grad_(), REF_FAKE.clone().requires_grad_()
    ddo_loss(real, fake, ref_real, ref_fake, beta=0.5, alpha=alpha, uncond=UNCOND).loss.backward()
    norm = max(alpha, 1.0)
    expected_real = torch.tensor([-1 / 8 / norm, -3 / 8 / norm, -1 / 8], dtype=torch.float64) / 3
    expected_fake = torch.tensor([3 * alpha / 8 / norm, alpha / 8 / norm, 0.0], dtype=torch.float64) / 3
    torch.testing.assert_close(real.grad, expected_real, rtol=1e-12, atol=0)
    torch.testing.assert_close(fake.grad, expected_fake, rtol=1e-12, atol=0)
    assert (real.grad < 0).all() and (fake.grad[:2] > 0).all() and fake.grad[2] == 0
    # the reference is the other side of the ratio: its gradient is the policy's negated (train never asks for it)
    torch.testing.assert_close(ref_real.grad, -expected_real)


def test_a_null_label_rows_fake_is_not_read():
    """Whatever a null-label row's fake log-probs are, its loss is its real term alone."""
    base = ddo_loss(REF_REAL + R_REAL, REF_FAKE + R_FAKE, REF_REAL, REF_FAKE, beta=0.5, alpha=4.0, uncond=UNCOND)
    moved = REF_FAKE + R_FAKE + torch.tensor([0.0, 0.0, -5000.0], dtype=torch.float64)
    other = ddo_loss(REF_REAL + R_REAL, moved, REF_REAL, REF_FAKE, beta=0.5, alpha=4.0, uncond=UNCOND)
    assert torch.equal(base.per_row, other.per_row)


def test_ddo_is_cca_on_conditional_rows_and_differs_on_null_label_rows():
    """Same shape as CCA (paper Eq. 12) with lam = alpha and the fake in the negative's place; only the
    null-label rule differs: CCA's null row is a positive twice, (ln 2 + ln 2) / max(lam, 1) at ratio 0
    (lam = 10: 0.2 ln 2), DDO's one positive term, ln 2."""
    pos, neg = torch.tensor([-9.0, -18.0]), torch.tensor([-12.0, -18.0])
    ref_pos, ref_neg = torch.tensor([-10.0, -18.0]), torch.tensor([-11.0, -18.0])
    mask = torch.tensor([False, True])
    ddo = ddo_loss(pos, neg, ref_pos, ref_neg, beta=0.5, alpha=10.0, uncond=mask)
    cca = cca_loss(pos, neg, ref_pos, ref_neg, beta=0.5, lam=10.0, positive_twice=mask)
    torch.testing.assert_close(ddo.per_row[0], cca.per_row[0])
    torch.testing.assert_close(cca.per_row[1], torch.tensor(0.2 * LN2))
    torch.testing.assert_close(ddo.per_row[1], torch.tensor(LN2))


def test_float32_policy_and_float64_reference():
    pos = torch.tensor([-5.0], requires_grad=True)
    out = ddo_loss(pos, pos.detach() - 1, torch.tensor([-5.0], dtype=torch.float64),
                   torch.tensor([-6.0], dtype=torch.float64), beta=1.0, alpha=2.0)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(3 * LN2 / 2)  # ratio 0: (1 + 2) ln 2 / 2


def test_logged_metrics_leave_null_label_rows_out_of_the_fakes():
    out = ddo_loss(torch.tensor([1.0, 2.0, 5.0]), torch.tensor([-1.0, 3.0, 9.0]), torch.zeros(3), torch.zeros(3),
                   beta=1.0, alpha=1.0, uncond=torch.tensor([False, False, True]))
    m = out.metrics(torch.tensor([False, False, True]))
    assert m["rewards/pos"] == pytest.approx(8 / 3)
    assert m["rewards/neg"] == pytest.approx(1.0)  # (-1 + 3) / 2: the null-label row's 9 is left out
    assert m["rewards/accuracy"] == pytest.approx(0.5)
