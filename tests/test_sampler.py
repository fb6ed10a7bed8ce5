"""Sampling with a KV cache: log-probs of sampled tokens equal teacher forcing; cache equals no cache."""

from __future__ import annotations

import torch

from pipeline.sampling import filter_logits, sample


def test_sampled_logps_equal_teacher_forced(tiny_gpt):
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    for scale in (0.0, 1.5):
        out = sample(tiny_gpt, labels, cfg_scale=scale, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            forced = tiny_gpt(out.tokens, labels)
        torch.testing.assert_close(out.token_logp, forced, atol=1e-5, rtol=0)


def test_kv_cache_equals_recomputing_the_prefix(tiny_gpt):
    labels = torch.arange(5).repeat(2)
    for kwargs in ({}, {"cfg_scale": 1.5}, {"top_k": 10, "top_p": 0.9, "temperature": 0.8}):
        a = sample(tiny_gpt, labels, generator=torch.Generator().manual_seed(7), use_cache=True, **kwargs)
        b = sample(tiny_gpt, labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs)
        assert torch.equal(a.tokens, b.tokens), kwargs
        torch.testing.assert_close(a.token_logp, b.token_logp, atol=1e-5, rtol=0)


def test_guidance_changes_samples_and_seed_fixes_them(tiny_gpt):
    labels = torch.arange(5)
    a = sample(tiny_gpt, labels, generator=torch.Generator().manual_seed(1))
    b = sample(tiny_gpt, labels, generator=torch.Generator().manual_seed(1))
    c = sample(tiny_gpt, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_filter_top_k_and_top_p_by_hand():
    """probs (0.5, 0.3, 0.15, 0.05): top-p 0.7 keeps the 2 tokens whose mass first reaches 0.7 (0.5 + 0.3),
    0.85 keeps 3 (0.95), top-k 3 keeps the 3 largest; temperature divides the logits."""
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 0, 0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, 1.0, 0, 0.85)) == [True, True, False, True]
    assert kept(filter_logits(logits, 1.0, 3, 1.0)) == [True, True, False, True]
    torch.testing.assert_close(filter_logits(logits, 0.5, 0, 1.0), logits / 0.5)


def test_top_k_one_is_greedy_decoding(tiny_gpt):
    """With top_k = 1 every sampled token is the argmax of the teacher-forced logits at its position."""
    labels = torch.arange(5)
    out = sample(tiny_gpt, labels, top_k=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_gpt.logits(labels, out.tokens[:, :-1])
    assert torch.equal(out.tokens, logits.argmax(-1))


def test_inverse_cdf_draw_matches_the_distribution():
    """Frequencies of 40,000 draws from p = (0.1, 0, 0.6, 0.3) are within 1.5% of p; zero-mass tokens never drawn."""
    from pipeline.sampling import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(40_000, 1)
    picks = draw(probs, torch.rand(40_000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_on_step_sees_every_token_and_changes_no_sample(tiny_gpt):
    """eval's progress within a batch (issue 30 point 3): the sampler reports each token of the batch as it is
    drawn, and the tokens are bitwise those drawn without the callback."""
    labels = torch.arange(5)
    n = tiny_gpt.cfg.block_size
    for scale in (0.0, 1.5):
        steps = []
        seen = sample(tiny_gpt, labels, cfg_scale=scale, generator=torch.Generator().manual_seed(2),
                      on_step=lambda done, total: steps.append((done, total)))
        plain = sample(tiny_gpt, labels, cfg_scale=scale, generator=torch.Generator().manual_seed(2))
        assert steps == [(t, n) for t in range(1, n + 1)]
        assert torch.equal(seen.tokens, plain.tokens) and torch.equal(seen.token_logp, plain.token_logp)
