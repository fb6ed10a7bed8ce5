"""`cca-pipe check` (stages/check.py): a shipped pipeline's every stage against what is known before its first
stage runs, in process on the stand-ins of tests/test_shipped_pipelines.py (10 images of 2 classes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from test_imagenet_pipeline import ROOT
from test_shipped_pipelines import make_world, shipped_params

from pipeline.config import ConfigError
from pipeline.digits import write_digits
from pipeline.parallel import check_batch_rows
from stages.check import cache_rows, check_folder
from stages.cli.main import command_line, main

PIPELINES = ["imagenet-llamagen", "imagenet-var"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("small"), per_class=5)  # 10 images


def folder_with(pipeline: str, params: dict, tmp_path: Path) -> Path:
    folder = tmp_path / pipeline
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / pipeline / "dvc.yaml", folder / "dvc.yaml")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def problems_of(folder: Path, *overrides: str) -> list[str]:
    obj = {"params": folder / "params.yaml", "overrides": list(overrides), "device": "cpu", "preset": None}
    problems, _ = check_folder(folder, obj, command_line())
    assert all("\n" not in p for p in problems)
    return problems


def test_cache_rows_counts_images_times_the_views_a_row_takes():
    # 10 images, tencrop's 10 views: `all` makes a row per (image, view), `one` a row per image
    assert cache_rows(10, 10, SimpleNamespace(views="all"))[0] == 100
    assert cache_rows(10, 10, SimpleNamespace(views="one")) == (10, "an epoch (a visit) of the reference cache will hold (10 images x 1 view)")


def test_one_rule_for_the_batch_and_the_rows_train_and_check_share():
    check_batch_rows(10, 10, "of the cache c.parquet")  # a batch of every row: one step an epoch
    with pytest.raises(ConfigError, match=r"^train.batch_size = 11 is larger than the 10 rows of the cache c.parquet: .*"
                                          r"set train.batch_size <= 10 "):
        check_batch_rows(11, 10, "of the cache c.parquet")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_shipped_batch_on_ten_images_is_one_line_naming_train_batch_size(pipeline, small, tmp_path):
    folder = folder_with(pipeline, shipped_params(pipeline, small), tmp_path)
    problems = problems_of(folder)
    assert problems == ["stage 'train': train.batch_size = 256 is larger than the 10 rows an epoch (a visit) of the reference cache will hold "
                        "(10 images x 1 view): a step cannot take more rows than an epoch holds; set train.batch_size <= 10 "
                        "(and train.micro_batch_size to a divisor of it), or set `profile: trial` in params.yaml for a trial "
                        "run on a few images (docs/imagenet.md)"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_trial_profile_passes_on_ten_images(pipeline, small, tmp_path):
    params = shipped_params(pipeline, small)
    assert problems_of(folder_with(pipeline, {**params, "profile": "trial"}, tmp_path)) == []
    # the same as `--set profile=trial` on the command line
    assert problems_of(folder_with(pipeline, params, tmp_path / "set"), "profile=trial") == []


def test_the_cli_prints_one_line_per_problem_and_exits_2(small, tmp_path, monkeypatch):
    params = shipped_params("imagenet-llamagen", small)
    params["gpt_ckpt"] = str(tmp_path / "nowhere.pt")
    params["tokenize"]["chunk_rows"] = 4097  # not a multiple of tokenize.batch_size 4
    monkeypatch.chdir(folder_with("imagenet-llamagen", params, tmp_path))
    result = CliRunner().invoke(main, ["check", "--out", "data/check.txt"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    # the missing checkpoint once (an input of reflogp, train and eval), named by its params key; the bad
    # chunk_rows once per stage that builds the settings would be noise: every stage builds every section
    assert [line for line in lines if "nowhere.pt" in line] == [
        f"cca-pipe: check: gpt_ckpt = {tmp_path / 'nowhere.pt'}: not found (an input of stage 'reflogp', from params.yaml's "
        "gpt_ckpt): fix the path there, or put the file there"]
    assert any("tokenize.chunk_rows = 4097: must be a multiple of tokenize.batch_size (4)" in line for line in lines)
    assert not Path("data/check.txt").exists()


def test_a_passing_check_writes_its_constant_record(small, tmp_path, monkeypatch):
    monkeypatch.chdir(folder_with("imagenet-var", {**shipped_params("imagenet-var", small), "profile": "trial"}, tmp_path))
    result = CliRunner().invoke(main, ["check", "--out", "data/check.txt"])
    assert result.exit_code == 0, result.output
    assert "10 images of 2 classes, x 1 views" in result.output
    first = Path("data/check.txt").read_bytes()
    assert CliRunner().invoke(main, ["check", "--out", "data/check.txt"]).exit_code == 0
    assert Path("data/check.txt").read_bytes() == first  # a pass never makes the stages after it stale


def test_checkpoint_shapes_against_the_settings(small, tmp_path):
    var = {**shipped_params("imagenet-var", small), "profile": "trial", "depth": 3}
    assert problems_of(folder_with("imagenet-var", var, tmp_path)) == [
        f"stages 'reflogp', 'train', 'eval': checkpoint {small / 'checkpoints/var_d2.pth'} is VAR-d2, but depth 3 is set: "
        "set depth: 2 or use var_d3.pth"]
    llamagen = {**shipped_params("imagenet-llamagen", small), "profile": "trial", "image_size": 128}
    # the tiny GPT's JSON config has block_size 16 (4 x 4 tokens: 64 px through VQ-16), 128 px makes 8 x 8
    assert problems_of(folder_with("imagenet-llamagen", llamagen, tmp_path / "l")) == [
        f"stages 'reflogp', 'train', 'eval': {small / 'checkpoints/c2i_tiny_64.pt'} generates 16 tokens per image, but "
        "tokenize.image_size = 128 makes 64 (8 x 8): set image_size to 64 (the checkpoint's resolution), or use the "
        "checkpoint made for this one"]


def test_micro_batches_that_processes_cannot_share(small, tmp_path):
    params = {**shipped_params("imagenet-llamagen", small), "profile": "trial", "launch": {"nproc_per_node": 3}}
    problems = problems_of(folder_with("imagenet-llamagen", params, tmp_path))
    assert problems == ["stage 'train': train.batch_size / train.micro_batch_size = 8 / 1 = 8 micro-batches per step cannot "
                        "be shared equally by 3 processes, whatever the micro_batch_size (8 is not a multiple of 3): set "
                        "train.batch_size to 9 (a multiple of 3 x 1), or run 2 processes in all"]


def test_eval_classes_the_base_model_does_not_have(small, tmp_path):
    params = {**shipped_params("imagenet-var", small), "profile": "trial"}
    # the stand-in VAR-d2 has 2 classes; --set is over the profile (which samples 2)
    assert problems_of(folder_with("imagenet-var", params, tmp_path), "eval.num_classes=3") == [
        f"stage 'eval': eval.num_classes = 3 but --base {small / 'checkpoints/var_d2.pth'} has 2 classes: set "
        "eval.num_classes to at most 2 (0: every class of the model)"]


# ------------------------------------------------------------ the embedded default's pipelines: root and paper


def _repository_copy(tmp_path: Path, with_root_pipeline: bool = True) -> Path:
    """The dvc.yaml and params.yaml files of the repository root and pipelines/paper, in a DVC repository of
    their own (.dvc/), nothing built: a fresh clone before `make demo`."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "pipelines/paper").mkdir(parents=True)
    names = ["params.yaml", "pipelines/paper/dvc.yaml", "pipelines/paper/params.yaml"]
    for name in names + ["dvc.yaml"] * with_root_pipeline:
        shutil.copy(ROOT / name, repo / name)
    return repo


def test_the_embedded_default_checks_train_against_the_digits_prepare_will_write(tmp_path):
    """Before prepare ran, check counts the images it will write from prepare's settings (1797 digits less
    round(20%) of each class = 1438 training images), x 9 shifted views a row each: 12,942 rows an epoch."""
    repo = _repository_copy(tmp_path)
    problems, facts = check_folder(repo, {"params": repo / "params.yaml", "overrides": [], "device": "cpu", "preset": None},
                                   command_line())
    assert problems == [] and "reference cache: 12942 rows (reflogp.views all)" in facts
    assert any("1438 images of 10 classes, x 9 views" in f for f in facts), facts
    (problem,) = problems_of(repo, "train.batch_size=16000")
    assert problem.startswith("stage 'train': train.batch_size = 16000 is larger than the 12942 rows") and "1438 images x 9 views" in problem
    written = write_digits(tmp_path / "digits", 8, 0.9, 0)["train"]  # what prepare writes with test_fraction 0.9
    assert written == 179  # round(90%) of each class's 174..183 digits held out
    (problem,) = problems_of(repo, "prepare.test_fraction=0.9", "train.batch_size=2048")
    assert f"train.batch_size = 2048 is larger than the {written * 9} rows" in problem, problem


def test_the_paper_pipeline_takes_the_main_pipelines_outputs_as_made(tmp_path):
    """pipelines/paper reads ../../data/ar/gpt.pt and the main cache, which `dvc repro` there builds first (the
    root dvc.yaml makes them): not missing. Without the root pipeline nothing makes them, and check says so."""
    repo = _repository_copy(tmp_path)
    assert problems_of(repo / "pipelines/paper") == []
    bare = _repository_copy(tmp_path / "bare", with_root_pipeline=False)
    problems = problems_of(bare / "pipelines/paper")
    assert any(f"{bare / 'data/ar/gpt.pt'} not found" in p for p in problems), problems


@pytest.mark.parametrize("folder", ["", "pipelines/paper", "pipelines/imagenet-llamagen", "pipelines/imagenet-var"])
def test_every_shipped_pipeline_checks_before_its_first_stage(folder):
    """`check` is a stage of every shipped dvc.yaml, and every other stage that depends on no other stage's
    output of the same dvc.yaml depends on check's record, so DVC runs check first."""
    spec = yaml.safe_load((ROOT / folder / "dvc.yaml").read_text(encoding="utf-8"))
    stages = spec["stages"]
    record = stages["check"]["outs"][0]
    stages = {n: s.get("do", s) for n, s in stages.items()}  # a foreach's stage is its `do`
    outs = [o for n, s in stages.items() if n != "check" for o in s.get("outs") or [] if isinstance(o, str)]

    def reads(dep: str, out: str) -> bool:  # the dep is the out, inside it, or a folder holding it (a foreach's
        out = out.split("${")[0]           # outs compared by their path up to the first ${...})
        return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/") or (
            dep.startswith(out) and out != "")

    first = [n for n, s in stages.items() if n != "check" and not any(
        reads(d, o) for d in s.get("deps") or [] if isinstance(d, str) for o in outs)]
    assert first and all(record in (stages[n].get("deps") or []) for n in first), first
