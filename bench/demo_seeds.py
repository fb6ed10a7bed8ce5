"""The headline claim as a distribution: the embedded default's `dvc repro` once per full pipeline seed, each in a
folder of its own, and the three FIDs the headline compares (base, best CFG scale, CCA at train.lambda) of each.

    python bench/demo_seeds.py --seeds 0 1 2 3 4 --record      # ~12 min per seed on the 2 idle cores

Seed k sets every seed of a trained part to k: the VQ tokenizer, the evaluator's classifier, the GPT, the reference
cache's draws (views, negatives) and the fine-tuning (SEED_KEYS); seed 0 is the shipped params.yaml. The data split
(prepare.seed) and the sampling seeds (eval.seeds) stay, so every run is scored against the same 359 test digits with
the same sampling seeds. A run on another CPU or thread count differs from ours in every trained part (its floats
round differently), which is what reseeding every one of them stands for.

Each folder (<workdir>/seed<k>: this checkout's pipeline/, stages/, dvc.yaml and params.yaml, a git and DVC repo of
its own) is kept: rerunning the command resumes (`dvc repro` skips what is done). The command prints each run's
verdict line and the set's table. With --record it appends the set to docs/demo_runs.csv as "seeds <date>" and
rewrites what is generated from that file: the table in docs/paper.md ("What make demo prints") and the range the
README's headline quotes; `cca-pipe verdict` then compares with the new set (tests/test_verdict.py checks the three
agree). --set SECTION.KEY=VALUE changes a setting of every run (tests: the tiny pipeline).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.report import DemoRun, demo_runs_table, ratio_range, read_demo_runs, write_demo_runs  # noqa: E402
from stages import report  # noqa: E402

SEED_KEYS = ("pretrain_vq.seed", "pretrain_classifier.seed", "pretrain_ar.seed", "reflogp.seed", "train.seed")
COPIED = ("pipeline", "stages", "dvc.yaml", ".gitignore")
DOCS_TABLE = re.compile(r"(<!-- demo-runs: .*? -->\n)(.*?)(<!-- /demo-runs -->)", re.S)


def _run(args: list[str], cwd: Path) -> str:
    path, venv_bin = os.environ.get("PATH", ""), str(Path(sys.executable).parent)  # this venv's dvc and cca-pipe
    env = {**os.environ, "PATH": path if venv_bin in path.split(os.pathsep) else f"{venv_bin}{os.pathsep}{path}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {cwd} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def seeded_params(params: dict, seed: int, overrides: dict[str, object]) -> dict:
    """params.yaml with every key of SEED_KEYS at `seed`, then `overrides` ({"section.key": value})."""
    params = yaml.safe_load(yaml.safe_dump(params))
    for key, value in {**dict.fromkeys(SEED_KEYS, seed), **overrides}.items():
        section, name = key.split(".", 1)
        if section not in params:
            raise SystemExit(f"--set {key}: params.yaml has no section {section!r}")
        params[section][name] = value
    return params


def run_folder(folder: Path, params: dict) -> Path:
    """A git + DVC repository holding this checkout's pipeline with `params` (made once: a rerun resumes in it)."""
    if (folder / ".dvc").is_dir():
        if yaml.safe_load((folder / "params.yaml").read_text()) != params:
            raise SystemExit(f"{folder} holds a run of other settings: remove it or choose another --workdir")
        return folder
    folder.mkdir(parents=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "seeds@bench"], ["git", "config", "user.name", "seeds"],
                 ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "seeded run"]):
        _run(args, folder)
    return folder


def headline(folder: Path, params: dict, date: str, set_name: str, description: str) -> DemoRun:
    """The run's base, best CFG and main CCA FIDs, as `cca-pipe verdict` reads them."""
    data = folder / "data"
    sweep = report.SweepConfig(**params["sweep"])
    base, cfg, cca = report.headline_points(report.collect(data / "eval", data / "train", data / "sweep", sweep),
                                            data / "eval", data / "train")
    best = min(cfg, key=lambda p: p.metrics["fid"])
    fids = (round(p.metrics["fid"], 3) for p in (base, best, cca))  # as the results tables print them
    return DemoRun(date, set_name, description, next(fids), best.cfg_scale, next(fids), next(fids))


def record(runs_path: Path, new: list[DemoRun], paper_md: Path, readme: Path) -> None:
    """Append `new` to the record and rewrite what is generated from it: docs/paper.md's table, the README's range."""
    runs = read_demo_runs(runs_path)
    before = ratio_range(runs).phrase
    runs = [r for r in runs if r.set != new[0].set] + new  # a rerun of the same set replaces it
    text = readme.read_text(encoding="utf-8")
    quoted = re.compile(r"\s+".join(map(re.escape, before.split())))  # the phrase may be wrapped over lines
    if not quoted.search(text):
        raise SystemExit(f"{readme} does not quote {before!r} (the range of {runs_path}): fix its headline by hand first")
    paper = paper_md.read_text(encoding="utf-8")
    if not DOCS_TABLE.search(paper):
        raise SystemExit(f"{paper_md} has no <!-- demo-runs: ... --> ... <!-- /demo-runs --> block to rewrite")
    write_demo_runs(runs_path, runs)
    paper_md.write_text(DOCS_TABLE.sub(lambda m: m.group(1) + demo_runs_table(runs) + m.group(3), paper), encoding="utf-8")
    readme.write_text(quoted.sub(ratio_range(runs).phrase, text), encoding="utf-8")


def main(argv: list[str] | None = None) -> list[DemoRun]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one full pipeline run per seed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cca-demo-seeds"), help="the runs' folders (kept: reruns resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of every run (YAML value)")
    parser.add_argument("--record", action="store_true", help="append the set to --runs and rewrite --paper-md's table and --readme's range")
    parser.add_argument("--runs", type=Path, default=ROOT / "docs/demo_runs.csv")
    parser.add_argument("--paper-md", type=Path, default=ROOT / "docs/paper.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: write SECTION.KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    date = datetime.date.today().isoformat()
    set_name = f"seeds {date}"
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "?"
    rows = []
    for seed in args.seeds:
        params = seeded_params(shipped, seed, overrides)
        folder = run_folder(args.workdir / f"seed{seed}", params)
        start = time.time()
        _run(["dvc", "repro"], folder)
        wall = time.time() - start
        description = f"seed {seed} ({commit}, OMP_NUM_THREADS {threads}, {platform.machine()})"
        rows.append(headline(folder, params, date, set_name, description))
        verdict = _run(["cca-pipe", "verdict", "--runs", str(args.runs)], folder).strip().splitlines()[-1]
        print(f"seed {seed} (dvc repro {wall / 60:.1f} min): {verdict}", flush=True)
    print(demo_runs_table(rows))
    print(f"CCA / best CFG over these runs: {ratio_range(rows).phrase}")
    if args.record:
        record(args.runs, rows, args.paper_md, args.readme)
        print(f"recorded in {args.runs}; rewrote the table in {args.paper_md} and the range in {args.readme}")
    return rows


if __name__ == "__main__":
    main()
