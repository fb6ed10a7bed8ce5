"""The verdict `make demo` ends with (`cca-pipe verdict`), the record of runs it compares with
(docs/demo_runs.csv), and the two documents that quote that record (docs/paper.md's table, the README's headline)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from test_report import _eval_dir, _metrics, _train_dir
from worlds import invoke

from pipeline.formats import FormatError
from pipeline.report import DemoRun, demo_runs_table, ratio_range, read_demo_runs, write_demo_runs
from stages import report

ROOT = Path(__file__).resolve().parents[1]
HEADER = "date,set,run,base_fid,cfg_scale,cfg_fid,cca_fid\n"


def _runs(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def _world(tmp_path: Path, cca_fid: float, cfg: dict[float, float], base_fid: float = 12.0) -> Path:
    """A finished run: the base model at `base_fid`, CFG at the scales `cfg` ({s: FID}; the main eval holds s=1, the
    sweep the rest), the main CCA policy (lambda 10) at `cca_fid`; and a record of 2 older runs (0.5x, 2x the best
    CFG) and 2 of the latest set: 0.80x the best CFG and 0.33x the base (4/5, 4/12), 1.05x and 0.57x (6.3/6, 6.3/11)."""
    main = {"base": _metrics(base_fid, 6.0), "cca": _metrics(cca_fid, 7.9)}
    if 1.0 in cfg:
        main["cfg_1"] = _metrics(cfg[1.0], 7.7)
    _eval_dir(tmp_path / "eval", main)
    _train_dir(tmp_path / "train", 10, 0.5)
    sweep_scales = [s for s in cfg if s != 1.0]
    for s in sweep_scales:
        _eval_dir(tmp_path / f"sweep/cfg/s{s}", {f"cfg_{s:g}": _metrics(cfg[s], 7 + s)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sweep": {"lambdas": [], "betas": [0.5], "cfg_scales": sweep_scales}}))
    _runs(tmp_path / "runs.csv", ["2026-11-01,history,old a,12,1,5,2.5", "2026-11-02,history,old b,12,1,5,10",
                                  "2026-12-08,seeds 2026-12-08,seed 0,12,1,5,4", "2026-12-08,seeds 2026-12-08,seed 1,11,1,6,6.3"])
    return tmp_path


def _verdict(world: Path, sweep_scales: list[float]) -> str:
    sweep = report.SweepConfig(lambdas=[], betas=[0.5], cfg_scales=sweep_scales) if sweep_scales else None
    return report.verdict(world / "eval", world / "train", world / "sweep", sweep, world / "runs.csv")


def test_a_ratio_inside_the_latest_sets_range_is_a_normal_run(tmp_path: Path):
    world = _world(tmp_path, 5.4, {0.5: 7.0, 1.0: 6.0, 2.0: 9.0})
    # 5.4 / 6.0 = 0.90 of the best CFG (s=1, from the main eval; 0.5 and 2 from the sweep), 5.4 / 12 = 0.45 of the
    # base; the ranges are the latest set's (0.80-1.05, 0.33-0.57), not the older runs' (0.50-2.00)
    assert _verdict(world, [0.5, 2.0]) == (
        "CCA without guidance (λ=10): FID 5.40 = 0.90x the best CFG scale (s=1, FID 6.00), 0.45x the base (FID 12.00); "
        "runs on this machine gave 0.80-1.05x and 0.33-0.57x (docs/paper.md): a normal run")


def test_a_ratio_outside_the_range_says_so_and_where_to_look(tmp_path: Path):
    world = _world(tmp_path, 7.2, {0.5: 7.0, 1.0: 6.0, 2.0: 9.0})
    line = _verdict(world, [0.5, 2.0])  # 7.2 / 6 = 1.20, 7.2 / 12 = 0.60
    assert line.startswith("CCA without guidance (λ=10): FID 7.20 = 1.20x the best CFG scale (s=1, FID 6.00), 0.60x the base")
    assert line.endswith('runs on this machine gave 0.80-1.05x and 0.33-0.57x (docs/paper.md): outside that range: see '
                         'docs/paper.md, "What make demo prints"')
    assert "\n" not in line


def test_a_run_that_learned_nothing_is_outside_though_cca_equals_cfg(tmp_path: Path):
    """Models that did not learn: base, CFG and CCA alike. CCA / best CFG (5.4 / 5.4 = 1.00) is in its range, CCA /
    base (5.4 / 5.5 = 0.98) is not."""
    line = _verdict(_world(tmp_path, 5.4, {0.5: 5.6, 1.0: 5.4, 2.0: 5.7}, base_fid=5.5), [0.5, 2.0])
    assert "FID 5.40 = 1.00x the best CFG scale (s=1, FID 5.40), 0.98x the base (FID 5.50)" in line
    assert "outside that range" in line


def test_the_range_is_compared_as_printed(tmp_path: Path):
    """6.324 / 6 = 1.054, printed 1.05: inside a range printed 0.80-1.05; 6.336 / 6 = 1.056, printed 1.06: outside
    (0.53 of the base both, inside 0.33-0.57)."""
    assert _verdict(_world(tmp_path / "a", 6.324, {0.5: 7.0, 1.0: 6.0, 2.0: 9.0}), [0.5, 2.0]).endswith("a normal run")
    assert "outside that range" in _verdict(_world(tmp_path / "b", 6.336, {0.5: 7.0, 1.0: 6.0, 2.0: 9.0}), [0.5, 2.0])


def test_a_best_cfg_scale_at_the_edge_of_those_evaluated_is_flagged(tmp_path: Path):
    world = _world(tmp_path, 5.4, {0.5: 7.0, 1.0: 6.5, 2.0: 6.0})  # best at s=2, the largest: 5.4 / 6 = 0.90
    assert ("0.90x the best CFG scale (s=2, FID 6.00; the largest scale evaluated, the best may lie beyond), "
            "0.45x the base") in _verdict(world, [0.5, 2.0])
    only = _world(tmp_path / "only", 5.4, {1.0: 6.0})  # the tiny pipeline's: one scale
    assert "the best CFG scale (s=1, FID 6.00; the only scale evaluated), 0.45x" in _verdict(only, [])


def test_a_missing_method_is_one_line_naming_it(tmp_path: Path, monkeypatch, capsys):
    world = _world(tmp_path, 5.4, {})  # no CFG point at all
    (world / "sweep").mkdir()
    with pytest.raises(FormatError, match=r"hold no cfg point: .*evaluate cfg \(eval.methods, sweep.cfg_scales\)"):
        _verdict(world, [])
    code, err = invoke(["--params", world / "params.yaml", "verdict", "--eval", world / "eval", "--train", world / "train",
                        "--sweep", world / "sweep", "--runs", world / "runs.csv"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("cca-pipe: error: ") and "no cfg point" in err
    # another training folder than the main eval's policy: no main CCA point either
    with pytest.raises(FormatError, match="hold no cfg and no cca point: .*evaluate cfg, cca "):
        report.verdict(world / "eval", world / "elsewhere", world / "sweep", None, world / "runs.csv")


def test_the_cli_prints_the_line(tmp_path: Path, monkeypatch, capsys):
    from stages.cli import main as cli

    world = _world(tmp_path, 5.4, {0.5: 7.0, 1.0: 6.0, 2.0: 9.0})
    monkeypatch.setattr(sys, "argv", ["cca-pipe", "--params", str(world / "params.yaml"), "verdict", "--eval", str(world / "eval"),
                                      "--train", str(world / "train"), "--sweep", str(world / "sweep"), "--runs", str(world / "runs.csv")])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 0
    assert capsys.readouterr().out == ("CCA without guidance (λ=10): FID 5.40 = 0.90x the best CFG scale (s=1, FID 6.00), 0.45x the base "
                                       "(FID 12.00); runs on this machine gave 0.80-1.05x and 0.33-0.57x (docs/paper.md): a normal run\n")


def test_the_record_is_read_strictly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nothere.csv is missing"):
        read_demo_runs(tmp_path / "nothere.csv")
    bad = _runs(tmp_path / "bad.csv", ["2026-12-08,seeds,seed 0,12,1,5,4", "2026-12-08,seeds,seed 1,13,1,six,6.3"])
    with pytest.raises(FormatError, match=r"bad.csv line 3: cfg_fid = 'six' is not a number"):
        read_demo_runs(bad)
    with pytest.raises(FormatError, match=r"line 2: no 'cca_fid'"):
        read_demo_runs(_runs(tmp_path / "short.csv", ["2026-12-08,seeds,seed 0,12,1,5"]))
    with pytest.raises(FormatError, match="holds no run"):
        read_demo_runs(_runs(tmp_path / "empty.csv", []))


def test_the_record_round_trips_and_its_range_is_the_latest_sets(tmp_path: Path):
    runs = [DemoRun("2026-11-01", "history", "old, with a comma", 12.0, 1.0, 5.0, 2.5),
            DemoRun("2026-12-08", "seeds 2026-12-08", "seed 0", 12.0, 1.0, 5.0, 4.0),
            DemoRun("2026-12-09", "seeds 2026-12-08", "seed 1", 13.0, 1.5, 6.0, 6.3),
            DemoRun("2026-12-09", "seeds 2026-12-08", "seed 2", 13.0, 1.0, 5.0, 5.0)]
    write_demo_runs(tmp_path / "runs.csv", runs)
    assert read_demo_runs(tmp_path / "runs.csv") == runs
    rng = ratio_range(runs)  # 0.80, 1.05, 1.00 of the best CFG; 0.33, 0.48, 0.38 of the base
    assert (rng.set, rng.runs, rng.first, rng.last) == ("seeds 2026-12-08", 3, "2026-12-08", "2026-12-09")
    assert (round(rng.base_low, 4), round(rng.base_high, 4)) == (0.3333, 0.4846)
    assert rng.phrase == "0.80-1.05x over 3 runs (median 1.00x)"
    table = demo_runs_table(runs)
    assert "| 2026-12-09 | seed 1 | 13.00 | 6.00 (s=1.5) | 6.30 | 1.05x | 0.48x |" in table
    # the spread row of the seeds: base 12-13 (median 13), CCA / base 0.33-0.48 (4/12, 6.3/13, 5/13 = 0.38)
    assert "| spread | min-max (median) | 12.00-13.00 (median 13.00) | 5.00-6.00 (median 5.00) | 4.00-6.30 (median 5.00) | " \
           "0.80-1.05 (median 1.00) | 0.33-0.48 (median 0.38) |" in table
    assert table.index("**history** (1 runs)") < table.index("**seeds 2026-12-08** (3 runs)")


DOCS_TABLE = re.compile(r"<!-- demo-runs: .*? -->\n(.*?)<!-- /demo-runs -->", re.S)


def test_the_docs_table_and_the_readme_headline_are_the_records():
    """docs/paper.md's table is demo_runs_table of docs/demo_runs.csv (bench/demo_seeds.py --record rewrites both),
    and the README's headline quotes the latest set's range."""
    runs = read_demo_runs(ROOT / "docs/demo_runs.csv")
    match = DOCS_TABLE.search((ROOT / "docs/paper.md").read_text(encoding="utf-8"))
    assert match and match.group(1).strip() == demo_runs_table(runs).strip()
    headline = next(p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if "matches the best CFG scale" in p)
    assert ratio_range(runs).phrase in " ".join(headline.split())


def test_make_demo_ends_with_the_verdict():
    """The demo recipe's last command is the verdict (after the results table), so it is the last line printed."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    commands = [c.strip() for c in re.split(r"&&|;", recipe.replace("\\\n", " ")) if c.strip()]
    assert commands[-1] == "cca-pipe verdict" and any(c.startswith("cca-pipe results") for c in commands)
