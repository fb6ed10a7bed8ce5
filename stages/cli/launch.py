"""`cca-pipe --nproc-per-node N STAGE ...` (or params.yaml's `launch:` section): the command becomes PyTorch's
own launcher, torchrun (`torch.distributed.run`, run in this process by `torchrun_main`, which leaves out its
failure summaries), which starts the processes, sets RANK/WORLD_SIZE/LOCAL_RANK and stops every process as soon
as one fails (max restarts 0). Each process runs the command the job was started with, less the launch options:
the `cca-pipe` script by its path (torchrun's `--no-python`), else `python -m stages.cli.main`. Multi-node: run
the same command on each node with `--nnodes` and a shared `--rdzv-endpoint host:port` (torchrun's c10d
rendezvous; README shows a SLURM script).

Each job meets under its own rendezvous id (`--rdzv-id`, `launch.rdzv_id`), so two jobs on one endpoint never
join one rendezvous. Unset, it is the scheduler's job id (`slurm-$SLURM_JOB_ID[.$SLURM_STEP_ID]`, else
PBS_JOBID, LSB_JOBID, FLUX_JOB_ID), else a digest of the command line without its launch options: the same on
every node of a job run with the same command, different for jobs that run another stage or write another
output. The endpoint's port is served by the job's first node: a port already in use on that machine is
another job's, refused in one line (give each job its own port), unless the id is given explicitly (several
"nodes" of one job on one machine: start each with the same `--rdzv-id`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, check_ranges, setting

log = logging.getLogger(__name__)

DISTRIBUTED = ("reflogp", "negatives", "train", "eval")  # the stages that share their work over processes
# set for the ranks by torchrun_main, which names a rank killed by a signal: the ranks that lose their connection
# to it then exit without a line of their own
QUIET_PEERS = "CCA_PIPE_QUIET_PEERS"
_OPTIONS = ("--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--rdzv-id")
# job ids of the schedulers (SLURM, PBS/Torque, LSF, Flux): the same on every node of a job, unique among jobs
_SCHEDULER_JOB_IDS = ("PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID")


@dataclass
class LaunchConfig:
    nproc_per_node: int = setting(1, ge=1)  # processes per node (one per GPU); 1: a plain process
    nnodes: int = setting(1, ge=1)
    rdzv_endpoint: str = ""  # host:port of the rendezvous, the same on every node (multi-node only)
    rdzv_id: str = ""  # the job's rendezvous id, the same on every node; "": the scheduler's job id (module doc)

    def __post_init__(self) -> None:
        check_ranges(self, "launch")


def launch_arguments(argv: list[str]) -> list[str]:
    """`argv` without the launch options (what torchrun's processes run)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _OPTIONS)):
            rest.append(arg)
    return rest


def rendezvous_id(cfg: LaunchConfig, argv: list[str], environ: dict[str, str] | None = None) -> str:
    """This job's rendezvous id: the setting, else the scheduler's job id, else a digest of the command line."""
    env = os.environ if environ is None else environ
    if cfg.rdzv_id:
        return cfg.rdzv_id
    if env.get("SLURM_JOB_ID"):  # with the step: two sruns of one allocation are two jobs
        return "slurm-" + env["SLURM_JOB_ID"] + (f".{env['SLURM_STEP_ID']}" if env.get("SLURM_STEP_ID") else "")
    for name in _SCHEDULER_JOB_IDS:
        if env.get(name):
            return f"{name.split('_')[0].lower()}-{env[name]}"
    return "cca-pipe-" + hashlib.sha256("\0".join(launch_arguments(argv)).encode()).hexdigest()[:16]


def rank_entry(argv0: str) -> list[str]:
    """What each rank runs, before the stage's arguments: the `cca-pipe` script this job was started with, by its
    path, so that the ranks start as the job did (a venv's script, a site's wrapper of that name); started otherwise
    (`python -m stages.cli.main`, a script or a test calling `run`), the CLI's module under this Python."""
    if Path(argv0).name == "cca-pipe" and os.path.isfile(argv0) and os.access(argv0, os.X_OK):
        return ["--no-python", os.path.abspath(argv0)]
    return ["-m", "stages.cli.main"]


def torchrun_arguments(cfg: LaunchConfig, argv: list[str], argv0: str | None = None) -> list[str]:
    """torchrun's arguments that run `cca-pipe argv` (without the launch options) on this node; `argv0`: how this
    process was started (sys.argv[0])."""
    rest = launch_arguments(argv)
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        where = ["--standalone"]  # a free port on this machine
    else:
        where = ["--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", cfg.rdzv_endpoint or "localhost:29400",
                 "--rdzv-id", rendezvous_id(cfg, argv)]
    return [*where, "--nproc-per-node", str(cfg.nproc_per_node), "--max-restarts", "0",
            *rank_entry(sys.argv[0] if argv0 is None else argv0), *rest]


def torchrun_command(cfg: LaunchConfig, argv: list[str], argv0: str | None = None) -> list[str]:
    """The same job as a command of its own: torchrun under this module's quiet launcher (`python -m
    stages.cli.launch`, what a script or a scheduler may run instead of `cca-pipe --nproc-per-node`)."""
    return [sys.executable, "-m", "stages.cli.launch", *torchrun_arguments(cfg, argv, argv0)]


def check_endpoint_free(cfg: LaunchConfig) -> None:
    """On the machine named by the endpoint, its port must be free: torchrun's first node serves the
    rendezvous there, and a node finding the port taken would join whatever serves it (another job's store,
    which goes when that job ends, taking this one down with C++ errors)."""
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname, parse_rendezvous_endpoint

    if (cfg.nnodes == 1 and not cfg.rdzv_endpoint) or cfg.rdzv_id:
        return  # --standalone: a free port; an explicit id: joining that job on purpose
    host, port = parse_rendezvous_endpoint(cfg.rdzv_endpoint or "localhost:29400", default_port=29400)
    if not _matches_machine_hostname(host):
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a finished job's TIME_WAIT is no conflict
        try:
            probe.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(
                f"the rendezvous endpoint {host}:{port} (--rdzv-endpoint / launch.rdzv_endpoint) is already in use on "
                f"this machine, by another job or program: give each job its own port, e.g. {host}:{port + 1}") from None


# What a scheduler or a user stops a job with (SLURM's scancel: SIGTERM; Ctrl-C: SIGINT; a closed terminal: SIGHUP)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def relaunch(cfg: LaunchConfig, argv: list[str]) -> int:
    """Run the command under torchrun, in this process, and return its exit status. A stop signal this process
    gets is passed on by torchrun to every rank, which it then waits for (then SIGKILL, after 30 s); the ranks stop
    where they are (pipeline/distributed.py), keeping their resume point, and this returns 128 + the signal's
    number: a job told to stop does not go on to commit its output. (In this process rather than a `python -m
    stages.cli.launch` child: one import of torch fewer per job, 2-3 s of CPU.)"""
    check_endpoint_free(cfg)
    log.info("running under torchrun: %d processes per node, %d node(s)", cfg.nproc_per_node, cfg.nnodes)
    return torchrun_main(torchrun_arguments(cfg, argv))


def wake_stopped_ranks_when_closing() -> None:
    """torchrun ends a job by sending SIGTERM to each rank's process group, then waits 30 s before SIGKILL. A rank
    stopped by SIGSTOP or Ctrl-Z holds the SIGTERM pending, so the job ended 30 s after the rank that timed out had
    said why. SIGCONT after the signal lets it act on it at once. (torchrun has no option for this: the close of
    its subprocess handler, which the agent calls for each rank, is wrapped; absent in another torch, nothing is.)"""
    try:
        from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import SubprocessHandler
    except ImportError:  # pragma: no cover - another torch layout: the job still ends, 30 s later
        return
    close = SubprocessHandler.close
    if getattr(close, "wakes_stopped_ranks", False):
        return

    def close_then_continue(self, death_sig: signal.Signals | None = None) -> None:
        close(self, death_sig)
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass  # already gone

    close_then_continue.wakes_stopped_ranks = True
    SubprocessHandler.close = close_then_continue


def torchrun_main(args: list[str]) -> int:
    """torchrun (`torch.distributed.run`'s own launcher, its arguments) without its noise: the failed rank has
    said what went wrong in one line (rank 0 for the job, stages/cli/main.py), so torchrun's failure summary (a
    ChildFailedError traceback), its agent's log lines, and the SignalException traceback of a stopped job
    are left out; a rank killed by a signal, which could say nothing itself, gets one line here. Returns the
    exit status: the first failed rank's, or 128 + the signal's number. With -v (in `args`) torchrun speaks."""
    verbose = "-v" in args or "--verbose" in args
    if not verbose:
        os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's loggers read it as they are made
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    def stop(signum: int, _frame) -> None:  # what torchrun's own handler does once its ranks have started
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    # from now, not only once the ranks start: a signal during the rendezvous stops the job the same way
    previous = {s: signal.getsignal(s) for s in (*FORWARDED, signal.SIGQUIT)}  # torchrun handles SIGQUIT too
    for s in FORWARDED:
        signal.signal(s, stop)
    try:
        if not verbose:
            os.environ[QUIET_PEERS] = "1"  # the ranks inherit it
            for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
                if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
                    logging.getLogger(name).setLevel(logging.CRITICAL)  # those made before LOGLEVEL was set, too
            wake_stopped_ranks_when_closing()
        run(parse_args(args))
    except ChildFailedError as e:
        if verbose:
            raise
        return _first_failure(e)
    except SignalException as e:  # this launcher was told to stop, and so were the ranks
        return 128 + int(e.sigval)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _first_failure(e) -> int:
    """The exit status of a failed job (torchrun's ChildFailedError), its killed rank named in one line."""
    # a rank killed by a signal (not the SIGTERM with which the agent ends the others once one has failed) first,
    # if one was: it could say nothing, while its peers, which lost their connection to it, exit quietly
    # (QUIET_PEERS); failure times are whole seconds, and on a tie torchrun's first failure is the lowest rank
    killed = {r: f for r, f in e.failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM}
    rank = min(killed, key=lambda r: (killed[r].timestamp, r)) if killed else e.get_first_failure()[0]
    failure = e.failures[rank]
    if failure.exitcode >= 0:
        return failure.exitcode or 1
    name = failure.signal_name()
    print(f"cca-pipe: error: rank {rank} of the job was killed by {name} (the out-of-memory killer, a scheduler, a "
          "user): the job stopped uncommitted; rerun the command to resume", file=sys.stderr)
    return 128 - failure.exitcode


def exit_without_teardown(code: int) -> None:
    """End the process as Python's own exit does, less its last two steps, then exit with `code`.

    Python's exit waits for the non-daemon threads, runs the atexit handlers (logging's flush, multiprocessing's and
    tempfile's cleanup, a coverage tool's save), flushes stdout, then tears every module down and runs the C++ static
    destructors. With torch imported the last two cost 0.7 s of CPU, with torch._dynamo and torch-fidelity 1.4 s
    (docs/performance.md, "fourth pass"), after the command's outputs are committed and said: every process ends
    that much sooner (the demo's ~30, the suite's ~400; `cca-pipe` and torchrun's launcher, stages/cli/main.py
    run_process and this module's __main__). The steps kept are CPython's own functions (no public API
    runs them); without them, the plain exit."""
    import atexit
    import threading

    shutdown, exit_handlers = getattr(threading, "_shutdown", None), getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or exit_handlers is None:  # pragma: no cover - another Python: its own exit
        sys.exit(code)
    shutdown()
    exit_handlers()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        code = code or 120  # Python's own status when stdout cannot be flushed at exit (a closed pipe)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    with contextlib.suppress(OSError, AttributeError):  # C's stdio buffers (a library that printed through them)
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(code)


if __name__ == "__main__":  # `python -m stages.cli.launch <torchrun arguments>` (torchrun_command)
    exit_without_teardown(torchrun_main(sys.argv[1:]))
