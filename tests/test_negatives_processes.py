"""`cca-pipe negatives` in processes: 2 torchrun processes write the bytes 1 process writes, and a run killed
with SIGKILL after a chunk resumes to the bytes of an uninterrupted run (the stage is seeded per fake, not per
rank or run). Slow (tests/conftest.py SLOW_MODULES): it starts processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from test_live import live_steps
from test_negatives_stage import make_world
from worlds import job_environment
from zygote import kill_and_wait

from pipeline.formats import read_ref_cache

BIN = Path(sys.executable).parent
# `cca-pipe` from PATH: the session's, forked with its ranks from a process that has imported torch (tests/zygote.py);
# kill_and_wait also waits for the forked process of the run it kills to be gone
CCA_PIPE = "cca-pipe"



def command(root: Path, out: Path, nproc: int = 1) -> list[str]:
    return [CCA_PIPE, "--params", str(root / "params.yaml"), "--device", "cpu", "--nproc-per-node", str(nproc),
            "negatives", "--tokens", str(root / "real.zarr"), "--ref", str(root / "gpt.pt"), "--vq", str(root / "vq.pt"),
            "--out", str(out)]


def store_bytes(store: Path) -> dict[str, bytes]:
    """Every file of a store by its relative path (chunk files, zarr.json with the attributes)."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_two_processes_write_the_bytes_of_one(tmp_path: Path):
    root = make_world(tmp_path, rows=9, ratio=2)  # 18 fakes, chunks of 4: the last chunk's 2 rows, one per rank
    for nproc in (1, 2):
        proc = subprocess.run(command(root, root / f"fakes{nproc}.zarr", nproc), capture_output=True, text=True, env=job_environment(),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = store_bytes(root / "fakes1.zarr"), store_bytes(root / "fakes2.zarr")
    assert len(one) > 10 and one == two
    for nproc in (1, 2):  # the main process alone logs: each chunk's step once (two writers would append it twice)
        assert live_steps(root / f"fakes{nproc}.zarr.live", "rows_done") == list(range(5)), nproc
    # the DDO cache of these fakes (reflogp --negatives, with the reference's dropout: keyed masks), 2 = 1
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["reflogp"].update(batch_size=4, part_rows=8, dropout=0.1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for nproc in (1, 2):
        cmd = [CCA_PIPE, "--params", str(root / "params.yaml"), "--device", "cpu", "--nproc-per-node",
               str(nproc), "reflogp", "--tokens", str(root / "real.zarr"), "--ref", str(root / "gpt.pt"), "--negatives",
               str(root / "fakes1.zarr"), "--out", str(root / f"ddo{nproc}.parquet")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=job_environment(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (a, meta), (b, _) = (read_ref_cache(root / f"ddo{n}.parquet") for n in (1, 2))
    assert "ref_logp_fake" in a and meta["fakes_fingerprint"] and a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    # train.loss ddo on that cache (policy dropout as the cache's reference; null-label rows): 2 processes = 1
    logs, weights = [], []
    for nproc in (1, 2):
        out = root / f"train{nproc}"
        sets = ["train.loss=ddo", "train.alpha=2", "train.epochs=1", "train.batch_size=6", "train.micro_batch_size=1",
                "train.lr=1e-3", "train.dropout=0.1", "train.uncond_ratio=0.3"]
        cmd = [CCA_PIPE, "--params", str(root / "params.yaml"), "--device", "cpu", "--nproc-per-node", str(nproc),
               *[x for o in sets for x in ("--set", o)], "train", "--tokens", str(root / "real.zarr"), "--cache",
               str(root / "ddo1.parquet"), "--init", str(root / "gpt.pt"), "--negatives", str(root / "fakes1.zarr"),
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=job_environment(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
        weights.append(torch.load(out / "policy.pt", weights_only=True)["model"])
    assert len(logs[0]) == len(logs[1]) == 3  # 18 cache rows (9 images x 2 views) / 6
    for x, y in zip(*logs, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/pos"] - y["rewards/pos"]) < 1e-5
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-5
    assert logs[0][0]["loss"] != logs[0][-1]["loss"]  # training moves


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path: Path):
    root = make_world(tmp_path, rows=120)  # 30 chunks of 4 fakes
    subprocess.run(command(root, root / "whole.zarr"), check=True, capture_output=True, env=job_environment(), timeout=300)
    out = root / "killed.zarr"
    progress_file = root / "killed.zarr.partial" / "progress.json"
    proc = subprocess.Popen(command(root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=job_environment())
    done: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not done:
        try:
            done = json.loads(progress_file.read_text())["done_chunks"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    kill_and_wait(proc)
    assert 0 < len(done) < 30, f"could not kill mid-run (done chunks: {done})"
    assert not out.exists() and progress_file.is_file()
    rerun = subprocess.run(command(root, out), capture_output=True, text=True, env=job_environment(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr
    assert store_bytes(out) == store_bytes(root / "whole.zarr")
    # the live log beside the store: the killed run's chunks, then the rerun's from its resume point, each once
    for name in ("rows_done", "throughput/rows_per_s", "eta_s"):
        assert live_steps(root / "killed.zarr.live", name) == list(range(30)), name
