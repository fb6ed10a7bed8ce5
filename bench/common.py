"""Shared helpers for the benchmarks: repeat timing, matmul peak, peak memory, JSON + table output."""

from __future__ import annotations

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


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "repeats": len(seconds)}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Float32 GEMM throughput of this machine, measured the same way for every benchmark."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(timed(lambda: a @ b, repeats, warmup=2))
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_flops(cfg: GPTConfig, tokens: int) -> float:
    """Matmul FLOPs of one forward over `tokens` positions of one sequence (causal attention counted half)."""
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden
    dense = 2 * tokens * (cfg.n_layer * per_layer + cfg.dim * cfg.vocab_size)
    attention = cfg.n_layer * 2 * tokens * tokens * cfg.dim  # QK^T and AV, half of the square
    return dense + attention


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def write_results(name: str, results: dict) -> Path:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")
    return path


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def env_threads() -> None:
    if "BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
