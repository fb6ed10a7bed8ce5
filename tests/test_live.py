"""Issue 33.3, a run you can watch: train, reflogp and eval log through DVCLive (pipeline/live.py) into the run
folder's live/, which `dvc plots show` and `dvc exp show` read; a killed and resumed train leaves one step axis."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from worlds import train_stage_world
from zygote import kill_and_wait

from pipeline.config import ConfigError
from pipeline.live import LIVE_DIR, LIVE_METRICS, LIVE_PLOTS, LiveLog, check_mirrors
from stages import reflogp as reflogp_stage
from stages import train as train_stage
from stages.reflogp import RefLogpConfig
from stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def live_steps(live: Path, name: str) -> list[int]:
    return [int(r["step"]) for r in tsv(live / LIVE_PLOTS / f"{name}.tsv")]


# ------------------------------------------------------------------------------------------------ LiveLog itself

def test_each_step_is_a_row_of_each_metric_and_the_summary_holds_the_last(tmp_path: Path):
    live = LiveLog(tmp_path / "live", total_steps=4)
    for step in range(4):
        live.log_step(step, {"loss": 1.0 / (step + 1), "rewards/pos": float(step), "note": "text is skipped"}, rows=8)
    live.close()
    loss = tsv(tmp_path / "live" / LIVE_PLOTS / "loss.tsv")
    assert [(int(r["step"]), float(r["loss"])) for r in loss] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]
    assert live_steps(tmp_path / "live", "rewards/pos") == [0, 1, 2, 3]  # a "/" in a name is a sub-folder
    assert live_steps(tmp_path / "live", "throughput/rows_per_s") == [0, 1, 2, 3]
    eta = [float(r["eta_s"]) for r in tsv(tmp_path / "live" / LIVE_PLOTS / "eta_s.tsv")]
    assert eta[-1] == 0.0 and all(e > 0 for e in eta[:-1])  # nothing left after the last step
    assert not (tmp_path / "live" / LIVE_PLOTS / "note.tsv").exists()
    summary = json.loads((tmp_path / "live" / LIVE_METRICS).read_text())
    assert summary["loss"] == 0.25 and summary["rewards"]["pos"] == 3.0 and summary["step"] == 3


def test_a_resume_drops_the_steps_logged_past_the_resume_point(tmp_path: Path):
    """A process killed after step 5 whose last resume point is step 3: steps 3.. are logged again, once each."""
    first = LiveLog(tmp_path / "live", total_steps=8)
    for step in range(6):
        first.log_step(step, {"loss": float(step)})
    # killed: no close
    second = LiveLog(tmp_path / "live", resume=3, total_steps=8)
    for step in range(3, 8):
        second.log_step(step, {"loss": 100.0 + step})
    second.close()
    rows = tsv(tmp_path / "live" / LIVE_PLOTS / "loss.tsv")
    assert [int(r["step"]) for r in rows] == list(range(8))
    assert [float(r["loss"]) for r in rows] == [0.0, 1.0, 2.0, 103.0, 104.0, 105.0, 106.0, 107.0]
    assert json.loads((tmp_path / "live" / LIVE_METRICS).read_text())["step"] == 7


@pytest.mark.parametrize("summary", ["", '{"step": 4, "lo'], ids=["emptied", "cut"])
def test_a_resume_after_a_kill_mid_summary_write_resumes(summary: str, tmp_path: Path):
    """DVCLive rewrites metrics.json in place: a SIGKILL between its truncate and its write leaves it empty or cut
    (a `make test` under load: the resumed train stopped on "Expecting value"). The resume goes on, the summary
    rewritten at its next step."""
    first = LiveLog(tmp_path / "live", total_steps=8)
    for step in range(5):
        first.log_step(step, {"loss": float(step)})
    (tmp_path / "live" / LIVE_METRICS).write_text(summary)  # killed in the middle of the next rewrite
    second = LiveLog(tmp_path / "live", resume=3, total_steps=8)
    for step in range(3, 8):
        second.log_step(step, {"loss": 100.0 + step})
    second.close()
    assert [int(r["step"]) for r in tsv(tmp_path / "live" / LIVE_PLOTS / "loss.tsv")] == list(range(8))
    assert json.loads((tmp_path / "live" / LIVE_METRICS).read_text())["step"] == 7


def test_a_fresh_start_clears_a_previous_run_s_steps(tmp_path: Path):
    old = LiveLog(tmp_path / "live")
    for step in range(3):
        old.log_step(step, {"loss": 1.0})
    new = LiveLog(tmp_path / "live", resume=0)
    new.log_step(0, {"loss": 2.0})
    new.close()
    assert [float(r["loss"]) for r in tsv(tmp_path / "live" / LIVE_PLOTS / "loss.tsv")] == [2.0]


def test_it_logs_in_a_git_repo_without_commits(tmp_path: Path, monkeypatch):
    """`git init; dvc init; dvc repro`: DVCLive's own experiment lookup fails there ("Empty git repo")."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    live = LiveLog(tmp_path / "live")
    live.log_step(0, {"loss": 1.5})
    live.close()
    assert [float(r["loss"]) for r in tsv(tmp_path / "live" / LIVE_PLOTS / "loss.tsv")] == [1.5]


def test_a_disabled_log_writes_nothing(tmp_path: Path):
    """What the processes other than the main one hold."""
    live = LiveLog(tmp_path / "live", total_steps=2, enabled=False)
    live.log_step(0, {"loss": 1.0}, rows=4)
    live.log_summary({"fid": 3.0})
    live.close()
    assert not (tmp_path / "live").exists()


def test_a_summary_without_steps_is_metrics_json_only(tmp_path: Path):
    live = LiveLog(tmp_path / "live")
    live.log_summary({"cca/seed0/fid": 12.5, "cca/seed1/fid": 11.5})
    live.close()
    assert json.loads((tmp_path / "live" / LIVE_METRICS).read_text())["cca"] == {"seed0": {"fid": 12.5}, "seed1": {"fid": 11.5}}
    assert not (tmp_path / "live" / "plots").exists()


# ---------------------------------------------------------------------------------------- the mirrors' settings

def hide_package(monkeypatch, package: str) -> None:
    """Make `package` look not installed to importlib.util.find_spec, whatever this machine has (the test extras
    install tensorboard; a bare install has neither mirror)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))


def test_tensorboard_without_its_package_is_refused_in_one_line_before_anything_is_claimed(world: dict, monkeypatch):
    hide_package(monkeypatch, "tensorboard")
    with pytest.raises(ConfigError) as e:
        train_stage.run(TrainConfig(tensorboard=True, **world["base"]), world["tokens"], world["cache"], world["gpt"],
                        world["dir"] / "tb")
    assert str(e.value) == ("train.tensorboard is true but the tensorboard package is not installed: "
                            "`pip install tensorboard`, or set train.tensorboard: false")
    assert not (world["dir"] / "tb").exists() and not (world["dir"] / "tb.partial").exists()


def test_tensorboard_mirrors_the_steps(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = LiveLog(tmp_path / "live", mirrors={"tensorboard": True})
    for step in range(3):
        live.log_step(step, {"loss": float(step)})
    live.close()
    events = EventAccumulator(str(tmp_path / "live" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_wandb_without_its_package_is_refused_in_one_line(monkeypatch):
    hide_package(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match=r"^train\.wandb is true but the wandb package is not installed: `pip install "
                                          r"wandb`, or set train\.wandb: false$"):
        check_mirrors({"tensorboard": False, "wandb": True}, "train")


def test_the_mirrors_are_off_by_default_and_marked_as_not_changing_results():
    """same_result: DVC's sweep does not track them (python -m stages.cli.dvcdeps), a change reruns nothing."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in ("tensorboard", "wandb"):
        assert fields[name].default is False and fields[name].metadata["same_result"] is True, name
        assert yaml.safe_load((ROOT / "params.yaml").read_text())["train"][name] is False, name


# ------------------------------------------------------------------------------------------ the stages, in process

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    # 16 images, a 2-visit cache: 2 epochs of 4 steps of 4 rows
    return {**train_stage_world(tmp_path_factory.mktemp("live")), "base": dict(epochs=2.0, batch_size=4, micro_batch_size=2, lr=1e-3)}


def test_train_logs_every_step_live_with_the_step_log_s_values(world: dict):
    out = world["dir"] / "train"
    train_stage.run(TrainConfig(**world["base"]), world["tokens"], world["cache"], world["gpt"], out)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 8  # 2 epochs of 16 rows in batches of 4
    live = out / LIVE_DIR
    for name in ("loss", "rewards/pos", "rewards/neg", "rewards/accuracy", "lr", "grad_norm"):
        rows = tsv(live / LIVE_PLOTS / f"{name}.tsv")
        assert [int(r["step"]) for r in rows] == list(range(8)), name
        assert [float(r[name.split("/")[-1]]) for r in rows] == pytest.approx([s[name] for s in steps], rel=1e-12), name
    assert live_steps(live, "throughput/rows_per_s") == live_steps(live, "eta_s") == list(range(8))
    summary = json.loads((live / LIVE_METRICS).read_text())
    assert summary["step"] == 7 and summary["steps"] == 8 and summary["loss"] == pytest.approx(steps[-1]["loss"])
    assert "throughput" not in steps[0] and "eta_s" not in steps[0]  # wall-clock figures stay out of the step log


def test_reflogp_logs_its_parts_while_it_runs(world: dict, monkeypatch):
    """Progress per part goes to the parts' folder (gone with it once the cache is merged): seen at the merge."""
    seen = {}
    merge = reflogp_stage.RefCacheParts.merge

    def observed_merge(self):
        seen["rows"] = tsv(self.dir / LIVE_DIR / LIVE_PLOTS / "rows_done.tsv")
        return merge(self)

    monkeypatch.setattr(reflogp_stage.RefCacheParts, "merge", observed_merge)
    reflogp_stage.run(RefLogpConfig(batch_size=4, part_rows=4, visits=1), world["tokens"], world["gpt"], world["dir"] / "c4.parquet")
    assert [(int(r["step"]), float(r["rows_done"])) for r in seen["rows"]] == [(0, 4), (1, 8), (2, 12), (3, 16)]


# ----------------------------------------------------- the CLI killed and resumed; DVC reading the files (slow)

def _cli_world(world: dict) -> Path:
    """params.yaml for a train of 80 steps (20 epochs of the 2-visit cache, repeated) with a resume point every 5."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({**world["base"], "epochs": 20.0, "repeat_visits": True, "save_every": 5})
    (world["dir"] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return world["dir"] / "params.yaml"


def _train_cmd(world: dict, out: Path) -> list[str]:
    # `cca-pipe` from PATH: forked from the session's zygote (tests/zygote.py); kill_and_wait also waits for the
    # forked process to be gone
    return ["cca-pipe", "--params", str(_cli_world(world)), "train", "--tokens", str(world["tokens"]),
            "--cache", str(world["cache"]), "--init", str(world["gpt"]), "--out", str(out)]


def test_a_killed_and_resumed_train_leaves_one_step_axis(world: dict):
    """SIGKILL once a resume point exists and steps past it were logged live; the rerun resumes: each DVCLive
    step file holds steps 0..79 once, in order, with the values of the finished run's step log."""
    out = world["dir"] / "killed"
    partial = out.with_name(out.name + ".partial")
    loss_file = partial / LIVE_DIR / LIVE_PLOTS / "loss.tsv"

    def ready() -> bool:
        return (partial / "checkpoints" / "0000010.pt").is_file() and loss_file.is_file() and len(tsv(loss_file)) >= 13

    proc = subprocess.Popen(_train_cmd(world, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    finished = proc.poll() is not None
    kill_and_wait(proc)
    assert not finished and not out.exists(), "the run finished before it could be killed"
    killed_at = len(tsv(loss_file))
    resumed = subprocess.run(_train_cmd(world, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(80)) and killed_at < 80
    for name in ("loss", "rewards/pos", "rewards/neg", "lr", "grad_norm", "throughput/rows_per_s", "eta_s"):
        assert live_steps(out / LIVE_DIR, name) == list(range(80)), name
    loss = [float(r["loss"]) for r in tsv(out / LIVE_DIR / LIVE_PLOTS / "loss.tsv")]
    assert loss == [s["loss"] for s in steps]  # written as repr: the same floats
    assert json.loads((out / LIVE_DIR / LIVE_METRICS).read_text())["step"] == 79


def _dvc(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_plots_show_and_exp_show_read_the_live_files(world: dict, tmp_path: Path):
    """A tiny git + DVC repo whose dvc.yaml is the shipped train stage's outputs, metrics and plots (and the
    top-level plots); a train run into its data/train: `dvc plots show` gives the loss per step from DVCLive's
    files, `dvc exp show` the live metrics."""
    shipped = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    train = shipped["stages"]["train"]
    stage = {"cmd": train["cmd"], "outs": train["outs"], "metrics": train["metrics"], "plots": train["plots"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    _dvc(["init", "-q"], tmp_path)
    _dvc(["config", "core.analytics", "false"], tmp_path)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "tiny"], cwd=tmp_path, check=True)
    train_stage.run(TrainConfig(**world["base"]), world["tokens"], world["cache"], world["gpt"], tmp_path / "data" / "train")
    steps = [json.loads(line) for line in (tmp_path / "data/train/metrics.jsonl").read_text().splitlines()]

    plots = json.loads(_dvc(["plots", "show", "--json"], tmp_path))["data"]
    live_loss = "data/train/live/plots/metrics/loss.tsv"
    assert live_loss in plots and "data/train/live/plots/metrics/rewards/neg.tsv" in plots, sorted(plots)
    points = [p for entry in plots[live_loss] for p in entry["content"]["data"]["values"]]
    assert [(int(p["step"]), float(p["loss"])) for p in points] == [(s["step"], s["loss"]) for s in steps]

    shown = json.loads(_dvc(["exp", "show", "--json"], tmp_path))
    workspace = next(row for row in shown if row.get("rev") == "workspace")
    metrics = workspace["data"]["metrics"]["data/train/live/metrics.json"]["data"]
    assert metrics["step"] == len(steps) - 1 and metrics["loss"] == pytest.approx(steps[-1]["loss"], rel=1e-12)
    assert metrics["rewards"]["pos"] == pytest.approx(steps[-1]["rewards/pos"], rel=1e-12)


def test_a_reflogp_stopped_after_two_parts_resumes_on_one_step_axis(world: dict, monkeypatch):
    """The parts' folder holding live/ is still an unfinished cache of ours (resumed, not refused); the rerun
    logs parts 2 and 3 after the first run's 0 and 1."""
    write, merge, seen = reflogp_stage.RefCacheParts.write_part, reflogp_stage.RefCacheParts.merge, {}

    def write_then_stop(self, k, columns):
        if k == 2:
            raise KeyboardInterrupt  # as a stop between parts
        return write(self, k, columns)

    def observed_merge(self):
        seen["rows"] = tsv(self.dir / LIVE_DIR / LIVE_PLOTS / "rows_done.tsv")
        return merge(self)

    out = world["dir"] / "c_stopped.parquet"
    cfg = RefLogpConfig(batch_size=4, part_rows=4, visits=1)
    with monkeypatch.context() as m:
        m.setattr(reflogp_stage.RefCacheParts, "write_part", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            reflogp_stage.run(cfg, world["tokens"], world["gpt"], out)
    monkeypatch.setattr(reflogp_stage.RefCacheParts, "merge", observed_merge)
    reflogp_stage.run(cfg, world["tokens"], world["gpt"], out)
    assert [(int(r["step"]), float(r["rows_done"])) for r in seen["rows"]] == [(0, 4), (1, 8), (2, 12), (3, 16)]
