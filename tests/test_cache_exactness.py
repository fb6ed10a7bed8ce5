"""The cache is exact: a fresh policy reproduces the cached reference log-probs, and the loss computed
from cached reference log-probs equals the loss with an online reference model on the same rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.alignment import AlignmentRun, loss_for_batch, make_batch, policy_logps
from pipeline.checkpoint import save_checkpoint
from pipeline.families import LLAMAGEN
from pipeline.loaders import load_gpt
from pipeline.logprobs import sequence_logp
from pipeline.losses import cca_loss
from pipeline.models.llamagen import GPTConfig
from pipeline.refcache import draw_pairs, reference_logps
from stages.train import TrainConfig

CPU = torch.device("cpu")


def _world(tiny_gpt, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(12, 3, 16), dtype=np.uint16)
    labels = rng.integers(0, 5, size=12).astype(np.int32)
    save_checkpoint(tmp_path / "ref.pt", tiny_gpt.state_dict(), tiny_gpt.cfg.to_dict(), kind="llamagen-gpt")
    pairs = draw_pairs(labels, 3, 5, seed=1, views="all")
    cache = {**pairs, **reference_logps(load_gpt(tmp_path / "ref.pt"), tokens, pairs, batch_size=7, device=CPU)}
    return tokens, cache


def test_fresh_policy_reproduces_cached_reference(tiny_gpt, tmp_path):
    tokens, cache = _world(tiny_gpt, tmp_path)
    policy = load_gpt(tmp_path / "ref.pt")
    rows = np.arange(len(cache["row"]))
    for uncond in (np.zeros(len(rows), bool), np.arange(len(rows)) % 3 == 0):
        batch = make_batch(rows, tokens, cache, uncond, policy.cfg.null_class)
        with torch.no_grad():
            pos, neg = policy_logps(policy, batch, CPU)
        assert (pos.double() - batch.ref_logp_pos).abs().max() < 1e-3
        assert (neg.double() - batch.ref_logp_neg).abs().max() < 1e-3
    # the null column is log p(x | null) of the same view
    x = torch.from_numpy(tokens[cache["row"], cache["view"]].astype(np.int64))
    with torch.no_grad():
        null = sequence_logp(policy, torch.full((len(x),), policy.cfg.null_class), x)
    assert (null.double() - torch.from_numpy(cache["ref_logp_null"])).abs().max() < 1e-3


def test_cached_loss_equals_online_reference_loss(tiny_gpt, tmp_path):
    tokens, cache = _world(tiny_gpt, tmp_path)
    policy, online_ref = load_gpt(tmp_path / "ref.pt"), load_gpt(tmp_path / "ref.pt")
    with torch.no_grad():  # move the policy away from the reference so ratios are non-zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = np.arange(len(cache["row"]))
    uncond = rows % 4 == 1
    batch = make_batch(rows, tokens, cache, uncond, policy.cfg.null_class)
    cached = loss_for_batch(policy, batch, "cca", beta=0.5, lam=10.0, device=CPU)
    with torch.no_grad():
        ref_pos = sequence_logp(online_ref, batch.labels_pos, batch.tokens)
        ref_neg = sequence_logp(online_ref, batch.labels_neg, batch.tokens)
    pos, neg = policy_logps(policy, batch, CPU)
    online = cca_loss(pos, neg, ref_pos, ref_neg, beta=0.5, lam=10.0, positive_twice=batch.positive_twice)
    assert abs(cached.ratio_pos).max() > 0.1  # the check is not vacuous
    torch.testing.assert_close(cached.loss, online.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.per_row, online.per_row, rtol=1e-5, atol=1e-5)


def test_first_step_loss_is_the_ratio_zero_value_and_training_moves_weights(tiny_gpt, tmp_path):
    tokens, cache = _world(tiny_gpt, tmp_path)
    policy = load_gpt(tmp_path / "ref.pt")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logged = []
    cfg = TrainConfig(beta=0.5, lam=10.0, lr=3e-3, epochs=4.0, batch_size=12, micro_batch_size=4, uncond_ratio=0.0)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    logged += [run.step(*batch) for batch in run.batches()]
    assert len(logged) == 12  # 4 epochs x 36 cache rows / 12
    assert math.isclose(logged[0]["loss"], 11 * math.log(2) / 10, rel_tol=1e-4)
    assert logged[-1]["rewards/margin"] > 0  # positives now above negatives
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_online_reference_path_gives_the_cached_loss(tiny_gpt, tmp_path):
    """The benchmark's online path (a frozen second model every step) computes the same loss as the cache."""
    from pipeline.alignment import with_online_reference

    tokens, cache = _world(tiny_gpt, tmp_path)
    policy, reference = load_gpt(tmp_path / "ref.pt"), load_gpt(tmp_path / "ref.pt")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = np.arange(len(cache["row"]))
    batch = make_batch(rows, tokens, cache, rows % 5 == 0, policy.cfg.null_class)
    online = with_online_reference(reference, batch, CPU)
    torch.testing.assert_close(online.ref_logp_pos, batch.ref_logp_pos, atol=1e-3, rtol=0)
    a = loss_for_batch(policy, batch, "cca", beta=0.5, lam=10.0, device=CPU)
    b = loss_for_batch(policy, online, "cca", beta=0.5, lam=10.0, device=CPU)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_a_lambda_conditioned_policy_at_step_0_is_the_reference_for_any_lambda(tiny_gpt, tmp_path):
    """The lambda embedding starts at zero: a fresh lambda-conditioned policy reproduces the cached
    reference log-probs (|delta| < 1e-3 nats) at every lambda; after training, lambda matters."""
    from stages.train import TrainConfig

    tokens, cache = _world(tiny_gpt, tmp_path)
    policy = load_gpt(tmp_path / "ref.pt")
    policy.enable_lambda_conditioning()
    rows = np.arange(len(cache["row"]))
    for lam in (1.0, 30.0, 8103.0):
        batch = make_batch(rows, tokens, cache, np.zeros(len(rows), bool), policy.cfg.null_class, lam=np.full(len(rows), lam))
        with torch.no_grad():
            pos, neg = policy_logps(policy, batch, CPU)
        assert (pos.double() - batch.ref_logp_pos).abs().max() < 1e-3
        assert (neg.double() - batch.ref_logp_neg).abs().max() < 1e-3
    cfg = TrainConfig(beta=0.5, lr=3e-3, epochs=4.0, batch_size=12, micro_batch_size=4, uncond_ratio=0.0,
                      lambda_conditioning={"min": 1, "max": 1000})
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    for batch in run.batches():
        run.step(*batch)
    run.finish()
    x, labels = torch.from_numpy(tokens[:4, 0].astype(np.int64)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        low, high = (sequence_logp(policy, labels, x, torch.full((4,), lam)) for lam in (1.0, 1000.0))
    assert (low - high).abs().max() > 1e-3  # the embedding learned something of lambda


def test_a_lambda_conditioned_checkpoint_loads_whole_and_into_the_peer_layout_without_its_extra_keys(tiny_gpt, tmp_path):
    from pipeline.models.llamagen import GPT

    tiny_gpt.enable_lambda_conditioning()
    with torch.no_grad():
        tiny_gpt.lambda_embed.mlp[2].weight.add_(0.1)
    LLAMAGEN.save(tmp_path / "policy.pt", tiny_gpt)
    back = load_gpt(tmp_path / "policy.pt")
    assert back.cfg.lambda_conditioning and torch.equal(back.lambda_embed.mlp[2].weight, tiny_gpt.lambda_embed.mlp[2].weight)
    state = torch.load(tmp_path / "policy.pt", weights_only=True)["model"]
    extra = {k for k in state if k.startswith("lambda_embed.")}
    assert extra == {"lambda_embed.mlp.0.weight", "lambda_embed.mlp.0.bias", "lambda_embed.mlp.2.weight", "lambda_embed.mlp.2.bias"}
    plain = GPT(GPTConfig(**{**tiny_gpt.cfg.to_dict(), "lambda_conditioning": False}))
    plain.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)  # the peer's layout


def test_a_policy_given_the_caches_masks_reproduces_a_cache_computed_with_dropout(tiny_gpt, tmp_path):
    """reflogp.dropout > 0: each row's masks are keyed by (seed, row, role), so the policy at step 0 (here
    lambda-conditioned, scored at lambda 1) replays them and passes train's step-0 check, with other
    micro-batches than the cache's batches; with another seed's masks it does not (the masks matter)."""
    from pipeline.distributed import World
    from pipeline.refcache import CacheMismatch, ReferenceNoise, check_cache_rows

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(12, 3, 16), dtype=np.uint16)
    pairs = draw_pairs(rng.integers(0, 5, size=12).astype(np.int32), 3, 5, seed=1, views="all")
    save_checkpoint(tmp_path / "ref.pt", tiny_gpt.state_dict(), tiny_gpt.cfg.to_dict(), kind="llamagen-gpt")
    reference = load_gpt(tmp_path / "ref.pt")
    reference.set_dropout(0.5, 0.5)
    noise = ReferenceNoise(seed=4, dropout=0.5, drop_path=0.5)
    cache = {**pairs, **reference_logps(reference, tokens, pairs, batch_size=7, device=CPU, noise=noise)}
    policy = load_gpt(tmp_path / "ref.pt")
    policy.enable_lambda_conditioning()
    policy.set_dropout(0.5, 0.5)
    rows = np.random.default_rng(2).permutation(len(cache["row"]))
    check_cache_rows(policy, policy, tokens, cache, rows, noise, 5, CPU, World(), "cache.parquet")
    with pytest.raises(CacheMismatch, match="cache.parquet: column ref_logp_pos"):
        check_cache_rows(policy, policy, tokens, cache, rows, ReferenceNoise(5, 0.5, 0.5), 5, CPU, World(), "cache.parquet")


def test_a_reference_giving_non_finite_log_probs_is_refused_naming_the_row():
    """reflogp checks each part before writing it: a NaN or an infinity anywhere in a row's log-probs stops it,
    naming how many rows and the first one's token store row."""
    from pathlib import Path

    from stages.reflogp import check_finite

    part = {"row": np.array([5, 7, 9])}
    finite = {"ref_logp_pos": np.array([-1.0, -2.0, -3.0]), "ref_logp_neg": np.array([-4.0, -5.0, -6.0])}
    check_finite(finite, part, Path("ref.pt"), Path("cache.parquet"))
    broken = {"ref_logp_pos": np.array([-1.0, np.nan, -3.0]), "ref_logp_neg": np.array([-4.0, -5.0, -np.inf])}
    with pytest.raises(FloatingPointError, match=r"ref.pt gives non-finite log-probs for 2 of 3 rows \(first: token store "
                                                 r"row 7\).*Nothing was written to cache.parquet"):
        check_finite(broken, part, Path("ref.pt"), Path("cache.parquet"))
