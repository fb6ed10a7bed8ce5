"""The learning-rate and weight-decay schedules of the released recipes (VAR's lr_control.lr_wd_annealing
'lin0', the constant schedule, the cosine weight decay) by hand, as training applies them per step, and
train.max_steps capping the run the schedule spans."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from worlds import tiny_llamagen_cache_world

from pipeline.alignment import AlignmentRun, lr_factor, weight_decay_at
from pipeline.families import LLAMAGEN
from stages.train import TrainConfig

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------- lr and wd annealing


def test_lin0_schedule_by_hand():
    """VAR's lr_control.lr_wd_annealing('lin0') with total = 101 steps (max_it - 1 = 100), warm-up
    round(0.02 * 101) = round(2.02) = 2 steps, wp0 = 0.005, end ratio 0.01:
      step 0: 0.005 + 0.995 * 0/2 = 0.005
      step 1: 0.005 + 0.995 * 1/2 = 0.5025
      steps 2..6: pasd = (step - 2) / 98 in {0, 1/98, ..., 4/98 = 0.0408} < 0.05 -> 1.0
      step 7: pasd = 5/98 = 0.05102 >= 0.05 -> 0.01 + 0.99 * (93/98) / 0.95 = 0.998936627...
      step 51: pasd = 49/98 = 0.5 -> 0.01 + 0.99 * 0.5 / 0.95 = 0.531052631...
      step 100: pasd = 1 -> 0.01 + 0.99 * 0 / 0.95 = 0.01 exactly."""
    def f(step: int) -> float:
        return lr_factor("lin0", step, 101, 0.02, 0.005, 0.01)

    assert f(0) == pytest.approx(0.005, abs=1e-15)
    assert f(1) == pytest.approx(0.5025, abs=1e-15)
    assert [f(s) for s in range(2, 7)] == [1.0] * 5
    assert f(7) == pytest.approx(0.998936627282492, rel=1e-12)
    assert f(51) == pytest.approx(0.5310526315789474, rel=1e-12)
    assert f(100) == 0.01
    values = [f(s) for s in range(7, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # linear decay, strictly down to the end ratio


def test_constant_schedule_is_always_one():
    assert {lr_factor("constant", s, 101, 0.02, 0.005, 0.01) for s in range(101)} == {1.0}
    assert {lr_factor("constant", s, 10, 0.5, 0.0, 0.0) for s in range(10)} == {1.0}  # even with a warm-up fraction


def test_weight_decay_cosine_by_hand():
    """cur_wd = end + (start - end) (0.5 + 0.5 cos(pi step / (total - 1))): start at step 0, end at the last
    step, the mean at the midpoint (cos(pi/2) = 0); total 101, start 0.05, end 0.08 (the d30 recipe).
    Step 25: cos(pi/4) = 0.70710678 -> 0.08 - 0.03 * 0.85355339 = 0.05439340."""
    assert weight_decay_at(0, 101, 0.05, 0.08) == pytest.approx(0.05, abs=1e-15)
    assert weight_decay_at(100, 101, 0.05, 0.08) == pytest.approx(0.08, abs=1e-15)
    assert weight_decay_at(50, 101, 0.05, 0.08) == pytest.approx(0.065, abs=1e-15)
    assert weight_decay_at(25, 101, 0.05, 0.08) == pytest.approx(0.08 - 0.03 * (0.5 + 0.5 * math.sqrt(0.5)), rel=1e-12)
    assert {weight_decay_at(s, 101, 0.05, None) for s in range(101)} == {0.05}


def test_training_applies_the_lin0_lr_per_step(tmp_path):
    """4 steps, warm-up round(0.5 * 4) = 2, lr 1e-3, end ratio 0.1: logged lr per step
    step 0: 0.005e-3; step 1: (0.005 + 0.995/2) e-3 = 0.5025e-3; step 2: pasd 0/1 -> 1e-3; step 3: pasd 1 -> 0.1e-3."""
    policy, tokens, cache = tiny_llamagen_cache_world()
    cfg = TrainConfig(lr=1e-3, lr_schedule="lin0", warmup_fraction=0.5, warmup_start=0.005, end_ratio=0.1, epochs=4.0,
                      batch_size=len(cache["row"]), micro_batch_size=len(cache["row"]), uncond_ratio=0.0)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    logged = [run.step(*batch)["lr"] for batch in run.batches()]
    assert logged == pytest.approx([0.005e-3, 0.5025e-3, 1e-3, 0.1e-3], rel=1e-12)


# ------------------------------------------------------------------------------------- run length


def test_max_steps_caps_the_run_and_the_schedule_spans_the_capped_run():
    """train.max_steps (issue 23 item 4): 2 epochs of 12 rows in batches of 4 are 6 steps; capped at 4, the run
    takes 4, and lin0's last step reaches end_ratio at step 4 (the schedule spans the capped run)."""
    from pipeline.alignment import run_steps

    assert run_steps(2.0, 12, 4, None) == 6 and run_steps(2.0, 12, 4, 4) == 4 and run_steps(2.0, 12, 4, 100) == 6
    base, tokens, cache = tiny_llamagen_cache_world()
    logged = []
    cfg = TrainConfig(lr_schedule="lin0", end_ratio=0.1, lr=1e-3, epochs=2.0, max_steps=4, batch_size=4,
                      micro_batch_size=4, uncond_ratio=0.0)
    run = AlignmentRun(copy.deepcopy(base), tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    logged += [run.step(*batch)["lr"] for batch in run.batches()]
    assert len(logged) == 4 and logged[-1] == pytest.approx(1e-4)
