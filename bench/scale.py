"""Benchmark: the token store at ImageNet scale. Synthetic stores of 128k and 1.28M rows (A = 1, L = 256) and
128k rows with A = 10 views: time to open, rows/s through the training DataLoader (pipeline.alignment's
StepRows over the chunk-aware order, batches of 256 rows), peak RSS of the reading process; against the
rows/s a LlamaGen-B-sized train step consumes on this machine.

    python bench/scale.py            # builds the stores in a temporary folder (about 2 GB), prints a table
    BENCH_SCALE_QUICK=1 python bench/scale.py   # 1/10 of the sizes, for a smoke run (also: --quick)
    python bench/scale.py --device cuda         # the LlamaGen-B step on the GPU (bf16 autocast): scale_cuda.json

Each measurement runs in a fresh process, so its peak RSS is that of reading alone. The loader is CPU work
(MFU n/a); the LlamaGen-B step it is compared with reports its MFU (3 forwards of 4 sequences per step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import fmt_mfu, forward_flops, mfu, parse_args, peak_flops, peak_label, table, timed, write_results  # noqa: E402

QUICK = os.environ.get("BENCH_SCALE_QUICK") == "1"
STORES = [(128_000, 1), (1_280_000, 1), (128_000, 10)]
TOKENS, CHUNK, BATCH, STEPS = 256, 1024, 256, 200


def build(path: Path, rows: int, views: int) -> None:
    """A store of random codes, written chunk by chunk (never whole in memory)."""
    from pipeline.tokenstore import TokenStoreWriter

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, rows).astype(np.int32)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 16384, "image_size": 256, "grid": 16,
             "augmentations": [f"v{k}" for k in range(views)], "class_names": [str(i) for i in range(1000)]}
    writer = TokenStoreWriter(path, labels, views, TOKENS, attrs, build_key="bench", chunk_rows=CHUNK)
    for chunk in writer.pending_chunks():
        start, stop = writer.chunk_range(chunk)
        writer.write_chunk(chunk, rng.integers(0, 16384, (stop - start, views, TOKENS), dtype=np.uint16))
    writer.finish()


def measure(path: str, workers: int) -> dict:
    """In a fresh process: open time, DataLoader rows/s over STEPS batches, peak RSS."""
    import resource

    import torch

    from pipeline.alignment import StepRows, epoch_order
    from pipeline.tokenstore import open_token_store

    started = time.perf_counter()
    store = open_token_store(path)
    open_s = time.perf_counter() - started
    n, views = store.tokens.shape[:2]
    cache = {"row": np.repeat(np.arange(n), views), "view": np.tile(np.arange(views, dtype=np.int16), n)}  # views "all"
    store.tokens.cache_chunks = 16
    order = epoch_order(np.random.default_rng(0), cache["row"], store.tokens.chunk_rows, 16)
    loader = torch.utils.data.DataLoader(StepRows(store.tokens, cache, order, BATCH), batch_size=None,
                                         sampler=range(STEPS), num_workers=workers,
                                         multiprocessing_context="spawn" if workers else None)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    started = time.perf_counter()
    got = sum(len(batch) for batch in iterator)
    seconds = time.perf_counter() - started
    return {"open_s": open_s, "rows_per_s": got / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llamagen_b_step(device) -> dict:
    """Rows (a positive and a negative sequence each) per second of a CCA train step of LlamaGen-B (111M
    parameters, 256 tokens), micro-batch 2 rows, forward + backward + AdamW, on this machine (median of 3;
    bf16 autocast on CUDA), and its MFU: 3 forwards of the 4 sequences per step."""
    import torch

    from pipeline.device import autocast
    from pipeline.models.llamagen import GPT, gpt_config

    torch.manual_seed(0)
    cfg = gpt_config("GPT-B", block_size=TOKENS)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens, labels = torch.randint(0, 16384, (4, TOKENS)).to(device), torch.tensor([1, 2, 3, 4]).to(device)

    def step():
        with autocast(device):
            loss = model(tokens, labels).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = timed(step, 3, warmup=0 if device.type == "cpu" else 1, device=device)
    seconds = sorted(times)[1]
    flops_per_s = 3 * 4 * forward_flops(cfg, TOKENS) / seconds
    return {"rows_per_s": 2 / seconds, "seconds_per_step": seconds, "flops_per_s": flops_per_s, "mfu": mfu(flops_per_s, device)}


def main(args) -> dict:
    quick = QUICK or args.quick
    stores = [(rows // 10, views) for rows, views in STORES] if quick else STORES
    results = {"stores": [], "device": str(args.device), "mfu": None, "mfu_note": "n/a for the loader (no model computes)"}
    with tempfile.TemporaryDirectory() as tmp:
        for rows, views in stores:
            path = Path(tmp) / f"s{rows}x{views}.zarr"
            started = time.perf_counter()
            build(path, rows, views)
            entry = {"rows": rows, "views": views, "build_s": time.perf_counter() - started,
                     "gb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9}
            for workers in (0, 2):
                out = subprocess.run([sys.executable, __file__, "--measure", str(path), str(workers)], check=True,
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                entry[f"workers{workers}"] = json.loads(out.stdout.strip().splitlines()[-1])
            results["stores"].append(entry)
            print(f"measured {rows} x {views}", file=sys.stderr)
    peak_flops(args.device)
    results["llamagen_b_step"] = step = llamagen_b_step(args.device)
    results["llamagen_b_rows_per_s"] = step["rows_per_s"]
    write_results("scale", results, args.device, quick)
    rows = [[f"{s['rows']:,} x {s['views']}", f"{s['gb']:.2f}", f"{s['workers0']['open_s'] * 1e3:.1f}",
             f"{s['workers0']['rows_per_s']:,.0f}", f"{s['workers2']['rows_per_s']:,.0f}", f"{s['workers0']['peak_rss_mb']:.0f}"]
            for s in results["stores"]]
    print(table(rows, ["rows x views (L=256)", "store GB", "open ms", "rows/s (in process)", "rows/s (2 workers)",
                       "peak RSS MB (in process)"]))
    small, big = results["stores"][0], results["stores"][1]
    growth = big["workers0"]["peak_rss_mb"] - small["workers0"]["peak_rss_mb"]
    slowest = min(s["workers0"]["rows_per_s"] for s in results["stores"])
    print(f"\nopen at {big['rows']:,} rows: {big['workers0']['open_s'] * 1e3:.1f} ms (target < 1000); peak RSS growth "
          f"{small['rows']:,} -> {big['rows']:,} rows: {growth:.0f} MB (target < 100)")
    print(f"LlamaGen-B train step ({args.device}) consumes {results['llamagen_b_rows_per_s']:.2f} rows/s here (MFU "
          f"{fmt_mfu(step['mfu'])}; {peak_label(args.device)}); the slowest loader gives "
          f"{slowest:,.0f} rows/s = {slowest / results['llamagen_b_rows_per_s']:,.0f}x (target >= 20x); loader MFU: n/a")
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        main(parse_args(__doc__))
