"""Benchmark 11: memory per process of DDP vs FSDP (train.strategy) at 2 processes, with and without
activation checkpointing, for a GPT of ~100M parameters (LlamaGen-B's shape: dim 768, 12 layers, 12 heads,
vocabulary 16384, 1000 classes; 256 tokens).

    python bench/fsdp.py                 # CPU, gloo, 2 processes: writes bench/results/fsdp.json
    python bench/fsdp.py --device cuda   # 2 GPUs, NCCL (bf16 FSDP): fsdp_cuda.json
    python bench/fsdp.py --quick         # a 4-layer model, 1 step (fsdp_quick.json)

Each configuration is one `torchrun --standalone --nproc-per-node 2` of this file's worker (OMP_NUM_THREADS=1
per rank), which builds the model on every rank (seeded), then trains 2 steps of the project's own loop
(pipeline.alignment.AlignmentRun: distribute, AdamW over the family's groups, clipping) on a synthetic cache
of 8 rows, global batch 4 rows, micro-batch 1 row (2 sequences per forward), so each rank runs 2
micro-batches per step. Per rank it reports:
  - state: the bytes this process holds of the trained weights, their gradients and AdamW's two moments,
    counted tensor by tensor (a DTensor counts its local shard): DDP 16 bytes per parameter, FSDP 16/N;
  - peak: the peak resident memory over the training steps (VmHWM, reset once the model is built and, for
    FSDP, sharded) minus the resident memory before the model was built: the model state, activations,
    the FSDP working set (gathered blocks), DDP's buckets, allocator slack; glibc is told to return freed
    blocks (MALLOC_MMAP_THRESHOLD_, as bench/memory.py), so freed tensors do not linger in the figure;
  - on CUDA, torch.cuda.max_memory_allocated over the steps.
The plan's prediction (pipeline/memplan.py, `cca-pipe plan`) is printed beside each row.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]


def model_config(quick: bool):
    from pipeline.models.llamagen import GPTConfig

    return GPTConfig(dim=768, n_layer=4 if quick else 12, n_head=12, vocab_size=16384, num_classes=1000, block_size=256)


def worker(out: Path, strategy: str, checkpointing: bool, quick: bool) -> None:
    import numpy as np
    import torch

    from pipeline.alignment import AlignConfig, AlignmentRun
    from pipeline.device import local_bytes, rss_mb
    from pipeline.distributed import init_world, shutdown_world
    from pipeline.families import LLAMAGEN
    from pipeline.models.llamagen import GPT
    from pipeline.parallel import distribute, place

    world = init_world(os.environ.get("BENCH_DEVICE", "cpu"))
    torch.manual_seed(0)
    cfg = model_config(quick)
    before_model = rss_mb()
    policy = place(GPT(cfg), world, strategy)
    if strategy == "fsdp":  # sharded before the peak is reset: the plan counts a rank's shard, not the load
        distribute(policy, world, strategy)
    rows = 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(rows, 1, cfg.block_size), dtype=np.uint16)
    labels = (np.arange(rows) % cfg.num_classes).astype(np.int32)
    cache = {"row": np.arange(rows), "view": np.zeros(rows, np.int16), "label": labels, "neg_label": (labels + 1) % cfg.num_classes,
             **{k: np.full(rows, -2000.0) for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null")}}
    align = AlignConfig(beta=0.02, lam=10.0, lr=1e-5, epochs=(1 if quick else 2) * 4 / rows, batch_size=4, micro_batch_size=1,
                        uncond_ratio=0.0, strategy=strategy, activation_checkpointing=checkpointing)
    optimizers = []

    class RecordedAdamW(torch.optim.AdamW):  # to count its state after the steps
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    torch.optim.AdamW = RecordedAdamW
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux)
        f.write("5")
    run = AlignmentRun(policy, tokens, cache, align, world.device, world, LLAMAGEN.param_groups)
    for batch in run.batches():
        run.step(*batch)
    run.finish()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    trained = [p for p in policy.parameters() if p.requires_grad]
    moments = [t for state in optimizers[0].state.values() for k, t in state.items() if k != "step" and torch.is_tensor(t)]
    result = {"rank": world.rank, "params": sum(p.numel() for p in GPT(cfg).parameters()) if world.main else None,
              "weights_bytes": local_bytes(trained), "grad_bytes": local_bytes(p.grad for p in trained if p.grad is not None),
              "optimizer_bytes": local_bytes(moments), "rss_before_model_mb": before_model, "peak_mb": hwm - before_model,
              **({"cuda_peak_mb": torch.cuda.max_memory_allocated(world.device) / 2**20} if world.device.type == "cuda" else {})}
    gathered = world.gather(result)
    if world.main:
        out.write_text(json.dumps(gathered))
    shutdown_world()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planned(strategy: str, checkpointing: bool, quick: bool, device) -> float:
    """The plan's per-rank peak for this run (GB): pipeline/memplan.py, what `cca-pipe plan` prints."""
    import torch

    from pipeline.memplan import inputs_from_model, plan
    from pipeline.models.llamagen import GPT

    with torch.device("meta"):
        model = GPT(model_config(quick))
    return plan(inputs_from_model(model, 1, world_size=2, strategy=strategy, activation_checkpointing=checkpointing,
                                     device=device.type)).peak / 1e9


def main() -> None:
    from bench.common import parse_args, table, write_results

    args = parse_args(__doc__)
    from bench.memory import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "CCA_PIPE_DIST_TIMEOUT_S": "300", "PYTHONPATH": str(ROOT),
           "BENCH_DEVICE": args.device.type}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, checkpointing in CONFIGS:
            out = Path(tmp) / f"{strategy}-{checkpointing}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                   "--master-addr", "127.0.0.1", __file__, "--worker", str(out), strategy, str(checkpointing),
                   str(args.quick)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                sys.exit(f"{strategy} (checkpointing {checkpointing}) failed:\n{proc.stderr[-3000:]}")
            runs[f"{strategy}{'+ac' if checkpointing else ''}"] = json.loads(out.read_text())
    params = runs["ddp"][0]["params"]
    ddp_state = sum(runs["ddp"][0][k] for k in ("weights_bytes", "grad_bytes", "optimizer_bytes"))
    rows = []
    for name, ranks in runs.items():
        strategy, checkpointing = name.removesuffix("+ac"), name.endswith("+ac")
        plan = planned(strategy, checkpointing, args.quick, args.device)
        for r in ranks:
            state = r["weights_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]
            rows.append([name, r["rank"], f"{r['weights_bytes'] / 1e6:.0f}", f"{r['grad_bytes'] / 1e6:.0f}",
                         f"{r['optimizer_bytes'] / 1e6:.0f}", f"{state / 1e6:.0f}", f"{state / ddp_state:.2f}",
                         f"{r['peak_mb']:.0f}", f"{plan * 1e3:.0f}", f"{r['peak_mb'] / (plan * 1e3):.2f}",
                         f"{r.get('cuda_peak_mb', float('nan')):.0f}"])
    print(f"GPT of {params / 1e6:.1f}M parameters, 2 processes ({args.device.type}); MB per process")
    print(table(rows, ["strategy", "rank", "weights", "grads", "AdamW", "state", "state/DDP", "peak (RSS)",
                       "planned peak", "measured/planned", "CUDA peak"]))
    print(f"-> {write_results('fsdp', {'params': params, 'runs': runs}, args.device, args.quick)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "True", sys.argv[5] == "True")
    else:
        main()
