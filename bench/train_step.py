"""Benchmark 1 and 2: a CCA train step with the cached reference vs an online reference model (the official
design: a second frozen model forwarded every step), and what that means for a 4-point lambda sweep.

    python bench/train_step.py            # prints a table, writes bench/results/train_step.json

Each path runs in its own process so that peak RSS is its own. Both compute the loss of the same first
batch from the same weights, and the script asserts they agree.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench.common import MID, peak_rss_mb, summary, table, timed, write_results  # noqa: E402

ROWS_PER_STEP = 8  # 8 rows = 16 sequences of 256 tokens per step (a positive and a negative per row)
REPEATS = 7


def one_path(mode: str) -> dict:
    from pipeline.alignment import AlignBatch, loss_for_batch, with_online_reference
    from pipeline.models.llamagen import GPT
    from pipeline.refcache import reference_logps

    torch.manual_seed(0)
    policy = GPT(MID)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MID.vocab_size, (ROWS_PER_STEP, 1, MID.block_size)).astype(np.uint16)
    labels, neg_labels = np.arange(ROWS_PER_STEP, dtype=np.int32), np.arange(ROWS_PER_STEP, dtype=np.int32) + 100
    pairs = {"row": np.arange(ROWS_PER_STEP), "view": np.zeros(ROWS_PER_STEP, np.int16), "label": labels, "neg_label": neg_labels}
    lab, neg = torch.from_numpy(labels).long(), torch.from_numpy(neg_labels).long()
    no_uncond = torch.zeros(ROWS_PER_STEP, dtype=torch.bool)
    cpu = torch.device("cpu")
    reflogp_s = None
    if mode == "cached":  # the cache was made beforehand by reflogp; here from the same initial weights
        ref = reference_logps(policy, tokens, pairs, ROWS_PER_STEP, cpu)
        reflogp_s = summary(timed(lambda: reference_logps(policy, tokens, pairs, ROWS_PER_STEP, cpu), 3, warmup=0))["median_s"]
        batch = AlignBatch(torch.from_numpy(tokens[:, 0].astype(np.int64)), lab, neg,
                           torch.from_numpy(ref["ref_logp_pos"]), torch.from_numpy(ref["ref_logp_neg"]), no_uncond)
        reference = None
    else:
        reference = GPT(MID)
        reference.load_state_dict(policy.state_dict())
        reference.requires_grad_(False).eval()
        batch = AlignBatch(torch.from_numpy(tokens[:, 0].astype(np.int64)), lab, neg, torch.zeros(ROWS_PER_STEP, dtype=torch.float64),
                           torch.zeros(ROWS_PER_STEP, dtype=torch.float64), no_uncond)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    losses = []

    def step():
        b = with_online_reference(reference, batch, cpu) if reference is not None else batch
        out = loss_for_batch(policy, b, "cca", beta=0.02, lam=1000.0, device=cpu)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())

    times = timed(step, REPEATS, warmup=1)
    return {"mode": mode, **summary(times), "first_loss": losses[0], "peak_rss_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in policy.parameters()), "reflogp_s_per_row": reflogp_s and reflogp_s / ROWS_PER_STEP}


def main() -> dict:
    results = {}
    for mode in ("cached", "online"):
        out = subprocess.run([sys.executable, __file__, "--path", mode], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    cached, online = results["cached"], results["online"]
    assert abs(cached["first_loss"] - online["first_loss"]) < 1e-4, (cached["first_loss"], online["first_loss"])
    speedup = online["median_s"] / cached["median_s"]
    weights_mb = cached["params"] * 4 / 2**20
    # Benchmark 2 from the measured times: a 4-point sweep costs, per data row, one reflogp pass (3 sequences)
    # plus 4 cached train steps' worth, against 4 online-reference train steps' worth.
    per_row_cached, per_row_online = cached["median_s"] / ROWS_PER_STEP, online["median_s"] / ROWS_PER_STEP
    sweep_cached, sweep_online = cached["reflogp_s_per_row"] + 4 * per_row_cached, 4 * per_row_online
    results.update(speedup=speedup, rss_saving_mb=online["peak_rss_mb"] - cached["peak_rss_mb"], weights_mb=weights_mb,
                   sweep_seconds_per_row={"cached": sweep_cached, "online": sweep_online, "ratio": sweep_online / sweep_cached})
    rows = [[m, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{r['first_loss']:.6f}"]
            for m, r in (("cached reference", cached), ("online reference", online))]
    print(f"train step, GPT {cached['params'] / 1e6:.1f}M params, {ROWS_PER_STEP} rows x 2 sequences x {MID.block_size} tokens, "
          f"median of {REPEATS} (after 1 warm-up)")
    print(table(rows, ["path", "s/step", "range", "peak RSS MB", "first loss"]))
    print(f"cached is {speedup:.2f}x faster per step (target >= 1.30); peak RSS lower by "
          f"{results['rss_saving_mb']:.0f} MB (one model's float32 weights: {weights_mb:.0f} MB)")
    print(f"4-point lambda sweep: reflogp once + 4 cached trainings vs 4 online trainings: {sweep_online / sweep_cached:.2f}x less time")
    write_results("train_step", results)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--path":
        print(json.dumps(one_path(sys.argv[2])))
    else:
        main()
