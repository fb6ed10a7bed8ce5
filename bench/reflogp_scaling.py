"""Benchmark: what 2 processes gain over 1 for the project's own reflogp stage (CPU, gloo), with one thread
per process (OMP_NUM_THREADS=1 in every process; a 1-process run with 2 threads is shown beside it, for the
same cores used by threads instead of processes).

    python bench/reflogp_scaling.py            # prints a table, writes bench/results/reflogp_scaling.json
    python bench/reflogp_scaling.py --quick    # smoke run: fewer rows (reflogp_scaling_quick.json)

A synthetic world in a temporary folder (bench/ddp.py's build_world: a token store and the small GPT,
dim 128, 2 layers, 64 tokens). Each configuration runs `cca-pipe --nproc-per-node N reflogp` twice, on a
short and a long store (the long one has 4x the rows), and its rows/s is (long rows - short rows) /
(long wall - short wall): interpreter, torchrun and process-group start-up cancel. Two part layouts are
timed with 2 processes: one part holding every row (part_rows = rows: by parts, the second process had
nothing to do) and 8 parts. The caches of every run are checked equal to the 1-process cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import parse_args, table, write_results  # noqa: E402
from bench.ddp import SMALL, TIMEOUT_S, build_world, cca_pipe  # noqa: E402
from pipeline.formats import read_ref_cache  # noqa: E402

BATCH = 32  # reflogp.batch_size: rows per forward (x3 sequences)


def timed_reflogp(root: Path, nproc: int, parts: int, threads: int, tag: str) -> tuple[float, Path]:
    """Wall seconds of one `cca-pipe --nproc-per-node nproc reflogp` (OMP_NUM_THREADS=threads in every process)
    into a fresh cache, and the cache."""
    part_rows = -(-_rows(root) // parts // BATCH) * BATCH
    out = root / f"cache_{tag}.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CCA_PIPE_DIST_TIMEOUT_S": "300", "PYTHONPATH": str(ROOT)}
    cmd = [*cca_pipe(), "--params", str(root / "params.yaml"), "--device", "cpu", "--nproc-per-node", str(nproc),
           "--set", f"reflogp.part_rows={part_rows}", "--set", f"reflogp.batch_size={BATCH}", "reflogp",
           "--tokens", str(root / "tokens.zarr"), "--ref", str(root / "gpt.pt"), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - started, out


def _rows(root: Path) -> int:
    return int(yaml.safe_load((root / "rows.yaml").read_text())["rows"])


def world(root: Path, rows: int) -> Path:
    root.mkdir()
    build_world(root, SMALL, rows, 16, 2, "cpu")
    (root / "rows.yaml").write_text(f"rows: {rows}\n")
    return root


CONFIGS = [  # (label, processes, parts, threads per process)
    ("1 process, 1 thread", 1, 1, 1),
    ("1 process, 2 threads", 1, 1, 2),
    ("2 processes x 1 thread, 1 part", 2, 1, 1),
    ("2 processes x 1 thread, 8 parts", 2, 8, 1),
]


def main(args) -> dict:
    short_rows, long_rows = (128, 512) if args.quick else (512, 2048)
    load_at_start = list(os.getloadavg())
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-reflogp-") as tmp:
        short, long_ = world(Path(tmp) / "short", short_rows), world(Path(tmp) / "long", long_rows)
        reference = None
        for label, nproc, parts, threads in CONFIGS:
            tag = f"n{nproc}_p{parts}_t{threads}"
            t_short, _ = timed_reflogp(short, nproc, parts, threads, tag)
            t_long, cache = timed_reflogp(long_, nproc, parts, threads, tag)
            columns, _ = read_ref_cache(cache)
            reference = reference or columns
            same = all(np.array_equal(reference[k], columns[k]) for k in reference)
            rows_per_s = (long_rows - short_rows) / (t_long - t_short)
            runs.append({"config": label, "processes": nproc, "parts": parts, "threads_per_process": threads,
                         "wall_s": [t_short, t_long], "rows_per_s": rows_per_s, "cache_equals_one_process": same})
            print(f"measured {label}: {rows_per_s:.1f} rows/s", file=sys.stderr)
    one = runs[0]["rows_per_s"]
    for r in runs:
        r["speedup"] = r["rows_per_s"] / one
    results = {"model": SMALL.to_dict(), "batch_rows": BATCH, "rows": [short_rows, long_rows], "runs": runs,
               "loadavg_at_start": load_at_start}
    print(f"reflogp on CPU (gloo), GPT dim {SMALL.dim} x {SMALL.n_layer} layers, {SMALL.block_size} tokens, "
          f"{BATCH} rows per forward; rows/s from {short_rows}- and {long_rows}-row runs; load at start {load_at_start[0]:.1f}")
    print(table([[r["config"], f"{r['rows_per_s']:.1f}", f"{r['speedup']:.2f}x", "yes" if r["cache_equals_one_process"] else "NO"]
                 for r in runs], ["configuration", "rows/s", "vs 1 process", "cache = 1-process cache"]))
    write_results("reflogp_scaling", results, "cpu", args.quick)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__))
