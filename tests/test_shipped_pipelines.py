"""The shipped ImageNet pipelines run as shipped: `dvc repro` of pipelines/imagenet-llamagen and
pipelines/imagenet-var with ONLY what their params.yaml says to edit changed (data_dir, checkpoints, model
names as JSON configs of tiny stand-ins, depth, image_size, eval_reference, inception_weights); every
setting (preset, batch sizes, samples per class, methods, guidance scales, ...) is the shipped one.

The shipped train batch is 256 rows (the presets' global batch), so the stand-in data set has 256 images
(2 classes x 128, 24 px, upscaled by tokenize to 64 px: tiny VQ, 16 or 30 tokens), which makes exactly one
training step; eval draws the shipped 50 samples per class of the stand-in model's 2 classes.

On a folder of 10 images the shipped settings stop at the pipelines' first stage, `check`, naming
train.batch_size, and `profile: trial` runs each pipeline to the end: tests/test_hub_pipelines.py checks this on
its `dvc repro` of the same 10 images by Hub ids (tests/test_check.py checks the same in process, problem by
problem).

pipelines/paper is not run here: it starts from the embedded default's outputs (`make demo`);
tests/test_dvc_smoke.py runs it as shipped on a tiny `dvc repro` of the main pipeline.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_imagenet_pipeline import BIN, ROOT, TINY_VQ, _run, init_pipeline_repo
from test_var import TINY_VAE, TINY_VAR, _randomize
from worlds import write_reference_images

from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR, VARConfig
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
from pipeline.tokenizers.vq import VQConfig, VQModel
from stages.cli.main import main

CLASSES, IMAGES_PER_CLASS = 2, 128  # 256 rows: one step of the presets' batch of 256
TINY_GPT = dict(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=CLASSES, block_size=16, multiple_of=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_inception: Path) -> Path:
    return make_world(tmp_path_factory.mktemp("shipped"), IMAGES_PER_CLASS, random_inception)


def make_world(root: Path, per_class: int, inception: Path | None = None) -> Path:
    """Stand-ins for the downloads: class folders (CLASSES x per_class images), a reference folder, checkpoints
    in the release layouts, with a copy of the `inception` weights (the random_inception fixture's; without it, an
    empty file stands for them)."""
    rng = np.random.default_rng(0)
    write_reference_images(root / "imagenet" / "train", rng, classes=CLASSES, per_class=per_class, size=24)
    write_reference_images(root / "reference", rng, classes=CLASSES, per_class=4, size=24)
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    torch.manual_seed(0)
    (ckpts / "vq_tiny.json").write_text(json.dumps(TINY_VQ))
    (ckpts / "gpt_tiny.json").write_text(json.dumps(TINY_GPT))
    torch.save({"model": VQModel(VQConfig(**TINY_VQ)).state_dict()}, ckpts / "vq_ds16_c2i.pt")
    torch.save({"model": GPT(GPTConfig(**TINY_GPT)).state_dict()}, ckpts / "c2i_tiny_64.pt")
    vae = MSVQModel(MSVQConfig(**TINY_VAE))
    _randomize(vae.quantize, 1, std=0.5)
    torch.save(vae.state_dict(), ckpts / "vae_tiny.pth")
    (ckpts / "vae_tiny.json").write_text(json.dumps(TINY_VAE))
    torch.save(VAR(VARConfig(**{**TINY_VAR, "num_classes": CLASSES})).state_dict(), ckpts / "var_d2.pth")
    if inception:
        shutil.copyfile(inception, ckpts / "inception.pth")
    else:
        (ckpts / "inception.pth").write_bytes(b"")
    return root


def shipped_params(pipeline: str, world: Path) -> dict:
    """The pipeline's params.yaml with only the paths and model names its comments say to edit changed."""
    params = yaml.safe_load((ROOT / "pipelines" / pipeline / "params.yaml").read_text())
    ckpts = world / "checkpoints"
    common = dict(data_dir=str(world / "imagenet/train"), image_size=64, eval_reference=str(world / "reference"))
    if pipeline == "imagenet-llamagen":
        params.update(common, vq_ckpt=str(ckpts / "vq_ds16_c2i.pt"), vq_model=str(ckpts / "vq_tiny.json"),
                      gpt_ckpt=str(ckpts / "c2i_tiny_64.pt"), gpt_model=str(ckpts / "gpt_tiny.json"))
    else:
        params.update(common, vae_ckpt=str(ckpts / "vae_tiny.pth"), vae_model=str(ckpts / "vae_tiny.json"),
                      var_ckpt=str(ckpts / "var_d2.pth"), depth=TINY_VAR["depth"])
    params["eval"]["inception_weights"] = str(ckpts / "inception.pth")
    return params


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["imagenet-llamagen", "imagenet-var"])
def test_shipped_pipeline_runs_as_shipped(pipeline: str, world: Path, tmp_path: Path):
    params = shipped_params(pipeline, world)
    folder = init_pipeline_repo(tmp_path / "repo", pipeline, params)
    _run([BIN / "dvc", "repro"], folder)
    metrics = json.loads((folder / "data/eval/metrics.json").read_text())
    guided = [f"cfg_{s:g}" for s in params["eval"]["cfg_scales"]] if "cfg" in params["eval"]["methods"] else []
    assert set(metrics["methods"]) == {"base", "cca", *guided}
    assert metrics["samples_per_method"] == params["eval"]["samples_per_class"] * CLASSES
    assert all(np.isfinite(m["fid"]) and m["fid"] > 1e-3 for m in metrics["methods"].values())  # a measurement, not 0
    # `cca-pipe config` in the folder shows the settings each stage ran with
    for stage in ("train", "eval"):
        assert config_of(stage, folder)[stage] == yaml.safe_load((folder / f"data/{stage}/settings.yaml").read_text())[stage]
    store = json.loads((folder / "data/tokens.zarr/zarr.json").read_text())["attributes"]
    assert config_of("tokenize", folder)["tokenize"]["image_size"] == store["image_size"] == params["image_size"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, random_inception: Path) -> Path:
    return make_world(tmp_path_factory.mktemp("small"), 5, random_inception)  # 10 images


def config_of(stage: str, folder: Path) -> dict:
    """`cca-pipe config STAGE` in `folder`, in this process (the same command, without a process importing torch
    for each of the module's 9 calls)."""
    with contextlib.chdir(folder):
        result = CliRunner().invoke(main, ["config", stage])
    assert result.exit_code == 0, result.output[-2000:]
    return yaml.safe_load(result.stdout)


def test_config_in_a_pipeline_folder_applies_the_dvc_stage_options(tmp_path: Path):
    """dvc.yaml passes `--set tokenize.image_size=${image_size}` (and eval's): `cca-pipe config` there shows
    the image_size the stages run with, not the section's own 384."""
    params = yaml.safe_load((ROOT / "pipelines/imagenet-llamagen/params.yaml").read_text())
    params["image_size"] = 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "pipelines/imagenet-llamagen/dvc.yaml").read_text())
    assert params["tokenize"]["image_size"] == params["eval"]["image_size"] == 384
    assert config_of("tokenize", tmp_path)["tokenize"]["image_size"] == 256
    assert config_of("eval", tmp_path)["eval"]["image_size"] == 256
    assert config_of("train", tmp_path)["train"]["micro_batch_size"] == params["train"]["micro_batch_size"]


def test_tokenize_refuses_an_eval_section_that_cannot_work(world: Path, tmp_path: Path):
    """The LlamaGen pipeline's eval section as 7c58bf8 shipped it (cfg evaluated, no scales): refused by
    tokenize, the first stage, before any work, not by eval after tokenize, reflogp and train."""
    params = shipped_params("imagenet-llamagen", world)
    del params["eval"]["methods"]  # the default, base,cfg,cca
    params["eval"]["cfg_scales"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [str(BIN / "cca-pipe"), "tokenize", "--images", params["data_dir"], "--vq", params["vq_ckpt"],
         "--vq-model", params["vq_model"], "--out", str(tmp_path / "tokens.zarr")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval.methods includes cfg but eval.cfg_scales is empty" in proc.stderr
    assert not (tmp_path / "tokens.zarr").exists() and not (tmp_path / "tokens.zarr.partial").exists()


@pytest.mark.slow
def test_the_imagenet_ddo_projects_run_both_rounds_on_the_stand_ins(small_world: Path, tmp_path: Path):
    """pipelines/imagenet-{llamagen,var}/ddo as shipped (presets llamagen-L-ddo, var-d16-ddo) over their parent's
    tokens and checkpoints: the parent's params.yaml with only its documented paths changed, `profile: trial` in
    both files (their comments: a few images), `dvc repro` in the DDO folder. Both rounds run (round 2's reference
    is round 1's selected policy), the parent's CCA train and eval do not, and each round's policy is scored."""
    from pipeline.checkpoint import file_sha256
    from pipeline.tokenstore import open_token_store

    for pipeline in ("imagenet-llamagen", "imagenet-var"):
        params = {**shipped_params(pipeline, small_world), "profile": "trial"}
        folder = init_pipeline_repo(tmp_path / pipeline, pipeline, params)
        ddo = folder / "ddo"
        ddo.mkdir()
        shutil.copy(ROOT / "pipelines" / pipeline / "ddo" / "dvc.yaml", ddo / "dvc.yaml")
        shipped = yaml.safe_load((ROOT / "pipelines" / pipeline / "ddo" / "params.yaml").read_text())
        (ddo / "params.yaml").write_text(yaml.safe_dump({**shipped, "profile": "trial"}, sort_keys=False))
        log = _run([BIN / "dvc", "repro"], ddo)
        for stage in (f"{s}-{r}" for r in (1, 2) for s in ("negatives", "reflogp", "train", "select", "eval")):
            assert f"Running stage '{stage}'" in log, (pipeline, stage, log[-3000:])
        assert "dvc.yaml:tokenize'" in log and "dvc.yaml:train'" not in log and "dvc.yaml:eval'" not in log
        first = file_sha256(folder / "data/checkpoints" / ("gpt_ckpt" if pipeline == "imagenet-llamagen" else "var_ckpt"))
        for r, reference in ((1, first), (2, file_sha256(ddo / "data/round1/select/policy.pt"))):
            fakes = open_token_store(ddo / f"data/round{r}/negatives.zarr")
            assert fakes.attrs["negatives"]["ref_ckpt_sha256"] == reference, (pipeline, r)
            settings = yaml.safe_load((ddo / f"data/round{r}/train/settings.yaml").read_text())["train"]
            assert (settings["loss"], settings["alpha"], settings["beta"]) == ("ddo", 50.0, 0.02)  # the preset's
            assert json.loads((ddo / f"data/round{r}/train/metrics.json").read_text())["steps"] == 2  # the trial's
            metrics = json.loads((ddo / f"data/round{r}/eval/metrics.json").read_text())
            assert set(metrics["methods"]) == {"cca"} and np.isfinite(metrics["methods"]["cca"]["fid"])
        assert file_sha256(ddo / "data/round1/select/policy.pt") == file_sha256(ddo / "data/round1/train/policy.pt")
