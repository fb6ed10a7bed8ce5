"""Dropout during fine-tuning: live in train mode, seeded, and absent when the rate is 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from worlds import tiny_llamagen_cache_world

from pipeline.alignment import AlignmentRun
from pipeline.families import LLAMAGEN
from pipeline.models.llamagen import GPT
from stages.train import TrainConfig

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------- dropout


def _losses(base: GPT, tokens, cache, dropout: float, seed: int) -> list[float]:
    policy = copy.deepcopy(base)
    cfg = TrainConfig(dropout=dropout, beta=1.0, lam=1.0, lr=1e-3, epochs=2.0, batch_size=12, micro_batch_size=6,
                      uncond_ratio=0.0, seed=seed)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)  # it sets the policy's dropout
    logged = [run.step(*batch)["loss"] for batch in run.batches()]
    assert len(logged) == 2  # 2 epochs of 12 rows, one 12-row batch each
    return logged


def test_dropout_is_live_and_seeded():
    """Each step's batch is all 12 rows, so step 0's loss depends on the seed only through dropout masks.
    Without dropout the policy equals the reference at step 0: every ratio is 0 and the loss is the
    ratio-zero value (1 + lambda) ln 2 / max(lambda, 1) = 2 ln 2 = 1.386294... (lambda 1) for any seed. With
    dropout 0.1 (live in train mode; the cache was computed in eval mode) it is not, differs between seeds
    0 and 1, and is reproduced exactly by the same seed. (lambda 1: with lambda 10 the positive and negative
    terms' shifts nearly cancel in the mean, so the first-step difference would be small.)"""
    base, tokens, cache = tiny_llamagen_cache_world()
    ratio_zero = 2 * math.log(2)
    plain0, plain1 = _losses(base, tokens, cache, 0.0, 0), _losses(base, tokens, cache, 0.0, 1)
    assert plain0[0] == pytest.approx(ratio_zero, rel=1e-5) and plain1[0] == pytest.approx(ratio_zero, rel=1e-5)
    drop0, drop0_again, drop1 = (_losses(base, tokens, cache, 0.1, s) for s in (0, 0, 1))
    assert drop0 == drop0_again
    assert abs(drop0[0] - drop1[0]) > 1e-3 and abs(drop0[1] - drop1[1]) > 1e-3
    assert abs(drop0[0] - ratio_zero) > 1e-3 and abs(drop1[0] - ratio_zero) > 1e-3
