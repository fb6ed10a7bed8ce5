"""Benchmark 7: VAR sampling throughput. Guidance-free (ours: the unconditional half is never computed)
vs the upstream sampler's behaviour (VAR's autoregressive_infer_cfg always runs the null half, even at
cfg 0: CCA's 2x saving is then never realised) vs CFG (linear schedule, as VAR samples for FID).

    python bench/var_sampling.py           # prints a table, writes bench/results/var_sampling.json
    BENCH_VAR_DEPTH=16 python bench/var_sampling.py   # the released VAR-d16 size (slow on a CPU)

Random weights at the release's layout (10 scales, 680 tokens, 4096 codes); tokens only: the VQVAE
decoder costs the same for every setting, so it is timed once, separately.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_threads, summary, table, timed, write_results  # noqa: E402
from pipeline.models.var import VAR, VARModel, var_config  # noqa: E402
from pipeline.sampling import sample_var  # noqa: E402
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel  # noqa: E402

DEPTH = int(os.environ.get("BENCH_VAR_DEPTH", "8"))  # d8: C=512, 8 heads, 38M parameters (CPU-sized)
BATCHES = [int(b) for b in os.environ.get("BENCH_VAR_BATCHES", "16,64").split(",")]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def images_per_s(model, batch: int, **kwargs) -> dict:
    labels = torch.arange(batch) % model.cfg.num_classes
    run = lambda: sample_var(model, labels, generator=torch.Generator().manual_seed(0), **kwargs)  # noqa: E731
    with torch.inference_mode():
        s = summary(timed(run, REPEATS, warmup=1))
    return {**s, "images_per_s": batch / s["median_s"], "batch": batch}


def main() -> dict:
    env_threads()
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig()).eval()
    model = VARModel(VAR(var_config(DEPTH)), vae.quantize).eval()
    params_m = model.var.num_params() / 1e6
    results = {"depth": DEPTH, "params_m": params_m}
    rows = []
    for batch in BATCHES:
        ours = images_per_s(model, batch)
        upstream = images_per_s(model, batch, upstream_null_half=True)
        cfg = images_per_s(model, batch, cfg_scale=1.5, cfg_schedule="linear", top_k=900, top_p=0.96)
        results[f"b{batch}"] = {"guidance_free": ours, "upstream_null_half": upstream, "cfg_linear_1.5": cfg}
        results[f"b{batch}_speedup_vs_upstream"] = ours["images_per_s"] / upstream["images_per_s"]
        results[f"b{batch}_speedup_vs_cfg"] = ours["images_per_s"] / cfg["images_per_s"]
        name = f"VAR-d{DEPTH} ({params_m:.0f}M), batch {batch}"
        rows.append([name, "guidance-free, null half skipped (ours)", f"{ours['images_per_s']:.2f}",
                     f"{ours['min_s']:.2f}-{ours['max_s']:.2f}", ""])
        rows.append([name, "guidance-free, null half computed (upstream)", f"{upstream['images_per_s']:.2f}",
                     f"{upstream['min_s']:.2f}-{upstream['max_s']:.2f}",
                     f"ours {results[f'b{batch}_speedup_vs_upstream']:.2f}x faster"])
        rows.append([name, "CFG 1.5 linear, top-k 900, top-p 0.96", f"{cfg['images_per_s']:.2f}",
                     f"{cfg['min_s']:.2f}-{cfg['max_s']:.2f}", f"ours {results[f'b{batch}_speedup_vs_cfg']:.2f}x faster"])
    codes = torch.randint(0, 4096, (BATCHES[0], 680))
    with torch.inference_mode():
        decode = summary(timed(lambda: vae.decode_codes(codes), 1, warmup=1))
    results["decode_images_per_s"] = BATCHES[0] / decode["median_s"]
    print(f"VAR sampling, 10 scales / 680 tokens per image, tokens only, median of {REPEATS} after a warm-up; "
          f"VQVAE decode alone: {results['decode_images_per_s']:.1f} images/s (batch {BATCHES[0]}), the same for every row")
    print(table(rows, ["model", "sampler", "images/s", "time range s", "ratio"]))
    write_results("var_sampling", results)
    return results


if __name__ == "__main__":
    main()
