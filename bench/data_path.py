"""Benchmark 5: the data path into train. Opening the token store (Zarr, lazy) and reading the reference cache
(Parquet), then assembling train batches in train's chunk-aware order (each row's view read from the
store's chunks on demand), against what a train step consumes (its steps/s from train_step.json).

    python bench/data_path.py      # prints a table, writes bench/results/data_path.json
    python bench/data_path.py --quick   # smoke run: 10,000 rows (data_path_quick.json)

    python bench/data_path.py --device cuda   # + the copy of each batch to the GPU (data_path_cuda.json)

The data path is CPU work (Zarr, Parquet, numpy); on CUDA each assembled batch is also copied to the GPU
(synchronised). No model computes here, so MFU is n/a. --device also picks the consumption side:
train_step.json (cpu) or train_step_cuda.json (cuda), whose rows_per_step and s/step give the batches/s
a cached train step consumes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import on_device, parse_args, results_name, summary, table, timed, write_results  # noqa: E402
from pipeline.alignment import epoch_order, make_batch  # noqa: E402
from pipeline.formats import read_ref_cache, write_ref_cache  # noqa: E402
from pipeline.tokenstore import open_token_store, write_token_store  # noqa: E402

ROWS, VIEWS, TOKENS, BATCH = 100_000, 2, 256, 256  # an ImageNet-shaped slice: 256 tokens, 2 views, global batch 256


def main(args) -> dict:
    rng = np.random.default_rng(0)
    n_rows = 10_000 if args.quick else ROWS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = rng.integers(0, 16384, (n_rows, VIEWS, TOKENS)).astype(np.uint16)
        labels = rng.integers(0, 1000, n_rows).astype(np.int32)
        attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 16384, "image_size": 256, "grid": 16,
                 "augmentations": ["center", "center_flip"], "class_names": [str(i) for i in range(1000)]}
        write_token_store(tmp / "t.zarr", tokens, labels, attrs, chunk_rows=4096)
        cols = {"row": np.arange(n_rows), "label": labels, "neg_label": (labels + 1) % 1000, "view": rng.integers(0, 2, n_rows).astype(np.int16),
                "ref_logp_pos": rng.normal(size=n_rows), "ref_logp_neg": rng.normal(size=n_rows), "ref_logp_null": rng.normal(size=n_rows)}
        write_ref_cache(tmp / "c.parquet", cols, {"tokens_fingerprint": "x", "ref_ckpt_sha256": "y", "seed": 0,
                                                  "num_classes": 1000, "null_class": 1000, "seq_len": TOKENS})
        load_store = summary(timed(lambda: open_token_store(tmp / "t.zarr"), 3, warmup=0))
        load_cache = summary(timed(lambda: read_ref_cache(tmp / "c.parquet"), 3, warmup=0))
        store = open_token_store(tmp / "t.zarr")
        store.tokens.cache_chunks = 16
        cache, _ = read_ref_cache(tmp / "c.parquet")
        order = epoch_order(rng, cache["row"], store.tokens.chunk_rows, 16)  # train's chunk-aware order
        k = iter(range(10**9))

        def one_batch():
            i = next(k) % (n_rows // BATCH)
            rows = order[i * BATCH : (i + 1) * BATCH]
            b = make_batch(rows, store.tokens, cache, rng.random(BATCH) < 0.1, 1000)
            if args.device.type == "cuda":  # on a GPU the batch is then copied to it, as train does
                for t in (b.tokens, b.labels_pos, b.labels_neg, b.ref_logp_pos, b.ref_logp_neg, b.positive_twice):
                    t.to(args.device)

        batch = summary(timed(one_batch, 50, warmup=2, device=args.device))
    batches_per_s = 1 / batch["median_s"]
    step_file = Path(__file__).parent / "results" / f"{results_name('train_step', args.device)}.json"
    consumed = None
    if step_file.is_file():  # a cached train step of the mid-size model consumes rows_per_step rows; in 256-row batches
        measured = json.loads(step_file.read_text())
        step = measured["cached"]
        consumed = (measured.get("rows_per_step", 8) / step["median_s"]) / BATCH  # 8: train_step.py's default
    results = {"rows": n_rows, "load_token_store": load_store, "load_cache": load_cache, "batch_assembly": batch,
               "batches_per_s": batches_per_s, "train_batches_per_s": consumed, "train_step_file": step_file.name,
               "headroom": batches_per_s / consumed if consumed else None, "mfu": None,
               "mfu_note": "n/a: no model computes in the data path"}
    rows = [["open token store (metadata; lazy)", f"{load_store['median_s'] * 1e3:.1f} ms", f"{n_rows} x {VIEWS} x {TOKENS} uint16"],
            ["read reference cache", f"{load_cache['median_s']:.3f} s", f"{n_rows} rows"],
            ["assemble a 256-row train batch" + (f" (+ copy to {args.device})" if args.device.type == "cuda" else ""),
             f"{batch['median_s'] * 1e3:.2f} ms", f"{batches_per_s:.0f} batches/s"]]
    if consumed:
        rows.append([f"train consumes (mid-size model, {on_device(args.device)}, {step_file.name})", f"{consumed:.4f} batches/s",
                     f"headroom {batches_per_s / consumed:.0f}x"])
    print("data path into train (CPU work; MFU n/a: no model computes here), median of repeats")
    print(table(rows, ["step", "time", "note"]))
    write_results("data_path", results, args.device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
