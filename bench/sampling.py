"""Benchmark 3: sampling throughput. Guidance-free vs CFG (same model, same batch: CFG doubles the batch
through the network), and KV cache vs recomputing the prefix at every step.

    python bench/sampling.py                  # prints a table, writes bench/results/sampling.json
    python bench/sampling.py --device cuda    # bf16 autocast on a GPU: bench/results/sampling_cuda.json
    python bench/sampling.py --quick          # smoke run: batch 16 only, one timed run (sampling_quick.json)

MFU counts the model FLOPs actually run: per image decode_flops (bench/common.py: with the KV cache, the
per-token forward costs summed over the 256 tokens; without it, the whole prefix recomputed at each step),
twice that for CFG, whose null half goes through the network too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    MID,
    decode_flops,
    fmt_mfu,
    mfu,
    parse_args,
    peak_flops,
    peak_label,
    summary,
    table,
    timed,
    write_results,
)
from pipeline.device import autocast  # noqa: E402
from pipeline.models.llamagen import GPT, GPTConfig  # noqa: E402
from pipeline.sampling import sample  # noqa: E402

# KV cache vs no cache needs 256 decode steps that each re-run the whole prefix without a cache: a smaller
# model keeps that side measurable on a CPU; the ratio is what matters.
SMALL = GPTConfig(dim=256, n_layer=4, n_head=4, vocab_size=4096, num_classes=1000, block_size=256, multiple_of=256)


def images_per_s(model, batch: int, repeats: int, device: torch.device, peak: float, **kwargs) -> dict:
    labels = (torch.arange(batch) % model.cfg.num_classes).to(device)
    use_cache = kwargs.get("use_cache", True)

    def run():
        with autocast(device):
            sample(model, labels, generator=torch.Generator(device=device).manual_seed(0), **kwargs)

    times = timed(run, repeats, warmup=1 if use_cache else 0, device=device)
    s = summary(times)
    rows_through = batch * (2 if kwargs.get("cfg_scale", 0.0) != 0.0 else 1)  # CFG: the null half as well
    flops_per_s = rows_through * decode_flops(model.cfg, use_cache=use_cache) / s["median_s"]
    return {**s, "images_per_s": batch / s["median_s"], "batch": batch, "flops_per_s": flops_per_s, "mfu": mfu(flops_per_s, device, peak)}


def main(args) -> dict:
    device = args.device
    peak = peak_flops(device)
    torch.manual_seed(0)
    mid, small = GPT(MID).to(device).eval(), GPT(SMALL).to(device).eval()
    batches = ((16, 1),) if args.quick else ((16, 2), (64, 2), (256, 1))
    results = {"device": str(device), "matmul_peak_flops_per_s": peak}
    for batch, repeats in batches:
        results[f"mid_b{batch}_free"] = images_per_s(mid, batch, repeats, device, peak)
        results[f"mid_b{batch}_cfg"] = images_per_s(mid, batch, repeats, device, peak, cfg_scale=1.0)
    results["small_b16_cache"] = images_per_s(small, 16, 1 if args.quick else 3, device, peak)
    results["small_b16_nocache"] = images_per_s(small, 16, 1, device, peak, use_cache=False)
    rows = []
    mid_m, small_m = sum(p.numel() for p in mid.parameters()) / 1e6, sum(p.numel() for p in small.parameters()) / 1e6
    for batch, _ in batches:
        free, cfg = results[f"mid_b{batch}_free"], results[f"mid_b{batch}_cfg"]
        rows.append([f"GPT {mid_m:.0f}M, batch {batch}, no guidance", f"{free['images_per_s']:.2f}",
                     f"{free['min_s']:.2f}-{free['max_s']:.2f}", fmt_mfu(free["mfu"]), ""])
        rows.append([f"GPT {mid_m:.0f}M, batch {batch}, CFG", f"{cfg['images_per_s']:.2f}", f"{cfg['min_s']:.2f}-{cfg['max_s']:.2f}",
                     fmt_mfu(cfg["mfu"]), f"guidance-free {free['images_per_s'] / cfg['images_per_s']:.2f}x faster"])
        results[f"cfg_cost_b{batch}"] = free["images_per_s"] / cfg["images_per_s"]
    c, n = results["small_b16_cache"], results["small_b16_nocache"]
    results["kv_speedup"] = c["images_per_s"] / n["images_per_s"]
    rows.append([f"GPT {small_m:.0f}M, batch 16, KV cache", f"{c['images_per_s']:.2f}", f"{c['min_s']:.2f}-{c['max_s']:.2f}",
                 fmt_mfu(c["mfu"]), ""])
    rows.append([f"GPT {small_m:.0f}M, batch 16, prefix recomputed", f"{n['images_per_s']:.3f}", f"{n['min_s']:.2f}",
                 fmt_mfu(n["mfu"]), f"KV cache {results['kv_speedup']:.1f}x faster"])
    runs = "one run after a warm-up" if args.quick else "median of 2 after a warm-up (batch 256 and the no-cache run: one run)"
    print(f"sampling {MID.block_size} tokens per image on {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
          f"tokens only, no VQ decode), {runs}")
    print(peak_label(device) + "; model FLOPs as run (CFG: 2x the rows; no cache: the prefix recomputed)")
    print(table(rows, ["setting", "images/s", "time range s", "MFU", "ratio"]))
    write_results("sampling", results, device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
