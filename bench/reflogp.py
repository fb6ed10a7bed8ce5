"""Benchmark 4: reflogp throughput (sequences/s) and achieved GFLOP/s against this machine's float32 matmul
peak, measured in the same process, for the mid-size config.

    python bench/reflogp.py        # prints a table, writes bench/results/reflogp.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MID, forward_flops, matmul_peak_gflops, summary, table, timed, write_results  # noqa: E402
from pipeline.models.llamagen import GPT  # noqa: E402
from pipeline.refcache import reference_logps  # noqa: E402


def main() -> dict:
    peak = matmul_peak_gflops()
    torch.manual_seed(0)
    model = GPT(MID).eval()
    rng = np.random.default_rng(0)
    rows = 32
    tokens = rng.integers(0, MID.vocab_size, (rows, 1, MID.block_size)).astype(np.uint16)
    pairs = {"row": np.arange(rows), "view": np.zeros(rows, np.int16), "label": rng.integers(0, 1000, rows).astype(np.int32),
             "neg_label": rng.integers(0, 1000, rows).astype(np.int32)}
    results = {"matmul_peak_gflops": peak}
    table_rows = []
    for batch in (4, 16):
        s = summary(timed(lambda: reference_logps(model, tokens, pairs, batch, torch.device("cpu")), 3, warmup=1))
        sequences = 3 * rows  # c, c_neg and null per row
        gflops = sequences * forward_flops(MID, MID.block_size) / s["median_s"] / 1e9
        results[f"batch{batch}"] = {**s, "sequences_per_s": sequences / s["median_s"], "gflops": gflops, "fraction_of_peak": gflops / peak}
        table_rows.append([f"{batch} rows ({3 * batch} sequences) per forward", f"{sequences / s['median_s']:.1f}",
                           f"{gflops:.1f}", f"{gflops / peak:.0%}", f"{s['min_s']:.2f}-{s['max_s']:.2f}"])
    print(f"reflogp, GPT {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {MID.block_size} tokens, {rows} rows, "
          f"median of 3; float32 matmul peak {peak:.1f} GFLOP/s (2048^3 GEMM, best of 5)")
    print(table(table_rows, ["batch", "sequences/s", "GFLOP/s", "of peak", "time range s"]))
    write_results("reflogp", results)
    return results


if __name__ == "__main__":
    main()
