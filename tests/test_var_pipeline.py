"""The ImageNet + VAR path end to end through DVC and the CLI: tokenize -> reflogp -> train -> eval on a
tiny ImageNet-layout folder, with a reduced VAR and VQVAE saved as the release saves them (plain state
dicts; the VAR one nested like VAR's own training checkpoints), and torch-fidelity's Inception layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_imagenet_pipeline import (
    BIN,
    ROOT,
    _run,
    assert_dry_run_lists_the_four_stages,
    init_pipeline_repo,
    make_imagenet_folder,
)
from test_var import TINY_VAE, TINY_VAR, _randomize

from pipeline.models.var import VAR, VARConfig
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel


@pytest.fixture(scope="module")
def repo(tmp_path_factory, random_inception: Path) -> Path:
    root = tmp_path_factory.mktemp("imagenet_var")
    make_imagenet_folder(root / "imagenet" / "train")
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig(**TINY_VAE))
    _randomize(vae.quantize, 1, std=0.5)
    torch.save(vae.state_dict(), ckpts / "vae_tiny.pth")
    (ckpts / "vae_tiny.json").write_text(json.dumps(TINY_VAE))
    var = VAR(VARConfig(**{**TINY_VAR, "num_classes": 1000}))
    torch.save({"trainer": {"var_wo_ddp": var.state_dict()}, "epoch": 3}, ckpts / "ar-ckpt-d2.pth")
    shutil.copyfile(random_inception, ckpts / "inception.pth")

    params = yaml.safe_load((ROOT / "pipelines/imagenet-var/params.yaml").read_text())
    params.update(data_dir=str(root / "imagenet/train"), vae_ckpt=str(ckpts / "vae_tiny.pth"),
                  vae_model=str(ckpts / "vae_tiny.json"), var_ckpt=str(ckpts / "ar-ckpt-d2.pth"), depth=2,
                  image_size=64, eval_reference=str(root / "imagenet/train"))
    params["tokenize"].update(augment="randcrop:2", batch_size=4, chunk_rows=4, num_workers=0)
    params["train"].update(batch_size=4, micro_batch_size=2, save_every=2, beta=0.5, lr=1e-3)
    params["eval"].update(samples_per_class=2, num_classes=3, top_k=0, top_p=0.0, batch_size=8, resize_to=32,
                          inception_weights=str(ckpts / "inception.pth"))
    return init_pipeline_repo(root / "repo", "imagenet-var", params)


def test_var_pipeline_lists_the_four_stages(repo: Path):
    assert_dry_run_lists_the_four_stages(repo)


@pytest.mark.slow
def test_var_four_stages_through_dvc(repo: Path):
    log = _run([BIN / "dvc", "repro"], repo)
    from pipeline.formats import read_ref_cache
    from pipeline.tokenstore import open_token_store

    store = open_token_store(repo / "data/tokens.zarr")
    assert store.tokens.shape == (12, 2, 30)  # 12 images, 2 random crops, scales 1+4+9+16
    assert store.attrs["family"] == "var" and store.attrs["patch_nums"] == [1, 2, 3, 4]
    assert store.attrs["augmentations"] == ["randcrop0", "randcrop1"]
    assert not np.array_equal(store.tokens[:][:, 0], store.tokens[:][:, 1])  # two different crops
    cache, meta = read_ref_cache(repo / "data/ref_logp.parquet")
    assert len(cache["row"]) == 12 and np.isfinite(cache["ref_logp_pos"]).all()
    assert (cache["ref_logp_pos"] < 0).all()
    # the policy is a plain VAR state dict under "model", loadable strictly by the upstream class layout
    state = torch.load(repo / "data/train/policy.pt", map_location="cpu", weights_only=True)
    VAR(VARConfig(**{**TINY_VAR, "num_classes": 1000})).load_state_dict(state["model"], strict=True)
    assert state["family"] == "var" and state["preset"] == "var-d16"
    assert state["train_params"]["lambda"] == 50.0  # from the preset (not overridden in params.yaml)
    assert state["train_params"]["lr_schedule"] == "lin0" and state["train_params"]["grad_clip"] == 2.0
    assert "is the recipe for VAR-d16, but this checkpoint is VAR-d2" in log  # flagged, from the preset's own data
    steps = [json.loads(line) for line in (repo / "data/train/metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and abs(steps[0]["rewards/pos"]) < 1e-3  # step 0: policy == cached reference
    metrics = json.loads((repo / "data/eval/metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "cfg_1.5", "cca"}
    assert all(np.isfinite(m["fid"]) for m in metrics["methods"].values())
    samples = np.load(repo / "data/eval/samples/cfg_1.5_seed0.npz")
    assert samples["arr_0"].shape == (6, 32, 32, 3)  # arr_1: the labels, in the file's shuffled order
    assert list(samples["arr_1"][np.argsort(samples["sample_index"])]) == [0, 0, 1, 1, 2, 2]
