"""Benchmark 4: reflogp throughput (sequences/s) and its model FLOP utilisation (MFU): achieved FLOP/s
against the device's matmul peak, measured in the same process, for the mid-size config. A forward only:
forward_flops (bench/common.py) per sequence, 3 sequences (c, c_neg, null) per row.

    python bench/reflogp.py                  # prints a table, writes bench/results/reflogp.json
    python bench/reflogp.py --device cuda    # bf16 autocast, bf16 peak: bench/results/reflogp_cuda.json
    python bench/reflogp.py --quick          # smoke run: 16 rows, one timed run (reflogp_quick.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    MID,
    fmt_flops,
    fmt_mfu,
    forward_flops,
    mfu,
    parse_args,
    peak_flops,
    peak_label,
    summary,
    table,
    timed,
    write_results,
)
from pipeline.models.llamagen import GPT  # noqa: E402
from pipeline.refcache import reference_logps  # noqa: E402


def main(args) -> dict:
    device = args.device
    peak = peak_flops(device)
    torch.manual_seed(0)
    model = GPT(MID).to(device).eval()
    rng = np.random.default_rng(0)
    rows = 16 if args.quick else 32 if device.type == "cpu" else 1024  # a GPU needs more rows to time
    batches = (4, 16) if device.type == "cpu" else (16, 64, 256)
    repeats = 1 if args.quick else 3
    tokens = rng.integers(0, MID.vocab_size, (rows, 1, MID.block_size)).astype(np.uint16)
    pairs = {"row": np.arange(rows), "view": np.zeros(rows, np.int16), "label": rng.integers(0, 1000, rows).astype(np.int32),
             "neg_label": rng.integers(0, 1000, rows).astype(np.int32)}
    results = {"device": str(device), "rows": rows, "matmul_peak_gflops": peak / 1e9, "matmul_peak_flops_per_s": peak}
    table_rows = []
    for batch in batches:
        s = summary(timed(lambda: reference_logps(model, tokens, pairs, batch, device), repeats, warmup=1, device=device))
        sequences = 3 * rows  # c, c_neg and null per row
        flops_per_s = sequences * forward_flops(MID, MID.block_size) / s["median_s"]
        results[f"batch{batch}"] = {**s, "sequences_per_s": sequences / s["median_s"], "gflops": flops_per_s / 1e9,
                                    "flops_per_s": flops_per_s, "fraction_of_peak": mfu(flops_per_s, device, peak)}
        table_rows.append([f"{batch} rows ({3 * batch} sequences) per forward", f"{sequences / s['median_s']:.1f}",
                           fmt_flops(flops_per_s), fmt_mfu(mfu(flops_per_s, device, peak)), f"{s['min_s']:.2f}-{s['max_s']:.2f}"])
    print(f"reflogp on {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}), GPT "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {MID.block_size} tokens, {rows} rows, median of {repeats}")
    print(peak_label(device))
    print(table(table_rows, ["batch", "sequences/s", "model FLOP/s", "MFU", "time range s"]))
    write_results("reflogp", results, device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
