"""The ImageNet + LlamaGen path end to end, through DVC and the CLI, on a tiny generated ImageNet-layout
folder with random-weight checkpoints saved in the upstream layouts (LlamaGen's {"model": ...} with a
`freqs_cis` entry, VQ-16's layout, torch-fidelity's Inception state dict)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from worlds import save_random_inception  # noqa: F401 (other modules import it from here)

from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_VQ = dict(codebook_size=64, codebook_embed_dim=8, ch=16, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, z_channels=32,
               norm_groups=8, codebook_used_size=64)
TINY_GPT = dict(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=3, block_size=16, multiple_of=32)


def _run(args, cwd):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_imagenet_folder(root: Path) -> None:
    """3 classes x 4 images of assorted sizes and modes, as ImageNet has them (plus a PNG with alpha)."""
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(64, 120, size=2)
            arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            name = folder / f"{wnid}_{i}.JPEG"
            if c == 0 and i == 0:
                Image.fromarray(arr[..., 0], mode="L").save(name, format="JPEG")  # grayscale
            elif c == 1 and i == 0:
                Image.fromarray(arr).convert("CMYK").save(name, format="JPEG")  # CMYK JPEG
            elif c == 2 and i == 0:
                rgba = np.concatenate([arr, rng.integers(0, 255, size=(h, w, 1), dtype=np.uint8)], -1)
                Image.fromarray(rgba, mode="RGBA").save(folder / f"{wnid}_{i}.png")  # alpha channel
            else:
                Image.fromarray(arr).save(name, format="JPEG")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, random_inception: Path) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_folder(root / "imagenet" / "train")
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    torch.manual_seed(0)
    (ckpts / "vq_tiny.json").write_text(json.dumps(TINY_VQ))
    (ckpts / "gpt_tiny.json").write_text(json.dumps(TINY_GPT))
    torch.save({"model": VQModel(VQConfig(**TINY_VQ)).state_dict()}, ckpts / "vq_ds16_c2i.pt")
    gpt_sd = GPT(GPTConfig(**TINY_GPT)).state_dict()
    gpt_sd["freqs_cis"] = torch.zeros(17, 16, 2)  # upstream files carry the RoPE buffer
    torch.save({"model": gpt_sd, "steps": 100}, ckpts / "c2i_tiny_64.pt")
    shutil.copyfile(random_inception, ckpts / "inception.pth")

    params = yaml.safe_load((ROOT / "pipelines/imagenet-llamagen/params.yaml").read_text())
    params.update(data_dir=str(root / "imagenet/train"), vq_ckpt=str(ckpts / "vq_ds16_c2i.pt"),
                  vq_model=str(ckpts / "vq_tiny.json"), gpt_ckpt=str(ckpts / "c2i_tiny_64.pt"),
                  gpt_model=str(ckpts / "gpt_tiny.json"), image_size=64, eval_reference=str(root / "imagenet/train"))
    params["tokenize"].update(batch_size=4, chunk_rows=4, num_workers=0)
    params["train"].update(batch_size=4, micro_batch_size=2, save_every=2, beta=0.5, lr=1e-3)
    params["eval"].update(samples_per_class=4, methods=["base", "cfg", "cca"], cfg_scales=[1.0], batch_size=8, resize_to=32,
                          inception_weights=str(ckpts / "inception.pth"))
    return init_pipeline_repo(root / "repo", "imagenet-llamagen", params)


def init_pipeline_repo(repo: Path, pipeline: str, params: dict) -> Path:
    """A git + DVC repository laid out as ours (pipeline/, stages/, pipelines/<pipeline>/dvc.yaml, whose
    code deps point at ../../pipeline) with the given params.yaml; returns the pipeline's folder."""
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    folder = repo / "pipelines" / pipeline
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / pipeline / "dvc.yaml", folder / "dvc.yaml")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run([BIN / "dvc", "init", "-q"], repo)
    return folder


def assert_dry_run_lists_the_four_stages(repo: Path) -> None:
    # --force: on a fresh workspace DVC 3.67's plain --dry stops at the first stage whose input is an
    # earlier stage's not-yet-written output (treeverse/dvc#9818); forced, it lists the whole plan
    log = _run([BIN / "dvc", "repro", "--dry", "--force"], repo)
    for stage in ("tokenize", "reflogp", "train", "eval"):
        assert f"Running stage '{stage}'" in log


def test_dry_run_lists_the_four_stages(repo: Path):
    assert_dry_run_lists_the_four_stages(repo)


@pytest.mark.slow
def test_four_stages_run_and_the_policy_loads_in_llamagen_layout(repo: Path):
    _run([BIN / "dvc", "repro"], repo)
    from pipeline.formats import read_ref_cache
    from pipeline.tokenstore import open_token_store

    store = open_token_store(repo / "data/tokens.zarr")
    assert store.tokens.shape == (12, 10, 16)  # 12 images, ten-crop views (the release's codes), 4x4 grid
    assert store.attrs["class_names"] == ["n01440764", "n01443537", "n01484850"]
    assert list(store.labels) == [0] * 4 + [1] * 4 + [2] * 4
    cache, meta = read_ref_cache(repo / "data/ref_logp.parquet")
    assert len(cache["row"]) == 12 and np.isfinite(cache["ref_logp_pos"]).all()
    # the policy loads the way LlamaGen's own scripts load a c2i checkpoint: torch.load(...)["model"], strict
    state = torch.load(repo / "data/train/policy.pt", map_location="cpu", weights_only=True)["model"]
    GPT(GPTConfig(**TINY_GPT)).load_state_dict(state, strict=True)
    assert (repo / "data/train/checkpoints/0000002.pt").is_file()
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "cfg_1", "cca"}
    assert all(np.isfinite(m["is"]) for m in metrics["methods"].values())
    assert all(np.isfinite(m["sfid"]) for m in metrics["methods"].values())  # Inception: sFID beside FID
    samples = np.load(repo / "data/eval/samples/cca_seed0.npz")
    assert samples["arr_0"].shape == (12, 32, 32, 3) and samples["arr_0"].dtype == np.uint8  # resized 64 -> 32


def test_missing_inception_weights_is_a_clear_error(repo: Path, tmp_path: Path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    proc = subprocess.run(
        [str(BIN / "cca-pipe"), "--set", "eval.inception_weights=/nonexistent/inception.pth", "eval",
         "--vq", params["vq_ckpt"], "--vq-model", params["vq_model"], "--base", params["gpt_ckpt"],
         "--gpt-model", params["gpt_model"], "--policy", params["gpt_ckpt"], "--reference", params["data_dir"],
         "--out", str(tmp_path / "eval")],
        cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "/nonexistent/inception.pth" in proc.stderr and "eval.inception_weights" in proc.stderr
    assert not (tmp_path / "eval").exists()  # refused before writing anything
