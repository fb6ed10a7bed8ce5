"""Bad input gets one clear error naming the file/key and the fix, and leaves no half-written output."""

from __future__ import annotations

import dataclasses
import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.device import OutOfMemory
from pipeline.formats import FormatError
from pipeline.images import ImageFolderError, list_image_folder, open_rgb
from pipeline.loaders import load_gpt
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import open_token_store, write_token_store
from stages import reflogp as reflogp_stage
from stages import tokenize as tokenize_stage
from stages import train as train_stage
from stages.cli import main as cli

CPU = torch.device("cpu")
GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=64, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=64)


def _folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _vq(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    return tmp_path / "vq.pt"


def _tokenize(images: Path, vq: Path, out: Path, **overrides):
    cfg = tokenize_stage.TokenizeConfig(image_size=16, augment="none", batch_size=2, chunk_rows=2, **overrides)
    return tokenize_stage.run(cfg, images, vq, out, CPU)


# ---------------------------------------------------------------- image folders


def test_truncated_image_is_named_and_no_store_is_left(tmp_path):
    images = _folder(tmp_path / "img")
    data = (images / "b/1.png").read_bytes()
    (images / "b/1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match=r"b/1\.png.*corrupt or truncated.*bad_images: skip"):
        _tokenize(images, _vq(tmp_path), tmp_path / "t.zarr")
    assert not (tmp_path / "t.zarr").exists()


def test_skip_policy_drops_bad_images_within_the_threshold(tmp_path):
    images = _folder(tmp_path / "img", per_class=5)
    (images / "a/2.png").write_bytes(b"not a png at all")
    vq = _vq(tmp_path)
    with pytest.raises(ImageFolderError, match="max_bad_fraction"):
        _tokenize(images, vq, tmp_path / "t.zarr", bad_images="skip", max_bad_fraction=0.05)
    _tokenize(images, vq, tmp_path / "t.zarr", bad_images="skip", max_bad_fraction=0.2)
    store = open_token_store(tmp_path / "t.zarr")
    assert store.tokens.shape[0] == 9 and list(store.labels) == [0] * 4 + [1] * 5
    assert store.attrs["skipped_files"] == [str(images / "a/2.png")]


def test_non_image_file_and_empty_class_folder(tmp_path):
    images = _folder(tmp_path / "img")
    (images / "a/notes.txt").write_text("x")
    (images / "a/.DS_Store").write_text("ignored")
    with pytest.raises(ImageFolderError, match=r"non-image entries.*a/notes\.txt"):
        list_image_folder(images)
    (images / "a/notes.txt").unlink()
    (images / "c").mkdir()
    with pytest.raises(ImageFolderError, match=r"class folder .*/c holds no images"):
        list_image_folder(images)


def test_unusual_modes_become_8bit_rgb(tmp_path):
    gray16 = np.array([[0, 32896], [65535, 257]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.new("RGBA", (2, 2), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (2, 2), 77).save(tmp_path / "gray.png")
    Image.new("P", (2, 2), 3).save(tmp_path / "palette.png")
    assert np.asarray(open_rgb(tmp_path / "g16.png"))[..., 0].tolist() == [[0, 128], [255, 1]]
    assert np.asarray(open_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(open_rgb(tmp_path / "cmyk.jpg"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(open_rgb(tmp_path / "gray.png"))[1, 1].tolist() == [77, 77, 77]
    for name in ("g16.png", "rgba.png", "cmyk.jpg", "gray.png", "palette.png"):
        im = open_rgb(tmp_path / name)
        assert im.mode == "RGB" and np.asarray(im).dtype == np.uint8


# ---------------------------------------------------------------- checkpoints and vocabularies


def test_checkpoint_key_and_shape_problems_are_listed(tmp_path):
    state = GPT(GPT_CFG).state_dict()
    state.pop("norm.weight")
    state["extra.bias"] = torch.zeros(3)
    state["output.weight"] = torch.zeros(10, 32)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_gpt(tmp_path / "bad.pt", GPT_CFG)
    message = str(info.value)
    assert "bad.pt" in message and "norm.weight" in message and "extra.bias" in message
    assert "output.weight: checkpoint (10, 32) vs model (64, 32)" in message


def test_checkpoint_of_another_size(tmp_path):
    bigger = GPTConfig(**{**GPT_CFG.to_dict(), "dim": 64, "n_layer": 2})
    torch.save({"model": GPT(bigger).state_dict()}, tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"big\.pt.*unexpected keys \['layers\.1\..*wrong shapes"):
        load_gpt(tmp_path / "big.pt", GPT_CFG)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": GPT(GPT_CFG).state_dict(), "args": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*pickled\.pt"):
        load_gpt(tmp_path / "pickled.pt", GPT_CFG)


def _world(tmp_path: Path, codebook: int = 64, labels=None):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, min(codebook, 64), (8, 1, 16)).astype(np.uint16)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32) if labels is None else labels
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": codebook, "image_size": 16, "grid": 4,
             "augmentations": ["center"], "class_names": ["a", "b", "c"]}
    write_token_store(tmp_path / "t.zarr", tokens, labels, attrs)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    return tmp_path / "t.zarr", tmp_path / "gpt.pt"


def test_vocabulary_mismatch_names_both_files(tmp_path):
    tokens, gpt = _world(tmp_path, codebook=16384)
    with pytest.raises(ValueError, match=r"t\.zarr uses a codebook of 16384 codes but the model .*gpt\.pt has a vocabulary of 64"):
        reflogp_stage.run(reflogp_stage.RefLogpConfig(batch_size=4, part_rows=8), tokens, gpt, tmp_path / "c.parquet")
    assert not (tmp_path / "c.parquet").exists()


def test_labels_out_of_range_are_refused(tmp_path):
    import zarr

    tokens, _ = _world(tmp_path)
    zarr.open_group(str(tokens), mode="r+")["labels"][0] = 7
    with pytest.raises(FormatError, match=r"t\.zarr.*(labels: values outside \[0, 3\)|fingerprint)"):
        open_token_store(tokens).labels


# ---------------------------------------------------------------- integrity, numerics, resources


def _cache(tmp_path: Path, tokens: Path, gpt: Path) -> Path:
    reflogp_stage.run(reflogp_stage.RefLogpConfig(batch_size=4, part_rows=8, visits=3), tokens, gpt, tmp_path / "c.parquet")
    return tmp_path / "c.parquet"


def test_train_refuses_a_cache_made_from_other_tokens_or_weights(tmp_path):
    tokens, gpt = _world(tmp_path)
    cache = _cache(tmp_path, tokens, gpt)
    cfg = train_stage.TrainConfig(batch_size=4, micro_batch_size=2)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "other.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    with pytest.raises(FormatError, match=r"c\.parquet is stale: its ref_ckpt_sha256 .*`cca-pipe reflogp`"):
        train_stage.run(cfg, tokens, cache, tmp_path / "other.pt", tmp_path / "train")
    _world(tmp_path / "new", labels=np.array([1, 1, 2, 0, 1, 2, 0, 1], np.int32))
    with pytest.raises(FormatError, match=r"stale: its tokens_fingerprint"):
        train_stage.run(cfg, tmp_path / "new/t.zarr", cache, gpt, tmp_path / "train")
    assert not (tmp_path / "train/policy.pt").exists()


def test_non_finite_loss_stops_and_names_the_step_and_checkpoint(tmp_path, monkeypatch):
    import pipeline.alignment as alignment
    from pipeline.losses import cca_loss

    tokens, gpt = _world(tmp_path)
    cache = _cache(tmp_path, tokens, gpt)
    calls = []

    def diverging(*args, **kwargs):  # the loss of a run whose lr is too high turns NaN at step 2
        calls.append(1)
        out = cca_loss(*args, **kwargs)
        return out if len(calls) <= 2 else dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setitem(alignment.LOSSES, "cca", diverging)
    cfg = train_stage.TrainConfig(batch_size=2, micro_batch_size=2, epochs=1, uncond_ratio=0.0, save_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2.*Last good checkpoint: .*0000002\.pt"):
        train_stage.run(cfg, tokens, cache, gpt, tmp_path / "train")
    assert not (tmp_path / "train/policy.pt").exists()


def test_out_of_memory_says_which_batch_size_to_lower(tmp_path, monkeypatch):
    import pipeline.alignment as alignment

    tokens, gpt = _world(tmp_path)
    cache = _cache(tmp_path, tokens, gpt)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(alignment, "loss_for_batch", oom)
    with pytest.raises(OutOfMemory, match=r"train\.micro_batch_size = 4 rows per forward \(up to 8 sequences\).*e\.g\. to 2"):
        train_stage.run(train_stage.TrainConfig(batch_size=8, micro_batch_size=4), tokens, cache, gpt, tmp_path / "train")


def test_full_disk_is_one_clear_message_and_no_partial_file(tmp_path, monkeypatch, capsys):
    tokens, gpt = _world(tmp_path)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["reflogp"].update(batch_size=4, part_rows=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    import pyarrow.parquet

    def full(table, where, **kwargs):
        Path(where).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pyarrow.parquet, "write_table", full)
    monkeypatch.setattr(sys, "argv", ["cca-pipe", "--params", str(tmp_path / "params.yaml"), "reflogp", "--tokens", str(tokens),
                                      "--ref", str(gpt), "--out", str(tmp_path / "out/c.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Free space on it" in err and "c.parquet" in err
    assert not list((tmp_path / "out").rglob("*.tmp")) and not (tmp_path / "out/c.parquet").exists()
