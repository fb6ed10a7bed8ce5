"""Benchmark 1 and 2: a CCA train step with the cached reference vs an online reference model (the official
design: a second frozen model forwarded every step), and what that means for a 4-point lambda sweep.

    python bench/train_step.py                 # prints a table, writes bench/results/train_step.json
    python bench/train_step.py --device cuda   # bf16 autocast on a GPU: bench/results/train_step_cuda.json
    python bench/train_step.py --quick         # smoke run: 2 rows per step, 2 repeats (train_step_quick.json)

Each path runs in its own process so that peak memory is its own. Both compute the loss of the same first
batch from the same weights, and the script asserts they agree (to 1e-4 in float32; 1e-2 under bf16, where
the cached reference's batch of 3 conditions rounds differently from the policy's batch of 2). MFU counts a
step as 3 forwards of the policy over the 2 x rows sequences (forward + backward), plus one forward for
the online reference; AdamW is not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    MID,
    fmt_flops,
    fmt_mfu,
    mfu,
    parse_args,
    peak_flops,
    peak_gpu_mb,
    peak_label,
    peak_rss_mb,
    summary,
    table,
    timed,
    train_step_flops,
    write_results,
)

ROWS_PER_STEP = 8  # 8 rows = 16 sequences of 256 tokens per step (a positive and a negative per row)
REPEATS = 7


def one_path(mode: str, device: torch.device, rows_per_step: int, repeats: int) -> dict:
    from pipeline.alignment import AlignBatch, loss_for_batch, with_online_reference
    from pipeline.models.llamagen import GPT
    from pipeline.refcache import reference_logps

    torch.manual_seed(0)
    policy = GPT(MID).to(device)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MID.vocab_size, (rows_per_step, 1, MID.block_size)).astype(np.uint16)
    labels, neg_labels = np.arange(rows_per_step, dtype=np.int32), np.arange(rows_per_step, dtype=np.int32) + 100
    pairs = {"row": np.arange(rows_per_step), "view": np.zeros(rows_per_step, np.int16), "label": labels, "neg_label": neg_labels}
    lab, neg = torch.from_numpy(labels).long(), torch.from_numpy(neg_labels).long()
    no_uncond = torch.zeros(rows_per_step, dtype=torch.bool)
    reflogp_s = None
    if mode == "cached":  # the cache was made beforehand by reflogp; here from the same initial weights
        ref = reference_logps(policy, tokens, pairs, rows_per_step, device)
        reflogp_s = summary(timed(lambda: reference_logps(policy, tokens, pairs, rows_per_step, device), 3, warmup=0,
                                  device=device))["median_s"]
        batch = AlignBatch(torch.from_numpy(tokens[:, 0].astype(np.int64)), lab, neg,
                           torch.from_numpy(ref["ref_logp_pos"]), torch.from_numpy(ref["ref_logp_neg"]), no_uncond)
        reference = None
    else:
        reference = GPT(MID).to(device)
        reference.load_state_dict(policy.state_dict())
        reference.requires_grad_(False).eval()
        batch = AlignBatch(torch.from_numpy(tokens[:, 0].astype(np.int64)), lab, neg, torch.zeros(rows_per_step, dtype=torch.float64),
                           torch.zeros(rows_per_step, dtype=torch.float64), no_uncond)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    losses = []

    def step():
        b = with_online_reference(reference, batch, device) if reference is not None else batch
        out = loss_for_batch(policy, b, "cca", beta=0.02, lam=1000.0, device=device)  # bf16 autocast on CUDA
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())

    times = timed(step, repeats, warmup=1, device=device)
    return {"mode": mode, **summary(times), "first_loss": losses[0], "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(device),
            "params": sum(p.numel() for p in policy.parameters()), "reflogp_s_per_row": reflogp_s and reflogp_s / rows_per_step}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=None, help=f"rows per step (default {ROWS_PER_STEP}; --quick: 2)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed steps after one warm-up (default {REPEATS}; --quick: 2)")
    parser.add_argument("--path", choices=("cached", "online"), help=argparse.SUPPRESS)  # internal: one path, in this process


def main(args: argparse.Namespace) -> dict:
    device = args.device
    rows_per_step = args.rows or (2 if args.quick else ROWS_PER_STEP)
    repeats = args.repeats or (2 if args.quick else REPEATS)
    peak = peak_flops(device)  # here, before the paths run, with the same threads as theirs
    results = {"rows_per_step": rows_per_step, "device": str(device)}
    for mode in ("cached", "online"):
        out = subprocess.run([sys.executable, __file__, "--path", mode, "--device", str(device), "--rows", str(rows_per_step),
                              "--repeats", str(repeats)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the {mode} path failed:\n{out.stderr[-4000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    cached, online = results["cached"], results["online"]
    tolerance = 1e-2 if device.type == "cuda" else 1e-4
    assert abs(cached["first_loss"] - online["first_loss"]) < tolerance, (cached["first_loss"], online["first_loss"])
    for r in (cached, online):
        r["flops_per_step"] = train_step_flops(MID, rows_per_step, online_reference=r is online)
        r["flops_per_s"] = r["flops_per_step"] / r["median_s"]
        r["mfu"] = mfu(r["flops_per_s"], device, peak)
    speedup = online["median_s"] / cached["median_s"]
    weights_mb = cached["params"] * 4 / 2**20
    memory = "peak_gpu_mb" if device.type == "cuda" else "peak_rss_mb"
    # Benchmark 2 from the measured times: a 4-point sweep costs, per data row, one reflogp pass (3 sequences)
    # plus 4 cached train steps' worth, against 4 online-reference train steps' worth.
    per_row_cached, per_row_online = cached["median_s"] / rows_per_step, online["median_s"] / rows_per_step
    sweep_cached, sweep_online = cached["reflogp_s_per_row"] + 4 * per_row_cached, 4 * per_row_online
    results.update(speedup=speedup, memory_saving_mb=online[memory] - cached[memory], memory_kind=memory, weights_mb=weights_mb,
                   rss_saving_mb=online["peak_rss_mb"] - cached["peak_rss_mb"], matmul_peak_flops_per_s=peak,
                   sweep_seconds_per_row={"cached": sweep_cached, "online": sweep_online, "ratio": sweep_online / sweep_cached})
    rows = [[m, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r[memory]:.0f}", f"{r['first_loss']:.6f}",
             fmt_flops(r["flops_per_s"]), fmt_mfu(r["mfu"])]
            for m, r in (("cached reference", cached), ("online reference", online))]
    print(f"train step on {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}), GPT {cached['params'] / 1e6:.1f}M params, "
          f"{rows_per_step} rows x 2 sequences x {MID.block_size} tokens, median of {repeats} (after 1 warm-up)")
    print(peak_label(device) + "; a step = 3 policy forwards (+1 reference forward online)")
    print(table(rows, ["path", "s/step", "range", "peak GPU MB" if memory == "peak_gpu_mb" else "peak RSS MB", "first loss",
                       "model FLOP/s", "MFU"]))
    print(f"cached is {speedup:.2f}x faster per step (target >= 1.30); peak memory lower by "
          f"{results['memory_saving_mb']:.0f} MB (one model's float32 weights: {weights_mb:.0f} MB)")
    print(f"4-point lambda sweep: reflogp once + 4 cached trainings vs 4 online trainings: {sweep_online / sweep_cached:.2f}x less time")
    write_results("train_step", results, device, args.quick)
    return results


if __name__ == "__main__":
    args = parse_args(__doc__, add_args)
    if args.path:
        print(json.dumps(one_path(args.path, args.device, args.rows or ROWS_PER_STEP, args.repeats or REPEATS)))
    else:
        main(args)
