"""The `cca-pipe` processes of the suite's `dvc repro` runs, forked from a process that has imported torch.

Most of the suite's time was processes starting: every stage of a `dvc repro` is a process that imports torch
(~2.2 s of CPU on the 2-core CI machine), torch._dynamo with the optimizer or torchvision (~1.4 s more), before it
does anything (docs/performance.md, "Issue 31.6, fourth pass"). Each test session's worker starts one zygote
(`python tests/zygote.py SOCKET`, the `forked_stage_processes` fixture in conftest.py): it does what `cca-pipe`
does before torch (pipeline.host.use_huge_pages), imports the third-party libraries the stages import, and waits.
The `cca-pipe` that the session puts first on PATH (tests/zygote_client.py, what DVC runs for a stage) hands its
command line, environment, working folder and standard streams to the zygote, which forks a child; the child
takes them over and runs the console script's entry (stages.cli:run_process, pyproject.toml) as a fresh `cca-pipe` would,
while the client passes stop signals on and ends with the child's exit status (or its signal).

What the child shares with the zygote is only the imported third-party modules: our own code (pipeline/,
stages/) is imported by the child, so a setting read at import still comes from the child's environment. Where the
environment differs in a variable that an imported library may have read already (threads, allocator, locale,
Python's own, torch's: IMPORT_TIME_PREFIXES), the zygote refuses and the client runs the real `cca-pipe` instead;
so does it when the zygote is not there (CCA_PIPE_TEST_FRESH=1 makes every stage a fresh process, as the suite
ran before). The child's argv[0] is the client's path, so that under `cca-pipe --nproc-per-node N` torchrun's ranks
(which run the script the job was started with, stages/cli/launch.py rank_entry) are clients too, forked alike.
A test that kills a forked `cca-pipe` waits for it with kill_and_wait. Tests that start `cca-pipe` by its path get
fresh processes: those that kill or signal a torchrun job (its ranks die with their parent, the launcher), a
Ctrl-C to a process group, a writer whose pid is named, the processes whose memory is measured;
tests/test_zygote.py checks the child against a fresh process.

Written here rather than with multiprocessing's forkserver: that one runs a Python function in the child, and
has no way to hand over a command's standard streams, environment and exit status to another process.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

SOCKET_ENV = "CCA_PIPE_TEST_ZYGOTE"  # the zygote's socket, for the client
REAL_ENV = "CCA_PIPE_TEST_REAL"  # the venv's own `cca-pipe`, which the client runs where the zygote cannot
FRESH_ENV = "CCA_PIPE_TEST_FRESH"  # "1": no zygote, every stage a fresh process

# what the stages import that costs most to import (torch 2.2 s, torch._dynamo 1.3 s, torch-fidelity's torchvision):
# third-party only, and none of them starts a thread at import (checked at start: a fork keeps only the forking one).
# scikit-learn (the embedded default's digits) sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK in the environment as it
# is imported: imported here, so that they are the zygote's own, as they are a session's once a test has imported it
PRELOADED = ("torch", "torch._dynamo", "torch.distributed", "torch_fidelity", "torchvision", "numpy", "zarr", "yaml",
             "click", "PIL.Image", "tqdm", "sklearn")
# environment variables a library may read as it is imported (OpenMP/BLAS threads, glibc's allocator, PyTorch's
# allocator, the linker, Python, the locale, torch's, zarr's and tqdm's settings): a child whose environment differs
# from the zygote's in one of them is refused, and runs fresh
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "MALLOC_", "THP_", "LD_", "PYTHON", "TORCH",
                        "PYTORCH", "CUDA", "NVIDIA", "LC_", "LANG", "ZARR", "NUMCODECS", "TQDM_", "NUMPY")
# ... except these (names, or prefixes of names), read where they are used: torch sets TORCHINDUCTOR_CACHE_DIR in the
# environment the first time a process asks for its compile cache (torch/_inductor/runtime/cache_dir_utils.py), so a
# test session's processes inherit it from the session or not, depending on what ran before; torchrun gives each rank
# TORCHELASTIC_* (run id, restarts, error file) and TORCH_NCCL_ASYNC_ERROR_HANDLING, which torch.distributed reads as
# it starts a job and NCCL as it makes a process group, never at import
READ_WHEN_USED = ("TORCHINDUCTOR_CACHE_DIR", "TORCHELASTIC_", "TORCH_NCCL_")
# a request: its length, then JSON {"argv", "script", "env", "cwd", "client": its pid}; the streams ride along
FRAME = struct.Struct("!I")


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES) and not k.startswith(READ_WHEN_USED)}


def refusal(env: dict[str, str], own: dict[str, str], threads: int) -> str:
    """Why a child with environment `env` cannot be forked from this zygote ("" if it can). `own`: the zygote's
    variables as its imports read them; one the zygote set itself before them (use_huge_pages, as `cca-pipe` does)
    is the same for a child that leaves it unset: its `cca-pipe` would set it the same way."""
    if threads != 1:
        return f"the zygote runs {threads} threads"
    env = {**{k: own[k] for k in own.keys() - ENVIRONMENT_AT_START.keys()}, **import_time_env(env)}
    differing = sorted(k for k in env.keys() | own.keys() if env.get(k) != own.get(k))
    return f"the environment differs in {', '.join(differing)}" if differing else ""


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < FRAME.size or len(data) < FRAME.size + FRAME.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("the client closed its connection mid-request")
        data += more
    return json.loads(data[FRAME.size:FRAME.size + FRAME.unpack_from(data)[0]]), fds


def serve(path: str) -> tuple[dict, list[int]]:
    """Serve `cca-pipe` clients on the socket at `path` until this process's stdin closes (the test session ended);
    returns only in a forked child: its request and the client's standard streams."""
    own = import_time_env(os.environ)  # as the imports read it: after use_huge_pages
    threads = len(os.listdir("/proc/self/task"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, ("accept",))
    selector.register(sys.stdin, selectors.EVENT_READ, ("session",))
    print("ready", flush=True)
    while True:
        # a client gone (killed) before a new one is served: its child is killed before the next is forked, as a
        # fresh process is gone once its killer's wait returns (a rerun then never meets the killed run still going)
        for key, _events in sorted(selector.select(), key=lambda ready: ready[0].data[0] == "accept"):
            kind = key.data[0]
            if kind == "session":
                if not sys.stdin.buffer.read1(1 << 10):  # the session ended: so do the children left (none, normally)
                    for other in list(selector.get_map().values()):
                        if other.data[0] == "child":
                            os.kill(other.data[1], signal.SIGKILL)
                    sys.exit(0)
            elif kind == "accept":
                conn, _ = listener.accept()
                conn.settimeout(30)
                try:
                    request, fds = receive(conn)
                except (OSError, ValueError) as e:
                    print(f"zygote: a bad request: {e}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                why = refusal(request["env"], own, threads)
                if why:
                    print(f"zygote: {request['argv'][1:3]} runs fresh: {why}", file=sys.stderr, flush=True)
                    conn.sendall(f"refused {why}\n".encode())
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = os.fork()
                if pid == 0:
                    for other in list(selector.get_map().values()):
                        if other.data[0] == "child":
                            os.close(other.fd)  # a pidfd
                        elif other.data[0] == "client":
                            other.fileobj.close()
                    selector.close()
                    listener.close()
                    conn.close()
                    return request, fds
                for fd in fds:
                    os.close(fd)
                print(f"zygote: forked {pid} for client {request['client']} {request['argv'][1:3]}", file=sys.stderr,
                      flush=True)
                pidfd = os.pidfd_open(pid)
                conn.sendall(f"pid {pid}\n".encode())
                selector.register(pidfd, selectors.EVENT_READ, ("child", pid, conn))
                selector.register(conn, selectors.EVENT_READ, ("client", pid))
            elif kind == "client":  # the client went away (killed): its child is stopped as it would have been
                try:
                    gone = not key.fileobj.recv(1)
                except OSError:
                    gone = True
                if gone:
                    selector.unregister(key.fileobj)
                    os.kill(key.data[1], signal.SIGKILL)
            elif kind == "child":
                _, pid, conn = key.data
                _, status = os.waitpid(pid, 0)
                selector.unregister(key.fd)
                os.close(key.fd)
                try:
                    selector.unregister(conn)
                except KeyError:  # already, when its client went away
                    pass
                try:
                    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


def become(request: dict, fds: list[int]) -> None:
    """Turn this forked child into the client's `cca-pipe` process: its streams, folder, environment, argv (the
    client's path first, as the command was started: under torchrun the ranks start the same way, forked too), and a
    __main__ that is the real console script (multiprocessing's spawned processes rerun __main__'s file)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["script"]
    sys.argv = list(request["argv"])
    sys.path[0] = str(Path(script).parent)  # a console script's own folder, as Python puts it there
    main = types.ModuleType("__main__")
    main.__file__ = script
    sys.modules["__main__"] = main
    # streams as Python makes them at start: stderr line-buffered, stdout only when it is a terminal
    for name, fd, mode in (("stdin", 0, "rb"), ("stdout", 1, "wb"), ("stderr", 2, "wb")):
        like = getattr(sys, name)
        stream = io.TextIOWrapper(open(fd, mode, closefd=False), encoding=like.encoding, errors=like.errors,
                                  line_buffering=fd == 2 or (fd == 1 and os.isatty(fd)))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    import numpy

    numpy.random.seed()  # the legacy global generator, seeded from the OS as in a fresh process (random reseeds itself)


def process_state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped, Z: ended, not yet reaped), "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def kill_and_wait(proc: subprocess.Popen, environ: dict[str, str] | None = None, timeout_s: float = 30) -> None:
    """SIGKILL a `cca-pipe` a test started, and wait until it is gone: where it was a client of the zygote named in
    `environ` (default: this session's), the process forked for it too (the zygote kills that one as it sees its
    client go, moments later), so that what the test looks at next is what a killed fresh process leaves, and
    nothing it left is still being written."""
    proc.kill()
    proc.wait()
    log = Path((os.environ if environ is None else environ).get(SOCKET_ENV, "/nonexistent")).with_name("zygote.log")
    found = re.findall(rf"forked (\d+) for client {proc.pid} ", log.read_text(encoding="utf-8")) if log.is_file() else []
    if not found:
        return  # a fresh process
    deadline = time.monotonic() + timeout_s
    while process_state(int(found[-1])) not in ("", "Z"):  # gone, or ended and not yet reaped: its files are closed
        if time.monotonic() > deadline:
            raise AssertionError(f"process {found[-1]}, forked for the killed client {proc.pid}, still runs {timeout_s} s later")
        time.sleep(0.002)


@contextlib.contextmanager
def zygote_on_path(folder: Path) -> Iterator[dict[str, str]]:
    """A zygote serving on a socket in `folder`, and the environment that makes `cca-pipe` its client (PATH: the
    client first, before the caller's PATH), for the `with` block."""
    real = Path(sys.executable).parent / "cca-pipe"
    (folder / "bin").mkdir()
    client = folder / "bin" / "cca-pipe"
    client.write_text(f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "import zygote_client\nzygote_client.main()\n", encoding="utf-8")
    client.chmod(0o755)
    with open(folder / "zygote.log", "w", encoding="utf-8") as log:
        zygote = subprocess.Popen([sys.executable, __file__, str(folder / "zygote.sock")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        if zygote.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the zygote did not start: {(folder / 'zygote.log').read_text(encoding='utf-8')[-2000:]}")
        yield {SOCKET_ENV: str(folder / "zygote.sock"), REAL_ENV: str(real),
               "PATH": os.pathsep.join([str(folder / "bin"), os.environ.get("PATH", "")])}
    finally:
        zygote.stdin.close()  # its signal to end
        try:
            zygote.wait(timeout=30)
        except subprocess.TimeoutExpired:
            zygote.kill()


ENVIRONMENT_AT_START = dict(os.environ)

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.host import use_huge_pages

    use_huge_pages()  # what `cca-pipe` does before torch (stages/cli/main.py run)
    for module in PRELOADED:
        __import__(module)
    sys.path.pop(0)
    gc.collect()
    gc.freeze()  # the imported objects out of the collector's reach: the children do not copy their pages for it
    request, fds = serve(sys.argv[1])
    del sys.modules["pipeline.host"], sys.modules["pipeline"]  # the child imports our code itself
    become(request, fds)
    from importlib.metadata import entry_points

    (console_script,) = entry_points(group="console_scripts", name="cca-pipe")  # pyproject.toml's [project.scripts]
    sys.exit(console_script.load()())
