"""pipeline/outputs.py: what a stage may replace, the per-output lock, and the swap of finished outputs."""

from __future__ import annotations

import os

import pytest

from pipeline.outputs import Claim, OutputError, OutputLock, StageDir, atomic_file, replace_path


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    first, second = OutputLock(tmp_path / "out"), OutputLock(tmp_path / "out")
    first.acquire()
    try:
        with pytest.raises(OutputError, match=rf"out is being written by another cca-pipe process \(pid {os.getpid()} "):
            second.acquire()
    finally:
        first.release()
    second.acquire()  # released: free again, and the lock file was removed and recreated
    second.release()
    assert not (tmp_path / ".out.lock").exists()


def test_stage_dir_replaces_only_its_own_entries(tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / ".gitignore").write_text("/policy.pt\n")  # DVC's: harmless, the directory can be claimed
    with StageDir(out, "train", key="run1") as claim:
        work = claim.open_partial()
        (work / "policy.pt").write_text("v1")
        (work / "checkpoints").mkdir()
        (work / "checkpoints" / "0000010.pt").write_text("c")
        claim.commit()
    (out / "notes.txt").write_text("mine")  # a user's file in our directory is left alone from now on
    with StageDir(out, "train", key="run2") as claim:
        (claim.open_partial() / "policy.pt").write_text("v2")
        claim.commit()
    assert (out / "policy.pt").read_text() == "v2" and (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints").exists()  # ours, from the earlier run, not written by this one
    assert (out / ".gitignore").is_file() and not (tmp_path / "train.partial").exists()


def test_a_partial_of_other_settings_is_discarded_one_of_the_same_kept(tmp_path):
    out = tmp_path / "eval"
    with StageDir(out, "eval", key="a") as claim:
        (claim.open_partial() / "unit.json").write_text("1")
    with StageDir(out, "eval", key="a") as claim:
        assert claim.resumed() and (claim.open_partial() / "unit.json").is_file()
    with StageDir(out, "eval", key="b") as claim:
        assert not claim.resumed() and not (claim.open_partial() / "unit.json").exists()


def test_claims_refuse_foreign_paths_before_any_work(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("x")
    with pytest.raises(OutputError, match=r"mine \(output of cca-pipe train\) already exists and is not cca-pipe's own"):
        with StageDir(tmp_path / "mine", "train"):
            pass
    with StageDir(tmp_path / "eval_out", "eval") as claim:  # another stage's directory is not ours either
        (claim.open_partial() / "metrics.json").write_text("{}")
        claim.commit()
    with pytest.raises(OutputError, match="eval_out"):
        with StageDir(tmp_path / "eval_out", "train"):
            pass
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(OutputError, match="symbolic link"):
        with Claim(tmp_path / "link", what="x", owned=lambda p: True):
            pass
    assert (tmp_path / "mine" / "data.csv").read_text() == "x"


def test_parents_made_for_a_failed_claim_are_removed(tmp_path):
    with pytest.raises(OutputError):
        with Claim(tmp_path / "a" / "b" / "out", what="x", owned=lambda p: False) as claim:
            raise OutputError("input rejected")
    assert not (tmp_path / "a").exists() and claim.committed is False


def test_replace_path_swaps_a_directory(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "f").write_text("old")
    replace_path(tmp_path / "new", tmp_path / "store")
    assert (tmp_path / "store" / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


# ------------------------------------------------------------------------------------------------ issue 21 item 1: ours or untouched at every depth


def _run(out, key: str, files: dict[str, str]) -> None:
    with StageDir(out, "train", key=key) as claim:
        work = claim.open_partial()
        for name, text in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        claim.commit()


def test_a_users_file_in_our_sub_folder_survives_and_our_stale_files_go(tmp_path):
    out = tmp_path / "train"
    _run(out, "run1", {"policy.pt": "v1", "checkpoints/0000010.pt": "c10", "checkpoints/0000020.pt": "c20",
                       "grids/deep/a.png": "a"})
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "grids" / "deep" / "mine.txt").write_text("mine too")
    (out / "extra").mkdir()
    (out / "extra" / "x").write_text("x")
    _run(out, "run2", {"policy.pt": "v2", "checkpoints/0000010.pt": "new10"})
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (out / "grids" / "deep" / "mine.txt").read_text() == "mine too" and (out / "extra" / "x").read_text() == "x"
    assert (out / "checkpoints" / "0000010.pt").read_text() == "new10" and (out / "policy.pt").read_text() == "v2"
    assert not (out / "checkpoints" / "0000020.pt").exists() and not (out / "grids" / "deep" / "a.png").exists()
    _run(out, "run3", {"policy.pt": "v3"})  # our emptied directories go, those holding a user's file stay
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["notes.txt"]
    (out / "checkpoints" / "notes.txt").unlink()
    (out / "grids" / "deep" / "mine.txt").unlink()
    _run(out, "run4", {"policy.pt": "v4"})
    assert sorted(p.name for p in out.iterdir()) == [".cca-pipe.json", "extra", "policy.pt"]


def test_a_users_file_where_we_would_write_is_refused_before_anything_moves(tmp_path):
    out = tmp_path / "train"
    _run(out, "run1", {"policy.pt": "v1"})
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "0000010.pt").write_text("the user's")
    with pytest.raises(OutputError, match=r"checkpoints/0000010\.pt is not cca-pipe's own"):
        _run(out, "run2", {"policy.pt": "v2", "checkpoints/0000010.pt": "ours"})
    assert (out / "policy.pt").read_text() == "v1" and (out / "checkpoints" / "0000010.pt").read_text() == "the user's"
    assert (tmp_path / "train.partial" / "policy.pt").read_text() == "v2"  # the finished run waits there


def test_a_commit_killed_midway_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "train"
    _run(out, "run1", {"policy.pt": "v1", "checkpoints/1.pt": "c1", "checkpoints/2.pt": "c2"})
    real_replace, moved = os.replace, []

    def killed_after_one(src, dst):
        if not str(src).endswith(".tmp"):  # the files moved in (atomic_file's renames pass)
            if moved:
                raise KeyboardInterrupt  # stands in for a kill between two renames
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _run(out, "run2", {"checkpoints/1.pt": "new1", "policy.pt": "v2"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "checkpoints" / "1.pt").read_text() == "new1" and (out / "policy.pt").read_text() == "v1"  # each file whole
    with StageDir(out, "train", key="run3"):  # the next run finishes the interrupted commit first
        assert (out / "policy.pt").read_text() == "v2" and not (out / "checkpoints" / "2.pt").exists()
        assert not (tmp_path / "train.partial").exists()
