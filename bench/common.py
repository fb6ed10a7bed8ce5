"""Shared helpers for the benchmarks: the command line (--device, --quick), repeat timing (synchronised on
CUDA), the matmul peak and model FLOP utilisation (MFU), FLOP counts, peak memory, JSON + table output.

Every script takes `--device` (default "auto": cuda if available, else cpu; or cpu, cuda, cuda:N; the
environment variable BENCH_DEVICE sets the default). On CUDA the model compute runs under bf16 autocast
(pipeline.device.autocast) and the peak is a bf16 GEMM's; on CPU everything is float32, as before, and the
peak is a float32 GEMM's. MFU = achieved model FLOP/s / that peak, both measured on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from pipeline.models.llamagen import GPTConfig

# The mid-size config of issue 5: LlamaGen's vocabulary and 256 tokens (256px), 6 x 512 -> ~37M parameters.
MID = GPTConfig(dim=512, n_layer=6, n_head=8, vocab_size=16384, num_classes=1000, block_size=256, multiple_of=256)

DEVICE_HELP = "auto (cuda if available, else cpu) | cpu | cuda | cuda:N; default $BENCH_DEVICE or auto"


# ---------------------------------------------------------------------------------------------- command line


def resolve_device(name: str) -> torch.device:
    """A --device value as a torch.device ("auto": cuda if available, else cpu); ValueError for a device
    this machine does not have or a kind the benchmarks do not run on."""
    from pipeline.device import pick_device

    try:
        device = pick_device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: no CUDA device on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_args(doc: str | None = None, add=None, argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmarks' shared command line: --device (args.device is then a torch.device) and --quick (a smoke
    run at reduced sizes, written to <name>_quick.json; also BENCH_QUICK=1), plus what `add(parser)` adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "auto"), help=DEVICE_HELP)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="smoke run at reduced sizes; results go to bench/results/<name>_quick.json")
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    return args


def compute_dtype(device) -> torch.dtype:
    """The dtype model compute runs in: bf16 (autocast) on CUDA, float32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def on_device(device) -> str:
    """"cpu" or "cuda": for the results' file names and the tables."""
    return torch.device(device).type


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device=None) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on CPU. device None:
    every CUDA device this process has used."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1, device=None) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` calls, each synchronised with the device
    before the clock starts and before it is read (see synchronize)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "repeats": len(seconds)}


def per_step_seconds(short: tuple[int, float], long: tuple[int, float]) -> float:
    """Steady-state seconds per step from two runs (steps, seconds) of different lengths: their difference
    over the difference in steps, so start-up and first-step costs common to both cancel."""
    (n_short, s_short), (n_long, s_long) = short, long
    if n_long <= n_short:
        raise ValueError(f"the long run ({n_long} steps) must have more steps than the short one ({n_short})")
    return (s_long - s_short) / (n_long - n_short)


def scaling_efficiency(rows_per_s: float, processes: int, rows_per_s_one: float) -> float:
    """Data-parallel efficiency: rows/s with N processes / (N x rows/s with one)."""
    return rows_per_s / (processes * rows_per_s_one)


# ---------------------------------------------------------------------------------------------- peak and MFU

_PEAKS: dict[tuple[str, int], dict] = {}


def peak_flops(device="cpu", n: int | None = None, repeats: int | None = None) -> float:
    """FLOP/s of an n x n x n GEMM in the device's compute dtype (float32 on CPU, with torch's current
    number of threads; bf16 on CUDA), best of `repeats` after 2 warm-ups: the peak MFU is measured
    against. Measured once per (device, threads) in a process; peak_info gives how."""
    device = torch.device(device)
    key = (str(device), torch.get_num_threads())
    if key not in _PEAKS:
        cuda = device.type == "cuda"
        n = n or (8192 if cuda else 2048)
        repeats = repeats or (20 if cuda else 10)
        dtype = compute_dtype(device)
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        best = min(timed(lambda: a @ b, repeats, warmup=2, device=device))
        _PEAKS[key] = {"flops_per_s": 2 * n**3 / best, "n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
                       "threads": torch.get_num_threads(), "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()}
        del a, b
    return _PEAKS[key]["flops_per_s"]


def peak_info(device="cpu") -> dict:
    """How peak_flops(device) was measured (measuring it first if needed)."""
    peak_flops(device)
    return dict(_PEAKS[(str(torch.device(device)), torch.get_num_threads())])


def peak_label(device="cpu") -> str:
    """One line for a table's caption: which peak MFU is relative to."""
    p = peak_info(device)
    where = p["device_name"] if p["device"].startswith("cuda") else f"{p['threads']} thread(s)"
    return (f"MFU against the measured {p['dtype']} matmul peak {fmt_flops(p['flops_per_s'])} "
            f"({p['n']}^3 GEMM, best of {p['repeats']}, {p['device']}, {where})")


def mfu(flops_per_s: float, device="cpu", peak: float | None = None) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the device's measured matmul peak (peak_flops),
    or over `peak` when given."""
    return flops_per_s / (peak if peak is not None else peak_flops(device))


def fmt_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def fmt_flops(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 GEMM throughput of this machine's CPU in GFLOP/s (peak_flops on the CPU)."""
    return peak_flops("cpu", n, repeats) / 1e9


# ---------------------------------------------------------------------------------------------- FLOP counts


def _dense_per_position(cfg: GPTConfig) -> int:
    """Matmul FLOPs per position of a GPT forward outside attention's scores: the blocks' projections and
    SwiGLU MLP, and the output head (embedding lookups are not matmuls)."""
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden
    return 2 * (cfg.n_layer * per_layer + cfg.dim * cfg.vocab_size)


def forward_flops(cfg: GPTConfig, tokens: int) -> float:
    """Matmul FLOPs of one forward over `tokens` positions of one sequence (causal attention counted half)."""
    attention = cfg.n_layer * 2 * tokens * tokens * cfg.dim  # QK^T and AV, half of the square
    return tokens * _dense_per_position(cfg) + attention


def train_step_flops(cfg: GPTConfig, rows: int, online_reference: bool = False) -> float:
    """Model FLOPs of a CCA train step over `rows` rows, each a positive and a negative sequence of
    cfg.block_size positions: the policy's forward + backward = 3 forwards; an online reference model
    (the official design) adds its forward. The optimizer step is not counted."""
    sequences = 2 * rows * forward_flops(cfg, cfg.block_size)
    return (4 if online_reference else 3) * sequences


def decode_flops(cfg: GPTConfig, tokens: int | None = None, use_cache: bool = True) -> float:
    """Matmul FLOPs of sampling `tokens` codes (default cfg.block_size) for one sequence, summed over the
    generated tokens. With a KV cache, step t = 1..N runs one position, attending to t keys (QK^T and AV:
    4 t dim per layer), so the sum is forward_flops(cfg, N) up to the diagonal; without a cache step t
    recomputes its whole prefix: forward_flops(cfg, t)."""
    n = tokens or cfg.block_size
    if not use_cache:
        return sum(forward_flops(cfg, t) for t in range(1, n + 1))
    return n * _dense_per_position(cfg) + cfg.n_layer * 2 * cfg.dim * n * (n + 1)


def var_sample_flops(cfg) -> float:
    """Matmul FLOPs of one row through VAR's transformer while sampling with a KV cache per scale
    (pipeline.models.var; cfg a VARConfig). At scale s (n = pn^2 new positions, P positions up to and
    including it): every block's qkv, proj and MLP on n positions, attention of n queries over P keys
    (QK^T and AV: 4 n P C), AdaLN's Linear(C, 6C) of the class embedding once; the head's AdaLN
    Linear(C, 2C) and Linear(C, V); word_embed (Cvae -> C) on every scale after the first. Not counted:
    the quantiser's next_input between scales (phi convolutions, interpolation), norms, softmax, sampling."""
    C, hidden = cfg.width, round(cfg.width * cfg.mlp_ratio)
    total, seen = 0, 0
    for si, pn in enumerate(cfg.patch_nums):
        n = pn * pn
        seen += n
        block = 2 * n * (4 * C * C + 2 * C * hidden) + 2 * C * 6 * C + 4 * n * seen * C
        head = 2 * n * C * cfg.vocab_size + 2 * C * 2 * C
        embed = 2 * n * cfg.cvae * C if si else 0
        total += cfg.depth * block + head + embed
    return total


# ---------------------------------------------------------------------------------------------- memory, output


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb(device) -> float | None:
    """Peak CUDA memory allocated by tensors in this process (None on CPU)."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def machine(device=None) -> dict:
    """What the results were measured on: the device used (default: cuda if available, else cpu), its
    compute dtype, the matmul peak if this process measured it, the load average at the end."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "device": str(device), "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
           "loadavg": list(os.getloadavg())}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count())
    peak = _PEAKS.get((str(device), torch.get_num_threads()))
    if peak is not None:
        out["matmul_peak"] = peak
    return out


def results_name(name: str, device="cpu", quick: bool = False) -> str:
    """The results file's stem: `name` on CPU (the names the tables were made from), `name_cuda` on a GPU,
    and `_quick` after either for a --quick smoke run."""
    return name + ("_cuda" if on_device(device) == "cuda" else "") + ("_quick" if quick else "")


def write_results(name: str, results: dict, device="cpu", quick: bool = False) -> Path:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{results_name(name, device, quick)}.json"
    path.write_text(json.dumps({"machine": machine(device), **results}, indent=2) + "\n")
    return path


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def env_threads() -> None:
    if "BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
