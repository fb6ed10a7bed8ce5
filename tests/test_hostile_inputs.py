"""Hostile input and faults against the stages, through the `cca-pipe` command line (in process).

Every case asserts: a non-zero exit (2), exactly one `cca-pipe: error:` line naming the file or the key at
fault, no traceback, and nothing created or changed at the command's output path (or its `.partial`).
The two critical defects of the past have their own tests below: tokenize into a directory holding a
user's file, and pickles that would run a command through torch-fidelity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from worlds import invoke, job_environment

from pipeline.checkpoint import save_checkpoint
from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from stages.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=2, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_world(tmp_path_factory.mktemp("hostile"))


def tiny_world(root: Path) -> Path:
    """Images (2 classes x 4), VQ, GPT, classifier, a token store, a reference cache and a params.yaml, all tiny,
    under `root` (also tests/test_integrity.py's world)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    save_checkpoint(root / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_checkpoint(root / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_classifier(root / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=2)).eval())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"].update(image_size=16, augment="flip", batch_size=4, chunk_rows=4)
    params["reflogp"].update(views="all", batch_size=4, part_rows=8)
    params["train"].update(epochs=1, batch_size=4, micro_batch_size=2, save_every=0)
    params["eval"].update(samples_per_class=2, seeds=[0], cfg_scales=[1.0], batch_size=4, grid_per_class=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["tokenize", "--images", root / "images", "--vq", root / "vq.pt", "--out", root / "tokens.zarr"],
                 ["reflogp", "--tokens", root / "tokens.zarr", "--ref", root / "gpt.pt", "--out", root / "cache.parquet"]):
        result = __import__("click.testing").testing.CliRunner().invoke(
            cli.main, ["--params", str(root / "params.yaml"), *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


def snapshot(path: Path):
    """Names and contents of everything at `path` (None if absent)."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*")) if not p.is_dir()} | {".": "dir"}
    return None


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], tuple[list, Path]]  # (world, tmp) -> (argv after --params, output path)
    expect: str  # must appear in the error line (a file name or a key)


def P(tmp: Path) -> list:
    return ["--params", tmp / "params.yaml"]


def with_params(world: Path, tmp: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> list:
    params = yaml.safe_load((world / "params.yaml").read_text())
    if edit:
        edit(params)
    (tmp / "params.yaml").write_text(text if text is not None else yaml.safe_dump(params, sort_keys=False))
    return P(tmp)


def tokenize(world: Path, tmp: Path, out: Path, vq: Path | None = None, images: Path | None = None, edit=None) -> tuple[list, Path]:
    return [*with_params(world, tmp, edit), "tokenize", "--images", images or world / "images", "--vq", vq or world / "vq.pt",
            "--out", out], out


def reflogp(world: Path, tmp: Path, ref: Path | None = None, tokens: Path | None = None, out: Path | None = None,
            extra: list | None = None, edit=None) -> tuple[list, Path]:
    out = out or tmp / "cache.parquet"
    return [*with_params(world, tmp, edit), *(extra or []), "reflogp", "--tokens", tokens or world / "tokens.zarr",
            "--ref", ref or world / "gpt.pt", "--out", out], out


def train(world: Path, tmp: Path, init: Path | None = None, cache: Path | None = None, tokens: Path | None = None,
          out: Path | None = None, edit=None, extra: list | None = None) -> tuple[list, Path]:
    out = out or tmp / "train"
    return [*with_params(world, tmp, edit), *(extra or []), "train", "--tokens", tokens or world / "tokens.zarr",
            "--cache", cache or world / "cache.parquet", "--init", init or world / "gpt.pt", "--out", out], out


def evaluate(world: Path, tmp: Path, vq: Path | None = None, base: Path | None = None, policy: Path | None = None,
             reference: Path | None = None, out: Path | None = None, edit=None, methods: str = "base,cfg,cca",
             extra: list | None = None) -> tuple[list, Path]:
    out = out or tmp / "eval"
    return [*with_params(world, tmp, edit), *(extra or []), "eval", "--vq", vq or world / "vq.pt", "--base", base or world / "gpt.pt",
            "--policy", policy or world / "gpt.pt", "--reference", reference or world / "images", "--classifier",
            world / "clf.pt", "--fidelity-cache", tmp / "fidelity", "--methods", methods, "--out", out], out


def copy_store(world: Path, tmp: Path) -> Path:
    shutil.copytree(world / "tokens.zarr", tmp / "tokens.zarr")
    return tmp / "tokens.zarr"


def edit_store_attrs(world: Path, tmp: Path, edit: Callable[[dict], None]) -> Path:
    store = copy_store(world, tmp)
    meta = json.loads((store / "zarr.json").read_text())
    edit(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))
    return store


def damaged_chunk(world: Path, tmp: Path, how: str) -> Path:
    store = copy_store(world, tmp)
    chunk = store / "tokens" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    if how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        chunk.write_bytes(b"")
    else:
        chunk.unlink()
    return store


def cache_with(world: Path, tmp: Path, edit: Callable[[dict], dict]) -> Path:
    """A copy of the cache with edited columns but intact provenance (the damage only its contents show)."""
    table = pq.read_table(world / "cache.parquet")
    columns = edit({k: table.column(k).to_numpy().copy() for k in table.column_names})
    import pyarrow as pa

    new = pa.Table.from_pydict(columns, schema=table.schema)
    pq.write_table(new, tmp / "bad.parquet")
    return tmp / "bad.parquet"


def ckpt_with_config(world: Path, tmp: Path, change: Callable[[dict], None]) -> Path:
    obj = torch.load(world / "gpt.pt", weights_only=True)
    change(obj["config"])
    torch.save(obj, tmp / "odd.pt")
    return tmp / "odd.pt"


def file_with(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def truncated(world: Path, tmp: Path, name: str) -> Path:
    data = (world / name).read_bytes()
    return file_with(tmp, f"cut-{name}", data[: len(data) // 2])


def nan_weight_ckpt(world: Path, tmp: Path) -> Path:
    obj = torch.load(world / "gpt.pt", weights_only=True)
    obj["model"]["layers.0.attention.wqkv.weight"][0, 0] = float("nan")
    torch.save(obj, tmp / "nan.pt")
    return tmp / "nan.pt"


def user_dir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    (tmp / name / "thesis.txt").write_text("four years of work")
    return tmp / name


def _resume_partial(world: Path, tmp: Path) -> tuple[list, Path, str]:
    """A train partial directory of ours, for these settings: (argv, its checkpoints directory, the run key)."""
    from pipeline.checkpoint import file_sha256
    from pipeline.formats import read_cache_provenance
    from pipeline.outputs import write_json
    from stages.cli.params import build, load_params
    from stages.train import TrainConfig, run_key

    argv, out = train(world, tmp, edit=lambda p: p["train"].update(save_every=1))
    cfg = build(TrainConfig, load_params(tmp / "params.yaml"), "train")
    key = run_key(cfg, {**read_cache_provenance(world / "cache.parquet")}, file_sha256(world / "gpt.pt"))
    partial = tmp / "train.partial"
    (partial / "checkpoints").mkdir(parents=True)
    write_json(partial / ".cca-pipe.json", {"stage": "train", "key": key, "partial": True})  # as open_partial writes it
    return argv, partial / "checkpoints", key


def resume_damaged(world: Path, tmp: Path) -> tuple[list, Path]:
    """A resume point whose resume.json was truncated by a disk fault."""
    argv, checkpoints, key = _resume_partial(world, tmp)
    (checkpoints / "resume.json").write_text(json.dumps({"key": key, "step": 1})[:20])
    return argv, tmp / "train"


def resume_planted(world: Path, tmp: Path) -> tuple[list, Path]:
    """A resume point whose torch.distributed.checkpoint metadata (a pickle DCP would unpickle) runs a command."""
    import pickle

    argv, checkpoints, key = _resume_partial(world, tmp)
    (checkpoints / "resume-0000001").mkdir()
    (checkpoints / "resume-0000001" / ".metadata").write_bytes(pickle.dumps(Payload(tmp / "PWNED")))
    (checkpoints / "resume.json").write_text(json.dumps({"key": key, "step": 1, "rng": {}, "state": "resume-0000001", "log_rows": []}))
    return argv, tmp / "train"


def big_png(tmp: Path) -> Path:
    images = tmp / "big"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        Image.new("L", (16, 16)).save(images / c / "0.png")
    Image.new("1", (12000, 12000)).save(images / "b" / "huge.png")  # 144 megapixels, a few kB on disk
    return images


def corrupt_reference(world: Path, tmp: Path) -> Path:
    ref = tmp / "ref"
    shutil.copytree(world / "images", ref)
    (ref / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ref


CASES = [
    # outputs that are not ours
    Case("tokenize --out names an existing file", lambda w, t: tokenize(w, t, file_with(t, "notes.md", b"# mine")), "notes.md"),
    Case("tokenize --out.partial is a user's directory", lambda w, t: (tokenize(w, t, t / "tok.zarr")[0], user_dir(t, "tok.zarr.partial")), "tok.zarr.partial"),
    Case("reflogp --out names an existing directory", lambda w, t: reflogp(w, t, out=user_dir(t, "cache_dir")), "cache_dir"),
    Case("reflogp --out names a foreign file", lambda w, t: reflogp(w, t, out=file_with(t, "c.parquet", b"not parquet")), "c.parquet"),
    Case("train --out holds a user's file", lambda w, t: train(w, t, out=user_dir(t, "results")), "results"),
    Case("eval --out holds a user's file", lambda w, t: evaluate(w, t, out=user_dir(t, "paper")), "paper"),
    Case("prepare --out holds a user's file", lambda w, t: ([*with_params(w, t), "prepare", "--out", user_dir(t, "photos")], t / "photos"), "photos"),
    # checkpoints of the wrong kind, damaged or unknown
    Case("VQ checkpoint as --ref", lambda w, t: reflogp(w, t, ref=w / "vq.pt"), "vq.pt is a LlamaGen VQ tokenizer"),
    Case("VQ checkpoint as --init", lambda w, t: train(w, t, init=w / "vq.pt"), "vq.pt"),
    Case("VQ checkpoint as --base", lambda w, t: evaluate(w, t, base=w / "vq.pt"), "--base expects"),
    Case("VQ checkpoint as --policy", lambda w, t: evaluate(w, t, policy=w / "vq.pt", methods="cca"), "--policy expects"),
    Case("GPT checkpoint as --vq (tokenize)", lambda w, t: tokenize(w, t, t / "tok.zarr", vq=w / "gpt.pt"), "gpt.pt is a LlamaGen GPT"),
    Case("GPT checkpoint as --vq (eval)", lambda w, t: evaluate(w, t, vq=w / "gpt.pt"), "--vq expects"),
    Case("classifier as --ref", lambda w, t: reflogp(w, t, ref=w / "clf.pt"), "clf.pt is a cca-pipe image classifier"),
    Case("config with an extra field", lambda w, t: reflogp(w, t, ref=ckpt_with_config(w, t, lambda c: c.update(colour=1))), "colour"),
    Case("config with a string for an int", lambda w, t: reflogp(w, t, ref=ckpt_with_config(w, t, lambda c: c.update(dim="32"))), "dim"),
    Case("unknown --gpt-model name", lambda w, t: (reflogp(w, t)[0][:-2] + ["--gpt-model", "GPT-Z", "--out", t / "c.parquet"], t / "c.parquet"), "GPT-Z"),
    Case("text file as checkpoint", lambda w, t: reflogp(w, t, ref=file_with(t, "weights.pt", b"these are my notes\n")), "weights.pt is not a PyTorch checkpoint"),
    Case("garbage .safetensors", lambda w, t: reflogp(w, t, ref=file_with(t, "w.safetensors", os.urandom(64))), "w.safetensors"),
    Case("truncated checkpoint", lambda w, t: reflogp(w, t, ref=truncated(w, t, "gpt.pt")), "cut-gpt.pt"),
    Case("checkpoint with a NaN weight", lambda w, t: reflogp(w, t, ref=nan_weight_ckpt(w, t)), "nan.pt is damaged"),
    Case("pickled objects in a checkpoint", lambda w, t: reflogp(w, t, ref=pickled_ckpt(w, t)), "refused to load"),
    # token stores
    Case("truncated Zarr chunk", lambda w, t: reflogp(w, t, tokens=damaged_chunk(w, t, "truncate")), "tokens/c/1/0/0"),
    Case("zero-byte Zarr chunk", lambda w, t: reflogp(w, t, tokens=damaged_chunk(w, t, "empty")), "tokens/c/1/0/0"),
    Case("deleted Zarr chunk", lambda w, t: reflogp(w, t, tokens=damaged_chunk(w, t, "delete")), "tokens/c/1/0/0 (rows 4..7) is missing"),
    Case("codebook_size is a string", lambda w, t: reflogp(w, t, tokens=edit_store_attrs(w, t, lambda a: a.update(codebook_size="32"))), "codebook_size"),
    Case("num_classes missing", lambda w, t: reflogp(w, t, tokens=edit_store_attrs(w, t, lambda a: a.pop("num_classes"))), "num_classes"),
    Case("store with an unknown dtype", lambda w, t: reflogp(w, t, tokens=unknown_dtype_store(w, t)), "tokens.zarr"),
    Case("not a token store", lambda w, t: reflogp(w, t, tokens=user_dir(t, "some_dir")), "some_dir"),
    # reference caches by content
    Case("NaN in the cache", lambda w, t: train(w, t, cache=cache_with(w, t, lambda c: _set(c, "ref_logp_pos", 3, np.nan))), "non-finite ref_logp_pos"),
    Case("inf in the cache", lambda w, t: train(w, t, cache=cache_with(w, t, lambda c: _set(c, "ref_logp_null", 0, -np.inf))), "non-finite ref_logp_null"),
    Case("row out of range", lambda w, t: train(w, t, cache=cache_with(w, t, lambda c: _set(c, "row", 2, 999))), "row outside"),
    Case("negative view", lambda w, t: train(w, t, cache=cache_with(w, t, lambda c: _set(c, "view", 1, -1))), "view outside"),
    Case("labels disagree with the store", lambda w, t: train(w, t, cache=cache_with(w, t, _flip_label)), "different from the token store"),
    Case("negative equal to positive", lambda w, t: train(w, t, cache=cache_with(w, t, _neg_equals_pos)), "negative label equal"),
    Case("a row missing", lambda w, t: train(w, t, cache=cache_with(w, t, lambda c: {k: v[1:] for k, v in c.items()})), "1 missing"),
    Case("a row duplicated", lambda w, t: train(w, t, cache=cache_with(w, t, _duplicate_row)), "more than once"),
    Case("truncated Parquet cache", lambda w, t: train(w, t, cache=truncated(w, t, "cache.parquet")), "cut-cache.parquet"),
    Case("truncated resume.json", resume_damaged, "resume.json is damaged"),
    Case("resume state with a planted pickle", resume_planted, "resume-0000001 cannot be read"),
    # params.yaml and --set
    Case("train.batch_size 0", lambda w, t: train(w, t, edit=lambda p: p["train"].update(batch_size=0)), "train.batch_size"),
    Case("invalid YAML", lambda w, t: ([*with_params(w, t, text="train: [unclosed\n"), "train"], t / "nothing"), "params.yaml line"),
    Case("a tab in params.yaml", lambda w, t: ([*with_params(w, t, text="train:\n\tlambda: 3\n"), "train"], t / "nothing"), "params.yaml line 2"),
    Case("a key written twice", lambda w, t: ([*with_params(w, t, text=(w / "params.yaml").read_text() + "train:\n  lambda: 3\n"), "train"], t / "nothing"), "'train' is written twice"),
    Case("malformed --set value", lambda w, t: train(w, t, extra=["--set", "train.lambda=[1,"]), "train.lambda=[1,"),
    Case("--set into a value", lambda w, t: train(w, t, extra=["--set", "train.beta.x=1"]), "train.beta.x=1"),
    Case("unknown key", lambda w, t: train(w, t, edit=lambda p: p["train"].update(lamda=3)), "lamda"),
    Case("string for an int", lambda w, t: train(w, t, edit=lambda p: p["train"].update(batch_size="64")), "train].batch_size"),
    Case("params file missing", lambda w, t: (["--params", t / "nope.yaml", "train"], t / "nothing"), "nope.yaml"),
    Case("eval.seeds empty", lambda w, t: evaluate(w, t, edit=lambda p: p["eval"].update(seeds=[])), "eval.seeds"),
    Case("eval.seeds repeated", lambda w, t: evaluate(w, t, edit=lambda p: p["eval"].update(seeds=[0, 0])), "eval.seeds"),
    Case("beta 0", lambda w, t: train(w, t, edit=lambda p: p["train"].update(beta=0.0)), "train.beta"),
    Case("negative beta", lambda w, t: train(w, t, edit=lambda p: p["train"].update(beta=-0.5)), "train.beta"),
    Case("negative lambda", lambda w, t: train(w, t, edit=lambda p: p["train"].update({"lambda": -1})), "train.lambda"),
    Case("epochs 0", lambda w, t: train(w, t, edit=lambda p: p["train"].update(epochs=0)), "train.epochs"),
    Case("uncond_ratio 2", lambda w, t: train(w, t, edit=lambda p: p["train"].update(uncond_ratio=2)), "train.uncond_ratio"),
    Case("negative grad_clip", lambda w, t: train(w, t, edit=lambda p: p["train"].update(grad_clip=-1.0)), "train.grad_clip"),
    Case("negative save_every", lambda w, t: train(w, t, edit=lambda p: p["train"].update(save_every=-5)), "train.save_every"),
    Case("NaN lr", lambda w, t: train(w, t, edit=lambda p: p["train"].update(lr=float("nan"))), "train.lr"),
    Case("negative lr", lambda w, t: train(w, t, edit=lambda p: p["train"].update(lr=-1e-4)), "train.lr"),
    Case("NaN CFG scale", lambda w, t: evaluate(w, t, edit=lambda p: p["eval"].update(cfg_scales=[float("nan")])), "eval.cfg_scales"),
    Case("negative temperature", lambda w, t: evaluate(w, t, edit=lambda p: p["eval"].update(temperature=-1.0)), "eval.temperature"),
    Case("empty cfg_scales with --methods cfg", lambda w, t: evaluate(w, t, methods="cfg", edit=lambda p: p["eval"].update(cfg_scales=[])), "eval.cfg_scales"),
    Case("unknown bad_images policy", lambda w, t: tokenize(w, t, t / "tok.zarr", edit=lambda p: p["tokenize"].update(bad_images="ignore")), "tokenize.bad_images"),
    Case("unknown augmentation", lambda w, t: tokenize(w, t, t / "tok.zarr", edit=lambda p: p["tokenize"].update(augment="rotate")), "tokenize.augment"),
    Case("chunk_rows not a multiple of batch_size", lambda w, t: tokenize(w, t, t / "tok.zarr", edit=lambda p: p["tokenize"].update(chunk_rows=6)), "tokenize.chunk_rows"),
    # images
    Case("144-megapixel PNG", lambda w, t: tokenize(w, t, t / "tok.zarr", images=big_png(t)), "huge.png"),
    Case("corrupt image in --reference", lambda w, t: evaluate(w, t, reference=corrupt_reference(w, t)), "1.png"),
    Case("reference .npz holding a pickle", lambda w, t: evaluate(w, t, reference=pickle_file(t, "ref.npz")), "ref.npz"),
    Case("missing image folder", lambda w, t: tokenize(w, t, t / "tok.zarr", images=t / "no_images"), "no_images"),
]


# ------------------------------------------------------------------------------------------------ issue 21, items 9 and 14
# (integrity helper's block: class folders that are broken links)


def images_with_link(world: Path, tmp: Path, target: str) -> Path:
    """A copy of the image folder with one more class folder `0bad` (sorted first): a symbolic link to `target`."""
    images = tmp / "linked"
    shutil.copytree(world / "images", images)
    (images / "0bad").symlink_to(target if target != "self" else images / "0bad")
    return images


CASES += [
    Case("class folder is a dangling link", lambda w, t: tokenize(w, t, t / "tok.zarr", images=images_with_link(w, t, "/nowhere")), "0bad"),
    Case("class folder is a link loop", lambda w, t: tokenize(w, t, t / "tok.zarr", images=images_with_link(w, t, "self")), "0bad"),
]


def _set(columns: dict, name: str, index: int, value) -> dict:
    columns[name][index] = value
    return columns


def _flip_label(columns: dict) -> dict:
    columns["label"][0] = 1 - columns["label"][0]
    columns["neg_label"][0] = 1 - columns["label"][0]
    return columns


def _neg_equals_pos(columns: dict) -> dict:
    columns["neg_label"][2] = columns["label"][2]
    return columns


def _duplicate_row(columns: dict) -> dict:
    columns["row"][1], columns["view"][1] = columns["row"][0], columns["view"][0]
    return columns


class Payload:
    """A pickle that runs a shell command when unpickled (what a malicious weights file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickle_file(tmp: Path, name: str) -> Path:
    import pickle

    (tmp / name).write_bytes(pickle.dumps(Payload(tmp / "PWNED")))
    return tmp / name


def pickled_ckpt(world: Path, tmp: Path) -> Path:
    obj = torch.load(world / "gpt.pt", weights_only=True)
    obj["args"] = Payload(tmp / "PWNED")
    torch.save(obj, tmp / "pickled.pt")
    return tmp / "pickled.pt"


def unknown_dtype_store(world: Path, tmp: Path) -> Path:
    store = copy_store(world, tmp)
    meta = json.loads((store / "tokens" / "zarr.json").read_text())
    meta["data_type"] = "uint3"
    (store / "tokens" / "zarr.json").write_text(json.dumps(meta))
    return store


def test_every_case_names_its_error_under_a_name_of_its_own():
    """A case whose `expect` is blank passes on any error line (`"" in line` holds), and a name given twice makes
    pytest suffix the ids, so a copied case hides among them: each case names what its one error line says, and
    no name repeats across the three tables."""
    cases = [*CASES, *SETTINGS_AND_MISMATCH_CASES, *CACHE_DEVICE_AND_FOLDER_CASES]
    assert [c.name for c in cases if not c.expect.strip()] == []
    names = [c.name for c in cases]
    assert sorted({n for n in names if names.count(n) > 1}) == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_clear_error_and_changes_nothing(case: Case, world: Path, tmp_path: Path, monkeypatch, capsys):
    argv, out = case.setup(world, tmp_path)
    partial = out.with_name(out.name + ".partial")
    before, before_partial = snapshot(out), snapshot(partial)
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2, f"exit {code}; stderr:\n{err[-2000:]}"
    assert len(errors) == 1, err[-2000:]
    assert case.expect in errors[0], errors[0]
    assert "Traceback" not in err
    assert snapshot(out) == before and snapshot(partial) == before_partial
    assert not (tmp_path / "PWNED").exists()
    assert not list(out.parent.glob(f".{out.name}.lock"))


# ------------------------------------------------------------------------------------------------ the two critical defects


def test_tokenize_into_a_users_directory_keeps_the_file_and_fails(world: Path, tmp_path: Path, monkeypatch, capsys):
    victim = user_dir(tmp_path, "victim")
    argv, _ = tokenize(world, tmp_path, victim)
    code, err = invoke(argv, monkeypatch, capsys)
    assert code == 2 and "victim" in err and "is not cca-pipe's own" in err
    assert (victim / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.txt"]


def test_a_failed_tokenize_keeps_the_previous_store(world: Path, tmp_path: Path, monkeypatch, capsys):
    good = tmp_path / "tokens.zarr"
    shutil.copytree(world / "tokens.zarr", good)
    before = snapshot(good)
    images = tmp_path / "broken"
    shutil.copytree(world / "images", images)
    (images / "a" / "2.png").write_bytes(b"garbage")
    argv, _ = tokenize(world, tmp_path, good, images=images)
    code, err = invoke(argv, monkeypatch, capsys)
    assert code == 2 and "2.png" in err
    assert snapshot(good) == before


def test_malicious_inception_weights_never_run(world: Path, tmp_path: Path, monkeypatch, capsys):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"Mixed_5b.weight": Payload(tmp_path / "PWNED")}, weights)
    argv, out = evaluate(world, tmp_path, edit=lambda p: p["eval"].update(feature_extractor="inception-v3-compat",
                                                                          inception_weights=str(weights)))
    code, err = invoke(argv, monkeypatch, capsys)
    assert code == 2 and "refused to load" in err and weights.name in err
    assert not (tmp_path / "PWNED").exists() and not out.exists()


def test_pickles_planted_in_the_fidelity_cache_never_run(world: Path, tmp_path: Path, monkeypatch, capsys):
    argv, out = evaluate(world, tmp_path, methods="base")
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    cache = tmp_path / "fidelity"
    (planted,) = cache.glob("ref-*.npz")  # the one file eval reads back: replace it by a pickle
    planted.write_bytes((pickle_file(tmp_path, "evil.pkl")).read_bytes())
    for name in ("ref-stats-fid.pt", "input2-inception-v3-compat-features-2048.pt"):  # torch-fidelity's own cache names
        torch.save(Payload(tmp_path / "PWNED"), cache / name)
    shutil.rmtree(out)
    code, err = invoke(argv, monkeypatch, capsys)
    assert code == 2 and planted.name in err and "delete it" in err
    assert not (tmp_path / "PWNED").exists()


def test_no_unpickling_anywhere_in_the_code():
    """Every torch.load passes weights_only=True; no pickle.load(s), no np.load(allow_pickle=True)."""
    import ast

    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"torch.load without weights_only=True at {where}"
            assert (owner, node.func.attr) not in (("pickle", "load"), ("pickle", "loads")), where
            if (owner, node.func.attr) == ("np", "load"):
                flag = kwargs.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), where


# ------------------------------------------------------------------------------------------------ issue 21, items 1, 2 and 14
# (integrity helper's block: files of a user's inside our sub-folders, content-keyed tokenize, unreadable images)


def test_a_users_file_in_train_checkpoints_survives_a_second_train(world: Path, tmp_path: Path, monkeypatch, capsys):
    argv, out = train(world, tmp_path, edit=lambda p: p["train"].update(save_every=1))
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    ours = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert ours, "the first run saved no checkpoint"
    (out / "checkpoints" / "notes.txt").write_text("notes")
    argv, _ = train(world, tmp_path, edit=lambda p: p["train"].update({"save_every": 0, "lambda": 30.0}))
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert (out / "checkpoints" / "notes.txt").read_text() == "notes"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["notes.txt"]  # our stale checkpoints went


def test_a_users_files_in_eval_samples_and_grids_survive_a_second_eval(world: Path, tmp_path: Path, monkeypatch, capsys):
    argv, out = evaluate(world, tmp_path, methods="base,cfg")
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    first = {d: sorted(p.name for p in (out / d).iterdir()) for d in ("samples", "grids")}
    assert all(first.values()), first
    for d in ("samples", "grids"):
        (out / d / "notes.txt").write_text(d)
    argv, _ = evaluate(world, tmp_path, methods="base")
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    for d in ("samples", "grids"):
        now = sorted(p.name for p in (out / d).iterdir())
        assert (out / d / "notes.txt").read_text() == d
        assert not any("cfg" in name for name in now), now  # ours from the first run, not written by this one
        assert set(now) < set(first[d]) | {"notes.txt"}, now


def test_tokenize_keys_the_store_by_image_contents(world: Path, tmp_path: Path, monkeypatch, capsys, caplog):
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    argv, out = tokenize(world, tmp_path, tmp_path / "tok.zarr", images=images)
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    old = json.loads((out / "zarr.json").read_text())["attributes"]["fingerprint"]

    import pipeline.images

    def no_reads(path):
        raise AssertionError(f"{path} was read: an unchanged tree is checked with stat() only")

    with monkeypatch.context() as m:  # unchanged: up to date, from stat() alone
        m.setattr(pipeline.images, "read_image_file", no_reads, raising=False)
        m.setattr("pipeline.tokenstore.read_image_file", no_reads, raising=False)
        assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert json.loads((out / "zarr.json").read_text())["attributes"]["fingerprint"] == old
    rng = np.random.default_rng(7)  # same name, same size, new bytes
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / "a" / "1.png")
    with caplog.at_level(logging.INFO):
        assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert "the images of 1 finished chunks changed" in caplog.text  # of 2 chunks: the other one is kept
    fresh_argv, fresh = tokenize(world, tmp_path, tmp_path / "fresh.zarr", images=images)
    assert invoke(fresh_argv, monkeypatch, capsys)[0] == 0
    now = json.loads((out / "zarr.json").read_text())["attributes"]
    assert now["fingerprint"] != old
    assert now["fingerprint"] == json.loads((fresh / "zarr.json").read_text())["attributes"]["fingerprint"]
    os.utime(images / "b" / "0.png", ns=(1, 1))  # a new mtime, the same bytes: hashed again, still up to date
    inode = (out / "zarr.json").stat().st_ino
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert (out / "zarr.json").stat().st_ino == inode  # not rebuilt
    assert json.loads((out / "zarr.json").read_text())["attributes"]["fingerprint"] == now["fingerprint"]


def test_an_unreadable_image_is_called_unreadable_not_corrupt(world: Path, tmp_path: Path, monkeypatch, capsys):
    import builtins

    real_open = builtins.open

    def denied(path, *args, **kwargs):  # tests run as root, where chmod 000 does not stop a read
        if str(path).endswith("a/2.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    argv, out = tokenize(world, tmp_path, tmp_path / "tok.zarr")
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "2.png" in errors[0] and "unreadable" in errors[0] and "corrupt" not in errors[0].replace("not corrupt", "")
    assert not out.exists() and not out.with_name("tok.zarr.partial").exists()


# ------------------------------------------------------------------------------------------------ issue 21, items 10-14
# (checked by test_hostile_input_is_one_clear_error_and_changes_nothing, case by case)

# a 9-level "billion laughs": 9**9 values from ~500 bytes
ALIAS_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n"
                     for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True))


def big_vocab_policy(tmp: Path) -> Path:
    """A GPT drawing codes from a vocabulary of 64, twice the VQ's codebook."""
    from dataclasses import replace

    cfg = replace(GPT_CFG, vocab_size=64)
    save_checkpoint(tmp / "big_vocab.pt", GPT(cfg).state_dict(), cfg.to_dict(), kind="llamagen-gpt")
    return tmp / "big_vocab.pt"


def other_params(world: Path, tmp: Path, edit: Callable[[dict], None]) -> Path:
    params = yaml.safe_load((world / "params.yaml").read_text())
    edit(params)
    (tmp / "other.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp / "other.yaml"


def safetensors_gpt(world: Path, tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file(torch.load(world / "gpt.pt", weights_only=True)["model"], tmp / "gpt.safetensors")
    return tmp / "gpt.safetensors"


def eval_dir_with(tmp: Path, metrics: bytes) -> Path:
    (tmp / "done_eval").mkdir()
    (tmp / "done_eval" / "metrics.json").write_bytes(metrics)
    return tmp / "done_eval"


def report(world: Path, tmp: Path, eval_dir: Path) -> tuple[list, Path]:
    return [*with_params(world, tmp), "report", "--eval", eval_dir, "--train", tmp / "no_train", "--sweep", tmp / "no_sweep",
            "--out", tmp / "report"], tmp / "report"


# settings that once hung or crashed a stage, and files that disagree with each other or the settings
SETTINGS_AND_MISMATCH_CASES = [
    Case("policy vocabulary larger than the VQ codebook", lambda w, t: evaluate(w, t, policy=big_vocab_policy(t), methods="cca"),
         "vocabulary of 64"),
    Case("eval.num_classes larger than the model's", lambda w, t: evaluate(w, t, edit=lambda p: p["eval"].update(num_classes=5)),
         "eval.num_classes = 5"),
    Case("a parent of --out is a file", lambda w, t: train(w, t, out=file_with(t, "afile", b"mine") / "train"), "afile is a file"),
    Case("--set train=5", lambda w, t: train(w, t, extra=["--set", "train=5"]), "train=5"),
    Case("a list as a YAML key", lambda w, t: ([*with_params(w, t, text="? [a, b]: 1\n" + (w / "params.yaml").read_text()),
                                               "config", "train"], t / "nothing"), "params.yaml line 1"),
    Case("batch_size 10**12", lambda w, t: train(w, t, edit=lambda p: p["train"].update(batch_size=10**12)),
         "train.batch_size = 1000000000000"),
    Case("lambda_conditioning max .inf", lambda w, t: train(w, t, edit=lambda p: p["train"].update(
        lambda_conditioning={"min": 1.0, "max": float("inf")})), "train.lambda_conditioning"),
    Case("alias bomb", lambda w, t: ([*with_params(w, t, text=ALIAS_BOMB + (w / "params.yaml").read_text()), "config", "train"],
                                     t / "nothing"), "expand to more than"),
    Case("recursive alias", lambda w, t: ([*with_params(w, t, text="loop: &loop [*loop]\n" + (w / "params.yaml").read_text()),
                                           "config", "train"], t / "nothing"), "recursive"),
    Case("--set into an unknown section", lambda w, t: train(w, t, extra=["--set", "trian.lambda=30"]), "no section 'trian'"),
    Case("a config error in --params other.yaml", lambda w, t: ([
        "--params", other_params(w, t, lambda p: p["train"].update(batch_size=0)), "config", "train"], t / "nothing"),
        "other.yaml: train.batch_size"),
    Case("an unknown key in --params other.yaml", lambda w, t: ([
        "--params", other_params(w, t, lambda p: p["train"].update(lamda=3)), "config", "train"], t / "nothing"),
        "other.yaml [train]: unknown keys"),
    Case("corrupt metrics.json (results)", lambda w, t: (["results", file_with(t, "metrics.json", b'{"methods": {')],
                                                       t / "nothing"), "metrics.json cannot be read"),
    Case("corrupt metrics.json (report)", lambda w, t: report(w, t, eval_dir_with(t, b"\x00\x00garbage")), "metrics.json cannot be read"),
    Case(".safetensors without a config", lambda w, t: reflogp(w, t, ref=safetensors_gpt(w, t)), "--gpt-model"),
]


@pytest.mark.parametrize("case", SETTINGS_AND_MISMATCH_CASES, ids=[c.name for c in SETTINGS_AND_MISMATCH_CASES])
def test_bad_settings_or_mismatched_files_are_one_clear_error_within_a_minute(case: Case, world: Path, tmp_path: Path, monkeypatch, capsys):
    import signal

    def too_slow(*_):
        raise TimeoutError("no answer within 60 s")  # an alias bomb hung config for minutes

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        test_hostile_input_is_one_clear_error_and_changes_nothing(case, world, tmp_path, monkeypatch, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_error_quoting_an_expanded_alias_stays_short(world: Path, tmp_path: Path, monkeypatch, capsys):
    """A 4-level bomb (9**4 values: within the expansion bound) as train.lr: the error quoting the value is one
    short line (50 kB before; 1.7 MB at 700 MB of memory from a 278-byte file)."""
    bomb = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9 if p else ['lol'] * 9)}]\n" for p, k in zip(["", *"abc"], "abcd", strict=True))
    params = yaml.safe_load((world / "params.yaml").read_text())
    params["train"]["lr"] = "BOMB"
    text = bomb + yaml.safe_dump(params, sort_keys=False).replace("lr: BOMB", "lr: *d")
    code, err = invoke([*with_params(world, tmp_path, text=text), "config", "train"], monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2 and len(errors) == 1 and "train].lr" in errors[0] and "Traceback" not in err
    assert len(err) < 2200, len(err)


@pytest.mark.parametrize("length", [246, 250])
def test_an_out_name_too_long_for_its_companions_is_refused(length: int, world: Path, tmp_path: Path, monkeypatch, capsys):
    """`<name>.partial`, `.<name>.lock` must fit the file system's 255 bytes (stat of `<name>.partial` itself
    fails at 250, so the generic check cannot snapshot it)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    argv, _ = train(world, tmp_path, out=tmp_path / ("x" * length))
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "choose a name of at most" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "params.yaml"])


def test_yaml_merge_keys_and_the_floats_people_write(tmp_path: Path):
    from stages.cli.params import build, load_params, parse_overrides
    from stages.eval import EvalConfig
    from stages.train import TrainConfig

    (tmp_path / "params.yaml").write_text("common: &common\n  beta: 0.7\n  lr: 1e-3\ntrain:\n  <<: *common\n  lambda: 30\n")
    params = load_params(tmp_path / "params.yaml", ["train.weight_decay=5E-2"])
    cfg = build(TrainConfig, params, "train")
    assert (cfg.beta, cfg.lr, cfg.lam, cfg.weight_decay) == (0.7, 1e-3, 30.0, 0.05)
    # what `eval --cfg-scale 0.00001` hands on (the float's str is '1e-05'), and `--set train.lr=1e-5`
    scales = build(EvalConfig, {}, "eval", overrides=parse_overrides([f"eval.cfg_scales={[0.00001]}"]))
    assert scales.cfg_scales == [1e-05]
    assert build(TrainConfig, {}, "train", overrides=parse_overrides(["train.lr=1e-5"])).lr == 1e-5
    assert parse_overrides(["eval.feature_extractor=classifier", "launch.rdzv_endpoint=1e5"]) == {
        "eval": {"feature_extractor": "classifier"}, "launch": {"rdzv_endpoint": 1e5}}
    # a setting that is a mapping is still a value: it may be switched off
    written = {"train": {"lambda_conditioning": {"min": 1, "max": 8103}}}
    assert parse_overrides(["train.lambda_conditioning=null"], written) == {"train": {"lambda_conditioning": None}}


def test_fidelity_cache_help_states_the_real_default():
    from click.testing import CliRunner

    from pipeline.evaluation import default_fidelity_cache

    text = "".join(CliRunner().invoke(cli.main, ["eval", "--help"]).output.split())  # as wrapped: no spaces
    assert "<out>/fidelity_cache" not in text
    assert "$XDG_CACHE_HOME/cca-pipe/fidelity" in text and "~/.cache/cca-pipe/fidelity" in text
    assert default_fidelity_cache().parts[-2:] == ("cca-pipe", "fidelity")


def test_a_read_only_train_directory_is_refused_before_training(world: Path, tmp_path: Path, monkeypatch, capsys):
    argv, out = train(world, tmp_path)
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the one directory read-only as an unprivileged user sees it
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out and mode & os.W_OK
                            else real_access(p, mode, **kw))
    try:
        test_hostile_input_is_one_clear_error_and_changes_nothing(Case("", lambda w, t: (argv, out), "not writable"),
                                                                  world, tmp_path, monkeypatch, capsys)
    finally:
        out.chmod(0o755)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_during_train_names_the_disk_and_the_file(world: Path, tmp_path: Path, monkeypatch, capsys):
    """The first checkpoint's temporary file is /dev/full (every write: ENOSPC), as on a disk that fills up."""
    argv, checkpoints, _ = _resume_partial(world, tmp_path)
    (checkpoints / f".0000001.pt.{os.getpid()}.tmp").symlink_to("/dev/full")
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if "cca-pipe: error:" in line]  # mid-run: after the progress bar
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"cannot write {checkpoints / '0000001.pt'}: the disk holding {checkpoints} is full" in errors[0]
    assert not (tmp_path / "train").exists() and not list(checkpoints.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ issue 29, items 5-10 and smaller
# (hostile-inputs helper's block: work lost or a loop, one line where a traceback was)


def test_every_text_file_is_read_and_written_as_utf8():
    """open / read_text / write_text in text mode name their encoding: under a strict C locale the default is
    ASCII, and eval lost its whole run writing "±" (issue 29, item 5)."""
    import ast

    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in ("os", "Image", "zarr", "gzip", "fcntl"):
                continue  # not a text open
            kwargs = {k.arg for k in node.keywords}
            mode = node.args[1] if name == "open" and len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "open" and not binary and not isinstance(node.func, ast.Attribute):
                assert "encoding" in kwargs, f"open() in text mode without encoding= at {where}"
            if name in ("read_text", "write_text") and isinstance(node.func, ast.Attribute) and not (
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "outputs"):  # Path's, not our helper
                assert "encoding" in kwargs, f"{name}() without encoding= at {where}"


def _strict_c_locale_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_") and k not in ("LANG", "LANGUAGE")}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def test_a_strict_c_locale_loses_no_work(world: Path, tmp_path: Path, monkeypatch, capsys):
    """Under LC_ALL=C (ASCII file names and text files): eval writes its "±" table, and a tokenize of a folder
    with non-ASCII names built under UTF-8 is up to date, not encoded again (issue 29, item 5). One process
    runs both commands."""
    import subprocess
    import sys

    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    (images / "a").rename(images / "café")
    (images / "café" / "0.png").rename(images / "café" / "ünï.png")
    tok_argv, store = tokenize(world, tmp_path, tmp_path / "tok.zarr", images=images)
    assert invoke(tok_argv, monkeypatch, capsys)[0] == 0  # this process: a UTF-8 locale
    inode = (store / "zarr.json").stat().st_ino
    eval_argv, out = evaluate(world, tmp_path, methods="base")
    script = ("import sys\nfrom stages.cli import main as cli\ncodes = []\n"
              f"for argv in {[[str(a) for a in tok_argv], [str(a) for a in eval_argv]]!r}:\n"
              "    sys.argv = ['cca-pipe', *argv]\n"
              "    try:\n        cli.run()\n        codes.append(0)\n"
              "    except SystemExit as e:\n        codes.append(e.code)\n"
              "print('exit codes', codes, sys.getfilesystemencoding())\n")
    done = subprocess.run([sys.executable, "-c", script], env=_strict_c_locale_env(), capture_output=True, timeout=300,
                          cwd=tmp_path)
    stdout, stderr = done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
    assert "exit codes [0, 0] ascii" in stdout, stderr[-3000:]
    assert "is up to date" in stderr and "encoding" not in stderr.split("is up to date")[0][-300:], stderr[-3000:]
    assert (store / "zarr.json").stat().st_ino == inode  # not rebuilt
    assert "Mean ± std" in (out / "results.md").read_text(encoding="utf-8")
    assert not out.with_name("eval.partial").exists()


@pytest.mark.parametrize("array", ["tokens", "labels"])
def test_tokenize_repairs_a_store_with_a_deleted_chunk(array: str, world: Path, tmp_path: Path, monkeypatch, capsys, caplog):
    """train and reflogp send a store with a missing chunk back to tokenize, which said "up to date": a loop
    (issue 29, item 6). Now it encodes the missing chunk again (only that one) and the store is whole."""
    from pipeline.tokenstore import verify_token_store

    store = copy_store(world, tmp_path)
    fingerprint = json.loads((store / "zarr.json").read_text())["attributes"]["fingerprint"]
    chunk = store / "tokens" / "c" / "1" / "0" / "0" if array == "tokens" else store / "labels" / "c" / "1"
    chunk.unlink()  # rows 4..7
    assert verify_token_store(store)  # damaged
    argv, _ = tokenize(world, tmp_path, store)
    with caplog.at_level(logging.INFO):
        code, err = invoke(argv, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert "up to date" not in caplog.text and "missing or damaged" in caplog.text
    if array == "tokens":  # the one chunk is encoded again, the other kept
        assert "resuming" in caplog.text and "1 of 2 chunks already done" in caplog.text
    assert verify_token_store(store) == []
    assert json.loads((store / "zarr.json").read_text())["attributes"]["fingerprint"] == fingerprint
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert "is up to date" in caplog.text


def test_listing_a_class_of_100k_files_is_linear(tmp_path: Path):
    """A class folder of 100,000 files was listed in quadratic time (a list membership test per file: 10k files
    38 s, 100k never finished); issue 29, item 7. A hang guard, not a timing target (bench/ has none needed)."""
    import signal

    from pipeline.images import list_image_folder

    for c, count in (("a", 100_000), ("b", 3)):
        (tmp_path / c).mkdir()
        for i in range(count):
            (tmp_path / c / f"{i:06d}.png").touch()
    (tmp_path / "b" / "notes.txt").touch()

    def too_slow(*_):
        raise TimeoutError("listing 100,000 files took more than 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match=r"1 non-image entries .*notes\.txt"):
            list_image_folder(tmp_path)
        (tmp_path / "b" / "notes.txt").unlink()
        paths, labels, classes = list_image_folder(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert classes == ["a", "b"] and len(paths) == 100_003
    assert paths[0].name == "000000.png" and paths[99_999].name == "099999.png" and labels.tolist().count(1) == 3


@contextlib.contextmanager
def small_disk(folder: Path, free_bytes: int):
    """A 1 MiB tmpfs at `folder` with about `free_bytes` left (a filler file takes the rest); skips where it
    cannot be mounted (not root, no tmpfs)."""
    import subprocess

    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs mount (root)")
    try:
        with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        size = (folder / "filler").stat().st_size
        os.truncate(folder / "filler", max(0, size - free_bytes))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_train_on_a_full_disk_is_one_line(world: Path, tmp_path: Path, monkeypatch, capsys):
    """A real full disk (tmpfs) under train's checkpoint: one line naming the disk, as reflogp and tokenize
    say it (was: OSError 28 and torch's inline_container.cc traceback); issue 29, item 8."""
    with small_disk(tmp_path / "disk", 16 * 1024) as disk:
        argv, out = train(world, tmp_path, out=disk / "train", edit=lambda p: p["train"].update(save_every=1))
        code, err = invoke(argv, monkeypatch, capsys)
        errors = [line for line in err.splitlines() if "cca-pipe: error:" in line]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert f"the disk holding {disk / 'train.partial'}" in errors[0] and "is full" in errors[0], errors[0]
        assert not out.exists()


def few_class_policy(tmp: Path) -> Path:
    """A GPT of 1 class (the base has 2)."""
    from dataclasses import replace

    cfg = replace(GPT_CFG, num_classes=1)
    save_checkpoint(tmp / "few.pt", GPT(cfg).state_dict(), cfg.to_dict(), kind="llamagen-gpt")
    return tmp / "few.pt"


def damaged_fidelity_cache(world: Path, tmp: Path, how: str) -> Path:
    """A copy of the features cache an eval of the world wrote (made once), damaged `how`."""
    from click.testing import CliRunner

    if not (world / "fidelity").is_dir():
        (world / "eval_run").mkdir()
        argv, _ = evaluate(world, world / "eval_run", methods="base")
        argv[argv.index("--fidelity-cache") + 1] = world / "fidelity"
        result = CliRunner().invoke(cli.main, list(map(str, argv)), catch_exceptions=False)
        assert result.exit_code == 0, result.output
    shutil.copytree(world / "fidelity", tmp / "fidelity")
    (cache,) = (tmp / "fidelity").glob("ref-*.npz")
    if how == "truncate":
        cache.write_bytes(cache.read_bytes()[:200])
    else:
        with np.load(cache) as f:
            arrays = {k: f[k].copy() for k in f.files}
        for k, v in arrays.items():
            if how == "shape":
                arrays[k] = v[:, :-1]
            else:
                v[1, 0] = np.nan
        with open(cache, "wb") as f:
            np.savez(f, **arrays)
    return cache


def top_level_image(world: Path, tmp: Path) -> Path:
    images = tmp / "loose"
    shutil.copytree(world / "images", images)
    shutil.copy(images / "a" / "0.png", images / "stray.png")
    (images / "README.txt").write_text("a data set's readme is not an image: allowed")
    return images


def png_header_only(tmp: Path, width: int, height: int) -> Path:
    """A class folder set whose `b/wide.png` declares width x height in its header (a few bytes on disk)."""
    import struct
    import zlib

    images = tmp / "wide"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        Image.new("L", (16, 16)).save(images / c / "0.png")
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))  # 1-bit grayscale
    (images / "b" / "wide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                                             + chunk(b"IEND", b""))
    return images


NESTED = "deep: " + "[" * 20_000 + "]" * 20_000 + "\n"

# damaged fidelity caches, devices this machine lacks, image folders and params files of the wrong shape
CACHE_DEVICE_AND_FOLDER_CASES = [
    Case("policy of fewer classes than the base", lambda w, t: evaluate(w, t, policy=few_class_policy(t), methods="base,cca"),
         "has 1 classes but --base"),
    Case("truncated fidelity cache", lambda w, t: evaluate(w, t, methods="base") if damaged_fidelity_cache(w, t, "truncate") else None,
         "/fidelity/ref-"),
    Case("fidelity cache of the wrong shape", lambda w, t: evaluate(w, t, methods="base") if damaged_fidelity_cache(w, t, "shape")
         else None, "has shape"),
    Case("NaN in the fidelity cache", lambda w, t: evaluate(w, t, methods="base") if damaged_fidelity_cache(w, t, "nan") else None,
         "non-finite values"),
    Case("a YAML list nested 20,000 deep", lambda w, t: ([*with_params(w, t, text=NESTED + (w / "params.yaml").read_text()),
                                                        "config", "train"], t / "nothing"), "nested too deeply"),
    Case("--device tpu", lambda w, t: train(w, t, extra=["--device", "tpu"]), "--device tpu"),
    Case("--device cuda:99", lambda w, t: train(w, t, extra=["--device", "cuda:99"]), "--device cuda:99"),
    Case("image folder is a file", lambda w, t: tokenize(w, t, t / "tok.zarr", images=file_with(t, "imgs.tar", b"x")),
         "imgs.tar is a file, not a folder"),
    Case("400-megapixel image", lambda w, t: tokenize(w, t, t / "tok.zarr", images=png_header_only(t, 20_000, 20_000)),
         "wide.png is 20000x20000 = 400 megapixels"),
    Case("an image at the top level of the folder", lambda w, t: tokenize(w, t, t / "tok.zarr", images=top_level_image(w, t)),
         "stray.png"),
    Case("unknown top-level section trian:", lambda w, t: (
        [*with_params(w, t, text=(w / "params.yaml").read_text() + "trian:\n  lambda: 3\n"), "config", "train"], t / "nothing"),
        "unknown section 'trian' (did you mean 'train'?)"),
    Case("empty params file", lambda w, t: ([*with_params(w, t, text="# nothing yet\n"), "config", "train"], t / "nothing"),
         "is empty"),
    Case("reflogp model vocabulary larger than the store's codebook", lambda w, t: reflogp(w, t, ref=big_vocab_policy(t)),
         "has a vocabulary of 64"),
]


@pytest.mark.parametrize("case", CACHE_DEVICE_AND_FOLDER_CASES, ids=[c.name for c in CACHE_DEVICE_AND_FOLDER_CASES])
def test_damaged_caches_devices_or_folders_are_one_clear_error_within_a_minute(case: Case, world: Path, tmp_path: Path, monkeypatch, capsys):
    test_bad_settings_or_mismatched_files_are_one_clear_error_within_a_minute(case, world, tmp_path, monkeypatch, capsys)


def test_device_cuda_without_a_gpu_is_one_line(world: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    test_hostile_input_is_one_clear_error_and_changes_nothing(
        Case("", lambda w, t: train(w, t, extra=["--device", "cuda"]), "--device cuda: this machine has no CUDA GPU"),
        world, tmp_path, monkeypatch, capsys)


def test_a_refused_pickle_is_one_line_without_a_protocol_warning(world: Path, tmp_path: Path, monkeypatch, capsys):
    """torch warned "Detected pickle protocol 4" before our error line (issue 29, smaller)."""
    import warnings

    obj = torch.load(world / "gpt.pt", weights_only=True)
    obj["args"] = Payload(tmp_path / "PWNED")
    torch.save(obj, tmp_path / "p4.pt", pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test_hostile_input_is_one_clear_error_and_changes_nothing(
            Case("", lambda w, t: reflogp(w, t, ref=t / "p4.pt"), "refused to load"), world, tmp_path, monkeypatch, capsys)
    assert not [str(w.message) for w in caught if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("where", ["a parent", "the name"])
def test_an_out_name_over_255_bytes_is_one_line(where: str, world: Path, tmp_path: Path, monkeypatch, capsys):
    """A name of more than 255 bytes anywhere in --out: Errno 36 from Path.exists was a traceback (issue 29, item 8)."""
    out = tmp_path / ("é" * 150) / "train" if where == "a parent" else tmp_path / ("x" * 300)
    argv, _ = train(world, tmp_path, out=out)
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"is {300} bytes" in errors[0] and "choose a shorter output path" in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def eval_with_default_cache(world: Path, tmp: Path) -> tuple[list, Path]:
    argv, out = evaluate(world, tmp, methods="base")
    i = argv.index("--fidelity-cache")
    return argv[:i] + argv[i + 2 :], out


def test_an_empty_home_is_refused_not_a_cache_at_the_root(world: Path, tmp_path: Path, monkeypatch, capsys):
    """HOME="" put the features cache at /.cache (issue 29, item 10)."""
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    root_cache = Path("/.cache/cca-pipe")
    existed = root_cache.exists()
    test_hostile_input_is_one_clear_error_and_changes_nothing(
        Case("", lambda w, t: eval_with_default_cache(w, t), "pass --fidelity-cache DIR or set XDG_CACHE_HOME"),
        world, tmp_path, monkeypatch, capsys)
    assert root_cache.exists() == existed


def test_a_read_only_home_names_the_cache_fix_and_leaves_no_partial(world: Path, tmp_path: Path, monkeypatch, capsys):
    """A read-only HOME said "choose ... (--out)" and left an empty eval.partial (issue 29, item 10)."""
    import subprocess

    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(home)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a read-only tmpfs mount (root)")
    try:
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        test_hostile_input_is_one_clear_error_and_changes_nothing(
            Case("", lambda w, t: eval_with_default_cache(w, t), "--fidelity-cache DIR, or set XDG_CACHE_HOME"),
            world, tmp_path, monkeypatch, capsys)
        assert not (tmp_path / "eval.partial").exists() and not (tmp_path / "eval").exists()
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


# ------------------------------------------------------------------------------------------------ issue 29, item 9: torchrun


def torchrun_cca(argv: list, nproc: int, timeout: float = 240, env: dict | None = None, direct: bool = False):
    """`cca-pipe --params P --nproc-per-node nproc STAGE ...` (`direct`: the same job as torchrun's own command,
    without the launcher's own checks) in a process group of its own (killed whole on a timeout), one thread per
    rank, a 60 s process-group timeout: (exit status, stdout + stderr). `cca-pipe` and the ranks' are the session's
    (from PATH: forked, tests/zygote.py)."""
    import shutil
    import subprocess

    from stages.cli.launch import LaunchConfig, torchrun_command

    cca_pipe = shutil.which("cca-pipe")
    cmd = torchrun_command(LaunchConfig(nproc_per_node=nproc), list(map(str, argv)), argv0=cca_pipe) if direct else \
        [cca_pipe, *map(str, argv[:2]), "--nproc-per-node", str(nproc), *map(str, argv[2:])]
    env = job_environment(**(env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"no end within {timeout} s: {err[-3000:]}")
    return proc.returncode, out + err


@pytest.mark.parametrize("via", ["cca-pipe", "torchrun"])
def test_micro_batches_three_processes_cannot_share_is_one_line_with_a_working_fix(via: str, world: Path, tmp_path: Path):
    """2 micro-batches (16 rows of 8) for 3 processes: the error was printed by each rank, then torch's failure
    summary, and suggested micro_batch_size 5, which batch_size 16 refuses (issue 29, item 9). Now one line:
    from the launcher before any rank starts (cca-pipe), or from rank 0 (the ranks' own check, under the
    torchrun command cca-pipe runs)."""
    import re

    from pipeline.distributed import World
    from pipeline.parallel import deal_micro_batches

    argv, out = train(world, tmp_path, edit=lambda p: p["train"].update(batch_size=16, micro_batch_size=8))
    code, text = torchrun_cca(argv, 3, direct=via == "torchrun")
    errors = [line for line in text.splitlines() if "cca-pipe: error:" in line]
    assert code == 2 and len(errors) == 1, text[-3000:]
    noise = [line for line in text.splitlines() if re.search(r"Traceback|ChildFailedError|Root Cause|error|exitcode", line, re.I)
             and "cca-pipe: error:" not in line]
    assert not noise, text[-3000:]
    fix = re.search(r"train\.batch_size to (\d+)", errors[0])
    assert fix, errors[0]
    deal_micro_batches(int(fix.group(1)), 8, World(rank=0, size=3))  # the suggestion works
    assert not out.exists() and not out.with_name("train.partial").exists()


def test_micro_batch_advice_is_settings_that_work():
    """Hand-derived: 12 rows of 4 (3 micro-batches) for 2 processes: micro 3 (4 micro-batches, 2 each); 16 of 8 for
    4: micro 4; 16 of 8 for 3: no micro_batch_size divides 16 into a multiple of 3 micro-batches: batch 24, or 2
    processes (which share 2 micro-batches)."""
    from pipeline.config import JobError
    from pipeline.parallel import check_micro_batches

    check_micro_batches(16, 8, 2)
    with pytest.raises(JobError, match=r"set train.micro_batch_size to 3 \(4 micro-batches, 2 per process\)"):
        check_micro_batches(12, 4, 2)
    with pytest.raises(JobError, match=r"set train.micro_batch_size to 4 \(4 micro-batches, 1 per process\)"):
        check_micro_batches(16, 8, 4)
    with pytest.raises(JobError, match=r"set train.batch_size to 24 \(a multiple of 3 x 8\), or run 2 processes in all"):
        check_micro_batches(16, 8, 3)
    with pytest.raises(JobError, match=r"set train.batch_size to 10 \(a multiple of 2 x 5\), or run 1 process in all"):
        check_micro_batches(5, 5, 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_during_fsdp_checkpoints_ends_the_job_quietly(world: Path, tmp_path: Path):
    """SIGTERM to the launcher while 2 FSDP ranks save a resume point every step: the job stops (128 + 15),
    resumable, with no SignalException traceback from torchrun (issue 29, item 9)."""
    import signal
    import subprocess

    argv, out = train(world, tmp_path, edit=lambda p: p["train"].update(save_every=1, epochs=50, strategy="fsdp",
                                                                         repeat_visits=True))  # a long run on the one-visit cache
    resume = tmp_path / "train.partial" / "checkpoints" / "resume.json"
    cmd = [str(Path(sys.executable).parent / "cca-pipe"), *map(str, argv[:2]), "--nproc-per-node", "2", *map(str, argv[2:])]
    env = job_environment(PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not resume.is_file():
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be stopped"
        time.sleep(0.5)  # a few more resume points: the signal lands in the middle of saving one, or close to it
        os.kill(proc.pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text and "ChildFailedError" not in text, text[-3000:]
    assert not out.exists() and resume.is_file()


def _rank_pids(pid: int) -> dict[int, int]:
    """rank -> pid of the processes below `pid` that torchrun started (their RANK), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    ranks, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            with contextlib.suppress(OSError):
                env = dict(e.split("=", 1) for e in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in e)
                if "RANK" in env and "LOCAL_RANK" in env:
                    ranks[int(env["RANK"])] = child
    return ranks


def _signal_rank_1(world: Path, tmp_path: Path, signum: int, dist_timeout_s: int, wait_s: int) -> tuple[int, str, Path]:
    """A long 2-process train (the one-visit cache read again: it is the signal under test, not the draws); once
    it is in the training loop, `signum` to rank 1 -> (the launcher's exit code, its output, the run's --out)."""
    import signal
    import subprocess

    argv, out = train(world, tmp_path, edit=lambda p: p["train"].update(epochs=2000, repeat_visits=True))
    cmd = [str(Path(sys.executable).parent / "cca-pipe"), *map(str, argv[:2]), "--nproc-per-node", "2", *map(str, argv[2:])]
    env = job_environment(dist_timeout_s, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    ranks: dict[int, int] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (tmp_path / "train.partial").is_dir():
            time.sleep(0.05)
        time.sleep(2)  # in the training loop
        ranks = _rank_pids(proc.pid)
        assert proc.poll() is None and set(ranks) == {0, 1}, "the job ended before a rank could be signalled"
        os.kill(ranks[1], signum)
        text, _ = proc.communicate(timeout=wait_s)
    finally:
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, text, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_rank_ends_the_job_in_one_line_after_the_timeout(world: Path, tmp_path: Path):
    """SIGSTOP of rank 1 mid-training: rank 0 waits CCA_PIPE_DIST_TIMEOUT_S (5 s here) in a collective, then the
    job ends with one line from rank 0, not gloo's "Timed out" traceback (issue 29, item 9); nothing is left
    running."""
    import signal

    returncode, text, out = _signal_rank_1(world, tmp_path, signal.SIGSTOP, dist_timeout_s=5, wait_s=150)
    errors = [line for line in text.splitlines() if "cca-pipe: error:" in line]
    assert returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "rank 0 of the job waited 5 s (CCA_PIPE_DIST_TIMEOUT_S)" in errors[0], errors[0]
    assert not out.exists()


@pytest.mark.parametrize("wrapped", [True, False])
def test_closing_a_stopped_rank_ends_it_without_waiting_for_sigkill(wrapped: bool, monkeypatch):
    """torchrun's close of a rank (SIGTERM to its process group, then SIGKILL after 30 s): a SIGSTOPped rank holds
    the SIGTERM pending until the SIGKILL, unless the close also sends SIGCONT (stages/cli/launch.py)."""
    import signal
    import subprocess

    from torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler import SubprocessHandler

    from stages.cli.launch import wake_stopped_ranks_when_closing

    monkeypatch.setattr(SubprocessHandler, "close", SubprocessHandler.close)  # restored after the test
    if wrapped:
        wake_stopped_ranks_when_closing()
        wake_stopped_ranks_when_closing()  # twice: wrapped once
    rank = SubprocessHandler(sys.executable, ("-c", "import time; time.sleep(120)"), {}, None, None, 0, None)
    try:
        os.kill(rank.proc.pid, signal.SIGSTOP)
        os.waitpid(rank.proc.pid, os.WUNTRACED)  # stopped now (sent at once, the lower-numbered SIGTERM would go first)
        rank.close(signal.SIGTERM)
        if wrapped:
            assert rank.proc.wait(timeout=60) == -signal.SIGTERM
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                rank.proc.wait(timeout=2)  # stopped: the SIGTERM waits
    finally:
        rank.proc.kill()
        rank.proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_by_a_signal_is_named_in_one_line(world: Path, tmp_path: Path):
    """SIGKILL of rank 1 mid-training (the out-of-memory killer): one line naming the rank and the signal, no
    torchrun summary, no traceback (issue 29, item 9)."""
    import signal

    returncode, text, out = _signal_rank_1(world, tmp_path, signal.SIGKILL, dist_timeout_s=60, wait_s=120)
    errors = [line for line in text.splitlines() if "cca-pipe: error:" in line]
    assert returncode == 128 + signal.SIGKILL and "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    assert len(errors) == 1 and "rank 1 of the job was killed by SIGKILL" in errors[0], text[-3000:]
    assert not out.exists()
