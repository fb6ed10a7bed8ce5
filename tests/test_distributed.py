"""torchrun data parallelism on CPU (gloo, 2 processes) against one plain process: reflogp, train, eval give
the one-process results; a 2-process train killed with SIGKILL resumes with 1 process; a failing rank stops
the job. Every torchrun is started through `cca-pipe --nproc-per-node 2` (the relaunch path users take),
with OMP_NUM_THREADS=1 per rank, a 60 s process-group timeout and a subprocess timeout, so a failing rank
can never hang the suite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from worlds import job_environment, write_reference_images
from zygote import process_state

from pipeline.checkpoint import save_checkpoint
from pipeline.formats import read_ref_cache
from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import write_token_store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = job_environment(PYTHONPATH=str(ROOT))
GPT_CFG = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, size=(40, 2, 16), dtype=np.uint16)
    labels = (np.arange(40) % 3).astype(np.int32)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 32, "image_size": 16, "grid": 4,
             "augmentations": ["center", "center_flip"], "class_names": ["a", "b", "c"]}
    write_token_store(root / "tokens.zarr", tokens, labels, attrs, chunk_rows=8)
    torch.manual_seed(0)
    save_checkpoint(root / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_checkpoint(root / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_classifier(root / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3)).eval())
    write_reference_images(root / "ref", rng)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # 80 rows: 5 parts; the reference with dropout 0.1 (one keyed draw per row): 2 processes (DDP, FSDP) must
    # draw the masks 1 process draws, and train's step-0 check replays them under DDP and FSDP
    params["reflogp"].update(views="all", batch_size=8, part_rows=16, dropout=0.1)
    # 4 micro-batches of 2 rows per step; dropout on, so the keyed masks (train.seed, visit) are exercised too
    params["train"].update(epochs=0.4, batch_size=8, micro_batch_size=2, lr=1e-3, uncond_ratio=0.25, dropout=0.1,
                           save_every=1)
    params["eval"].update(samples_per_class=3, seeds=[0], cfg_scales=[1.0], batch_size=2, grid_per_class=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def cca(world: Path, *args, nproc: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    # `cca-pipe` from PATH: forked from the session's zygote, which has imported torch (tests/zygote.py; where it
    # refuses, the real one); the tests that kill a job's process group start it by its path, as a process of its own
    cmd = ["cca-pipe", "--params", str(world / "params.yaml"), "--nproc-per-node", str(nproc), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=job_environment(), timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def reflogp(world: Path, out: Path, nproc: int) -> None:
    cca(world, "reflogp", "--tokens", world / "tokens.zarr", "--ref", world / "gpt.pt", "--out", out, nproc=nproc)


def train_args(world: Path, out: Path) -> list:
    return ["train", "--tokens", world / "tokens.zarr", "--cache", world / "cache1.parquet", "--init", world / "gpt.pt",
            "--out", out]


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def policy(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "policy.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def caches(world: Path) -> Path:
    reflogp(world, world / "cache1.parquet", 1)
    reflogp(world, world / "cache2.parquet", 2)
    return world


def test_reflogp_with_two_fsdp_processes_equals_one(caches: Path):
    """5 parts over 2 sharded processes: the one with 2 parts runs the forwards of a third with the other."""
    cca(caches, "--set", "reflogp.strategy=fsdp", "reflogp", "--tokens", caches / "tokens.zarr", "--ref", caches / "gpt.pt",
        "--out", caches / "cache_fsdp.parquet", nproc=2)
    one, meta_one = read_ref_cache(caches / "cache1.parquet")
    fsdp, meta_fsdp = read_ref_cache(caches / "cache_fsdp.parquet")
    assert {k: v for k, v in meta_one.items() if k != "settings"} == {k: v for k, v in meta_fsdp.items() if k != "settings"}
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert np.abs(one[name] - fsdp[name]).max() < 1e-5, name


COUNTING_REFLOGP = """
import os, sys
from pathlib import Path
import stages.reflogp as stage
from stages.cli import run
real_logps, real_write, counts, written = stage.reference_logps, stage.RefCacheParts.write_part, Path(sys.argv.pop(1)), []
crash_after = int(os.environ.get("CRASH_AFTER_PARTS", "0"))

def counted(model, tokens, pairs, *args, **kwargs):  # the rows this rank computes
    with open(counts / f"rank{os.environ['RANK']}", "a") as f:
        f.write(f"{len(pairs['row'])}\\n")
    return real_logps(model, tokens, pairs, *args, **kwargs)

def write_then_crash(self, k, columns):  # a job killed after that many parts
    real_write(self, k, columns)
    written.append(k)
    if len(written) == crash_after:
        os._exit(3)

stage.reference_logps, stage.RefCacheParts.write_part = counted, write_then_crash
run()
"""


def test_two_process_reflogp_shares_even_a_single_part_and_resumes(caches: Path, tmp_path: Path):
    """A job stopped after 4 of 5 parts: the rerun's one pending part (2 batches of 8 rows) is shared by both
    processes (by parts, one of them had it all), and the cache is the uninterrupted one-process cache."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING_REFLOGP)
    out = tmp_path / "cache.parquet"
    args = ["--params", caches / "params.yaml", "--device", "cpu", "reflogp", "--tokens", caches / "tokens.zarr",
            "--ref", caches / "gpt.pt", "--out", out]
    (tmp_path / "killed").mkdir()
    killed = torchrun(script, tmp_path / "killed", *args, env={"CRASH_AFTER_PARTS": "4"})
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-3000:]
    (tmp_path / "rerun").mkdir()
    rerun = torchrun(script, tmp_path / "rerun", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 of 5 parts already computed" in rerun.stderr
    rows = {rank: sum(map(int, (tmp_path / "rerun" / f"rank{rank}").read_text().split())) for rank in (0, 1)}
    assert rows == {0: 8, 1: 8}
    one, meta_one = read_ref_cache(caches / "cache1.parquet")
    two, meta_two = read_ref_cache(out)
    assert meta_one == meta_two
    for name in one:
        assert np.array_equal(one[name], two[name]), name


def test_reflogp_with_two_processes_equals_one(caches: Path):
    one, meta_one = read_ref_cache(caches / "cache1.parquet")
    two, meta_two = read_ref_cache(caches / "cache2.parquet")
    assert meta_one == meta_two  # provenance
    for name in ("row", "view", "label", "neg_label"):  # rows and their order
        assert np.array_equal(one[name], two[name]), name
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert np.abs(one[name] - two[name]).max() < 1e-5, name


def test_reflogp_of_several_visits_with_two_processes_equals_one(world: Path, tmp_path: Path):
    """reflogp.visits 2 (160 cache rows, the reference with dropout): each visit's rows, negatives and keyed
    masks are the one-process cache's whatever the world size."""
    for n in (1, 2):
        cca(world, "--set", "reflogp.visits=2", "reflogp", "--tokens", world / "tokens.zarr", "--ref", world / "gpt.pt",
            "--out", tmp_path / f"visits{n}.parquet", nproc=n)
    one, meta_one = read_ref_cache(tmp_path / "visits1.parquet")
    two, meta_two = read_ref_cache(tmp_path / "visits2.parquet")
    assert meta_one == meta_two and meta_one["visits"] == 2 and len(one["row"]) == 160
    for name in ("row", "view", "label", "neg_label"):
        assert np.array_equal(one[name], two[name]), name
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert np.abs(one[name] - two[name]).max() < 1e-5, name
    assert (one["neg_label"][:80] != one["neg_label"][80:]).any()  # a visit of its own
    assert np.abs(one["ref_logp_null"][:80] - one["ref_logp_null"][80:]).max() > 1e-3  # its own masks


def one_process_train(caches: Path) -> Path:
    if not (caches / "train1" / "policy.pt").is_file():
        cca(caches, *train_args(caches, caches / "train1"))
    return caches / "train1"


def test_train_with_two_processes_equals_one(caches: Path):
    one_process_train(caches)
    cca(caches, *train_args(caches, caches / "train2"), nproc=2)
    log1, log2 = steps(caches / "train1"), steps(caches / "train2")
    assert len(log1) == len(log2) == 4  # 0.4 epochs of 80 rows in batches of 8
    for a, b in zip(log1, log2, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/pos"] - b["rewards/pos"]) < 1e-5
    assert max_diff(policy(caches / "train1"), policy(caches / "train2")) < 1e-5
    assert log1[0]["loss"] != log1[1]["loss"]  # training moves


def test_a_two_process_train_logs_live_metrics_from_rank_0_only(caches: Path):
    """Issue 33.3: one set of DVCLive files, by the main process (pipeline/live.py): each step once in every
    step file (two writers appending to the same files would give each step twice), nothing else written live."""
    out = caches / "train2"
    if not (out / "policy.pt").is_file():
        cca(caches, *train_args(caches, out), nproc=2)
    live = out / "live"
    for name in ("loss", "rewards/pos", "rewards/neg", "lr", "grad_norm", "throughput/rows_per_s", "eta_s"):
        rows = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert [int(r.split("\t")[0]) for r in rows[1:]] == [0, 1, 2, 3], name
    assert json.loads((live / "metrics.json").read_text())["step"] == 3
    assert [p.relative_to(out) for p in out.rglob("live")] == [Path("live")]


def test_fsdp_train_with_two_processes_equals_ddp_with_one(caches: Path):
    """The stage under FSDP with activation checkpointing (pipeline/parallel.py): same steps and weights as one
    plain process; the consolidated checkpoints are the peer's layout; each process held half the weights."""
    one = one_process_train(caches)
    out = caches / "train_fsdp"
    cca(caches, "--set", "train.strategy=fsdp", "--set", "train.activation_checkpointing=true", *train_args(caches, out), nproc=2)
    for a, b in zip(steps(one), steps(out), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert max_diff(policy(one), policy(out)) < 1e-5
    assert max_diff(torch.load(one / "checkpoints" / "0000002.pt", weights_only=True)["model"],
                    torch.load(out / "checkpoints" / "0000002.pt", weights_only=True)["model"]) < 1e-5
    GPT(GPT_CFG).load_state_dict(policy(out), strict=True)
    memory = json.loads((out / "metrics.json").read_text())["memory"]
    total = sum(v.numel() * v.element_size() for v in policy(one).values())
    assert len(memory) == 2 and all(0.45 * total <= m["weight_bytes"] <= 0.55 * total for m in memory), (total, memory)
    assert not list((out / "checkpoints").glob("resume*"))  # the resume point goes once the run is complete


def test_a_killed_two_process_train_resumes_with_one(caches: Path):
    """SIGKILL to the launcher's process group (the ranks, in sessions of their own, die with their parent:
    PR_SET_PDEATHSIG), then a rerun with one process ends where the uninterrupted run ends."""
    longer = ["--set", "train.epochs=2", "--set", "train.repeat_visits=true"]  # 20 steps: the kill lands well before the end
    # (the one-visit cache read again at epoch 2: what is tested is the kill and the resume, not the draws)
    out = caches / "train_killed"
    resume = caches / "train_killed.partial" / "checkpoints" / "resume.json"
    cmd = [str(BIN / "cca-pipe"), "--params", str(caches / "params.yaml"), *longer, "--nproc-per-node", "2",
           *map(str, train_args(caches, out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (resume.parent / "0000002.pt").is_file():
        time.sleep(0.005)
    finished = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)  # the cca-pipe that runs torchrun's agent
    proc.wait()
    time.sleep(1.0)
    assert not finished and resume.is_file() and not out.exists(), "the job ended before it could be killed"
    before = sorted(p.name for p in resume.parent.iterdir())
    time.sleep(1.0)
    assert sorted(p.name for p in resume.parent.iterdir()) == before  # no orphan rank trains on
    result = cca(caches, *longer, *train_args(caches, out))  # one process
    assert "resuming" in result.stderr
    cca(caches, *longer, *train_args(caches, caches / "train_long"))
    assert max_diff(policy(caches / "train_long"), policy(out)) < 1e-5
    assert [r["step"] for r in steps(out)] == list(range(20))


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_launcher_stops_every_rank_uncommitted_and_resumable(caches: Path, signum: int):
    """The launcher alone gets the signal (a scheduler's cancel): it reaches torchrun and both ranks, which
    stop without committing, keeping the resume point; the launcher exits non-zero; a rerun resumes."""
    longer = ["--set", "train.epochs=4", "--set", "train.repeat_visits=true"]  # 40 steps: the signal lands well before
    # the end (the one-visit cache read again at every epoch: what is tested is the signal, not the draws)
    out = caches / f"train_{signum.name}"
    resume = caches / f"train_{signum.name}.partial" / "checkpoints" / "resume.json"
    cmd = [str(BIN / "cca-pipe"), "--params", str(caches / "params.yaml"), *longer, "--nproc-per-node", "2",
           *map(str, train_args(caches, out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (resume.parent / "0000002.pt").is_file():
            time.sleep(0.005)
        job = descendants(proc.pid)  # the two ranks (torchrun runs in the launcher), and anything they started
        assert proc.poll() is None and len(job) >= 2, "the job ended before it could be stopped"
        os.kill(proc.pid, signum)  # the launcher only, as `kill -TERM <pid>` or scancel's SIGTERM
        returncode = proc.wait(timeout=90)
        survivors = [pid for pid in job if process_state(pid) not in ("", "Z")]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only if the test failed: nothing may outlive it
        proc.wait()
    assert returncode == 128 + signum and not survivors
    assert not out.exists() and resume.is_file()  # not committed; the resume point kept
    result = cca(caches, *longer, *train_args(caches, out), nproc=2)
    assert "resuming" in result.stderr
    assert [r["step"] for r in steps(out)] == list(range(40))


def test_eval_with_two_processes_writes_the_same_samples_and_metrics(caches: Path):
    def run_eval(out: Path, nproc: int) -> dict:
        cca(caches, "eval", "--vq", caches / "vq.pt", "--base", caches / "gpt.pt", "--policy", caches / "gpt.pt",
            "--reference", caches / "ref", "--classifier", caches / "clf.pt", "--fidelity-cache", caches / "fc",
            "--out", out, nproc=nproc)
        return json.loads((out / "metrics.json").read_text())

    one, two = run_eval(caches / "eval1", 1), run_eval(caches / "eval2", 2)
    for name in ("base_seed0", "cfg_1_seed0", "cca_seed0"):
        with np.load(caches / "eval1/samples" / f"{name}.npz") as a, np.load(caches / "eval2/samples" / f"{name}.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"]), name
    for method, m in one["methods"].items():
        assert {k: v for k, v in m.items() if "images_per_s" not in k} == \
            {k: v for k, v in two["methods"][method].items() if "images_per_s" not in k}
    assert not list((caches / "eval2/samples").glob(".*rank*"))  # the shards were merged and removed


def test_a_failing_rank_stops_the_job_with_its_message(world: Path, tmp_path: Path):
    """Rank 1 raises while rank 0 waits in a collective: torchrun stops the job, non-zero, within 60 s."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys\n"
        "from pipeline.distributed import init_world\n"
        "from stages.cli.main import guarded\n"
        "with guarded():\n"
        "    world = init_world('cpu')\n"
        "    if world.rank == 1:\n"
        "        raise ValueError('rank 1 found a bad input: /data/missing.pt')\n"
        "    world.barrier()  # rank 0 would wait here forever\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "0", str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode != 0 and time.time() - started < 60
    assert "cca-pipe: error: rank 1 found a bad input: /data/missing.pt" in proc.stdout + proc.stderr


def torchrun(script: Path, *args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "0", str(script), *map(str, args)],
                          capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


def test_ranks_given_other_settings_or_inputs_stop_at_once_naming_the_rank_and_keys(tmp_path: Path):
    """Rank 1 gets its own `--set train.lambda=1000` (another params file would do the same) and runs in a folder
    of its own (a node's local disk) where `--init gpt.pt` is another file (a stale copy: another size). Both
    ranks stop before any work, with one line naming rank 1 and both keys, in seconds, not after the
    process-group timeout."""
    for rank, size in ((0, 10), (1, 20)):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "gpt.pt").write_bytes(b"x" * size)
    script = tmp_path / "wrapper.py"
    script.write_text(
        "import os, sys\n"
        "from stages.cli import run\n"
        f"os.chdir({str(tmp_path)!r} + '/node' + os.environ['RANK'])\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.argv[1:1] = ['--set', 'train.lambda=1000']\n"
        "run()\n")
    started = time.time()
    proc = torchrun(script, "--params", ROOT / "params.yaml", "--device", "cpu", "train", "--init", "gpt.pt",
                    "--out", tmp_path / "out")
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "cca-pipe: error:" in line]
    assert proc.returncode != 0 and time.time() - started < 60
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rank 1 of 2" in errors[0] and "train.lambda is 1000.0 there, 10.0 on rank 0" in errors[0], errors[0]
    assert "--init (what is there) is 'file of 20 bytes' there" in errors[0], errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_each_job_has_its_own_rendezvous_id_the_same_on_every_node():
    from stages.cli.launch import LaunchConfig, rendezvous_id, torchrun_command

    multi = LaunchConfig(nproc_per_node=2, nnodes=2, rdzv_endpoint="node0:29400")
    job = ["--nnodes", "2", "train", "--out", "data/train"]
    assert rendezvous_id(multi, job, {}) == rendezvous_id(multi, ["--nnodes=2", *job[2:]], {})  # node to node
    assert rendezvous_id(multi, job, {}) != rendezvous_id(multi, [*job[:-1], "data/train_l30"], {})  # job to job
    assert rendezvous_id(multi, job, {"SLURM_JOB_ID": "417", "SLURM_STEP_ID": "0"}) == "slurm-417.0"
    assert rendezvous_id(multi, job, {"PBS_JOBID": "88.head"}) == "pbs-88.head"
    named = LaunchConfig(nproc_per_node=2, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="mine")
    assert rendezvous_id(named, job, {"SLURM_JOB_ID": "417"}) == "mine"
    command = torchrun_command(multi, job)
    assert command[command.index("--rdzv-id") + 1] == rendezvous_id(multi, job)


def test_the_ranks_run_the_cca_pipe_the_job_was_started_with(tmp_path: Path, monkeypatch):
    """torchrun's ranks run the `cca-pipe` script the job was started with, by its path (--no-python), with the
    stage's arguments less the launch options; a job started otherwise runs the CLI's module under this Python."""
    from stages.cli.launch import LaunchConfig, rank_entry, torchrun_arguments

    script = tmp_path / "bin" / "cca-pipe"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert rank_entry("bin/cca-pipe") == ["--no-python", str(script)]  # absolute: the ranks may start elsewhere
    args = torchrun_arguments(LaunchConfig(nproc_per_node=2), ["--nproc-per-node", "2", "train", "--out", "o"], str(script))
    assert args == ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "--no-python", str(script),
                    "train", "--out", "o"]
    assert rank_entry(str(ROOT / "stages" / "cli" / "main.py")) == ["-m", "stages.cli.main"]  # python -m stages.cli.main
    script.chmod(0o644)
    assert rank_entry(str(script)) == ["-m", "stages.cli.main"]  # not a script one can run


def test_a_rendezvous_endpoint_in_use_on_this_machine_is_refused_in_one_line(world: Path, tmp_path: Path):
    """A second job given the endpoint a first job serves (here: any listener on the port) would join that
    job's store: refused before torchrun starts, one line, exit 2."""
    import socket

    with socket.socket() as first_job:
        first_job.bind(("", 0))
        first_job.listen()
        port = first_job.getsockname()[1]
        proc = cca(world, "--rdzv-endpoint", f"localhost:{port}", "reflogp", "--tokens", world / "tokens.zarr",
                   "--ref", world / "gpt.pt", "--out", tmp_path / "cache.parquet", nproc=2, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cca-pipe: error: the rendezvous endpoint localhost:{port}")
    assert len([line for line in proc.stderr.splitlines() if "error" in line.lower()]) == 1
