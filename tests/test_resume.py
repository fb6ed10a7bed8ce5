"""reflogp and train killed with SIGKILL mid-run, then rerun, finish with the result of an uninterrupted
run: bitwise-equal cached log-probs, and on CPU the same final weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from zygote import kill_and_wait

from pipeline.checkpoint import file_sha256, save_checkpoint
from pipeline.formats import read_ref_cache
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenstore import write_token_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPT_CFG = GPTConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=64, multiple_of=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    n = 300
    tokens = rng.integers(0, 64, size=(n, 2, 64), dtype=np.uint16)
    labels = rng.integers(0, 5, size=n).astype(np.int32)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 64, "image_size": 128, "grid": 8,
             "augmentations": ["center", "center_flip"], "class_names": [str(i) for i in range(5)]}
    write_token_store(root / "tokens.zarr", tokens, labels, attrs)
    torch.manual_seed(0)
    save_checkpoint(root / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["reflogp"].update(views="all", batch_size=20, part_rows=40)
    params["train"].update(epochs=1, batch_size=16, micro_batch_size=8, save_every=3, lr=1e-3)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _cli(world: Path, *args: str) -> list[str]:
    # `cca-pipe` from PATH: forked from the session's zygote (tests/zygote.py); killed with kill_and_wait, which also
    # waits for the forked process to be gone
    return ["cca-pipe", "--params", str(world / "params.yaml"), *args]


def _reflogp(world: Path, out: Path) -> list[str]:
    return _cli(world, "reflogp", "--tokens", str(world / "tokens.zarr"), "--ref", str(world / "gpt.pt"), "--out", str(out))


def _train(world: Path, cache: Path, out: Path) -> list[str]:
    return _cli(world, "train", "--tokens", str(world / "tokens.zarr"), "--cache", str(cache), "--init", str(world / "gpt.pt"),
                "--out", str(out))


def _kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    """Start cmd, SIGKILL it as soon as ready() holds (some resumable work is on disk), before it finishes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    finished_early = proc.poll() is not None
    kill_and_wait(proc)
    assert not finished_early, "the process finished before it could be killed"


def test_reflogp_resumes_bitwise(world: Path):
    subprocess.run(_reflogp(world, world / "ref_full.parquet"), check=True, capture_output=True)
    out = world / "ref_killed.parquet"
    parts = world / "ref_killed.parquet.partial"
    _kill_when(_reflogp(world, out), lambda: len(list(parts.glob("part-*.parquet"))) >= 2)
    assert not out.exists()
    done_before = len(list(parts.glob("part-*.parquet")))
    result = subprocess.run(_reflogp(world, out), check=True, capture_output=True, text=True)
    assert f"{done_before} of 15 parts already computed" in result.stderr
    full, meta_full = read_ref_cache(world / "ref_full.parquet")
    resumed, meta_resumed = read_ref_cache(out)
    for name in full:
        assert np.array_equal(full[name], resumed[name]), name
    assert meta_full == meta_resumed and not parts.exists()


def test_train_resumes_to_identical_weights(world: Path):
    cache = world / "ref_full.parquet"
    if not cache.exists():
        subprocess.run(_reflogp(world, cache), check=True, capture_output=True)
    subprocess.run(_train(world, cache, world / "train_full"), check=True, capture_output=True)
    out = world / "train_killed"
    resume = out.with_name(out.name + ".partial") / "checkpoints" / "resume.json"

    def has_resume_point() -> bool:
        return resume.is_file() and (resume.parent / "0000006.pt").is_file()

    _kill_when(_train(world, cache, out), has_resume_point)
    result = subprocess.run(_train(world, cache, out), check=True, capture_output=True, text=True)
    assert "resuming" in result.stderr
    full = torch.load(world / "train_full/policy.pt", weights_only=True)["model"]
    resumed = torch.load(out / "policy.pt", weights_only=True)["model"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # byte for byte (issue 21 item 5): the policy and every numbered checkpoint, as DVC and sha256-keyed caches see them
    assert file_sha256(out / "policy.pt") == file_sha256(world / "train_full/policy.pt")
    numbered = sorted(p.name for p in (world / "train_full/checkpoints").glob("[0-9]*.pt"))
    assert numbered and numbered == sorted(p.name for p in (out / "checkpoints").glob("[0-9]*.pt"))
    for name in numbered:
        assert file_sha256(out / "checkpoints" / name) == file_sha256(world / "train_full/checkpoints" / name), name
    log_full = [json.loads(line) for line in (world / "train_full/metrics.jsonl").read_text().splitlines()]
    log_resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_resumed] == [r["step"] for r in log_full]
    assert [r["loss"] for r in log_resumed] == [r["loss"] for r in log_full]
    assert not resume.exists()


def _cache_for(world: Path) -> Path:
    cache = world / "ref_full.parquet"
    if not cache.exists():
        subprocess.run(_reflogp(world, cache), check=True, capture_output=True)
    return cache


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.005)
    assert proc.poll() is None and predicate(), "the first run ended before it could be observed"


def test_second_writer_fails_at_once_and_the_first_equals_a_solo_run(world: Path):
    cache = _cache_for(world)
    solo = world / "train_solo"
    subprocess.run(_train(world, cache, solo), check=True, capture_output=True, timeout=300)
    out = world / "train_shared"
    # by its path, a process of its own: its pid is the one the second must name
    first = subprocess.Popen([str(BIN / "cca-pipe"), *_train(world, cache, out)[1:]], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (world / ".train_shared.lock").is_file() and (world / "train_shared.partial").is_dir(), first)
        second = subprocess.run(_train(world, cache, out), capture_output=True, text=True, timeout=120)
        still_running = first.poll() is None  # the second did not wait for the first
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is being written by another cca-pipe process" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and still_running
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
        first.wait()
    shared = torch.load(out / "policy.pt", weights_only=True)["model"]
    alone = torch.load(solo / "policy.pt", weights_only=True)["model"]
    assert all(torch.equal(shared[k], alone[k]) for k in alone)
    for name in ["policy.pt", *(f"checkpoints/{p.name}" for p in (solo / "checkpoints").glob("[0-9]*.pt"))]:
        assert file_sha256(out / name) == file_sha256(solo / name), name  # two runs, the same bytes
    assert (out / "metrics.jsonl").read_text() == (solo / "metrics.jsonl").read_text()
    assert not (world / ".train_shared.lock").exists()


def test_a_killed_writer_never_blocks_the_next_run(world: Path):
    cache = _cache_for(world)
    out = world / "train_sigkill"
    lock = world / ".train_sigkill.lock"
    proc = subprocess.Popen(_train(world, cache, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lock.is_file, proc)
    kill_and_wait(proc)
    assert lock.is_file()  # left behind by the kill, but no longer locked: the kernel released it
    result = subprocess.run(_train(world, cache, out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "policy.pt").is_file() and not lock.exists()


def test_same_weights_are_the_same_bytes_under_any_name_and_process(tmp_path: Path):
    """torch.save given a path recorded the temporary name (`.<name>.<pid>.tmp/data.pkl`) in the zip: identical
    weights then had another sha256 per file name and per process (issue 21 item 5)."""
    torch.manual_seed(0)
    state = GPT(GPT_CFG).state_dict()
    save_checkpoint(tmp_path / "a.pt", state, GPT_CFG.to_dict(), kind="llamagen-gpt", steps=3)
    save_checkpoint(tmp_path / "sub" / "0000003.pt", state, GPT_CFG.to_dict(), kind="llamagen-gpt", steps=3)
    assert file_sha256(tmp_path / "a.pt") == file_sha256(tmp_path / "sub" / "0000003.pt")
