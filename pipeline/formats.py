"""On-disk data formats, documented and validated in one place.

Token store (stage `tokenize`), a Zarr v3 group, e.g. `data/tokens/train.zarr`:
    tokens   (N, A, L) uint16   VQ codes; A augmented views per image. Layout by `family`:
                                  "llamagen": L = grid*grid tokens, row-major;
                                  "var": L = sum(pn^2) (680), the pn x pn maps of `patch_nums`, each
                                  row-major, concatenated coarse to fine (scale k = tokens[..., b_k:e_k])
    labels   (N,)      int32    class index in [0, num_classes), ImageFolder order (sorted folder names)
    attrs:   format ("cca-pipe/tokens"), format_version, family ("llamagen" | "var"; absent = llamagen),
             seq_len (L), patch_nums (var only), tokenizer_sha256, codebook_size, image_size,
             grid, augmentations (list of view names, length A), class_names (list, length num_classes),
             num_classes, build_key (digest of the inputs and settings), fingerprint (sha256 of shapes +
             tokens + labels bytes; present only once the store is complete)
Chunked along N (chunk_rows rows), Blosc zstd + bitshuffle. While being written, `progress.json` in the
store lists finished chunks, so an interrupted tokenize resumes (TokenStoreWriter).

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


class TokenStoreWriter:
    """Resumable writer of a token store.

    The arrays are created with their full shape; rows are written one chunk (`chunk_rows` rows) at a
    time, and each finished chunk is recorded atomically in `<path>/progress.json`. A rerun with the same
    `build_key` (a digest of everything that determines the tokens: inputs, tokenizer, settings) resumes
    with the chunks still missing; a store left by other settings is replaced. `finish()` computes the
    fingerprint and marks the store complete; until then `read_token_store` refuses it.
    """

    def __init__(self, path: str | os.PathLike, labels: np.ndarray, views: int, seq_len: int, attrs: dict,
                 build_key: str, chunk_rows: int = 1024):
        import zarr
        from zarr.codecs import BloscCodec

        missing = [k for k in _TOKEN_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"token store attributes missing: {missing}")
        self.path, self.chunk_rows = Path(path), max(1, chunk_rows)
        self.num_rows = len(labels)
        self.progress_file = self.path / "progress.json"
        self.done: set[int] = set()
        self.complete = False
        existing = self._existing_attrs()
        if existing.get("build_key") == build_key and "fingerprint" in existing:
            self.complete = True
            return
        if existing.get("build_key") == build_key and self.progress_file.is_file():
            self.done = set(json.loads(self.progress_file.read_text())["done_chunks"])
            self.group = zarr.open_group(str(self.path), mode="r+")
            return
        shutil.rmtree(self.path, ignore_errors=True)
        attrs = {**attrs, "format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION,
                 "num_classes": len(attrs["class_names"]), "build_key": build_key}
        self.group = zarr.open_group(str(self.path), mode="w", attributes=attrs)
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
        rows = min(self.chunk_rows, max(1, self.num_rows))
        self.group.create_array("tokens", shape=(self.num_rows, views, seq_len), dtype=np.uint16,
                                chunks=(rows, views, seq_len), compressors=compressor, fill_value=0)
        self.group.create_array("labels", data=labels.astype(np.int32), chunks=(rows,), compressors=compressor)
        self._save_progress()

    def _existing_attrs(self) -> dict:
        meta = self.path / "zarr.json"
        if not meta.is_file():
            return {}
        try:
            return json.loads(meta.read_text()).get("attributes", {})
        except (json.JSONDecodeError, OSError):
            return {}

    def _save_progress(self) -> None:
        tmp = self.progress_file.with_name("progress.json.tmp")
        tmp.write_text(json.dumps({"done_chunks": sorted(self.done)}))
        os.replace(tmp, self.progress_file)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_rows)

    def pending_chunks(self) -> list[int]:
        return [] if self.complete else [k for k in range(self.num_chunks) if k not in self.done]

    def write_chunk(self, chunk: int, tokens: np.ndarray) -> None:
        start, stop = self.chunk_range(chunk)
        if tokens.shape[0] != stop - start:
            raise ValueError(f"chunk {chunk} needs {stop - start} rows, got {tokens.shape[0]}")
        self.group["tokens"][start:stop] = tokens.astype(np.uint16)
        self.done.add(chunk)
        self._save_progress()

    def finish(self) -> str:
        if self.complete:
            return self._existing_attrs()["fingerprint"]
        if self.pending_chunks():
            raise RuntimeError(f"{self.path}: chunks {self.pending_chunks()[:5]}... were never written")
        fingerprint = tokens_fingerprint(self.group["tokens"][...], self.group["labels"][...])
        self.group.attrs["fingerprint"] = fingerprint
        self.progress_file.unlink(missing_ok=True)
        self.complete = True
        return fingerprint


def write_token_store(path: str | os.PathLike, tokens: np.ndarray, labels: np.ndarray, attrs: dict, chunk_rows: int = 1024) -> str:
    """Write a whole in-memory store atomically (to `<path>.tmp`, then rename). Returns the fingerprint."""
    path = Path(path)
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise ValueError(f"tokens must be (N, A, L) uint16, got {tokens.shape} {tokens.dtype}")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be ({tokens.shape[0]},), got {labels.shape}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = TokenStoreWriter(tmp, labels, tokens.shape[1], tokens.shape[2], attrs, build_key="in-memory", chunk_rows=chunk_rows)
    for chunk in writer.pending_chunks():
        start, stop = writer.chunk_range(chunk)
        writer.write_chunk(chunk, tokens[start:stop])
    fingerprint = writer.finish()
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
    if "fingerprint" not in attrs:
        raise FormatError(f"{path} is incomplete (tokenize was interrupted): rerun `cca-pipe tokenize` to resume it")
    tokens, labels = group["tokens"][...], group["labels"][...]
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise FormatError(f"{path}/tokens: expected (N, A, L) uint16, found {tokens.shape} {tokens.dtype}")
    if labels.dtype != np.int32 or labels.shape != (tokens.shape[0],):
        raise FormatError(f"{path}/labels: expected ({tokens.shape[0]},) int32, found {labels.shape} {labels.dtype}")
    if len(attrs.get("augmentations", [])) != tokens.shape[1]:
        raise FormatError(f"{path}: {tokens.shape[1]} views stored but attribute augmentations lists {attrs.get('augmentations')}")
    if attrs.get("family", "llamagen") == "var":
        patch_nums = attrs.get("patch_nums")
        if not patch_nums or sum(pn * pn for pn in patch_nums) != tokens.shape[2]:
            raise FormatError(f"{path}: VAR tokens of length {tokens.shape[2]} but attribute patch_nums {patch_nums} "
                              f"gives {sum(pn * pn for pn in patch_nums or [])}; re-run `cca-pipe tokenize`")
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
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RefCacheParts:
    """Resumable computation of a cache: rows are computed in parts of `part_rows`, each written atomically
    to `<path>.parts/part-<k>.parquet` with the provenance; a rerun keeps the parts whose provenance matches
    and computes the rest; `merge()` writes the single cache file and removes the parts."""

    def __init__(self, path: str | os.PathLike, num_rows: int, part_rows: int, provenance: dict):
        self.path, self.num_rows, self.part_rows = Path(path), num_rows, max(1, part_rows)
        self.provenance = provenance
        self.dir = self.path.with_name(self.path.name + ".parts")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / ".gitignore").write_text("# partial reference cache, merged and removed when complete\n*\n")

    @property
    def num_parts(self) -> int:
        return -(-self.num_rows // self.part_rows)

    def part_path(self, k: int) -> Path:
        return self.dir / f"part-{k:05d}.parquet"

    def part_range(self, k: int) -> tuple[int, int]:
        return k * self.part_rows, min((k + 1) * self.part_rows, self.num_rows)

    def pending(self) -> list[int]:
        done = []
        for k in range(self.num_parts):
            p = self.part_path(k)
            if p.is_file():
                try:
                    meta = read_cache_provenance(p)
                except Exception:  # a damaged part is recomputed
                    meta = {}
                if all(meta.get(key) == value for key, value in self.provenance.items()) and \
                        pq.ParquetFile(p).metadata.num_rows == self.part_range(k)[1] - self.part_range(k)[0]:
                    done.append(k)
        return [k for k in range(self.num_parts) if k not in done]

    def write_part(self, k: int, columns: dict[str, np.ndarray]) -> None:
        write_ref_cache(self.part_path(k), columns, self.provenance)

    def merge(self) -> None:
        tables = [pq.read_table(self.part_path(k)) for k in range(self.num_parts)]
        table = pa.concat_tables(tables)
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.path)
        shutil.rmtree(self.dir, ignore_errors=True)


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
