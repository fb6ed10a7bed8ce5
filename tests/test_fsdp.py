"""FSDP (pipeline/parallel.py) on CPU with gloo: 2 FSDP processes train what 1 plain process trains; a training
state written by 2 processes resumes on 1 and vice versa; the consolidated policy is the peer's layout and
loads strictly, giving the sharded model's log-probs; activation checkpointing leaves gradients unchanged.

The jobs run in tests/fsdp_worker.py: one plain process, then one torchrun of 2 (OMP_NUM_THREADS=1 per rank,
a 60 s process-group timeout and a subprocess timeout, so a failing rank cannot hang the suite), then one
plain process resuming what the 2 processes saved. 4 optimiser steps of 8 rows, 4 micro-batches each, with
dropout and drop path on, weight decay 0.05 and unconditional rows; CCA, and DDO (train.loss ddo, 2 fakes per
image) in the same processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.loaders import load_gpt, load_var
from pipeline.models.llamagen import GPT
from pipeline.models.var import VAR, VARModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fsdp_worker  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CCA_PIPE_DIST_TIMEOUT_S": "60", "PYTHONPATH": str(ROOT)}
FAMILIES = ("llamagen", "var")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    worker = str(ROOT / "tests" / "fsdp_worker.py")
    _run([sys.executable, worker, str(out), *(f"{f}:ddp:{a}" for f in FAMILIES for a in ("full", "stop", "ddo"))])
    _run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", worker, str(out),
          *(f"{f}:fsdp:{a}" for f in FAMILIES for a in ("full", f"resume=state-{f}-w1", "stop", "ddo"))])
    _run([sys.executable, worker, str(out), *(f"{f}:ddp:resume=state-{f}-w2" for f in FAMILIES)])
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_fsdp_processes_train_what_one_process_trains(runs: Path, family: str):
    one, two = _load(runs / f"{family}-ddp-w1-full.pt"), _load(runs / f"{family}-fsdp-w2-full.pt")
    assert _max_diff(one, two) < 1e-5
    initial = {k: v for k, v in fsdp_worker.build(family).state_dict().items()}
    assert _max_diff(initial, one) > 1e-3  # 4 steps at lr 1e-3 moved the weights: the agreement is not trivial


@pytest.mark.parametrize("family", FAMILIES)
def test_two_fsdp_processes_train_ddo_as_one_process_does(runs: Path, family: str):
    """train.loss ddo with 2 fakes per image, null-label rows, dropout: 2 FSDP processes = 1 plain process."""
    one, two = _load(runs / f"{family}-ddp-w1-ddo.pt"), _load(runs / f"{family}-fsdp-w2-ddo.pt")
    assert _max_diff(one, two) < 1e-5
    assert _max_diff(_load(runs / f"{family}-ddp-w1-full.pt"), one) > 1e-4  # DDO trained otherwise than CCA
    assert _max_diff(fsdp_worker.build(family).state_dict(), one) > 1e-3  # and it moved the weights


@pytest.mark.parametrize("family", FAMILIES)
def test_a_state_saved_by_two_processes_resumes_on_one_and_vice_versa(runs: Path, family: str):
    uninterrupted = _load(runs / f"{family}-ddp-w1-full.pt")
    assert _max_diff(uninterrupted, _load(runs / f"{family}-ddp-w1-resumed.pt")) < 1e-5  # saved by 2 FSDP processes
    assert _max_diff(uninterrupted, _load(runs / f"{family}-fsdp-w2-resumed.pt")) < 1e-5  # saved by 1 process
    # each FSDP process wrote its own shard of the state; the plain process one file
    assert len(list((runs / f"state-{family}-w2" / "resume-0000002").glob("*.distcp"))) == 2
    assert len(list((runs / f"state-{family}-w1" / "resume-0000002").glob("*.distcp"))) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_consolidated_policy_loads_strictly_and_gives_the_sharded_log_probs(runs: Path, family: str):
    path = runs / f"{family}-policy-w2.pt"
    saved = _load(path)
    reference = fsdp_worker.build(family)
    if family == "llamagen":
        assert set(saved["model"]) == set(GPT(reference.cfg).state_dict())  # LlamaGen's own keys
        model = load_gpt(path)
    else:
        assert set(saved["model"]) == set(VAR(reference.cfg).state_dict())  # the VAR transformer's, no quantiser
        model = VARModel(load_var(path), reference.quantizer)
    batch = _load(runs / f"{family}-logps-w2.pt")
    with torch.no_grad():
        logps = model.eval()(batch["tokens"], batch["labels"])
    assert torch.allclose(logps, batch["logps"], atol=1e-5, rtol=0)
    gathered = _load(runs / f"{family}-fsdp-w2-full.pt")  # the whole model's state, gathered from the shards
    assert _max_diff(reference.upstream_state_dict(gathered), saved["model"]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_leaves_the_gradients_unchanged(family: str):
    """Dropout and drop path on: the masks are keyed (pipeline.models.layers), so recomputation draws the same ones."""
    grads = []
    for checkpointing in (False, True):
        model = fsdp_worker.build(family)
        model.set_dropout(0.1 if family == "llamagen" else 0.0, 0.2)
        model.set_activation_checkpointing(checkpointing)
        model.train()
        tokens = torch.from_numpy(np.random.default_rng(1).integers(0, 64, (6, model.cfg.seq_len))).long()
        model(tokens, torch.arange(6) % 5, None, torch.arange(6) + 7).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None for g in checkpointed.values())
    assert max(float((plain[n] - checkpointed[n]).abs().max()) for n in plain) < 1e-6
    # the masks matter: other keys give other gradients, so equal keys are what made them agree
    model = fsdp_worker.build(family)
    model.set_dropout(0.1 if family == "llamagen" else 0.0, 0.2)
    model.train()
    model(tokens, torch.arange(6) % 5, None, torch.arange(6) + 8).sum().backward()
    assert max(float((plain[n] - p.grad).abs().max()) for n, p in model.named_parameters() if p.requires_grad) > 1e-4


def test_eval_says_what_to_do_when_a_model_does_not_fit_one_gpu(monkeypatch):
    """eval does not shard (sampling with KV caches): an out-of-memory move names the model, its size and the way out."""
    from pipeline.device import OutOfMemory
    from stages.eval import on_device

    model = fsdp_worker.build("llamagen")

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    monkeypatch.setattr(model, "to", full)
    with pytest.raises(OutOfMemory, match=r"--policy \(0\.0 GB of weights\).*sampling is not sharded.*--methods cca"):
        on_device(model, torch.device("cuda"), "--policy")
    monkeypatch.setattr(model, "to", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through unchanged
        on_device(model, torch.device("cuda"), "--policy")
