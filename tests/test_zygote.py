"""tests/zygote.py, what runs the `cca-pipe` stages of the suite's `dvc repro` runs: a forked `cca-pipe` says,
writes and returns what a fresh one does, ends as it ends when signalled, and where a setting read at import differs
it is a fresh one. The module starts a zygote of its own (not the session's, which CCA_PIPE_TEST_FRESH=1 turns off)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from zygote import kill_and_wait, process_state, zygote_on_path

from pipeline.host import HUGE_PAGES_ENV, THP_SYSFS

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(sys.executable).parent / "cca-pipe"


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> tuple[dict, Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # as in the suite's workers: one thread, which a fork keeps whole
        folder = tmp_path_factory.mktemp("zygote")
        with zygote_on_path(folder) as env:
            yield {**os.environ, **env}, folder / "zygote.log"


class Log:
    """What the zygote logs from now on."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, path.stat().st_size

    def text(self) -> str:
        with self.path.open(encoding="utf-8") as f:
            f.seek(self.start)
            return f.read()


@pytest.fixture
def zygote(started) -> tuple[dict, Log]:
    env, path = started
    return env, Log(path)


def forked(log: Log) -> list[int]:
    return [int(pid) for pid in re.findall(r"forked (\d+)", log.text())]


@pytest.mark.parametrize("argv", [["config", "train"], ["--params", "missing.yaml", "config", "train"], ["--help"],
                                  ["nosuch"]])
def test_a_forked_cca_pipe_says_and_returns_what_a_fresh_one_does(zygote, argv: list[str]):
    env, log = zygote
    ran = [subprocess.run([command, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
           for command in ("cca-pipe", str(REAL))]  # the client (first on PATH), then the real one
    assert [(p.returncode, p.stdout, p.stderr) for p in ran[:1]] == [(p.returncode, p.stdout, p.stderr) for p in ran[1:]]
    assert ran[0].returncode == (0 if argv[0] in ("config", "--help") else 2) and (ran[0].stdout or ran[0].stderr)
    assert len(forked(log)) == 1  # the first was forked; the real one is not the zygote's


@pytest.mark.parametrize("variable, value", [("OMP_NUM_THREADS", "2"), (HUGE_PAGES_ENV, "0"), (HUGE_PAGES_ENV, "1"),
                                             ("KMP_INIT_AT_FORK", "FALSE"), ("KMP_INIT_AT_FORK", "TRUE")])
def test_a_setting_read_at_import_that_differs_makes_a_fresh_process(zygote, variable: str, value: str):
    """OpenMP's threads, PyTorch's huge pages: read as torch is imported. The zygote's huge pages are `cca-pipe`'s
    (pipeline.host.use_huge_pages: on where the kernel has them), so a child that asks for them explicitly is forked;
    so is one with the KMP_INIT_AT_FORK that scikit-learn sets as it is imported (a session that has imported it),
    but not one that sets it otherwise."""
    env, log = zygote
    proc = subprocess.run(["cca-pipe", "config", "train"], cwd=ROOT, env={**env, variable: value},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "loss: cca" in proc.stdout
    if (variable, value) == (HUGE_PAGES_ENV, "1") and os.path.exists(THP_SYSFS) or (variable, value) == ("KMP_INIT_AT_FORK", "FALSE"):
        assert len(forked(log)) == 1 and "runs fresh" not in log.text()
    else:
        assert forked(log) == [] and f"runs fresh: the environment differs in {variable}" in log.text()


def _stopped(command: str, env: dict, log: Log) -> tuple[subprocess.Popen, int]:
    """`cca-pipe config train` and the process that runs it (the forked one, for the client), stopped (SIGSTOP) as it
    starts, before it could end or set a handler of its own; then the test's signals meet it while it runs. A forked
    process that ended before the test could stop it (0.2 s of work, on a loaded machine) is started again."""
    for _ in range(5):
        proc = subprocess.Popen([command, "config", "train"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline, seen = time.monotonic() + 60, len(forked(log))
        while command == "cca-pipe" and len(forked(log)) == seen:
            assert time.monotonic() < deadline, log.text()
            time.sleep(0.005)
        runner = forked(log)[-1] if command == "cca-pipe" else proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(runner, signal.SIGSTOP)
        stopping = time.monotonic() + 10
        while process_state(runner) not in ("T", "Z", "") and time.monotonic() < stopping:
            time.sleep(0.005)
        if process_state(runner) == "T":  # stopped; not one that had ended, unreaped (Z), or gone
            return proc, runner
        proc.communicate(timeout=60)
    raise AssertionError("the forked process ended five times before it could be stopped")


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_stop_signal_reaches_the_forked_process_and_the_client_ends_as_a_fresh_one(zygote):
    env, log = zygote
    ended = []
    for command in ("cca-pipe", str(REAL)):  # the client, then the real one
        proc, runner = _stopped(command, env, log)
        proc.send_signal(signal.SIGTERM)  # the client passes it on: pending in the stopped process
        time.sleep(0.2)
        os.kill(runner, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
        ended.append((proc.returncode, stdout, stderr))
        assert _gone(runner)
    assert ended[0] == ended[1] and ended[0][0] == -signal.SIGTERM


def test_a_killed_client_takes_its_forked_process_with_it(zygote):
    """The zygote sees its client go and kills the forked process: nothing outlives the command it ran for; and
    kill_and_wait (what the kill-and-resume tests use) returns once that process has ended, as a fresh one has
    once its parent's wait returns."""
    env, log = zygote
    client, runner = _stopped("cca-pipe", env, log)
    client.kill()
    client.communicate(timeout=60)
    assert _gone(runner)
    client, runner = _stopped("cca-pipe", env, log)
    kill_and_wait(client, env)
    assert process_state(runner) in ("", "Z")
