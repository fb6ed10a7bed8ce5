"""tokenize killed with SIGKILL mid-run and rerun gives exactly the arrays of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from zygote import kill_and_wait

from pipeline.formats import FormatError
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import open_token_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VQ = dict(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=32, norm_groups=8,
          codebook_used_size=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(1)
    for c in range(3):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(root / "images" / f"class{c}" / f"{i}.jpg")
    torch.manual_seed(0)
    (root / "vq.json").write_text(json.dumps(VQ))
    torch.save({"model": VQModel(VQConfig(**VQ)).state_dict()}, root / "vq.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"].update(image_size=64, augment="flip", batch_size=2, chunk_rows=4, num_workers=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _tokenize_cmd(root: Path, out: Path, images: Path | None = None) -> list[str]:
    # `cca-pipe` from PATH: forked from the session's zygote (tests/zygote.py); killed with kill_and_wait, which also
    # waits for the forked process to be gone
    return ["cca-pipe", "--params", str(root / "params.yaml"), "tokenize", "--images", str(images or root / "images"),
            "--vq", str(root / "vq.pt"), "--vq-model", str(root / "vq.json"), "--out", str(out)]


def _kill_after_a_chunk(cmd: list[str], out: Path) -> list[int]:
    """Start `cmd`, SIGKILL it once the progress file of `out`'s partial store lists a finished chunk."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress_file = out.with_name(out.name + ".partial") / "progress.json"
    deadline = time.time() + 120
    done: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        if progress_file.is_file():
            try:
                done = json.loads(progress_file.read_text())["done_chunks"]
            except (json.JSONDecodeError, KeyError):
                done = []
            if done:
                break
        time.sleep(0.005)
    kill_and_wait(proc)
    assert 0 < len(done) < 12, f"could not kill mid-run (done chunks: {done})"
    return done


def test_killed_tokenize_resumes_to_identical_arrays(setup: Path):
    reference = setup / "uninterrupted.zarr"
    subprocess.run(_tokenize_cmd(setup, reference), check=True, capture_output=True)

    out = setup / "killed.zarr"
    partial = out.with_name(out.name + ".partial")  # built beside the output, swapped in when complete
    _kill_after_a_chunk(_tokenize_cmd(setup, out), out)
    assert not out.exists()
    with pytest.raises(FormatError, match="incomplete"):
        open_token_store(partial)

    result = subprocess.run(_tokenize_cmd(setup, out), check=True, capture_output=True, text=True)
    assert "resuming" in result.stderr
    a, b = open_token_store(reference), open_token_store(out)
    assert np.array_equal(a.tokens[:], b.tokens[:]) and np.array_equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint
    assert not (out / "progress.json").exists() and not partial.exists()


def test_changed_settings_rebuild_instead_of_resuming(setup: Path):
    """A partial store made with other settings must not be mixed into the new one."""
    out = setup / "changed.zarr"
    subprocess.run(_tokenize_cmd(setup, out), check=True, capture_output=True)
    params = yaml.safe_load((setup / "params.yaml").read_text())
    params["tokenize"]["augment"] = "none"
    (setup / "params_none.yaml").write_text(yaml.safe_dump(params))
    cmd = _tokenize_cmd(setup, out)
    cmd[2] = str(setup / "params_none.yaml")
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "resuming" not in result.stderr
    assert open_token_store(out).tokens.shape == (48, 1, 256)  # 64 px, 4x downsampling


def test_dask_cluster_gives_the_same_tokens(setup: Path):
    # dask workers encode with one thread each; the in-process reference uses one thread too, since a
    # different thread count changes float summation order and can flip an exact near-tie between codes
    reference = setup / "one_thread.zarr"
    subprocess.run(_tokenize_cmd(setup, reference), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    cmd = _tokenize_cmd(setup, setup / "dask.zarr")
    cmd[3:3] = ["--set", "tokenize.dask_workers=2"]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    a, b = open_token_store(reference), open_token_store(setup / "dask.zarr")
    assert np.array_equal(a.tokens[:], b.tokens[:]) and a.fingerprint == b.fingerprint
    # issue 21 item 15: a successful run is quiet (no worker's ERROR traceback at shutdown, no INFO chatter)
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-3000:]
    assert "distributed.scheduler" not in result.stderr, result.stderr[-3000:]


def test_ctrl_c_during_a_dask_tokenize_is_one_line_and_keeps_the_finished_chunks(setup: Path, tmp_path: Path):
    """Issue 21 item 15: SIGINT to the whole process group (what a terminal's Ctrl-C sends) mid-run."""
    out = tmp_path / "dask.zarr"
    # by its path, a process of its own: the Ctrl-C reaches its whole process group, the dask workers too
    cmd = [str(BIN / "cca-pipe"), *_tokenize_cmd(setup, out)[1:]]
    cmd[3:3] = ["--set", "tokenize.dask_workers=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress_file = out.with_name(out.name + ".partial") / "progress.json"
    deadline, done = time.time() + 240, []
    while time.time() < deadline and proc.poll() is None and not done:
        with contextlib.suppress(OSError, ValueError, KeyError):
            done = json.loads(progress_file.read_text())["done_chunks"]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert 0 < len(done) < 12, f"could not interrupt mid-run (done chunks: {done})"
    assert proc.returncode != 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    kept = json.loads(progress_file.read_text())["done_chunks"]
    assert set(done) <= set(kept)  # the finished chunks are kept for a rerun (resuming is tested above)
    assert len([line for line in err.splitlines() if line.strip() and "%|" not in line]) == 1, err[-3000:]


def test_a_resumed_tokenize_re_encodes_the_chunks_whose_images_changed(setup: Path, tmp_path: Path):
    """Issue 21 item 3: killed after chunk 0, images changed, rerun: no chunk keeps old tokens."""
    images = tmp_path / "images"
    shutil.copytree(setup / "images", images)
    out = tmp_path / "killed.zarr"
    done = _kill_after_a_chunk(_tokenize_cmd(setup, out, images), out)
    rng = np.random.default_rng(5)
    for row in range(4 * max(done) + 4):  # a new image (same name) in every finished chunk (4 rows each)
        path = images / f"class{row // 16}" / f"{row % 16}.jpg"
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(path)
    result = subprocess.run(_tokenize_cmd(setup, out, images), check=True, capture_output=True, text=True)
    reference = tmp_path / "uninterrupted.zarr"
    subprocess.run(_tokenize_cmd(setup, reference, images), check=True, capture_output=True)
    a, b = open_token_store(reference), open_token_store(out)
    assert np.array_equal(a.tokens[:], b.tokens[:]) and a.fingerprint == b.fingerprint
    assert "changed since they were encoded" in result.stderr, result.stderr[-2000:]
