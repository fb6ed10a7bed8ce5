"""bench/demo_seeds.py on the tiny pipeline: two full pipeline seeds, each a `dvc repro` of the real dvc.yaml in a
folder of its own, recorded as a set: the record, docs/paper.md's table and the README's range are rewritten from it
and the verdict then quotes the new set. Seed 0's params.yaml is the tiny pipeline's (the shipped seeds, TINY
settings), so its folder is a copy of the session's tiny_pipeline (tests/tiny_pipeline.py), where the command
resumes (as a rerun does: run_folder checks the folder's params.yaml, `dvc repro` finds it done); seed 1 runs every
stage in a folder the command makes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from tiny_pipeline import TINY, copy_of

from bench.demo_seeds import SEED_KEYS, main
from pipeline.report import demo_runs_table, ratio_range, read_demo_runs

ROOT = Path(__file__).resolve().parents[1]


def test_two_seeds_of_the_tiny_pipeline_are_recorded_as_a_set(tiny_pipeline: Path, tmp_path: Path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("docs/demo_runs.csv", "docs/paper.md", "README.md"):
        shutil.copy(ROOT / name, docs / Path(name).name)
    before = read_demo_runs(docs / "demo_runs.csv")
    overrides = [f"{section}.{key}={json.dumps(value)}"  # JSON: a YAML value
                 for section, values in TINY.items() for key, value in values.items()]
    argv = ["--seeds", "0", "1", "--workdir", str(tmp_path / "runs"), "--record", "--runs", str(docs / "demo_runs.csv"),
            "--paper-md", str(docs / "paper.md"), "--readme", str(docs / "README.md")]
    for item in overrides:  # with TINY's one-point lambda sweep (shipped: none): seed 0 is then the tiny pipeline
        argv += ["--set", item]
    copy_of(tiny_pipeline, tmp_path / "runs/seed0")
    rows = main(argv)
    out = capsys.readouterr().out

    # every trained part's seed is the run's seed; the data split and the sampling seeds are the shipped ones
    for seed in (0, 1):
        params = yaml.safe_load((tmp_path / f"runs/seed{seed}/params.yaml").read_text())
        assert [params[s][k] for s, k in (key.split(".") for key in SEED_KEYS)] == [seed] * len(SEED_KEYS)
        assert params["prepare"]["seed"] == 0 and params["eval"]["seeds"] == TINY["eval"]["seeds"]
    # reseeded, every FID of the headline moved (VQ, classifier, GPT and policy differ)
    assert [r.run.split(" (")[0] for r in rows] == ["seed 0", "seed 1"]
    assert rows[0].base_fid != rows[1].base_fid and rows[0].cca_fid != rows[1].cca_fid
    # each run's verdict, against the record as it was (the history set)
    verdicts = [line for line in out.splitlines() if line.startswith("seed ")]
    assert len(verdicts) == 2
    for row, line in zip(rows, verdicts, strict=True):
        assert f"FID {row.cca_fid:.2f} = {row.over_cfg:.2f}x the best CFG scale (s=1, FID {row.cfg_fid:.2f}; the only scale" in line
        assert f"runs on this machine gave {ratio_range(before).low:.2f}-{ratio_range(before).high:.2f}x" in line

    after = read_demo_runs(docs / "demo_runs.csv")
    kept = [r for r in before if r.set != rows[0].set]  # a set recorded under today's name is replaced, not kept
    assert after[: len(kept)] == kept and after[len(kept):] == rows
    assert re.fullmatch(r"seeds \d{4}-\d{2}-\d{2}", rows[0].set) and ratio_range(after).set == rows[0].set
    paper = (docs / "paper.md").read_text()
    assert demo_runs_table(after) in paper and f"**{rows[0].set}** (2 runs)" in paper
    readme = (docs / "README.md").read_text()
    assert ratio_range(after).phrase in readme and ratio_range(before).phrase not in readme

    # a rerun resumes in the same folders (nothing to reproduce) and replaces the set instead of adding it twice
    assert main(argv) == rows
    assert read_demo_runs(docs / "demo_runs.csv") == after
