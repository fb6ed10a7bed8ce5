"""Pieces of the tiny worlds several test modules build (pytest puts tests/ on sys.path, as for conftest)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_reference_images(folder: Path, rng: np.random.Generator, classes: int = 3, per_class: int = 4,
                           size: int = 16) -> Path:
    """An image folder as eval reads a reference: `folder/<class>/<i>.png`, random RGB drawn from `rng`
    class by class (so a caller's later draws from `rng` stay what they were)."""
    for c in range(classes):
        (folder / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / str(c) / f"{i}.png")
    return folder


def job_environment(dist_timeout_s: int = 60, **more: str) -> dict[str, str]:
    """The environment of a `cca-pipe` job a test starts, from the session's as it is now (its PATH: conftest.py's
    session fixture puts the zygote's client first): one thread per rank, and a rank waiting for a peer that stopped
    answering gives up after `dist_timeout_s` (CCA_PIPE_DIST_TIMEOUT_S), so a failing rank never hangs the suite."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CCA_PIPE_DIST_TIMEOUT_S": str(dist_timeout_s), **more}


def invoke(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    """Run `cca-pipe argv` in this process, as its console script does (errors become one line and an exit
    status): (exit status, stderr)."""
    from stages.cli import main as cli

    monkeypatch.setattr(sys, "argv", ["cca-pipe", *map(str, argv)])
    code = 0
    try:
        cli.run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def save_random_inception(path: Path) -> None:
    """torch-fidelity's InceptionV3 state dict with random weights (the real file cannot be downloaded here). The
    same bytes at every call (seeded): a session builds it once, the `random_inception` fixture (conftest.py)."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real_load, real_load_sd = torch.load, torch.nn.Module.load_state_dict
    torch.load, torch.nn.Module.load_state_dict = (lambda *a, **k: {}), (lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    finally:
        torch.load, torch.nn.Module.load_state_dict = real_load, real_load_sd
    # PyTorch's default init shrinks activations layer by layer (features ~1e-8, the same for every image: FID 0,
    # IS 1 whatever the samples); batch-norm statistics of one batch of noise keep every layer at unit scale
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become this one batch's
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    torch.save(model.eval().state_dict(), path)


# ------------------------------------------------------------------ a tiny LlamaGen GPT and its reference cache

TINY_GPT_CFG = dict(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)


def tiny_llamagen_cache_world():
    """A reference GPT (TINY_GPT_CFG), its cache over 12 rows of 16 tokens (3 classes, 'other' negatives), and a
    policy copy: (policy, tokens, cache)."""
    import copy

    import torch

    from pipeline.models.llamagen import GPT, GPTConfig
    from pipeline.refcache import draw_pairs, reference_logps

    torch.manual_seed(0)
    ref = GPT(GPTConfig(**TINY_GPT_CFG)).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, size=(12, 2, 16), dtype=np.uint16)
    labels = rng.integers(0, 3, size=12).astype(np.int32)
    pairs = draw_pairs(labels, 2, 3, seed=1, views="one")
    cache = {**pairs, **reference_logps(ref, tokens, pairs, batch_size=12, device=torch.device("cpu"))}
    return copy.deepcopy(ref), tokens, cache


def train_stage_world(folder: Path, visits: int = 2, ddo: bool = False) -> dict:
    """What the train stage reads, written by the stages' own code: a token store of 16 images of 16 tokens (3
    classes, 4 chunks of 4), a reference GPT and its cache of `visits` visits: {"dir", "tokens", "cache", "gpt"}.
    `ddo`: also what train.loss ddo reads: a negatives store of one made-up fake per image, recorded as `cca-pipe
    negatives` records it, and the DDO cache of it ("negatives", "ddo_cache")."""
    import torch

    from pipeline.checkpoint import file_sha256, save_checkpoint
    from pipeline.models.llamagen import GPT, GPTConfig
    from pipeline.tokenstore import open_token_store, write_token_store
    from stages import reflogp as reflogp_stage
    from stages.reflogp import RefLogpConfig

    gpt_cfg = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=3, block_size=16, multiple_of=16)
    rng = np.random.default_rng(0)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 64, "image_size": 16, "grid": 4,
             "augmentations": ["center"], "class_names": ["a", "b", "c"]}
    write_token_store(folder / "t.zarr", rng.integers(0, 64, (16, 1, 16)).astype(np.uint16),
                      (np.arange(16) % 3).astype(np.int32), attrs, chunk_rows=4)
    torch.manual_seed(0)
    save_checkpoint(folder / "gpt.pt", GPT(gpt_cfg).state_dict(), gpt_cfg.to_dict(), kind="llamagen-gpt")
    reflogp_stage.run(RefLogpConfig(batch_size=8, part_rows=16, visits=visits), folder / "t.zarr", folder / "gpt.pt",
                      folder / "c.parquet")
    world = {"dir": folder, "tokens": folder / "t.zarr", "cache": folder / "c.parquet", "gpt": folder / "gpt.pt"}
    if not ddo:
        return world
    real = open_token_store(folder / "t.zarr")
    provenance = {"ref_ckpt_sha256": file_sha256(folder / "gpt.pt"), "real_tokens_fingerprint": real.fingerprint,
                  "real_rows": 16, "seed": 0, "ratio": 1}
    write_token_store(folder / "fakes.zarr", rng.integers(0, 64, (16, 1, 16)).astype(np.uint16), real.labels,
                      {**attrs, "augmentations": ["sample"], "negatives": provenance}, chunk_rows=4)
    reflogp_stage.run(RefLogpConfig(batch_size=8, part_rows=16, visits=visits), folder / "t.zarr", folder / "gpt.pt",
                      folder / "ddo.parquet", negatives_path=folder / "fakes.zarr")
    return {**world, "negatives": folder / "fakes.zarr", "ddo_cache": folder / "ddo.parquet"}


# a reference cache's provenance for hand-made caches of 2 classes, 4 tokens
REF_PROVENANCE = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 0, "num_classes": 2, "null_class": 2,
                  "seq_len": 4, "logp_code": {"pipeline/refcache.py": "0" * 64}}


def ref_columns(pairs: dict) -> dict:
    """`pairs` with made-up reference log-probs (seeded), as a cache's columns."""
    n = len(pairs["row"])
    rng = np.random.default_rng(2)
    return {**pairs, "ref_logp_pos": rng.normal(-20, 1, n), "ref_logp_neg": rng.normal(-21, 1, n), "ref_logp_null": rng.normal(-20, 1, n)}
