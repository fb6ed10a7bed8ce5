"""Benchmark 5: the data path into train. Opening the token store (Zarr, lazy) and reading the reference cache
(Parquet), then assembling train batches in train's chunk-aware order (each row's view read from the
store's chunks on demand), against what a train step consumes (its steps/s from train_step.json).

    python bench/data_path.py      # prints a table, writes bench/results/data_path.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import summary, table, timed, write_results  # noqa: E402
from pipeline.alignment import epoch_order, make_batch  # noqa: E402
from pipeline.formats import read_ref_cache, write_ref_cache  # noqa: E402
from pipeline.tokenstore import open_token_store, write_token_store  # noqa: E402

ROWS, VIEWS, TOKENS, BATCH = 100_000, 2, 256, 256  # an ImageNet-shaped slice: 256 tokens, 2 views, global batch 256


def main() -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = rng.integers(0, 16384, (ROWS, VIEWS, TOKENS)).astype(np.uint16)
        labels = rng.integers(0, 1000, ROWS).astype(np.int32)
        attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 16384, "image_size": 256, "grid": 16,
                 "augmentations": ["center", "center_flip"], "class_names": [str(i) for i in range(1000)]}
        write_token_store(tmp / "t.zarr", tokens, labels, attrs, chunk_rows=4096)
        cols = {"row": np.arange(ROWS), "label": labels, "neg_label": (labels + 1) % 1000, "view": rng.integers(0, 2, ROWS).astype(np.int16),
                "ref_logp_pos": rng.normal(size=ROWS), "ref_logp_neg": rng.normal(size=ROWS), "ref_logp_null": rng.normal(size=ROWS)}
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
            i = next(k) % (ROWS // BATCH)
            rows = order[i * BATCH : (i + 1) * BATCH]
            make_batch(rows, store.tokens, cache, rng.random(BATCH) < 0.1, 1000)

        batch = summary(timed(one_batch, 50, warmup=2))
    batches_per_s = 1 / batch["median_s"]
    step_file = Path(__file__).parent / "results" / "train_step.json"
    consumed = None
    if step_file.is_file():  # a train step of the mid-size model on this machine consumes 2 rows; scale to 256-row batches
        step = json.loads(step_file.read_text())["cached"]
        consumed = (2 / step["median_s"]) / BATCH
    results = {"rows": ROWS, "load_token_store": load_store, "load_cache": load_cache, "batch_assembly": batch,
               "batches_per_s": batches_per_s, "train_batches_per_s": consumed,
               "headroom": batches_per_s / consumed if consumed else None}
    rows = [["open token store (metadata; lazy)", f"{load_store['median_s'] * 1e3:.1f} ms", f"{ROWS} x {VIEWS} x {TOKENS} uint16"],
            ["read reference cache", f"{load_cache['median_s']:.3f} s", f"{ROWS} rows"],
            ["assemble a 256-row train batch", f"{batch['median_s'] * 1e3:.2f} ms", f"{batches_per_s:.0f} batches/s"]]
    if consumed:
        rows.append(["train consumes (mid-size model, this CPU)", f"{consumed:.4f} batches/s", f"headroom {batches_per_s / consumed:.0f}x"])
    print("data path into train, median of repeats")
    print(table(rows, ["step", "time", "note"]))
    write_results("data_path", results)
    return results


if __name__ == "__main__":
    main()
