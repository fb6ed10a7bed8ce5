"""Data parallelism under torchrun: this process's place in the job and the few collectives stages use.

Launch is PyTorch's own: `torchrun --nproc-per-node N ...` (or `cca-pipe --nproc-per-node N STAGE`, which
re-executes itself under torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK; `init_world` joins the process
group (NCCL on CUDA with each rank on its LOCAL_RANK device, gloo on CPU). A plain process is a world of
one: no process group, every collective a no-op, so stages run the same code either way.

A stop signal (SIGTERM, SIGINT) ends every rank at once: the job stops uncommitted, resumable. Before any
work, the ranks of a stage check that they were given the same job (`check_same_job`: one digest of the
resolved settings, paths and input sizes), so a node with another params file fails at once, by name.

Only the main process (rank 0) claims and writes shared outputs, logs and draws progress bars; the others
compute their share. A rank that fails exits non-zero, and torchrun (max restarts 0) stops the others
within its monitor interval; the process-group timeout (CCA_PIPE_DIST_TIMEOUT_S, default 1800 s) bounds
any wait on a rank that vanished without torchrun noticing. Outputs must live on a filesystem every node
sees (the ranks read the partial output the main process prepared, e.g. a resume point).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .ranks import launched, rank_zero  # noqa: F401 (imported from here by stages and components)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (picklable, small: metrics, scores)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, items: list) -> list:
        """This rank's share of `items` (round robin), which all ranks enumerate alike."""
        return items[self.rank :: self.size]

    def main_only(self, context):
        """`context` entered on the main process only (e.g. an output Claim: its lock and checks); the other
        ranks get the object unentered."""
        return context if self.main else contextlib.nullcontext(context)


def check_same_job(world: World, facts: dict[str, object]) -> None:
    """Every rank was given the same job: its `facts` (the resolved settings and the inputs, key -> value, e.g.
    `train.lambda`, `--tokens`) have rank 0's digest. Otherwise no rank starts: a ConfigError naming the ranks
    that differ and the keys, raised on the first process of each node (one line per node), while the other
    processes exit with status 2 quietly. One small collective when they agree."""
    from .config import ConfigError, settings_digest

    if world.size == 1:
        return
    digests = world.gather(settings_digest(facts))
    if len(set(digests)) == 1:
        return
    everyone = world.gather(facts)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    first = everyone[differing[0]]
    keys = sorted(k for k in everyone[0].keys() | first.keys() if everyone[0].get(k) != first.get(k))
    shown = "; ".join(f"{k} is {_brief(first.get(k))} there, {_brief(everyone[0].get(k))} on rank 0" for k in keys[:4])
    more = f" (and {len(keys) - 4} more: {', '.join(keys[4:10])})" if len(keys) > 4 else ""
    if world.local_rank != 0:
        raise SystemExit(2)
    raise ConfigError(
        f"rank{'s' if len(differing) > 1 else ''} {', '.join(map(str, differing))} of {world.size} got other settings "
        f"or inputs than rank 0 (rank {differing[0]}: {shown}{more}): every process of a job needs the same params "
        f"file, --set options, preset and paths; nothing was run")


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_identity(path: object) -> str:
    """What cheaply tells two nodes' copies of an input apart: a file's size (not its mtime: copies made for
    each node differ there), or what is at the path."""
    p = Path(str(path))
    if p.is_file():
        return f"file of {p.stat().st_size} bytes"
    return "directory" if p.is_dir() else "nothing"


def init_world(device: str = "auto") -> World:
    """This process's World: from torchrun's environment (joining the process group), else a world of one."""
    from .device import pick_device

    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(device=pick_device(device))
    _die_with_launcher()
    _stop_at_once()
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    chosen = pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
    timeout = datetime.timedelta(seconds=float(os.environ.get("CCA_PIPE_DIST_TIMEOUT_S", "1800")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": chosen} if chosen.type == "cuda" else {}))
    return World(rank=rank, size=size, local_rank=local, device=chosen)


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a launcher killed with SIGKILL (a job scheduler,
    a user) would leave its ranks running on, still writing outputs. Ask the kernel to kill this rank when its
    parent (the launcher) dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _stop_at_once() -> None:
    """SIGTERM/SIGINT (torchrun passes on what the launcher got: a scheduler's cancel, Ctrl-C) end this rank at
    once, as SIGKILL would: every stage resumes from that (outputs are committed last, by renames, and the
    resume point is written atomically), and no rank waits in a Python handler for a long C++ call to return,
    or prints a KeyboardInterrupt traceback per process."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def shutdown_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a set drawn with `seed`: per sample, so any split of the samples over
    processes or batches draws the same images."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
