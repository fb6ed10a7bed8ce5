"""Benchmark 9: data parallelism of the CCA train step under torchrun: steps/s and rows/s of the project's
own train stage with 1..N processes, and the efficiency rows/s(N) / (N x rows/s(1)).

    python bench/ddp.py                  # CPU, gloo: 1 and 2 processes; writes bench/results/ddp.json
    python bench/ddp.py --device cuda    # GPUs, NCCL: 1..N processes, N = torch.cuda.device_count(): ddp_cuda.json
    python bench/ddp.py --quick          # smoke run: 1 and 3 steps (ddp_quick.json)

A synthetic world in a temporary folder (as tests/test_distributed.py builds one): a token store
(pipeline.tokenstore.write_token_store), a GPT checkpoint (pipeline.checkpoint.save_checkpoint) and its
reference cache, made by `cca-pipe reflogp`. Then, for each process count N,
`cca-pipe --params <params.yaml> --device D --nproc-per-node N train ...`: N = 1 is one plain process (what
--nproc-per-node 1 runs: no process group), N > 1 re-executes under `torchrun --standalone` (a free port),
gloo on CPU, NCCL on CUDA with one GPU per rank; OMP_NUM_THREADS=1 in every process. The global batch
and its micro-batches are the same for every N (the train stage deals the micro-batches out round robin),
so the runs train the same steps.

Per-step time: the train stage's metrics.json gives "seconds" (its training loop) and "steps"; each N is
trained twice, for a short and a long number of steps, and the steady-state time per step is the
difference of their seconds over the difference of their steps (bench/common.py per_step_seconds), so the
DDP set-up, the first step's allocations and the loader's start cancel; the median over --repeats such
pairs (default 3; --quick: 1) is reported. seconds/steps of the long runs alone is reported beside it.

MFU: a step is 3 forwards of the policy over the batch's 2 x rows sequences (bench/common.py
train_step_flops); achieved FLOP/s over N x the peak of one device: on CPU a float32 GEMM with one thread
(each rank runs one thread), on CUDA a bf16 GEMM on one GPU.

Sizes (--size): "small" (default on CPU) GPTConfig(dim=128, n_layer=2, n_head=4, vocab_size=1024,
num_classes=10, block_size=64), global batch 16 rows, micro-batch 2, 4 and 24 steps; "mid" (default on
CUDA) the 37.7M-parameter MID config of bench/common.py, global batch 64 rows, micro-batch 8, 5 and 25
steps. Process counts that do not divide the step's micro-batches are skipped (the train stage refuses
them); --batch-rows / --micro-rows choose others.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    MID,
    fmt_mfu,
    mfu,
    parse_args,
    peak_flops,
    peak_info,
    peak_label,
    per_step_seconds,
    scaling_efficiency,
    table,
    train_step_flops,
    write_results,
)
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.models.llamagen import GPT, GPTConfig  # noqa: E402
from pipeline.tokenstore import write_token_store  # noqa: E402

SMALL = GPTConfig(dim=128, n_layer=2, n_head=4, vocab_size=1024, num_classes=10, block_size=64, multiple_of=32)
SIZES = {
    "small": {"cfg": SMALL, "batch": 16, "micro": 2, "steps": (4, 24)},
    "mid": {"cfg": MID, "batch": 64, "micro": 8, "steps": (5, 25)},
}
QUICK_STEPS = (1, 3)
TIMEOUT_S = 900  # per cca-pipe command


def cca_pipe() -> list[str]:
    """This environment's cca-pipe (the console script beside this Python, else the module)."""
    script = Path(sys.executable).parent / "cca-pipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stages.cli.main"]


def run_cca(root: Path, args: list, device: str, nproc: int = 1) -> float:
    """Run `cca-pipe --params root/params.yaml --device device --nproc-per-node nproc args`; wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CCA_PIPE_DIST_TIMEOUT_S": "300", "PYTHONPATH": str(ROOT)}
    cmd = [*cca_pipe(), "--params", str(root / "params.yaml"), "--device", device, "--nproc-per-node", str(nproc), *map(str, args)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - started


def build_world(root: Path, cfg: GPTConfig, rows: int, batch: int, micro: int, device: str) -> None:
    """Token store, GPT checkpoint, params.yaml and the reference cache (`cca-pipe reflogp`) under root."""
    rng = np.random.default_rng(0)
    grid = math.isqrt(cfg.block_size)
    tokens = rng.integers(0, cfg.vocab_size, size=(rows, 1, cfg.block_size), dtype=np.uint16)
    labels = (np.arange(rows) % cfg.num_classes).astype(np.int32)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": cfg.vocab_size, "image_size": 16 * grid, "grid": grid,
             "augmentations": ["center"], "class_names": [str(c) for c in range(cfg.num_classes)]}
    write_token_store(root / "tokens.zarr", tokens, labels, attrs, chunk_rows=64)
    torch.manual_seed(0)
    save_checkpoint(root / "gpt.pt", GPT(cfg).state_dict(), cfg.to_dict(), kind="llamagen-gpt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["reflogp"].update(views="all", batch_size=32, part_rows=4096)
    params["train"].update(batch_size=batch, micro_batch_size=micro, lr=1e-4, dropout=0.0, uncond_ratio=0.1, num_workers=0,
                           save_every=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cca(root, ["reflogp", "--tokens", root / "tokens.zarr", "--ref", root / "gpt.pt", "--out", root / "cache.parquet"], device)


def train(root: Path, nproc: int, steps: int, long_steps: int, device: str, repeat: int = 0) -> dict:
    """One train run of `steps` steps with `nproc` processes: its summary's steps and seconds, and the wall
    time of the whole command (interpreter, torchrun and process-group start-up included)."""
    out = root / f"train_n{nproc}_s{steps}_r{repeat}"
    epochs = (steps - 0.5) / long_steps  # the store holds long_steps batches: ceil(epochs * rows / batch) = steps
    wall = run_cca(root, ["--set", f"train.epochs={epochs!r}", "train", "--tokens", root / "tokens.zarr",
                          "--cache", root / "cache.parquet", "--init", root / "gpt.pt", "--out", out], device, nproc)
    summary = json.loads((out / "metrics.json").read_text())
    if summary["steps"] != steps:
        sys.exit(f"{out}: trained {summary['steps']} steps, expected {steps}")
    return {"steps": summary["steps"], "seconds": summary["seconds"], "wall_s": wall}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("auto", *SIZES), default="auto", help="model and batch (auto: small on CPU, mid on CUDA)")
    parser.add_argument("--procs", default=None, help="comma-separated process counts (default: 1,2 on CPU; 1..N GPUs on CUDA)")
    parser.add_argument("--batch-rows", type=int, default=None, help="global batch in rows (default: the size's)")
    parser.add_argument("--micro-rows", type=int, default=None, help="rows per micro-batch (default: the size's)")
    parser.add_argument("--steps", default=None, help="short,long steps per run (default: the size's; --quick: 1,3)")
    parser.add_argument("--repeats", type=int, default=None, help="(short, long) pairs per process count, median taken (default 3; --quick: 1)")


def process_counts(args, n_micro: int) -> tuple[list[int], list[str]]:
    """The process counts to measure and, for each default one skipped, why."""
    if args.procs:
        counts = [int(n) for n in args.procs.split(",")]
        bad = [n for n in counts if n < 1 or n_micro % n]
        if bad:
            sys.exit(f"--procs {args.procs}: {bad} do not divide the step's {n_micro} micro-batches (the train stage refuses them)")
        if args.device.type == "cuda" and max(counts) > torch.cuda.device_count():
            sys.exit(f"--procs {args.procs}: this machine has {torch.cuda.device_count()} GPU(s)")
        return counts, []
    candidates = list(range(1, torch.cuda.device_count() + 1)) if args.device.type == "cuda" else [1, 2]
    counts = [n for n in candidates if n_micro % n == 0]
    skipped = [f"{n} processes: {n_micro} micro-batches per step are not a multiple of {n}" for n in candidates if n_micro % n]
    return counts, skipped


def main(args) -> dict:
    device = args.device
    size = args.size if args.size != "auto" else ("mid" if device.type == "cuda" else "small")
    spec = SIZES[size]
    cfg = spec["cfg"]
    batch, micro = args.batch_rows or spec["batch"], args.micro_rows or spec["micro"]
    if batch % micro:
        sys.exit(f"--batch-rows {batch} is not a multiple of --micro-rows {micro}")
    short, long_ = (tuple(int(s) for s in args.steps.split(",")) if args.steps else QUICK_STEPS if args.quick else spec["steps"])
    if not 1 <= short < long_:
        sys.exit(f"--steps {short},{long_}: need 1 <= short < long")
    repeats = args.repeats or (1 if args.quick else 3)
    counts, skipped = process_counts(args, batch // micro)
    backend = "nccl" if device.type == "cuda" else "gloo"
    load_at_start = list(os.getloadavg())  # a shared machine: what else ran shows here
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        root = Path(tmp)
        build_world(root, cfg, batch * long_, batch, micro, str(device))
        for n in counts:
            dev = str(device) if n == 1 else device.type  # under torchrun each rank takes its LOCAL_RANK GPU
            pairs = []
            for k in range(repeats):
                first, second = train(root, n, short, long_, dev, k), train(root, n, long_, long_, dev, k)
                pairs.append({"short": first, "long": second, "s_per_step": per_step_seconds(
                    (first["steps"], first["seconds"]), (second["steps"], second["seconds"]))})
            seconds = statistics.median(p["s_per_step"] for p in pairs)
            runs.append({"processes": n, "backend": backend if n > 1 else "none (one plain process)", "pairs": pairs,
                         "s_per_step": seconds, "s_per_step_range": [min(p["s_per_step"] for p in pairs), max(p["s_per_step"] for p in pairs)],
                         "steps_per_s": 1 / seconds, "rows_per_s": batch / seconds,
                         "summary_s_per_step": statistics.median(p["long"]["seconds"] / p["long"]["steps"] for p in pairs)})
            print(f"measured {n} process(es): {seconds:.3f} s/step", file=sys.stderr)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the peak of one rank: one thread (OMP_NUM_THREADS=1)
    peak = peak_flops(device)  # after the runs, so this process holds no GPU memory while they train
    flops_per_step = train_step_flops(cfg, batch)
    one = next((r for r in runs if r["processes"] == 1), None)
    for r in runs:
        r["efficiency"] = scaling_efficiency(r["rows_per_s"], r["processes"], one["rows_per_s"]) if one else None
        r["flops_per_s"] = flops_per_step / r["s_per_step"]
        r["mfu"] = mfu(r["flops_per_s"] / r["processes"], device, peak)
    params_m = sum(p.numel() for p in GPT(cfg).parameters()) / 1e6
    results = {"device": str(device), "size": size, "model": cfg.to_dict(), "params_m": params_m, "batch_rows": batch,
               "micro_rows": micro, "steps": [short, long_], "repeats": repeats, "flops_per_step": flops_per_step, "peak_per_process": peak_info(device),
               "runs": runs, "skipped": skipped, "loadavg_at_start": load_at_start}
    rows = [[r["processes"], r["backend"], f"{r['s_per_step']:.3f} ({r['s_per_step_range'][0]:.3f}-{r['s_per_step_range'][1]:.3f})",
             f"{r['steps_per_s']:.2f}", f"{r['rows_per_s']:.1f}",
             f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "n/a", fmt_mfu(r["mfu"]), f"{r['summary_s_per_step']:.3f}"]
            for r in runs]
    print(f"CCA train step, data parallel on {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}): GPT {params_m:.2f}M "
          f"({size}), global batch {batch} rows ({2 * batch} sequences of {cfg.block_size} tokens), micro-batch {micro}; "
          f"s/step = (seconds({long_} steps) - seconds({short} steps)) / {long_ - short}, median (range) of {repeats}, OMP_NUM_THREADS=1; "
          f"load average at start {load_at_start[0]:.2f}")
    print(peak_label(device) + " per process; MFU = model FLOP/s / (N x that peak)")
    print(table(rows, ["processes", "backend", "s/step (range)", "steps/s", "rows/s", "efficiency", "MFU",
                       f"seconds/steps ({long_}-step run)"]))
    for line in skipped:
        print(f"skipped: {line}")
    write_results("ddp", results, device, args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__, add_args))
