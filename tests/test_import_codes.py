"""`import-codes` writes exactly the store `tokenize` writes: codes exported in LlamaGen's
extract_codes_c2i.py layout from a tokenized folder import back to the same tokens, labels, fingerprint and
attributes (but provenance), read by the same reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.checkpoint import save_checkpoint
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import open_token_store
from stages import import_codes, tokenize

CPU = torch.device("cpu")
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


def test_imported_codes_make_the_store_tokenize_makes(tmp_path: Path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    cfg = tokenize.TokenizeConfig(image_size=16, augment="flip", batch_size=3, chunk_rows=3)
    tokenize.run(cfg, tmp_path / "images", tmp_path / "vq.pt", tmp_path / "tokenized.zarr", CPU)
    made = open_token_store(tmp_path / "tokenized.zarr")

    for name in ("codes", "labels"):  # extract_codes_c2i.py: {i}.npy, (1, A, L) codes and (1,) labels, ImageFolder order
        (tmp_path / name).mkdir()
    for i in range(len(made.tokens)):
        np.save(tmp_path / "codes" / f"{i}.npy", made.tokens[i : i + 1].astype(np.int64))
        np.save(tmp_path / "labels" / f"{i}.npy", made.labels[i : i + 1].astype(np.int64))
    icfg = import_codes.ImportCodesConfig(augment="flip", image_size=16, chunk_rows=3)
    fingerprint = import_codes.run(icfg, tmp_path / "codes", tmp_path / "labels", tmp_path / "vq.pt", tmp_path / "imported.zarr",
                                   class_names=["cat", "dog", "eel"], vq_model=None)
    imported = open_token_store(tmp_path / "imported.zarr")

    assert fingerprint == made.fingerprint == imported.fingerprint
    assert np.array_equal(imported.tokens[:], made.tokens[:]) and np.array_equal(imported.labels, made.labels)
    provenance = {"source", "build_key", "settings", "fingerprint", "inputs_digest"}  # import-codes has no images to key
    assert {k: v for k, v in imported.attrs.items() if k not in provenance} == \
        {k: v for k, v in made.attrs.items() if k not in provenance}
    assert imported.attrs["family"] == "llamagen" and imported.attrs["seq_len"] == 16
    imported.check_chunks()
