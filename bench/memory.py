"""The memory plan (pipeline/memplan.py, `cca-pipe plan`) against measured peaks: GPT configs of growing
size, planned vs measured peak memory of a training step, with and without activation checkpointing, one
process on the CPU.

    python bench/memory.py                # prints a table, writes bench/results/memory.json
    python bench/memory.py --quick        # the two smallest configs (memory_quick.json)
    python bench/memory.py --threads 2    # torch threads of the measured process (default 1)

What is measured: a fresh process (`--worker`) first runs a tiny model of the same family through both
code paths (so libtorch's code pages are in before the baseline: they count in RSS), resets its peak RSS
(`/proc/self/clear_refs` 5 resets VmHWM), takes VmRSS as the baseline, builds the model and trains a step
of one micro-batch then a step of two (forward of 2 x micro_batch_size sequences -> per-sequence log-prob
-> the CCA loss, backward, gradient clipping, AdamW), then reports VmHWM - baseline. The second step's
second micro-batch is the plan's case: AdamW's moments exist and the gradients are being accumulated.
The process runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_) and PyTorch's huge pages for
tensors of 2 MiB or more (THP_MEM_ALLOC_ENABLE), as `cca-pipe` runs the stages (pipeline/host.py):
by default glibc raises the threshold up to 32 MiB as blocks are freed and keeps such blocks in its heap,
so RSS would follow the largest set ever freed rather than the tensors alive; with the threshold fixed,
a freed tensor's memory goes back to the system and the peak RSS is the peak of live tensors.

`measure(specs)` measures any list of single-process specs (see `spec`); multi-process rows (FSDP vs DDP
over 2 processes) can be added beside `single_process_rows` with their own launcher.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.host import HUGE_PAGES_ENV, MMAP_THRESHOLD  # noqa: E402 (after the path: run as a script)

# (dim, layers, heads) at LlamaGen's vocabulary and 256 tokens: ~12M, ~37M (bench.common.MID), ~112M parameters
SIZES = ((256, 4, 4), (512, 6, 8), (768, 12, 12))
MICRO_BATCH = 2  # rows per forward = 4 sequences
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), HUGE_PAGES_ENV: "1"}  # as `cca-pipe` runs; see the docstring


def spec(family: str, model: dict, micro_batch_size: int, activation_checkpointing: bool, dropout: float = 0.0,
         num_classes: int = 10) -> dict:
    """One measurement: the model (pipeline.memplan.build_meta's description), its batch and settings."""
    return {"family": family, "model": {**model, "num_classes": num_classes}, "micro_batch_size": micro_batch_size,
            "activation_checkpointing": activation_checkpointing, "dropout": dropout}


def planned(s: dict):
    """(PlanInputs, MemoryPlan) for a spec: one process on the CPU (DDP at world size 1: no buckets), float32."""
    from pipeline.memplan import build_meta, inputs_from_model, plan

    inputs = inputs_from_model(build_meta(s["family"], **s["model"]), s["micro_batch_size"], world_size=1, strategy="ddp",
                               device="cpu", activation_checkpointing=s["activation_checkpointing"], dropout=s["dropout"])
    return inputs, plan(inputs)


def measure(specs: list[dict], threads: int = 1, timeout: float = 600, worker: str = "--worker") -> list[dict]:
    """Measured peak bytes of each spec's training steps (or, with worker="--inference-worker", of each
    inference spec), in one fresh worker process (see the docstring)."""
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), worker], input=json.dumps(specs), env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"memory worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _train(model, s: dict, micro_batches: tuple[int, ...] = (1, 2), seed: int = 0) -> None:
    """CCA training steps of `micro_batches` micro-batches each, as pipeline.alignment runs them (one forward
    over positives and negatives). The first step makes the gradients and AdamW's moments; the second
    step's second micro-batch runs with all of them alive, the plan's case."""
    import torch

    from pipeline.losses import LOSSES

    gen = torch.Generator().manual_seed(seed)
    m, cfg = s["micro_batch_size"], model.cfg
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05)
    model.train()
    for n_micro in micro_batches:
        opt.zero_grad(set_to_none=True)
        for _ in range(n_micro):
            tokens = torch.randint(0, cfg.vocab_size, (m, cfg.seq_len), generator=gen)
            labels = torch.randint(0, cfg.num_classes, (2 * m,), generator=gen)
            keys = torch.randint(0, 2**62, (2 * m,), generator=gen)  # each sequence's dropout key
            logp = model(torch.cat([tokens, tokens]), labels, None, keys).sum(-1)
            pos, neg = logp.split(m)
            out = LOSSES["cca"](pos, neg, pos.detach() - 1.0, neg.detach() + 1.0, beta=0.02, lam=10.0)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()


def _build(s: dict, tiny: bool = False):
    from pipeline.memplan import build_meta

    model_spec = dict(s["model"])
    if tiny:  # the same code paths at a negligible size
        keys = {"llamagen": {"dim": 64, "n_layer": 1, "n_head": 4, "block_size": 16},
                "var": {"width": 64, "depth": 1, "heads": 4}}[s["family"]]
        model_spec.update(keys)
    model = build_meta(s["family"], "cpu", **model_spec)
    model.set_dropout(s["dropout"])
    model.set_activation_checkpointing(s["activation_checkpointing"])
    return model


def worker(specs: list[dict]) -> list[dict]:
    import torch

    torch.manual_seed(0)
    for s in specs:  # warm-up: page in the code of every path measured below
        _train(_build({**s, "micro_batch_size": 1}, tiny=True), {**s, "micro_batch_size": 1})
    results = []
    for s in specs:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss("VmRSS")
        model = _build(s)
        built = _rss("VmRSS") - base
        _train(model, s)
        results.append({"peak_bytes": _rss("VmHWM") - base, "model_bytes": built})
        del model
    return results


def single_process_rows(quick: bool = False, threads: int = 1) -> list[dict]:
    """Planned vs measured for the GPT sizes, checkpointing off and on."""
    sizes = SIZES[:2] if quick else SIZES
    specs = [spec("llamagen", {"gpt_model": "GPT-B", "block_size": 256, "dim": dim, "n_layer": layers, "n_head": heads},
                  MICRO_BATCH, ckpt, dropout=0.1)
             for dim, layers, heads in sizes for ckpt in (False, True)]
    rows = []
    for s, m in zip(specs, measure(specs, threads), strict=True):
        inputs, p = planned(s)
        rows.append({"model": s["model"], "params": inputs.params_total, "activation_checkpointing": s["activation_checkpointing"],
                     "sequences": inputs.sequences, "planned": p.rows(), "planned_peak_bytes": p.peak, "peak_phase": p.peak_phase,
                     "measured_peak_bytes": m["peak_bytes"], "ratio": m["peak_bytes"] / p.peak})
    return rows


# ------------------------------------------------------------------------------ tokenize and eval (inference)


def inference_spec(stage: str, tokenizer: dict, image_size: int, batch_size: int, views: int = 1, gpt: dict | None = None,
                   samples: int = 0, guided: bool = True) -> dict:
    """One inference measurement: "tokenize" (encode_views of batch_size x views images), "eval" (generate_images:
    sampling and decoding `samples` images in batches, with a GPT of `gpt`'s keys) or "scoring" (InceptionV3 features
    of batch_size images, random weights). `tokenizer`: VQConfig overrides of VQ-16."""
    return {"stage": stage, "tokenizer": tokenizer, "image_size": image_size, "batch_size": batch_size, "views": views,
            "gpt": gpt or {}, "samples": samples, "guided": guided}


def _inference_models(s: dict):
    from pipeline.models.llamagen import GPT, gpt_config
    from pipeline.tokenizers.vq import VQModel, vq_config

    vq = VQModel(vq_config("VQ-16", **s["tokenizer"])).eval()
    grid = s["image_size"] // vq.cfg.downsample
    gpt = GPT(gpt_config("GPT-B", block_size=grid * grid, vocab_size=vq.cfg.codebook_size, num_classes=10, **s["gpt"])).eval() \
        if s["stage"] == "eval" else None
    return vq, gpt


def _random_inception():
    """torch-fidelity's InceptionV3 with random weights (its constructor insists on reading a weights file)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from pipeline.metrics import FeatureExtractor

    real_load, real_load_sd = torch.load, torch.nn.Module.load_state_dict
    torch.load, torch.nn.Module.load_state_dict = (lambda *a, **k: {}), (lambda self, sd, *a, **k: None)
    try:
        module = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path="-")
    finally:
        torch.load, torch.nn.Module.load_state_dict = real_load, real_load_sd
    return FeatureExtractor(module.eval(), {"fid": "2048"}, "inception-v3-compat", "")


def _run_inference(s: dict, vq, gpt, extractor, count: int | None = None) -> None:
    import numpy as np
    import torch

    from pipeline.families import LLAMAGEN
    from pipeline.metrics import extract_features
    from pipeline.sampling import generate_images
    from pipeline.tokenizers.encode import encode_views

    gen = torch.Generator().manual_seed(0)
    if s["stage"] == "tokenize":
        views = torch.randint(0, 256, (count or s["batch_size"], s["views"], s["image_size"], s["image_size"], 3),
                              dtype=torch.uint8, generator=gen)
        encode_views(vq, views, torch.device("cpu"))
    elif s["stage"] == "eval":
        labels = torch.arange(10).repeat(s["samples"])[:count]  # `samples` per class of 10
        generate_images(LLAMAGEN, gpt, vq, labels, seed=0, batch_size=s["batch_size"], cfg_scale=1.0 if s["guided"] else 0.0)
    else:
        images = np.random.default_rng(0).integers(0, 256, (count or s["batch_size"], s["image_size"], s["image_size"], 3), np.uint8)
        extract_features(extractor, images, batch_size=s["batch_size"])


def inference_worker(specs: list[dict]) -> list[dict]:
    """Peak bytes of each inference spec above what its models hold (built, and a 1-image run made, before
    the baseline: code pages and the models' weights are not counted; the plan's activation rows are)."""
    import torch

    torch.manual_seed(0)
    results = []
    for s in specs:
        vq, gpt = _inference_models(s)
        extractor = _random_inception() if s["stage"] == "scoring" else None
        with torch.inference_mode():
            _run_inference(s, vq, gpt, extractor, count=1)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss("VmRSS")
            _run_inference(s, vq, gpt, extractor)
        results.append({"peak_bytes": _rss("VmHWM") - base})
        del vq, gpt, extractor
    return results


def planned_inference(s: dict) -> tuple[int, str]:
    """The plan's bytes for a spec beyond the weights (what inference_worker measures), and its phase."""
    from pipeline.memplan import conv_tokenizer, eval_plan, inception_peak_elements, tokenize_plan

    vq, gpt = _inference_models({**s, "stage": s["stage"] if s["stage"] == "eval" else "tokenize"})
    t = conv_tokenizer(vq)
    if s["stage"] == "tokenize":
        p = tokenize_plan(t, s["image_size"], s["batch_size"], s["views"])
        return p.peak - p.rows["tokenizer weights"], p.peak_phase
    if s["stage"] == "scoring":
        return inception_peak_elements() * s["batch_size"] * 4, "scoring"
    p = eval_plan([gpt], t, s["image_size"], s["batch_size"], s["guided"], s["samples"] * 10, "cpu", extractor_elements=0)
    phases = {k: v - p.rows["weights"] for k, v in p.phases.items() if k in ("sampling", "decoding")}
    phase = max(phases, key=phases.get)
    return phases[phase], phase


# VQ-16 at 256px (the encoder ImageNet tokenizes with, random weights), and eval's parts with a small GPT
INFERENCE_SPECS = (
    inference_spec("tokenize", {}, 256, 8), inference_spec("tokenize", {}, 256, 16),
    inference_spec("eval", {}, 256, 8, gpt={"dim": 256, "n_layer": 4, "n_head": 4}, samples=2),
    inference_spec("scoring", {}, 256, 16),
)


def inference_rows(quick: bool = False, threads: int = 1) -> list[dict]:
    specs = list(INFERENCE_SPECS[:1] if quick else INFERENCE_SPECS)
    rows = []
    for s, m in zip(specs, measure(specs, threads, timeout=3600, worker="--inference-worker"), strict=True):
        planned_bytes, phase = planned_inference(s)
        rows.append({"spec": s, "planned_bytes": planned_bytes, "peak_phase": phase, "measured_peak_bytes": m["peak_bytes"],
                     "ratio": m["peak_bytes"] / planned_bytes})
    return rows


def main(args) -> dict:
    from bench.common import table, write_results

    rows = single_process_rows(args.quick, args.threads)
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    print(f"training step peak memory on the CPU (float32, {args.threads} thread(s)), {2 * MICRO_BATCH} sequences x 256 tokens, "
          "dropout 0.1; planned (pipeline/memplan.py) vs measured peak RSS, MB")
    print(table([[f"{r['model']['dim']} x {r['model']['n_layer']}", f"{r['params'] / 1e6:.1f}M", "yes" if r["activation_checkpointing"] else "no",
                  mb(r["planned"]["weights"] + r["planned"]["gradients"] + r["planned"]["optimizer state"]),
                  mb(r["planned"]["activations"]), mb(r["planned"]["logits"]), r["peak_phase"], mb(r["planned_peak_bytes"]),
                  mb(r["measured_peak_bytes"]), f"{r['ratio']:.2f}"] for r in rows],
                ["dim x layers", "params", "act. ckpt", "16P", "activations", "logits", "peak during", "planned", "measured",
                 "measured / planned"]))
    inference = inference_rows(args.quick, args.threads)
    print(f"\ntokenize and eval peak memory on the CPU (float32, {args.threads} thread(s)), random weights; planned "
          "(pipeline/memplan.py, beyond the weights) vs measured peak RSS, MB")
    print(table([[r["spec"]["stage"], f"{r['spec']['image_size']}px", str(r["spec"]["batch_size"]), r["peak_phase"],
                  mb(r["planned_bytes"]), mb(r["measured_peak_bytes"]), f"{r['ratio']:.2f}"] for r in inference],
                ["stage", "images", "batch", "peak during", "planned", "measured", "measured / planned"]))
    results = {"rows": rows, "inference_rows": inference, "threads": args.threads}
    write_results("memory", results, "cpu", args.quick)
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
    elif sys.argv[1:] == ["--inference-worker"]:
        print(json.dumps(inference_worker(json.loads(sys.stdin.read()))))
    else:
        from bench.common import parse_args

        args = parse_args(__doc__, lambda p: p.add_argument("--threads", type=int, default=1, help="torch threads of the measured process"))
        if args.device.type != "cpu":
            sys.exit(f"bench/memory.py measures the CPU's peak RSS; run it with --device cpu (not {args.device})")
        main(args)
