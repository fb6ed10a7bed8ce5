"""How a `cca-pipe` process ends (stages/cli/main.py exit_without_teardown): everything Python's exit does that a
command or a tool around it can see (its output, its exit status, the threads it started, the atexit handlers,
also those registered before the command, as a coverage tool's) and not the teardown of the modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Python imports it at start from PYTHONPATH: an atexit handler and a thread before the command runs, and an object
# whose finalizer only the modules' teardown would call
SITECUSTOMIZE = """
import atexit, os, threading, time
OUT = os.environ["PROBE_OUT"]

def mark(name):
    with open(os.path.join(OUT, name), "w") as f:
        f.write(name)

atexit.register(mark, "atexit")

def late():
    time.sleep(0.5)
    mark("thread")

threading.Thread(target=late).start()

class Finalized:
    def __del__(self, _open=open, path=os.path.join(OUT, "teardown")):  # its own names: the modules' may be gone
        with _open(path, "w") as f:
            f.write("teardown")

kept = Finalized()
"""


@pytest.fixture
def probe(tmp_path: Path) -> tuple[Path, dict]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PROBE_OUT": str(tmp_path / "out")}
    return tmp_path / "out", env


def test_a_command_ends_with_its_output_status_threads_and_atexit_handlers_but_no_teardown(probe):
    out, env = probe
    proc = subprocess.run([str(BIN / "cca-pipe"), "config", "train"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # stdout into a pipe is block-buffered: all of it arrives, the same as the command prints in process
    assert proc.stdout == CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), "config", "train"]).stdout
    assert yaml.safe_load(proc.stdout)["train"]["loss"] == "cca"
    assert sorted(p.name for p in out.iterdir()) == ["atexit", "thread"]  # joined and run; the teardown skipped


def test_a_failing_command_keeps_its_status_and_message(probe, tmp_path: Path):
    out, env = probe
    proc = subprocess.run([str(BIN / "cca-pipe"), "--params", str(tmp_path / "missing.yaml"), "config", "train"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "missing.yaml" in proc.stderr and proc.stderr.endswith("\n")
    assert sorted(p.name for p in out.iterdir()) == ["atexit", "thread"]


def test_output_into_a_closed_pipe_ends_quietly_with_status_1(probe):
    """`cca-pipe config train | head -0`: click stops the command at the broken pipe (status 1, no traceback), and
    the exit's own flush of stdout does not turn that into another status or a message."""
    out, env = probe
    proc = subprocess.Popen([str(BIN / "cca-pipe"), "config", "train"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (1, b"")
    assert sorted(p.name for p in out.iterdir()) == ["atexit", "thread"]
