"""On-disk data formats, documented and validated in one place.

Token store (stage `tokenize`), a Zarr v3 group, e.g. `data/tokens/train.zarr`:
    tokens   (N, A, L) uint16   VQ codes; A augmented views per image, L = grid*grid tokens, row-major
    labels   (N,)      int32    class index in [0, num_classes), ImageFolder order (sorted folder names)
    attrs:   format ("cca-pipe/tokens"), format_version, tokenizer_sha256, codebook_size, image_size,
             grid, augmentations (list of view names, length A), class_names (list, length num_classes),
             num_classes, fingerprint (sha256 of shapes + tokens + labels bytes)
Chunked along N (chunk_rows rows), Blosc zstd + bitshuffle.

Reference log-prob cache (stage `reflogp`), a Parquet file, e.g. `data/reflogp/ref_logp.parquet`:
    One cache row per image (reflogp.views = "one") or per (image, view) ("all").
    row            int64    index into the token store
    label          int32    c
    neg_label      int32    c_neg != c, fixed at cache time (seeded)
    view           int16    which augmentation view of the row, fixed at cache time (seeded)
    ref_logp_pos   float64  log p_phi(x_view | c)      (sum over L tokens, float32 log-softmax)
    ref_logp_neg   float64  log p_phi(x_view | c_neg)
    ref_logp_null  float64  log p_phi(x_view | null)   (used by unconditional rows, CCA+CFG)
    schema metadata (provenance, checked by `train`): format, format_version, tokens_fingerprint,
             ref_ckpt_sha256, seed, views, num_classes, null_class, seq_len, code_version
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__

TOKENS_FORMAT = "cca-pipe/tokens"
TOKENS_FORMAT_VERSION = 1
CACHE_FORMAT = "cca-pipe/ref-logp"
CACHE_FORMAT_VERSION = 1


class FormatError(ValueError):
    """A data file that does not match its documented format; the message names the file and the fix."""


# ----------------------------------------------------------------------------- token store


@dataclass
class TokenStore:
    tokens: np.ndarray  # (N, A, L) uint16
    labels: np.ndarray  # (N,) int32
    attrs: dict

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]


def tokens_fingerprint(tokens: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(tokens.shape), str(tokens.dtype), list(labels.shape), str(labels.dtype)]).encode())
    h.update(np.ascontiguousarray(tokens).data)
    h.update(np.ascontiguousarray(labels).data)
    return h.hexdigest()


_TOKEN_ATTRS = ("tokenizer_sha256", "codebook_size", "image_size", "grid", "augmentations", "class_names")


def write_token_store(path: str | os.PathLike, tokens: np.ndarray, labels: np.ndarray, attrs: dict, chunk_rows: int = 1024) -> str:
    """Write the whole store atomically (to `<path>.tmp`, then rename). Returns the fingerprint."""
    import zarr
    from zarr.codecs import BloscCodec

    path = Path(path)
    missing = [k for k in _TOKEN_ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"token store attributes missing: {missing}")
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise ValueError(f"tokens must be (N, A, L) uint16, got {tokens.shape} {tokens.dtype}")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be ({tokens.shape[0]},), got {labels.shape}")
    labels = labels.astype(np.int32)
    fingerprint = tokens_fingerprint(tokens, labels)
    attrs = {**attrs, "format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION,
             "num_classes": len(attrs["class_names"]), "fingerprint": fingerprint}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    compressor = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
    group = zarr.open_group(str(tmp), mode="w", attributes=attrs)
    rows = max(1, min(chunk_rows, tokens.shape[0]))
    group.create_array("tokens", data=tokens, chunks=(rows, *tokens.shape[1:]), compressors=compressor)
    group.create_array("labels", data=labels, chunks=(rows,), compressors=compressor)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return fingerprint


def read_token_store(path: str | os.PathLike) -> TokenStore:
    """Load tokens and labels into memory and check shape, dtype, attributes, label range and fingerprint."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FormatError(f"{path} is not a token store (no zarr.json): run `cca-pipe tokenize` to create it")
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("format") != TOKENS_FORMAT or attrs.get("format_version") != TOKENS_FORMAT_VERSION:
        raise FormatError(
            f"{path}: format {attrs.get('format')!r} v{attrs.get('format_version')}, expected "
            f"{TOKENS_FORMAT!r} v{TOKENS_FORMAT_VERSION}; re-run `cca-pipe tokenize`"
        )
    for name in ("tokens", "labels"):
        if name not in group:
            raise FormatError(f"{path}: array {name!r} is missing; re-run `cca-pipe tokenize`")
    tokens, labels = group["tokens"][...], group["labels"][...]
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise FormatError(f"{path}/tokens: expected (N, A, L) uint16, found {tokens.shape} {tokens.dtype}")
    if labels.dtype != np.int32 or labels.shape != (tokens.shape[0],):
        raise FormatError(f"{path}/labels: expected ({tokens.shape[0]},) int32, found {labels.shape} {labels.dtype}")
    if len(attrs.get("augmentations", [])) != tokens.shape[1]:
        raise FormatError(f"{path}: {tokens.shape[1]} views stored but attribute augmentations lists {attrs.get('augmentations')}")
    if labels.size and (labels.min() < 0 or labels.max() >= attrs["num_classes"]):
        raise FormatError(f"{path}/labels: values outside [0, {attrs['num_classes']})")
    if tokens.size and int(tokens.max()) >= attrs["codebook_size"]:
        raise FormatError(f"{path}/tokens: code {int(tokens.max())} >= codebook_size {attrs['codebook_size']}")
    if tokens_fingerprint(tokens, labels) != attrs["fingerprint"]:
        raise FormatError(f"{path}: contents do not match the stored fingerprint (modified after writing?); re-run `cca-pipe tokenize`")
    return TokenStore(tokens, labels, attrs)


# ----------------------------------------------------------------------------- reference log-prob cache

CACHE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("label", pa.int32()),
        ("neg_label", pa.int32()),
        ("view", pa.int16()),
        ("ref_logp_pos", pa.float64()),
        ("ref_logp_neg", pa.float64()),
        ("ref_logp_null", pa.float64()),
    ]
)
_CACHE_META = ("tokens_fingerprint", "ref_ckpt_sha256", "seed", "num_classes", "null_class", "seq_len")


def write_ref_cache(path: str | os.PathLike, columns: dict[str, np.ndarray], provenance: dict) -> None:
    """Write the cache atomically with its provenance in the Parquet schema metadata."""
    path = Path(path)
    missing = [k for k in _CACHE_META if k not in provenance]
    if missing:
        raise ValueError(f"cache provenance missing: {missing}")
    meta = {**provenance, "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "code_version": __version__}
    schema = CACHE_SCHEMA.with_metadata({k.encode(): json.dumps(v).encode() for k, v in meta.items()})
    table = pa.Table.from_pydict({f.name: np.asarray(columns[f.name]) for f in CACHE_SCHEMA}, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_cache_provenance(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"reference cache {path} does not exist: run `cca-pipe reflogp` to create it")
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if k != b"ARROW:schema"}


def read_ref_cache(path: str | os.PathLike, expect: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read the cache, check its schema and that its provenance matches `expect` (e.g. the tokens'
    fingerprint and the reference checkpoint's sha256). Returns (columns, provenance)."""
    path = Path(path)
    meta = read_cache_provenance(path)
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise FormatError(f"{path}: not a cca-pipe reference cache v{CACHE_FORMAT_VERSION}; re-run `cca-pipe reflogp`")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise FormatError(
                f"{path} is stale: its {key} is {meta.get(key)!r} but the current input has {value!r}. "
                f"Rebuild it with `cca-pipe reflogp` (or `dvc repro reflogp`)."
            )
    table = pq.read_table(path)
    schema = table.schema.remove_metadata()
    if not schema.equals(CACHE_SCHEMA):
        raise FormatError(f"{path}: schema {schema} differs from the documented one {CACHE_SCHEMA}")
    return {name: table.column(name).to_numpy() for name in table.column_names}, meta
