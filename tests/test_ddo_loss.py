"""pipeline.losses.ddo_loss against hand computations (DDO paper Eq. 13 with the released VAR script's weights,
docs/ddo.md), and pipeline.ddo: the loss from cached reference log-probs equals the loss with an online
reference model (two models), gradients included."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.losses import cca_loss, ddo_loss

LN2, LN3 = math.log(2), math.log(3)
CPU = torch.device("cpu")


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


def test_two_fakes_per_row_by_hand():
    """negatives.ratio 2: each row's fake term is the mean over its 2 fakes, i.e. the loss is Eq. 13's two
    separate means. beta = 0.5, alpha = 4, log-ratios +-2 ln 3 as above (beta r = +-ln 3).
        row 0 (conditional): real +2 ln 3 -> ln(4/3); fakes +2 ln 3 -> ln 4 and -2 ln 3 -> ln(4/3), mean
                             2 ln 2 - ln(3)/2; L_0 = (ln(4/3) + 4 (2 ln 2 - ln(3)/2)) / 4 = ln(4/3)/4 + 2 ln 2 - ln(3)/2
        row 1 (null label):  real -2 ln 3 -> ln 4; its fakes (1000, 3000) have weight 0: L_1 = ln 4
    As two means: reals (ln(4/3) + 4 ln 4) / 2 (the null row weighted max(alpha, 1) = 4), fakes over all 4 of
    them (ln 4 + ln(4/3) + 0 + 0) / 4, L = (reals + 4 fakes) / 4 = ln(4/3)/8 + 2 ln 2 - ln(3)/4 = (L_0 + L_1) / 2.
    Gradients (d/dr -log sig(beta r) = -beta sig(-beta r), d/dr -log sig(-beta r) = beta sig(beta r); / 4, / 2
    rows, / 2 fakes for a fake): real 0: -0.5 (1/4) / 4 / 2 = -1/64; real 1: -0.5 (3/4) / 2 = -3/16;
    fake (0, 0): 4 (0.5) (3/4) / 4 / 2 / 2 = 3/32; fake (0, 1): 4 (0.5) (1/4) / 16 = 1/32; row 1's fakes 0."""
    ref_real = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    ref_fake = torch.tensor([[-30.0, -40.0], [-50.0, -60.0]], dtype=torch.float64)
    real = (ref_real + torch.tensor([2 * LN3, -2 * LN3], dtype=torch.float64)).requires_grad_()
    fake = (ref_fake + torch.tensor([[2 * LN3, -2 * LN3], [1000.0, 3000.0]], dtype=torch.float64)).requires_grad_()
    uncond = torch.tensor([False, True])
    out = ddo_loss(real, fake, ref_real, ref_fake, beta=0.5, alpha=4.0, uncond=uncond)
    rows = torch.tensor([math.log(4 / 3) / 4 + 2 * LN2 - LN3 / 2, 2 * LN2], dtype=torch.float64)
    torch.testing.assert_close(out.per_row, rows, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, torch.tensor(math.log(4 / 3) / 8 + 2 * LN2 - LN3 / 4, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(out.ratio_neg[0], torch.tensor(0.0, dtype=torch.float64))  # the row's fakes' mean
    out.loss.backward()
    torch.testing.assert_close(real.grad, torch.tensor([-1 / 64, -3 / 16], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(fake.grad, torch.tensor([[3 / 32, 1 / 32], [0.0, 0.0]], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # a row whose two fakes are the same sequence costs what it costs with that one fake
    twice = ddo_loss(real[:1], fake[:1, :1].expand(1, 2), ref_real[:1], ref_fake[:1, :1].expand(1, 2), beta=0.5, alpha=4.0)
    once = ddo_loss(real[:1], fake[:1, 0], ref_real[:1], ref_fake[:1, 0], beta=0.5, alpha=4.0)
    torch.testing.assert_close(twice.per_row, once.per_row, rtol=1e-12, atol=0)


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


# ----------------------------------------------------------------------- cached == online, on a tiny model


def _world(tiny_gpt, noise, ratio: int = 1):
    """A reference (tiny_gpt, with the noise's dropout), 10 real rows, `ratio` fakes per row drawn from the
    reference for the row's label by the project's sampler (guidance-free; tokens (10, L) for one, (10, r, L)
    for r), and the cache computed once."""
    from pipeline.ddo import reference_columns
    from pipeline.families import LLAMAGEN
    from pipeline.sampling import sample_uniforms

    reference = tiny_gpt
    rng = np.random.default_rng(0)
    n, length = 10, reference.cfg.seq_len
    real = torch.from_numpy(rng.integers(0, reference.cfg.vocab_size, size=(n, length)))
    labels = torch.from_numpy(rng.integers(0, reference.cfg.num_classes, size=n))
    drawn = LLAMAGEN.sample(reference.eval(), labels.repeat_interleave(ratio),
                            uniforms=sample_uniforms(7, list(range(n * ratio)), length))
    fakes = drawn.tokens if ratio == 1 else drawn.tokens.view(n, ratio, length)
    reference.set_dropout(noise.dropout, noise.drop_path)
    cache = {"label": labels.numpy(), **reference_columns(reference, real, fakes, labels, 4, CPU, noise)}
    return reference, real, drawn, fakes, cache


def _policy_keys(rows: np.ndarray, ratio: int = 1) -> torch.Tensor:
    """The real rows' keys, then each row's fakes', row by row, slot by slot (fake j: slot j)."""
    from pipeline.models.layers import noise_keys

    fake = torch.stack([noise_keys(9, rows, "visit_neg", j) for j in range(ratio)], dim=1)
    return torch.cat([noise_keys(9, rows, "visit_pos"), fake.reshape(-1)])


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(("rate", "ratio"), [(0.0, 1), (0.1, 1), (0.0, 2), (0.1, 2)])
def test_cached_ddo_loss_equals_online_two_model_loss(tiny_gpt, rate: float, ratio: int):
    """The loss and every parameter's gradient from the cache (pipeline.ddo) equal those of the released
    script's design computed here directly: a frozen reference forwarded at the step, every fake forwarded
    (a null-label row's fake under null too, weight 0), with reference dropout (rate 0.1: the cache's keyed
    masks) and policy dropout alike. Rows in another order and batch than the cache's. With 2 fakes per row
    the script's loss is written out as its two separate means (paper Eq. 13): the B reals' mean plus alpha
    times the mean over all 2B fakes (a null-label row's counted as 0), divided by max(alpha, 1)."""
    from pipeline.ddo import ddo_loss_for_batch, make_ddo_batch, with_online_reference
    from pipeline.logprobs import sequence_logp
    from pipeline.models.layers import noise_keys
    from pipeline.refcache import ReferenceNoise, row_keys

    noise = ReferenceNoise(seed=4, dropout=rate, drop_path=rate)
    reference, real, drawn, fakes, cache = _world(tiny_gpt, noise, ratio)
    columns = ["ref_logp_fake", "ref_logp_fake_1"][:ratio]
    assert sorted(cache) == sorted(["label", "ref_logp_pos", "ref_logp_null", *columns])
    if rate == 0.0:  # the sampler's own log-probs are the fake columns (teacher forcing of the same tokens)
        sampled = drawn.token_logp.sum(-1).double().numpy().reshape(len(real), ratio)
        assert np.abs(sampled - np.stack([cache[c] for c in columns], axis=1)).max() < 1e-3
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # move the policy away from the reference so that the ratios are not 0
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.train(rate > 0)
    rows = np.array([7, 2, 9, 0, 5, 3, 8, 1])
    uncond = np.arange(len(rows)) % 3 == 1
    keys = _policy_keys(rows, ratio) if rate > 0 else None
    batch = make_ddo_batch(rows, real[rows], fakes[rows], cache, uncond, reference.cfg.null_class, keys)

    policy.zero_grad()
    cached = ddo_loss_for_batch(policy, batch, beta=0.5, alpha=4.0, device=CPU)
    cached.loss.backward()
    cached_grads = _grads(policy)

    # the script's way: two models at the step, every sequence of a row under the row's label (or null)
    null = torch.full_like(batch.labels, reference.cfg.null_class)
    pair_labels = torch.where(batch.uncond, null, batch.labels)
    x = torch.cat([batch.real, fakes[rows].reshape(len(rows) * ratio, -1)])
    y = torch.cat([pair_labels, pair_labels.repeat_interleave(ratio)])
    ref_keys = row_keys(noise, rows, CPU, ("pos", "null"))  # a fake's masks are its own role's, slot j for fake j
    if ref_keys is not None:
        pos, null_keys = ref_keys.view(2, -1)
        fake_keys = torch.stack([noise_keys(4, rows, "fake", j) for j in range(ratio)], dim=1).reshape(-1)
        ref_keys = torch.cat([torch.where(batch.uncond, null_keys, pos), fake_keys])
    reference.train(noise.active)
    with torch.no_grad():
        ref_real, ref_fake = sequence_logp(reference, y, x, dropout_keys=ref_keys).split([len(rows), len(rows) * ratio])
    policy.zero_grad()
    pol_real, pol_fake = sequence_logp(policy, y, x, dropout_keys=keys).split([len(rows), len(rows) * ratio])
    r_real, r_fake = pol_real - ref_real, (pol_fake - ref_fake).view(len(rows), ratio)
    cond = (~batch.uncond).to(r_fake.dtype)[:, None]
    real_weight = torch.where(batch.uncond, 4.0, 1.0)  # max(alpha, 1) on a null-label row
    two_means = ((real_weight * -torch.nn.functional.logsigmoid(0.5 * r_real)).mean()
                 + 4.0 * (cond * -torch.nn.functional.logsigmoid(-0.5 * r_fake)).mean()) / 4.0
    online = ddo_loss(pol_real, pol_fake.view(len(rows), ratio).squeeze(1), ref_real, ref_fake.view(len(rows), ratio).squeeze(1),
                      beta=0.5, alpha=4.0, uncond=batch.uncond)
    torch.testing.assert_close(online.loss, two_means, rtol=1e-6, atol=1e-7)
    two_means.backward()

    assert cached.ratio_pos.abs().max() > 0.1 and cached.ratio_neg.abs().max() > 0.1  # not vacuous
    torch.testing.assert_close(cached.loss, online.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.per_row, online.per_row, rtol=1e-5, atol=1e-6)
    online_grads = _grads(policy)
    assert len(cached_grads) == len(online_grads) and sum(g.abs().sum() for g in online_grads) > 1e-2
    for a, b in zip(cached_grads, online_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    # pipeline.ddo's online path reads the same values as the cache
    again = with_online_reference(reference, batch, CPU, noise)
    torch.testing.assert_close(again.ref_logp_real, batch.ref_logp_real, rtol=0, atol=1e-4)
    torch.testing.assert_close(again.ref_logp_fake, batch.ref_logp_fake, rtol=0, atol=1e-4)
    assert again.ref_logp_fake.shape == (len(rows), ratio)


def test_a_fresh_policy_reproduces_the_cache_and_costs_the_ratio_zero_loss(tiny_gpt):
    """Step 0 (train's check for CCA's cache, here for DDO's columns): a copy of the reference reproduces the
    cached log-probs, so every ratio is 0 and the loss is the hand value: alpha = 4, 2 null-label rows of 6,
    (4 x (1 + 4) ln 2 / 4 + 2 ln 2) / 6 = 7 ln 2 / 6."""
    from pipeline.ddo import ddo_loss_for_batch, make_ddo_batch
    from pipeline.refcache import ReferenceNoise

    reference, real, drawn, fakes, cache = _world(tiny_gpt, ReferenceNoise())
    policy = copy.deepcopy(reference)
    rows = np.array([4, 1, 6, 0, 9, 2])
    uncond = np.array([True, False, False, True, False, False])
    batch = make_ddo_batch(rows, real[rows], fakes[rows], cache, uncond, reference.cfg.null_class)
    with torch.no_grad():
        out = ddo_loss_for_batch(policy, batch, beta=0.5, alpha=4.0, device=CPU)
    assert out.ratio_pos.abs().max() < 1e-3 and out.ratio_neg.abs().max() < 1e-3
    assert out.loss.item() == pytest.approx(7 * LN2 / 6, abs=1e-4)
