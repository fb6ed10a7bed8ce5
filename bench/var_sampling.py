"""Benchmark 7: VAR sampling throughput. Guidance-free (ours: the unconditional half is never computed)
vs the upstream sampler's behaviour (VAR's autoregressive_infer_cfg always runs the null half, even at
cfg 0: CCA's 2x saving is then never realised) vs CFG (linear schedule, as VAR samples for FID).

    python bench/var_sampling.py           # prints a table, writes bench/results/var_sampling.json
    BENCH_VAR_DEPTH=16 python bench/var_sampling.py   # the released VAR-d16 size (slow on a CPU)
    python bench/var_sampling.py --device cuda        # bf16 autocast on a GPU: var_sampling_cuda.json
    python bench/var_sampling.py --quick              # smoke run: batch 4, one timed run (var_sampling_quick.json)

Random weights at the release's layout (10 scales, 680 tokens, 4096 codes); tokens only: the VQVAE
decoder costs the same for every setting, so it is timed once, separately. Environment knobs (override
--quick's): BENCH_VAR_DEPTH, BENCH_VAR_BATCHES (comma-separated), BENCH_REPEATS, BENCH_THREADS.

MFU counts the transformer's matmuls as run (bench/common.py var_sample_flops: every block's linear layers
and attention per scale with the KV cache, the AdaLN and head projections), twice per image where the null
half goes through the network (upstream behaviour, CFG); the quantiser's convolutions between scales are
not counted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    env_threads,
    fmt_mfu,
    mfu,
    parse_args,
    peak_flops,
    peak_label,
    summary,
    table,
    timed,
    var_sample_flops,
    write_results,
)
from pipeline.device import autocast  # noqa: E402
from pipeline.families import VAR as VAR_FAMILY  # noqa: E402
from pipeline.models.var import VAR, VARModel, var_config  # noqa: E402
from pipeline.sampling import sample_var  # noqa: E402
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel  # noqa: E402

DEPTH = int(os.environ.get("BENCH_VAR_DEPTH", "8"))  # d8: C=512, 8 heads, 38M parameters (CPU-sized)
BATCHES = [int(b) for b in os.environ.get("BENCH_VAR_BATCHES", "16,64").split(",")]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))


def images_per_s(model, batch: int, repeats: int, device: torch.device, peak: float, **kwargs) -> dict:
    labels = (torch.arange(batch) % model.cfg.num_classes).to(device)

    def run():
        with autocast(device):
            sample_var(model, labels, generator=torch.Generator(device=device).manual_seed(0), **kwargs)

    with torch.inference_mode():
        s = summary(timed(run, repeats, warmup=1, device=device))
    doubled = kwargs.get("cfg_scale", 0.0) != 0.0 or kwargs.get("upstream_null_half", False)
    flops_per_s = batch * (2 if doubled else 1) * var_sample_flops(model.cfg) / s["median_s"]
    return {**s, "images_per_s": batch / s["median_s"], "batch": batch, "flops_per_s": flops_per_s, "mfu": mfu(flops_per_s, device, peak)}


def main(args) -> dict:
    env_threads()
    device = args.device
    batches = BATCHES if "BENCH_VAR_BATCHES" in os.environ or not args.quick else [4]
    repeats = REPEATS if "BENCH_REPEATS" in os.environ or not args.quick else 1
    peak = peak_flops(device)
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig()).to(device).eval()
    model = VARModel(VAR(var_config(DEPTH)), vae.quantize).to(device).eval()
    params_m = model.var.num_params() / 1e6
    results = {"depth": DEPTH, "params_m": params_m, "device": str(device), "matmul_peak_flops_per_s": peak,
               "flops_per_image": var_sample_flops(model.cfg)}
    rows = []
    for batch in batches:
        ours = images_per_s(model, batch, repeats, device, peak)
        upstream = images_per_s(model, batch, repeats, device, peak, upstream_null_half=True)
        cfg = images_per_s(model, batch, repeats, device, peak, cfg_scale=1.5, cfg_schedule="linear", top_k=900, top_p=0.96)
        results[f"b{batch}"] = {"guidance_free": ours, "upstream_null_half": upstream, "cfg_linear_1.5": cfg}
        results[f"b{batch}_speedup_vs_upstream"] = ours["images_per_s"] / upstream["images_per_s"]
        results[f"b{batch}_speedup_vs_cfg"] = ours["images_per_s"] / cfg["images_per_s"]
        name = f"VAR-d{DEPTH} ({params_m:.0f}M), batch {batch}"
        rows.append([name, "guidance-free, null half skipped (ours)", f"{ours['images_per_s']:.2f}",
                     f"{ours['min_s']:.2f}-{ours['max_s']:.2f}", fmt_mfu(ours["mfu"]), ""])
        rows.append([name, "guidance-free, null half computed (upstream)", f"{upstream['images_per_s']:.2f}",
                     f"{upstream['min_s']:.2f}-{upstream['max_s']:.2f}", fmt_mfu(upstream["mfu"]),
                     f"ours {results[f'b{batch}_speedup_vs_upstream']:.2f}x faster"])
        rows.append([name, "CFG 1.5 linear, top-k 900, top-p 0.96", f"{cfg['images_per_s']:.2f}",
                     f"{cfg['min_s']:.2f}-{cfg['max_s']:.2f}", fmt_mfu(cfg["mfu"]), f"ours {results[f'b{batch}_speedup_vs_cfg']:.2f}x faster"])
    codes = torch.randint(0, 4096, (batches[0], 680)).to(device)

    def decode_run():
        with VAR_FAMILY.decode_precision(device):  # as eval decodes: the release's fp16 autocast on CUDA
            vae.decode_codes(codes)

    with torch.inference_mode():
        decode = summary(timed(decode_run, 1, warmup=1, device=device))
    results["decode_images_per_s"] = batches[0] / decode["median_s"]
    print(f"VAR sampling on {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}), 10 scales / 680 tokens per image, "
          f"tokens only, median of {repeats} after a warm-up; VQVAE decode alone "
          f"({'fp16 autocast, as eval' if device.type == 'cuda' else 'float32'}): {results['decode_images_per_s']:.1f} images/s "
          f"(batch {batches[0]}), the same for every row")
    print(peak_label(device) + "; transformer matmuls as run (the null half counted where computed)")
    print(table(rows, ["model", "sampler", "images/s", "time range s", "MFU", "ratio"]))
    write_results("var_sampling", results, device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
