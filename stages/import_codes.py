"""Stage `import-codes`: codes extracted by LlamaGen's `extract_codes_c2i.py` -> our Zarr token store.

    cca-pipe --set import_codes.augment=flip --set import_codes.image_size=256 import-codes \
        --codes /data/codes/imagenet256_codes --labels /data/codes/imagenet256_labels \
        --vq vq_ds16_c2i.pt --vq-model VQ-16 --class-names-from /data/imagenet/train --out data/tokens.zarr

LlamaGen writes one pair of files per image, `{i}.npy` of shape (1, A, L) (codes) and `{i}.npy` of shape
(1,) (label), i = 0..N-1 in ImageFolder order; A = 2 (center crop + flip) or 10 (--ten-crop). Nothing is
re-encoded; the VQ checkpoint gives the codebook size and the token layout, as in `tokenize`, and its
sha256 (provenance). The store is exactly the one `tokenize` writes (same attributes, same reader).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting, settings_digest
from pipeline.families import load_tokenizer
from pipeline.hub import inputs_record
from pipeline.images import view_names
from pipeline.progress import progress
from pipeline.tokenstore import TokenStoreWriter, claim_token_store, store_attributes

from .cli.params import as_params

log = logging.getLogger(__name__)


@dataclass
class ImportCodesConfig:
    augment: str = "flip"  # the views extract_codes_c2i.py wrote: flip (A=2) or tencrop (A=10, --ten-crop)
    image_size: int = setting(256, ge=1)  # the resolution the codes were extracted at (256 or 384)
    chunk_rows: int = setting(512, ge=1)  # rows per Zarr chunk
    num_classes: int = setting(1000, ge=1)  # without --class-names-from: class names are "0" ... "num_classes-1"

    def __post_init__(self) -> None:
        check_ranges(self, "import_codes")
        try:
            view_names(self.augment)
        except ValueError as e:
            raise ConfigError(f"import_codes.augment: {e}") from None


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


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({e})") from e


def run(cfg: ImportCodesConfig, codes_dir: Path, labels_dir: Path, vq_path: Path, out: Path,
        class_names: list[str] | None = None, vq_model: str | None = "VQ-16") -> str:
    """`out` and its `.partial` must be absent or token stores of ours; built beside and swapped in."""
    with claim_token_store(out, "cca-pipe import-codes") as claim:
        return _import(cfg, codes_dir, labels_dir, vq_path, claim, class_names, vq_model)


def _import(cfg: ImportCodesConfig, codes_dir: Path, labels_dir: Path, vq_path: Path, claim, class_names, vq_model) -> str:
    code_files, label_files = _numbered_files(codes_dir), _numbered_files(labels_dir)
    if len(code_files) != len(label_files):
        raise ValueError(f"{codes_dir} has {len(code_files)} files but {labels_dir} has {len(label_files)}")
    labels = np.array([int(_npy(f).reshape(-1)[0]) for f in progress(label_files, desc="labels")], dtype=np.int32)
    first = _npy(code_files[0])
    names = view_names(cfg.augment)
    if first.ndim != 3 or first.shape[0] != 1 or first.shape[1] != len(names):
        raise ValueError(f"{code_files[0]} has shape {first.shape}; expected (1, {len(names)}, L) for import_codes.augment "
                         f"{cfg.augment!r}")
    family, vq = load_tokenizer(vq_path, vq_model)
    layout = family.tokenizer_layout(vq, cfg.image_size)
    if layout["seq_len"] != first.shape[2]:
        raise ValueError(f"{code_files[0]} holds {first.shape[2]} codes per view, but {vq_path} at import_codes.image_size "
                         f"{cfg.image_size} makes {layout['seq_len']}: set import_codes.image_size to the extraction's resolution")
    class_names = class_names or [str(i) for i in range(cfg.num_classes)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels in {labels_dir} fall outside [0, {len(class_names)}): set import_codes.num_classes or "
                         "pass --class-names-from")
    sha = file_sha256(vq_path)
    attrs = store_attributes(layout, sha, vq.cfg.codebook_size, cfg.image_size, names, class_names,
                             f"llamagen-codes:{codes_dir}", as_params(cfg))
    if hub := inputs_record(vq_path):  # the tokenizer read from the Hub (pipeline/hub.py)
        attrs["hub_inputs"] = hub
    key = settings_digest([cfg, sha, str(codes_dir), len(code_files), class_names, labels.tobytes().hex()])
    writer = TokenStoreWriter(claim.partial, labels, len(names), first.shape[2], attrs, key, cfg.chunk_rows)
    for chunk in progress(writer.pending_chunks(), desc="import-codes", unit="chunk"):
        start, stop = writer.chunk_range(chunk)
        block = np.stack([_npy(code_files[i])[0] for i in range(start, stop)])
        if block.min() < 0 or block.max() >= vq.cfg.codebook_size:
            raise ValueError(f"codes in {codes_dir} rows {start}..{stop} fall outside [0, {vq.cfg.codebook_size})")
        writer.write_chunk(chunk, block.astype(np.uint16))
    fingerprint = writer.finish()
    claim.commit_path()
    log.info("imported %d images x %d views x %d tokens -> %s", len(labels), len(names), first.shape[2], claim.target)
    return fingerprint
