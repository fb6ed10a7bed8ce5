"""Benchmark 3: sampling throughput. Guidance-free vs CFG (same model, same batch: CFG doubles the batch
through the network), and KV cache vs recomputing the prefix at every step.

    python bench/sampling.py        # prints a table, writes bench/results/sampling.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MID, summary, table, timed, write_results  # noqa: E402
from pipeline.models.llamagen import GPT, GPTConfig  # noqa: E402
from pipeline.sampling import sample  # noqa: E402

# KV cache vs no cache needs 256 decode steps that each re-run the whole prefix without a cache: a smaller
# model keeps that side measurable on a CPU; the ratio is what matters.
SMALL = GPTConfig(dim=256, n_layer=4, n_head=4, vocab_size=4096, num_classes=1000, block_size=256, multiple_of=256)


def images_per_s(model, batch: int, repeats: int, **kwargs) -> dict:
    labels = torch.arange(batch) % model.cfg.num_classes
    times = timed(lambda: sample(model, labels, generator=torch.Generator().manual_seed(0), **kwargs), repeats,
                  warmup=0 if kwargs.get("use_cache") is False else 1)
    s = summary(times)
    return {**s, "images_per_s": batch / s["median_s"], "batch": batch}


def main() -> dict:
    torch.manual_seed(0)
    mid, small = GPT(MID).eval(), GPT(SMALL).eval()
    results = {}
    for batch, repeats in ((16, 2), (64, 2), (256, 1)):
        results[f"mid_b{batch}_free"] = images_per_s(mid, batch, repeats)
        results[f"mid_b{batch}_cfg"] = images_per_s(mid, batch, repeats, cfg_scale=1.0)
    results["small_b16_cache"] = images_per_s(small, 16, 3)
    results["small_b16_nocache"] = images_per_s(small, 16, 1, use_cache=False)
    rows = []
    for batch in (16, 64, 256):
        free, cfg = results[f"mid_b{batch}_free"], results[f"mid_b{batch}_cfg"]
        rows.append([f"GPT {sum(p.numel() for p in mid.parameters()) / 1e6:.0f}M, batch {batch}, no guidance", f"{free['images_per_s']:.2f}",
                     f"{free['min_s']:.2f}-{free['max_s']:.2f}", ""])
        rows.append([f"GPT {sum(p.numel() for p in mid.parameters()) / 1e6:.0f}M, batch {batch}, CFG", f"{cfg['images_per_s']:.2f}",
                     f"{cfg['min_s']:.2f}-{cfg['max_s']:.2f}", f"guidance-free {free['images_per_s'] / cfg['images_per_s']:.2f}x faster"])
        results[f"cfg_cost_b{batch}"] = free["images_per_s"] / cfg["images_per_s"]
    c, n = results["small_b16_cache"], results["small_b16_nocache"]
    results["kv_speedup"] = c["images_per_s"] / n["images_per_s"]
    rows.append([f"GPT {sum(p.numel() for p in small.parameters()) / 1e6:.0f}M, batch 16, KV cache", f"{c['images_per_s']:.2f}",
                 f"{c['min_s']:.2f}-{c['max_s']:.2f}", ""])
    rows.append([f"GPT {sum(p.numel() for p in small.parameters()) / 1e6:.0f}M, batch 16, prefix recomputed", f"{n['images_per_s']:.3f}",
                 f"{n['min_s']:.2f}", f"KV cache {results['kv_speedup']:.1f}x faster"])
    print(f"sampling {MID.block_size} tokens per image (tokens only, no VQ decode), median of 2 after a warm-up (batch 256 and the no-cache run: one run)")
    print(table(rows, ["setting", "images/s", "time range s", "ratio"]))
    write_results("sampling", results)
    return results


if __name__ == "__main__":
    main()
