"""Stage `import-codes`: codes extracted by LlamaGen's `extract_codes_c2i.py` -> our Zarr token store.

    cca-pipe import-codes --codes /data/codes/imagenet256_codes --labels /data/codes/imagenet256_labels \
        --vq vq_ds16_c2i.pt --augment flip --image-size 256 --out data/tokens.zarr

LlamaGen writes one pair of files per image, `{i}.npy` of shape (1, A, L) (codes) and `{i}.npy` of shape
(1,) (label), i = 0..N-1 in ImageFolder order; A = 2 (center crop + flip) or 10 (--ten-crop). Nothing is
re-encoded; the VQ checkpoint is read only for its sha256 and codebook size (provenance).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pipeline.checkpoint import file_sha256
from pipeline.images import view_names
from pipeline.progress import progress
from pipeline.tokenizers.vq import load_vq, vq_config_from_spec
from pipeline.tokenstore import TokenStoreWriter, claim_token_store

log = logging.getLogger(__name__)


def _numbered_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (expected LlamaGen's <i>.npy files)")
    files = {int(p.stem): p for p in folder.glob("*.npy") if p.stem.isdigit()}
    if not files:
        raise ValueError(f"{folder} holds no <i>.npy files")
    missing = sorted(set(range(len(files))) - set(files))
    if missing or max(files) != len(files) - 1:
        raise ValueError(f"{folder}: files must be numbered 0..N-1 without gaps; missing e.g. {missing[:5]}")
    return [files[i] for i in range(len(files))]


def run(codes_dir: Path, labels_dir: Path, vq_path: Path, augment: str, image_size: int, out: Path,
        class_names: list[str] | None = None, vq_model: str | None = "VQ-16", chunk_rows: int = 4096,
        num_classes: int = 1000) -> str:
    with claim_token_store(out, "cca-pipe import-codes") as claim:
        return _import(codes_dir, labels_dir, vq_path, augment, image_size, claim, class_names, vq_model, chunk_rows, num_classes)


def _import(codes_dir, labels_dir, vq_path, augment, image_size, claim, class_names, vq_model, chunk_rows, num_classes) -> str:
    code_files, label_files = _numbered_files(codes_dir), _numbered_files(labels_dir)
    if len(code_files) != len(label_files):
        raise ValueError(f"{codes_dir} has {len(code_files)} files but {labels_dir} has {len(label_files)}")
    labels = np.array([int(np.load(f).reshape(-1)[0]) for f in progress(label_files, desc="labels")], dtype=np.int32)
    first = np.load(code_files[0])
    names = view_names(augment)
    if first.ndim != 3 or first.shape[0] != 1 or first.shape[1] != len(names):
        raise ValueError(f"{code_files[0]} has shape {first.shape}; expected (1, {len(names)}, L) for augment={augment!r}")
    vq_cfg = load_vq(vq_path, vq_config_from_spec(vq_model)).cfg
    class_names = class_names or [str(i) for i in range(num_classes)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels in {labels_dir} fall outside [0, {len(class_names)}): pass --num-classes or --class-names-from")
    attrs = {"tokenizer_sha256": file_sha256(vq_path), "codebook_size": vq_cfg.codebook_size, "image_size": image_size,
             "grid": int(round(first.shape[2] ** 0.5)), "augmentations": names, "class_names": class_names,
             "source": f"llamagen-codes:{codes_dir}"}
    key = hashlib.sha256(repr((str(codes_dir), len(code_files), attrs, labels.tobytes())).encode()).hexdigest()
    writer = TokenStoreWriter(claim.partial, labels, len(names), first.shape[2], attrs, key, chunk_rows)
    for chunk in progress(writer.pending_chunks(), desc="import-codes", unit="chunk"):
        start, stop = writer.chunk_range(chunk)
        block = np.stack([np.load(code_files[i])[0] for i in range(start, stop)])
        if block.min() < 0 or block.max() >= vq_cfg.codebook_size:
            raise ValueError(f"codes in {codes_dir} rows {start}..{stop} fall outside [0, {vq_cfg.codebook_size})")
        writer.write_chunk(chunk, block.astype(np.uint16))
    fingerprint = writer.finish()
    claim.commit_path()
    log.info("imported %d images x %d views x %d tokens -> %s", len(labels), len(names), first.shape[2], claim.target)
    return fingerprint
