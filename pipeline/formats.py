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
    neg_label      int32    c_neg, fixed at cache time (seeded); != c unless negatives "roll"
    view           int16    which augmentation view of the row, fixed at cache time (seeded)
    ref_logp_pos   float64  log p_phi(x_view | c)      (sum over L tokens, float32 log-softmax)
    ref_logp_neg   float64  log p_phi(x_view | c_neg)
    ref_logp_null  float64  log p_phi(x_view | null)   (used by unconditional rows, CCA+CFG)
    schema metadata (provenance, checked by `train`): format, format_version, tokens_fingerprint,
             ref_ckpt_sha256, seed, views, negatives ("other" | "roll": rows with neg_label == label are
             then positives twice), num_classes, null_class, seq_len, batch_size, logp_code ({source file:
             sha256} of the code that computes log-probs: editing it makes the cache stale), settings
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .outputs import Claim, atomic_file, write_text

log = logging.getLogger(__name__)

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
# Attribute types a readable store must have (a hand-edited zarr.json is caught here, not deep in a stage).
_ATTR_TYPES = {"codebook_size": int, "image_size": int, "grid": int, "num_classes": int, "augmentations": list,
               "class_names": list, "tokenizer_sha256": str, "build_key": str, "family": str, "seq_len": int}
REBUILD_STORE = "rebuild it with `cca-pipe tokenize` (or `dvc repro tokenize`)"


def store_attrs(path: str | os.PathLike) -> dict | None:
    """The zarr attributes of a directory if it is a cca-pipe token store (complete or not), else None."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) and attrs.get("format") == TOKENS_FORMAT else None


def is_token_store(path: Path) -> bool:
    return path.is_dir() and store_attrs(path) is not None


def _check_attrs(path: Path, attrs: dict) -> None:
    for key, kind in _ATTR_TYPES.items():
        if key not in attrs:
            raise FormatError(f"{path}: attribute {key!r} is missing from zarr.json; {REBUILD_STORE}")
        if not isinstance(attrs[key], kind) or (kind is int and isinstance(attrs[key], bool)):
            raise FormatError(f"{path}: attribute {key!r} is {attrs[key]!r}, expected {kind.__name__}; {REBUILD_STORE}")
    if attrs["num_classes"] < 1 or attrs["codebook_size"] < 1 or attrs["codebook_size"] > 65536:
        raise FormatError(f"{path}: num_classes {attrs['num_classes']} / codebook_size {attrs['codebook_size']} out of range; "
                          f"{REBUILD_STORE}")
    if len(attrs["class_names"]) != attrs["num_classes"]:
        raise FormatError(f"{path}: {len(attrs['class_names'])} class_names for num_classes {attrs['num_classes']}; {REBUILD_STORE}")


def _chunk_file(array, chunk: int) -> Path:
    """The file of row-chunk `chunk` of a (N, ...) zarr array stored in a local directory."""
    key = array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
    return Path(str(array.store_path.store.root)) / array.path / key


def _read_rows(path: Path, array, start: int, stop: int, chunk: int) -> np.ndarray:
    """Rows of one chunk, or a FormatError naming the store and the chunk file (missing, truncated,
    undecodable): zarr would silently return the fill value for a missing chunk."""
    file = _chunk_file(array, chunk)
    if not file.is_file():
        raise FormatError(f"{path}: chunk file {file.relative_to(path)} (rows {start}..{stop - 1}) is missing; {REBUILD_STORE}")
    try:
        return array[start:stop]
    except Exception as e:  # blosc/zstd errors come as RuntimeError, ValueError, TypeError... depending on codec
        raise FormatError(f"{path}: chunk file {file.relative_to(path)} (rows {start}..{stop - 1}) cannot be decoded "
                          f"({type(e).__name__}: {e}); the store is damaged: {REBUILD_STORE}") from e


class TokenStoreWriter:
    """Resumable writer of a token store at `path` (a stage writes it at its Claim's `.partial` path and
    swaps it into place once `finish()`ed; pipeline/outputs.py).

    The arrays are created with their full shape; rows are written one chunk (`chunk_rows` rows) at a
    time, and each finished chunk is recorded atomically in `<path>/progress.json`. A rerun with the same
    `build_key` (a digest of everything that determines the tokens: inputs, tokenizer, settings) resumes
    with the chunks still missing, after checking that every chunk the progress file lists exists and
    decodes (a deleted or damaged one is encoded again); a store of ours left by other settings is
    replaced. `finish()` computes the fingerprint and marks the store complete; until then
    `read_token_store` refuses it.
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
        existing = store_attrs(self.path) or {}
        if existing.get("build_key") == build_key and "fingerprint" in existing:
            self.complete = True
            return
        if existing.get("build_key") == build_key and self.progress_file.is_file():
            self.group = zarr.open_group(str(self.path), mode="r+")
            self.done = self._verified(set(json.loads(self.progress_file.read_text())["done_chunks"]))
            return
        if self.path.exists():
            shutil.rmtree(self.path)  # ours (a Claim checked the format marker), from other settings
        attrs = {"family": "llamagen", **attrs, "seq_len": seq_len, "format": TOKENS_FORMAT,
                 "format_version": TOKENS_FORMAT_VERSION, "num_classes": len(attrs["class_names"]), "build_key": build_key}
        self.group = zarr.open_group(str(self.path), mode="w", attributes=attrs)
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")
        rows = min(self.chunk_rows, max(1, self.num_rows))
        # every chunk is written, even one equal to the fill value (zarr skips those by default), so that a
        # missing chunk file always means damage
        config = {"write_empty_chunks": True}
        self.group.create_array("tokens", shape=(self.num_rows, views, seq_len), dtype=np.uint16,
                                chunks=(rows, views, seq_len), compressors=compressor, fill_value=0, config=config)
        self.group.create_array("labels", data=labels.astype(np.int32), chunks=(rows,), compressors=compressor, config=config)
        self._save_progress()

    def _verified(self, done: set[int]) -> set[int]:
        """The chunks of the progress file whose files exist and decode; the others are redone."""
        bad = []
        for chunk in sorted(done):
            try:
                _read_rows(self.path, self.group["tokens"], *self.chunk_range(chunk), chunk)
            except FormatError as e:
                bad.append(chunk)
                log.warning("%s; encoding chunk %d again", e, chunk)
        return done - set(bad)

    def _save_progress(self) -> None:
        write_text(self.progress_file, json.dumps({"done_chunks": sorted(self.done)}))

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
            return store_attrs(self.path)["fingerprint"]
        if self.pending_chunks():
            raise RuntimeError(f"{self.path}: chunks {self.pending_chunks()[:5]}... were never written")
        fingerprint = tokens_fingerprint(self.group["tokens"][...], self.group["labels"][...])
        self.group.attrs["fingerprint"] = fingerprint
        self.progress_file.unlink(missing_ok=True)
        self.complete = True
        return fingerprint


def claim_token_store(path: str | os.PathLike, what: str = "cca-pipe tokenize") -> Claim:
    """The right to (re)write a token store: the path and its `.partial` must be absent or stores of ours."""
    return Claim(path, what=what, owned=is_token_store)


def write_token_store(path: str | os.PathLike, tokens: np.ndarray, labels: np.ndarray, attrs: dict, chunk_rows: int = 1024) -> str:
    """Write a whole in-memory store (built beside, swapped in). Returns the fingerprint."""
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise ValueError(f"tokens must be (N, A, L) uint16, got {tokens.shape} {tokens.dtype}")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be ({tokens.shape[0]},), got {labels.shape}")
    with claim_token_store(path, "write_token_store") as claim:
        claim.discard_partial()
        writer = TokenStoreWriter(claim.partial, labels, tokens.shape[1], tokens.shape[2], attrs, build_key="in-memory",
                                  chunk_rows=chunk_rows)
        for chunk in writer.pending_chunks():
            start, stop = writer.chunk_range(chunk)
            writer.write_chunk(chunk, tokens[start:stop])
        fingerprint = writer.finish()
        claim.commit_path()
    return fingerprint


def read_token_store(path: str | os.PathLike) -> TokenStore:
    """Load tokens and labels into memory and check shape, dtype, attributes, label range and fingerprint."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FormatError(f"{path} is not a token store (no zarr.json): run `cca-pipe tokenize` to create it")
    attrs = store_attrs(path)
    if attrs is None:
        raise FormatError(f"{path}: zarr.json is not a cca-pipe token store's ({TOKENS_FORMAT!r} v{TOKENS_FORMAT_VERSION}); "
                          f"{REBUILD_STORE}")
    if attrs.get("format_version") != TOKENS_FORMAT_VERSION:
        raise FormatError(f"{path}: format version {attrs.get('format_version')}, expected {TOKENS_FORMAT_VERSION}; {REBUILD_STORE}")
    if "fingerprint" not in attrs:
        raise FormatError(f"{path} is incomplete (tokenize was interrupted): rerun `cca-pipe tokenize` to resume it")
    _check_attrs(path, attrs)
    try:
        group = zarr.open_group(str(path), mode="r")
        arrays = {name: group[name] for name in ("tokens", "labels")}
    except KeyError as e:
        raise FormatError(f"{path}: array {e} is missing; {REBUILD_STORE}") from e
    except Exception as e:  # an unknown dtype or codec, broken array metadata
        raise FormatError(f"{path}: cannot open its arrays ({type(e).__name__}: {e}); {REBUILD_STORE}") from e
    if arrays["tokens"].ndim != 3 or arrays["tokens"].dtype != np.uint16:
        raise FormatError(f"{path}/tokens: expected (N, A, L) uint16, found {arrays['tokens'].shape} {arrays['tokens'].dtype}")
    n = arrays["tokens"].shape[0]
    if arrays["labels"].dtype != np.int32 or arrays["labels"].shape != (n,):
        raise FormatError(f"{path}/labels: expected ({n},) int32, found {arrays['labels'].shape} {arrays['labels'].dtype}")
    data = {}
    for name, array in arrays.items():
        rows = array.chunks[0]
        data[name] = np.concatenate([_read_rows(path, array, s, min(s + rows, n), s // rows) for s in range(0, n, rows)]) \
            if n else array[...]
    tokens, labels = data["tokens"], data["labels"]
    if attrs["seq_len"] != tokens.shape[2]:
        raise FormatError(f"{path}: tokens of length {tokens.shape[2]} but attribute seq_len {attrs['seq_len']}; {REBUILD_STORE}")
    if len(attrs["augmentations"]) != tokens.shape[1]:
        raise FormatError(f"{path}: {tokens.shape[1]} views stored but attribute augmentations lists {attrs.get('augmentations')}")
    if attrs.get("family", "llamagen") == "var":
        patch_nums = attrs.get("patch_nums")
        if not patch_nums or sum(pn * pn for pn in patch_nums) != tokens.shape[2]:
            raise FormatError(f"{path}: VAR tokens of length {tokens.shape[2]} but attribute patch_nums {patch_nums} "
                              f"gives {sum(pn * pn for pn in patch_nums or [])}; {REBUILD_STORE}")
    if labels.size and (labels.min() < 0 or labels.max() >= attrs["num_classes"]):
        raise FormatError(f"{path}/labels: values outside [0, {attrs['num_classes']})")
    if tokens.size and int(tokens.max()) >= attrs["codebook_size"]:
        raise FormatError(f"{path}/tokens: code {int(tokens.max())} >= codebook_size {attrs['codebook_size']}")
    if tokens_fingerprint(tokens, labels) != attrs["fingerprint"]:
        raise FormatError(f"{path}: contents do not match the stored fingerprint (modified after writing?); {REBUILD_STORE}")
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
LOGP_COLUMNS = ("ref_logp_pos", "ref_logp_neg", "ref_logp_null")
_CACHE_META = ("tokens_fingerprint", "ref_ckpt_sha256", "seed", "num_classes", "null_class", "seq_len")
REBUILD_CACHE = "rebuild it with `cca-pipe reflogp` (or `dvc repro reflogp`)"


def _cache_table(columns: dict[str, np.ndarray], provenance: dict) -> pa.Table:
    missing = [k for k in _CACHE_META if k not in provenance]
    if missing:
        raise ValueError(f"cache provenance missing: {missing}")
    meta = {**provenance, "format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION}
    schema = CACHE_SCHEMA.with_metadata({k.encode(): json.dumps(v).encode() for k, v in meta.items()})
    return pa.Table.from_pydict({f.name: np.asarray(columns[f.name]) for f in CACHE_SCHEMA}, schema=schema)


def write_ref_cache(path: str | os.PathLike, columns: dict[str, np.ndarray], provenance: dict) -> None:
    """Write the cache atomically with its provenance in the Parquet schema metadata."""
    table = _cache_table(columns, provenance)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def is_ref_cache(path: Path) -> bool:
    try:
        return path.is_file() and read_cache_provenance(path).get("format") == CACHE_FORMAT
    except FormatError:
        return False


def _is_parts_dir(path: Path) -> bool:
    """An unfinished cache of ours: a directory of nothing but part files (and their .gitignore)."""
    return path.is_dir() and all(p.name == ".gitignore" or (p.name.startswith("part-") and p.suffix == ".parquet")
                                 for p in path.iterdir())


def claim_ref_cache(path: str | os.PathLike) -> Claim:
    return Claim(path, what="cca-pipe reflogp", owned=is_ref_cache, owned_partial=_is_parts_dir)


class RefCacheParts:
    """Resumable computation of a cache: rows are computed in parts of `part_rows`, each written atomically
    to `<dir>/part-<k>.parquet` with the provenance (`dir`: the Claim's `.partial` directory); a rerun keeps
    the parts whose provenance matches and computes the rest; `merge()` writes the single cache file and
    removes the parts."""

    def __init__(self, path: str | os.PathLike, num_rows: int, part_rows: int, provenance: dict, parts_dir: Path):
        self.path, self.num_rows, self.part_rows = Path(path), num_rows, max(1, part_rows)
        self.provenance = provenance
        self.dir = parts_dir
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
                    rows = pq.ParquetFile(p).metadata.num_rows
                except Exception:  # a damaged part is recomputed
                    meta, rows = {}, -1
                if all(meta.get(key) == value for key, value in self.provenance.items()) and \
                        rows == self.part_range(k)[1] - self.part_range(k)[0]:
                    done.append(k)
        return [k for k in range(self.num_parts) if k not in done]

    def write_part(self, k: int, columns: dict[str, np.ndarray]) -> None:
        write_ref_cache(self.part_path(k), columns, self.provenance)

    def merge(self) -> None:
        table = pa.concat_tables([pq.read_table(self.part_path(k)) for k in range(self.num_parts)])
        with atomic_file(self.path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        shutil.rmtree(self.dir, ignore_errors=True)


def read_cache_provenance(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"reference cache {path} does not exist: run `cca-pipe reflogp` to create it")
    if not path.is_file():
        raise FormatError(f"reference cache {path} is not a file (a directory?): pass the .parquet file that `cca-pipe reflogp` wrote")
    try:
        raw = pq.read_schema(path).metadata or {}
        return {k.decode(): json.loads(v) for k, v in raw.items() if k != b"ARROW:schema"}
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FormatError(f"{path} is not a readable Parquet file ({e}): it is truncated or not a reference cache; "
                          f"{REBUILD_CACHE}") from e


def read_ref_cache(path: str | os.PathLike, expect: dict | None = None, store: TokenStore | None = None
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """Read the cache, check its schema, that its provenance matches `expect` (e.g. the tokens'
    fingerprint and the reference checkpoint's sha256) and its contents (validate_ref_cache; against the
    token store when given). Returns (columns, provenance)."""
    path = Path(path)
    meta = read_cache_provenance(path)
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise FormatError(f"{path}: not a cca-pipe reference cache v{CACHE_FORMAT_VERSION}; {REBUILD_CACHE}")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            if isinstance(value, dict) and isinstance(meta.get(key), dict):  # a digest per source file
                changed = sorted(k for k in set(value) | set(meta[key]) if value.get(k) != meta[key].get(k))
                what = f"its {key} differs in {changed}: that code changed since the cache was computed"
            else:
                what = f"its {key} is {meta.get(key)!r} but the current input has {value!r}"
            raise FormatError(f"{path} is stale: {what}. Rebuild it with `cca-pipe reflogp` (or `dvc repro reflogp`).")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path}: cannot read its rows ({e}); {REBUILD_CACHE}") from e
    schema = table.schema.remove_metadata()
    if not schema.equals(CACHE_SCHEMA):
        raise FormatError(f"{path}: columns {schema.names} ({', '.join(map(str, schema.types))}) differ from the documented "
                          f"schema ({', '.join(f'{f.name}: {f.type}' for f in CACHE_SCHEMA)}); {REBUILD_CACHE}")
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    validate_ref_cache(path, columns, meta, store)
    return columns, meta


def validate_ref_cache(path: Path, columns: dict[str, np.ndarray], meta: dict, store: TokenStore | None = None) -> None:
    """The cache's contents, checked once at read time (one clear error instead of a NaN loss steps later,
    an IndexError, or training on garbage): finite log-probs; rows, views and labels in range; with the
    token store: labels equal the store's and every expected (row, view) present exactly once; negatives
    differ from their positives."""

    def fail(what: str, bad: np.ndarray) -> None:
        first = int(np.flatnonzero(bad)[0])
        raise FormatError(f"{path}: {int(bad.sum())} cache rows {what} (first: cache row {first}); {REBUILD_CACHE}")

    for name in LOGP_COLUMNS:
        bad = ~np.isfinite(columns[name])
        if bad.any():
            fail(f"have a non-finite {name}", bad)
    num_classes = meta.get("num_classes")
    if not isinstance(num_classes, int):
        raise FormatError(f"{path}: provenance num_classes is {num_classes!r}; {REBUILD_CACHE}")
    for name in ("label", "neg_label"):
        bad = (columns[name] < 0) | (columns[name] >= num_classes)
        if bad.any():
            fail(f"have a {name} outside [0, {num_classes})", bad)
    bad = columns["neg_label"] == columns["label"]
    if bad.any() and meta.get("negatives", "other") != "roll":  # rolled negatives may equal: positives twice
        fail("have a negative label equal to the positive one", bad)
    rows, views = columns["row"], columns["view"]
    if store is None:
        for name, column in (("row", rows), ("view", views)):
            if (column < 0).any():
                fail(f"have a negative {name}", column < 0)
        return
    n, a = store.tokens.shape[:2]
    for name, column, size in (("row", rows, n), ("view", views, a)):
        bad = (column < 0) | (column >= size)
        if bad.any():
            fail(f"have a {name} outside the token store's [0, {size})", bad)
    bad = columns["label"] != store.labels[rows]
    if bad.any():
        fail("have a label different from the token store's", bad)
    keys = rows.astype(np.int64) * a + views if meta.get("views") == "all" else rows.astype(np.int64)
    expected = n * a if meta.get("views") == "all" else n
    counts = np.bincount(keys, minlength=expected)
    if len(keys) != expected or (counts != 1).any():
        missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
        unit = "(row, view) pairs" if meta.get("views") == "all" else "rows"
        raise FormatError(f"{path}: {len(keys)} cache rows for {expected} token-store {unit}: {missing} missing, {repeated} "
                          f"present more than once; {REBUILD_CACHE}")
