"""`cca-pipe` as the test session puts it first on PATH (tests/zygote.py, the `forked_stage_processes` fixture):
hands the command to the session's zygote, which forks a process that has imported torch already, and ends as that
process ends; where the zygote is not there or refuses, runs the venv's own `cca-pipe`. Standard library only,
started with `python -I -S`: it costs a few milliseconds, not the seconds of an import of torch."""

import json
import os
import signal
import socket
import sys

from zygote import FRAME, REAL_ENV, SOCKET_ENV  # the names and the framing the zygote reads (standard library only)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what a scheduler, a user or DVC stops a command with


def main() -> None:
    real = os.environ[REAL_ENV]
    reply, sock = "", None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.environ[SOCKET_ENV])
        request = json.dumps({"argv": sys.argv, "script": real, "env": dict(os.environ), "cwd": os.getcwd(),
                              "client": os.getpid()}).encode()
        socket.send_fds(sock, [FRAME.pack(len(request)) + request], [0, 1, 2])
        lines = sock.makefile("r", encoding="utf-8")
        reply = lines.readline()
    except (OSError, KeyError):
        pass
    if not reply.startswith("pid "):  # no zygote, or it refused (a setting read at import differs): a fresh process
        os.execv(real, [real, *sys.argv[1:]])
    pid = int(reply.split()[1])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))
    end = lines.readline()
    if not end.startswith("exit "):
        sys.exit(f"cca-pipe (tests/zygote_client.py): the zygote went away while process {pid} ran")
    code = int(end.split()[1])
    if code < 0:  # killed by a signal: end the same way, so that the caller sees what a fresh process shows
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
