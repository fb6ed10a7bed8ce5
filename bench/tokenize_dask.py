"""Benchmark 6: tokenize throughput (images/s) in process and on a local dask cluster of 1 and 2 workers.

    python bench/tokenize_dask.py                # prints a table, writes bench/results/tokenize_dask.json
    python bench/tokenize_dask.py --device cuda  # the VQ encoder on the GPU (each dask worker on one): tokenize_dask_cuda.json
    python bench/tokenize_dask.py --quick        # smoke run: 32 images (tokenize_dask_quick.json)

MFU: n/a. The encoder is convolutional (no transformer); its FLOPs are not counted, and the wall time
includes JPEG decoding, resizing and cluster start-up, which no FLOP count would cover.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import parse_args, table, write_results  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.tokenizers.vq import VQConfig, VQModel  # noqa: E402
from stages import tokenize  # noqa: E402

# LlamaGen's VQ design at reduced width (ch 64 instead of 128), 128 px images -> 8x8 tokens, A = 2 views.
VQ = VQConfig(codebook_size=16384, codebook_embed_dim=8, ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256)
IMAGES = 256


def main(args) -> dict:
    rng = np.random.default_rng(0)
    device, images = args.device, 32 if args.quick else IMAGES
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for c in range(4):
            (tmp / "img" / f"n{c:08d}").mkdir(parents=True)
            for i in range(images // 4):
                Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(tmp / "img" / f"n{c:08d}" / f"{i}.JPEG", format="JPEG")
        torch.manual_seed(0)
        save_checkpoint(tmp / "vq.pt", VQModel(VQ).state_dict(), VQ.to_dict(), kind="llamagen-vq")
        settings = [(f"in process ({torch.get_num_threads()} threads)", 0), ("dask, 1 worker (1 thread)", 1), ("dask, 2 workers (1 thread each)", 2)]
        for name, workers in settings:
            cfg = tokenize.TokenizeConfig(image_size=128, augment="flip", batch_size=16, chunk_rows=32, dask_workers=workers)
            start = time.perf_counter()
            tokenize.run(cfg, tmp / "img", tmp / "vq.pt", tmp / f"t{workers}.zarr", device)
            seconds = time.perf_counter() - start
            results[name] = {"seconds": seconds, "images_per_s": images / seconds, "workers": workers, "mfu": None}
    rows = [[name, f"{r['images_per_s']:.1f}", f"{r['seconds']:.1f}", "n/a"] for name, r in results.items()]
    print(f"tokenize {images} JPEGs (160x200 -> 128 px, 2 views) on {device}, VQ ch=64 (LlamaGen design), wall time incl. cluster start; "
          "MFU n/a (convolutional encoder, FLOPs not counted)")
    print(table(rows, ["setting", "images/s", "seconds", "MFU"]))
    results["mfu_note"] = "n/a: the VQ encoder is convolutional; its FLOPs are not counted"
    write_results("tokenize_dask", results, device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
