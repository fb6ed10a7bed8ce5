"""`cca-pipe --nproc-per-node N STAGE ...` (or params.yaml's `launch:` section): the command re-executes
itself under PyTorch's own launcher, `python -m torch.distributed.run`, which starts the processes, sets
RANK/WORLD_SIZE/LOCAL_RANK and stops every process as soon as one fails (max restarts 0). Multi-node: run
the same command on each node with `--nnodes` and a shared `--rdzv-endpoint host:port` (torchrun's c10d
rendezvous; README shows a SLURM script)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass

from pipeline.config import check_ranges, setting

log = logging.getLogger(__name__)

DISTRIBUTED = ("reflogp", "train", "eval")  # the stages that share their work over processes
_OPTIONS = ("--nproc-per-node", "--nnodes", "--rdzv-endpoint")


@dataclass
class LaunchConfig:
    nproc_per_node: int = setting(1, ge=1)  # processes per node (one per GPU); 1: a plain process
    nnodes: int = setting(1, ge=1)
    rdzv_endpoint: str = ""  # host:port of the rendezvous, the same on every node (multi-node only)

    def __post_init__(self) -> None:
        check_ranges(self, "launch")


def torchrun_command(cfg: LaunchConfig, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `cca-pipe argv` (without the launch options) on this node."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _OPTIONS)):
            rest.append(arg)
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        where = ["--standalone"]  # a free port on this machine
    else:
        where = ["--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint or "localhost:29400",
                 "--rdzv-id", "cca-pipe"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(cfg.nproc_per_node),
            "--max-restarts", "0", "-m", "stages.cli", *rest]


def relaunch(cfg: LaunchConfig, argv: list[str]) -> int:
    """Run the command under torchrun and return its exit status."""
    command = torchrun_command(cfg, argv)
    log.info("running under torchrun: %d processes per node, %d node(s)", cfg.nproc_per_node, cfg.nnodes)
    return subprocess.run(command).returncode
