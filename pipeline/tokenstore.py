"""The token store (format documented in pipeline/formats.py), read lazily.

`open_token_store` checks metadata only (format version, shapes, dtypes, codecs, attributes): O(1) in the
number of images. Tokens are read on demand, a chunk at a time, through `TokenStore.tokens[rows, views]`;
the labels (4 bytes per image) on first use. Integrity is per chunk: every chunk ends in zarr's `crc32c`
codec, which zarr checks on each read; a missing chunk file (which zarr would silently read as the fill
value) is an error too. The store's fingerprint (sha256 of shapes, tokens and labels, what the reference
cache records) is computed once, when the store is finished, streaming chunk by chunk;
`verify_token_store` (`cca-pipe info --verify`) recomputes it.

Stores of format version 1 (whole-array fingerprint checked at every open, no checksums) are refused
with the command that rewrites them: `cca-pipe upgrade-store PATH` (same tokens, same fingerprint, so
caches made from them stay valid).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np

from .formats import TOKENS_FORMAT, TOKENS_FORMAT_VERSION, TOKENS_LEGACY_FAMILY, FormatError
from .images import StatKey, content_digest, read_image_file, stat_key
from .outputs import Claim, read_json, write_json, write_text
from .progress import progress

log = logging.getLogger(__name__)

REBUILD_STORE = "rebuild it with `cca-pipe tokenize` (or `dvc repro tokenize`)"
_TOKEN_ATTRS = ("tokenizer_sha256", "codebook_size", "image_size", "grid", "augmentations", "class_names")
# Attribute types a readable store must have (a hand-edited zarr.json is caught here, not deep in a stage).
_ATTR_TYPES = {"codebook_size": int, "image_size": int, "grid": int, "num_classes": int, "augmentations": list,
               "class_names": list, "tokenizer_sha256": str, "build_key": str, "family": str, "seq_len": int}


def store_attrs(path: str | os.PathLike) -> dict | None:
    """The zarr attributes of a directory if it is a cca-pipe token store (complete or not), else None."""
    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
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


def store_attributes(layout: dict, tokenizer_sha256: str, codebook_size: int, image_size: int, augmentations: list[str],
                     class_names: list[str], source: str, settings: dict, skipped_files: list[str] | None = None) -> dict:
    """The attributes of a new store (pipeline/formats.py), whoever makes it (tokenize, import-codes), so
    that every store is read by the same checks: `layout` is the family's (family, seq_len, grid[, patch_nums])."""
    return {**layout, "tokenizer_sha256": tokenizer_sha256, "codebook_size": codebook_size, "image_size": image_size,
            "augmentations": augmentations, "class_names": class_names, "source": source,
            "skipped_files": skipped_files or [], "settings": settings}


def fingerprint_header(num_rows: int, views: int, seq_len: int) -> bytes:
    """What the fingerprint hashes before the token and label bytes (their shapes and dtypes)."""
    return json.dumps([[num_rows, views, seq_len], "uint16", [num_rows], "int32"]).encode()


def _codecs():
    from zarr.codecs import BloscCodec, Crc32cCodec

    # the checksum last: zarr verifies it before decompressing, so a damaged chunk never decodes
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]


def _chunk_file(path: Path, array, chunk: int) -> Path:
    """The file of row-chunk `chunk` of a (N, ...) zarr array of the store at `path`."""
    return path / array.path / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))


def _read_chunk(path: Path, array, chunk: int) -> np.ndarray:
    """Rows of one chunk, or a FormatError naming the store and the chunk file (missing, truncated, a
    checksum mismatch): zarr would silently return the fill value for a missing chunk."""
    rows = array.chunks[0]
    start, stop = chunk * rows, min((chunk + 1) * rows, array.shape[0])
    file = _chunk_file(path, array, chunk)
    if not file.is_file():
        raise FormatError(f"{path}: chunk file {file.relative_to(path)} (rows {start}..{stop - 1}) is missing; {REBUILD_STORE}")
    try:
        return array[start:stop]
    except Exception as e:  # crc32c mismatch (ValueError), blosc errors (RuntimeError), ...
        raise FormatError(f"{path}: chunk file {file.relative_to(path)} (rows {start}..{stop - 1}) is damaged "
                          f"({type(e).__name__}: {e}); {REBUILD_STORE}") from e


class LazyTokens:
    """(N, A, L) uint16 tokens read on demand. `tokens[rows, views]` (two int arrays) gathers one view per
    row -> (len, L); `tokens[start:stop]` reads a range of rows -> (n, A, L). Decoded chunks are kept in a
    small LRU cache (`cache_chunks`), so reads that stay within a few chunks decode each once. Pickles
    without its zarr handle (DataLoader worker processes reopen the store themselves)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], chunk_rows: int, codebook_size: int, cache_chunks: int = 8):
        self.path, self.shape, self.chunk_rows = path, shape, chunk_rows
        self.codebook_size, self.cache_chunks = codebook_size, cache_chunks
        self.dtype = np.dtype(np.uint16)
        self._array = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def num_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk_rows)

    def chunk(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        if self._array is None:
            import zarr

            self._array = zarr.open_group(str(self.path), mode="r")["tokens"]
        rows = _read_chunk(self.path, self._array, k)
        if rows.size and int(rows.max()) >= self.codebook_size:
            raise FormatError(f"{self.path}/tokens: code {int(rows.max())} in chunk {k} >= codebook_size {self.codebook_size}; "
                              f"{REBUILD_STORE}")
        self._cache[k] = rows
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return rows

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("token store rows: only contiguous slices")
            chunks = range(start // self.chunk_rows, -(-stop // self.chunk_rows)) if stop > start else range(0)
            parts = [self.chunk(k) for k in chunks]
            if not parts:
                return np.zeros((0, *self.shape[1:]), np.uint16)
            first = chunks[0] * self.chunk_rows
            return np.concatenate(parts)[start - first : stop - first]
        rows, views = (np.asarray(k) for k in key)
        out = np.empty((len(rows), self.shape[2]), np.uint16)
        chunk_of = rows // self.chunk_rows
        for k in np.unique(chunk_of):  # sorted by chunk: each touched chunk decoded once
            at = np.flatnonzero(chunk_of == k)
            out[at] = self.chunk(int(k))[rows[at] - k * self.chunk_rows, views[at]]
        return out


class TokenStore:
    """A complete, checked token store, opened lazily: attrs, labels (on first use), tokens (on demand)."""

    def __init__(self, path: Path, attrs: dict, shape: tuple[int, int, int], chunk_rows: int):
        self.path, self.attrs = path, attrs
        self.tokens = LazyTokens(path, shape, chunk_rows, attrs["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[2]

    def check_chunks(self) -> None:
        """Read every chunk once (checksums, the code range), chunk by chunk: a stage that will read the whole
        store calls this before any work, so a damaged chunk fails it at once, not hours in."""
        for k in progress(range(self.tokens.num_chunks), desc="checking token chunks", unit="chunk"):
            self.tokens.chunk(k)
        self.labels

    @cached_property
    def labels(self) -> np.ndarray:
        import zarr

        array = zarr.open_group(str(self.path), mode="r")["labels"]
        labels = np.concatenate([_read_chunk(self.path, array, k) for k in range(self.tokens.num_chunks)]) \
            if len(self.tokens) else np.zeros(0, np.int32)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise FormatError(f"{self.path}/labels: values outside [0, {self.num_classes}); {REBUILD_STORE}")
        return labels


def _layout_problem(path: Path, attrs: dict, seq_len: int) -> str | None:
    """The store's family's verdict on its layout attributes (pipeline.families: the family reads its own)."""
    from .families import family_of_store

    try:
        family = family_of_store(attrs)
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from None
    return family.layout_problem(attrs, seq_len)


def open_token_store(path: str | os.PathLike) -> TokenStore:
    """Open a complete store after checking its metadata (format, version, attributes, shapes, dtypes, the
    checksum codec); no token is read."""
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FormatError(f"{path} is not a token store (no zarr.json): run `cca-pipe tokenize` to create it")
    attrs = store_attrs(path)
    if attrs is None:
        raise FormatError(f"{path}: zarr.json is not a cca-pipe token store's ({TOKENS_FORMAT!r}); {REBUILD_STORE}")
    if attrs.get("format_version") == 1:
        raise FormatError(f"{path} is a token store of format version 1 (whole-array fingerprint, no chunk checksums): "
                          f"convert it in place with `cca-pipe upgrade-store {path}` (no image is re-encoded)")
    if attrs.get("format_version") != TOKENS_FORMAT_VERSION:
        raise FormatError(f"{path}: format version {attrs.get('format_version')}, expected {TOKENS_FORMAT_VERSION}; {REBUILD_STORE}")
    if "fingerprint" not in attrs:
        raise FormatError(f"{path} is incomplete (tokenize was interrupted): rerun `cca-pipe tokenize` to resume it")
    _check_attrs(path, attrs)
    try:
        group = zarr.open_group(str(path), mode="r")
        tokens, labels = group["tokens"], group["labels"]
    except KeyError as e:
        raise FormatError(f"{path}: array {e} is missing; {REBUILD_STORE}") from e
    except Exception as e:  # an unknown dtype or codec, broken array metadata
        raise FormatError(f"{path}: cannot open its arrays ({type(e).__name__}: {e}); {REBUILD_STORE}") from e
    if tokens.ndim != 3 or tokens.dtype != np.uint16:
        raise FormatError(f"{path}/tokens: expected (N, A, L) uint16, found {tokens.shape} {tokens.dtype}")
    n = tokens.shape[0]
    if labels.dtype != np.int32 or labels.shape != (n,) or labels.chunks[0] != tokens.chunks[0]:
        raise FormatError(f"{path}/labels: expected ({n},) int32 chunked as tokens, found {labels.shape} {labels.dtype}")
    if tokens.chunks[1:] != tokens.shape[1:]:
        raise FormatError(f"{path}/tokens: chunks {tokens.chunks} must hold whole rows ({tokens.shape[1:]}); {REBUILD_STORE}")
    for name, array in (("tokens", tokens), ("labels", labels)):
        if not any(type(c).__name__ == "Crc32cCodec" for c in array.metadata.codecs):
            raise FormatError(f"{path}/{name}: no crc32c checksum in its codecs; {REBUILD_STORE}")
    if attrs["seq_len"] != tokens.shape[2]:
        raise FormatError(f"{path}: tokens of length {tokens.shape[2]} but attribute seq_len {attrs['seq_len']}; {REBUILD_STORE}")
    if len(attrs["augmentations"]) != tokens.shape[1]:
        raise FormatError(f"{path}: {tokens.shape[1]} views stored but attribute augmentations lists {attrs.get('augmentations')}")
    problem = _layout_problem(path, attrs, tokens.shape[2])
    if problem:
        raise FormatError(f"{path}: {problem}; {REBUILD_STORE}")
    return TokenStore(path, attrs, tuple(tokens.shape), tokens.chunks[0])


def stream_fingerprint(path: Path, tokens, labels, shape: tuple[int, int, int], chunk_rows: int,
                       desc: str | None = None) -> str:
    """sha256(header + tokens bytes + labels bytes), read chunk by chunk (never the whole array)."""
    h = hashlib.sha256(fingerprint_header(*shape))
    chunks = range(-(-shape[0] // chunk_rows))
    for k in progress(chunks, desc=desc, unit="chunk", disable=desc is None):
        h.update(np.ascontiguousarray(_read_chunk(path, tokens, k)).data)
    for k in chunks:
        h.update(np.ascontiguousarray(_read_chunk(path, labels, k)).data)
    return h.hexdigest()


def damaged_chunks(path: str | os.PathLike, desc: str | None = None) -> list[str]:
    """The chunk files of a store (tokens and labels) that are missing or fail to decode (their checksums),
    one message each; empty: every chunk is intact. Reads every chunk once."""
    import zarr

    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    problems = []
    for name in ("tokens", "labels"):
        array = group[name]
        for k in progress(range(-(-array.shape[0] // array.chunks[0])), desc=desc and f"{desc} {name}", unit="chunk",
                          disable=desc is None):
            try:
                _read_chunk(path, array, k)
            except FormatError as e:
                problems.append(str(e))
    return problems


def verify_token_store(path: str | os.PathLike) -> list[str]:
    """Problems found by reading every chunk and recomputing the fingerprint (empty: the store is intact)."""
    import zarr

    store = open_token_store(path)
    group = zarr.open_group(str(store.path), mode="r")
    problems = damaged_chunks(store.path, desc="verify")
    if not problems:
        fingerprint = stream_fingerprint(store.path, group["tokens"], group["labels"], store.tokens.shape, store.tokens.chunk_rows)
        if fingerprint != store.fingerprint:
            problems.append(f"{store.path}: contents do not match the stored fingerprint (modified after writing?); {REBUILD_STORE}")
    return problems


# ----------------------------------------------------------------------------------------- the input record

INPUTS_DIR = "inputs"  # <store>/inputs/<chunk>.json: the input record of each chunk (pipeline/formats.py)
# (path relative to the image folder, size, mtime_ns, sha256 of the bytes, ctime_ns, inode): the record of
# one image (input_file); records written before ctime and inode were kept hold the first four only
InputFile = tuple[str, int, int, str, int, int]


def input_file(name: str, key: StatKey, digest: str) -> InputFile:
    size, mtime_ns, ctime_ns, ino = key
    return name, size, mtime_ns, digest, ctime_ns, ino


def chunk_inputs_digest(files: list[InputFile]) -> str:
    """What a chunk was encoded from: its images' relative paths and content digests (not their times)."""
    return hashlib.sha256(json.dumps([[f[0], f[3]] for f in files]).encode()).hexdigest()


def inputs_digest(chunk_digests: list[str]) -> str:
    """What a whole store was encoded from: the digests of its chunks' inputs, in order."""
    return hashlib.sha256(json.dumps(chunk_digests).encode()).hexdigest()


def read_input_record(store: str | os.PathLike) -> dict[str, tuple[tuple, str]]:
    """relative path -> (stat key, digest), from a store's input record (empty if it has none); an
    unreadable or malformed entry is skipped (its image is then hashed again). An entry of the earlier
    format (no ctime, no inode) has None in their places: it matches no file's key, so it is hashed once."""
    record: dict[str, tuple[tuple, str]] = {}
    for file in sorted((Path(store) / INPUTS_DIR).glob("*.json")):
        for entry in (read_json(file) or {}).get("files", []):
            if isinstance(entry, list) and len(entry) in (4, 6) and isinstance(entry[3], str):
                with contextlib.suppress(TypeError, ValueError):
                    rest = (int(entry[4]), int(entry[5])) if len(entry) == 6 else (None, None)
                    record[str(entry[0])] = ((int(entry[1]), int(entry[2]), *rest), entry[3])
    return record


def known_inputs(paths: list[Path], names: list[str], record: dict[str, tuple[tuple, str]],
                 rehash: bool = False) -> list[InputFile | None]:
    """Each image's input record as far as it can be known before encoding, DVC's way but stricter: an
    image whose stat key (size, mtime_ns, ctime_ns, inode: pipeline.images.stat_key) matches the record
    keeps its digest (one stat, no read); one whose key changed, or every one with `rehash`, is hashed now;
    one the record does not hold is None (hashed from the bytes the encoder's loader reads). `names`: the
    paths relative to the image folder, the record's keys."""
    out: list[InputFile | None] = []
    for path, rel in zip(paths, names):
        known = record.get(rel)
        if known is None:
            out.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None  # read_image_file names the problem
        if not rehash and st is not None and stat_key(st) == known[0]:
            out.append(input_file(rel, known[0], known[1]))
        else:
            data, key = read_image_file(path)
            out.append(input_file(rel, key, content_digest(data)))
    return out


def refresh_input_record(store: str | os.PathLike, inputs: list[InputFile | None], chunk_rows: int) -> int:
    """Rewrite, in a store's input record, the stat keys of images whose bytes are as recorded but whose
    stat changed (touched, copied, the tree moved to another disk, a record of the earlier format), so
    that the next run knows them from stat() again instead of hashing them on every run. Only a chunk
    whose every path and digest equals `inputs` is touched; its digest stays the same. Returns how many
    images' entries were rewritten."""
    rewritten = 0
    for file in sorted((Path(store) / INPUTS_DIR).glob("*.json")):
        saved = read_json(file) or {}
        files = saved.get("files")
        if not file.stem.isdigit() or not isinstance(files, list):
            continue
        now = inputs[int(file.stem) * chunk_rows : (int(file.stem) + 1) * chunk_rows]
        if len(now) != len(files) or any(f is None for f in now) or \
                any(not isinstance(e, list) or len(e) < 4 or [e[0], e[3]] != [f[0], f[3]] for e, f in zip(files, now)):
            continue
        fresh = [list(f) for f in now]
        if fresh != files:
            rewritten += sum(e != f for e, f in zip(files, fresh))
            write_json(file, {**saved, "files": fresh})
    return rewritten


def reopen_for_update(store: Path, partial: Path) -> None:
    """Copy a complete store of ours to `partial` as an unfinished one whose every chunk is done, with the
    input digests of its record: a TokenStoreWriter of the same build key then resumes it, and its
    `drop_changed` re-encodes only the chunks whose images changed (one changed image in 1.28M re-encodes
    one chunk, not the data set). Copied, not linked: zarr rewrites chunk files in place."""
    import zarr

    if partial.exists():
        shutil.rmtree(partial)  # ours, of other settings (the caller's Claim checked it)
    shutil.copytree(store, partial)
    group = zarr.open_group(str(partial), mode="r+")
    attrs = dict(group.attrs)
    for key in ("fingerprint", "inputs_digest"):
        attrs.pop(key, None)
    group.attrs.clear()
    group.attrs.update(attrs)
    chunk_inputs = {}
    for file in (partial / INPUTS_DIR).glob("*.json"):
        digest = (read_json(file) or {}).get("digest")
        if file.stem.isdigit() and isinstance(digest, str):
            chunk_inputs[int(file.stem)] = digest
    write_text(partial / "progress.json", json.dumps({"done_chunks": sorted(chunk_inputs),
                                                      "chunk_inputs": {str(k): v for k, v in sorted(chunk_inputs.items())}}))


class TokenStoreWriter:
    """Resumable writer of a token store at `path` (a stage writes it at its Claim's `.partial` path and
    swaps it into place once `finish()`ed; pipeline/outputs.py).

    The arrays are created with their full shape; rows are written one chunk (`chunk_rows` rows) at a
    time, and each finished chunk is recorded atomically in `<path>/progress.json`. A rerun with the same
    `build_key` (a digest of everything that determines the tokens: inputs, tokenizer, settings) resumes
    with the chunks still missing, after checking that every chunk the progress file lists exists and
    decodes (a deleted or damaged one is encoded again); a store of ours left by other settings is
    replaced. A chunk written with its input record (`write_chunk(..., inputs)`) has the digest of its
    inputs in the progress file; `drop_changed` un-does the chunks whose images changed since, so a resumed
    store never mixes old and new encodings. `finish()` computes the fingerprint, streaming, records the
    digest of all inputs (when every chunk has one) and marks the store complete.
    """

    def __init__(self, path: str | os.PathLike, labels: np.ndarray, views: int, seq_len: int, attrs: dict,
                 build_key: str, chunk_rows: int = 1024):
        import zarr

        missing = [k for k in _TOKEN_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"token store attributes missing: {missing}")
        self.path, self.chunk_rows = Path(path), max(1, chunk_rows)
        self.num_rows, self.shape = len(labels), (len(labels), views, seq_len)
        self.progress_file = self.path / "progress.json"
        self.done: set[int] = set()
        self.chunk_inputs: dict[int, str] = {}  # chunk -> digest of the inputs it was encoded from
        self.complete = False
        existing = store_attrs(self.path) or {}
        same = existing.get("build_key") == build_key and existing.get("format_version") == TOKENS_FORMAT_VERSION
        if same and "fingerprint" in existing:
            self.complete = True
            return
        if same and self.progress_file.is_file():
            self.group = zarr.open_group(str(self.path), mode="r+")
            saved = json.loads(self.progress_file.read_text(encoding="utf-8"))
            self._repair_labels(labels)
            self.done = self._verified(set(saved["done_chunks"]))
            self.chunk_inputs = {int(k): v for k, v in saved.get("chunk_inputs", {}).items() if int(k) in self.done}
            return
        if self.path.exists():
            shutil.rmtree(self.path)  # ours (a Claim checked the format marker), from other settings
        attrs = {"family": TOKENS_LEGACY_FAMILY, **attrs, "seq_len": seq_len, "format": TOKENS_FORMAT,
                 "format_version": TOKENS_FORMAT_VERSION, "num_classes": len(attrs["class_names"]), "build_key": build_key}
        self.group = zarr.open_group(str(self.path), mode="w", attributes=attrs)
        rows = min(self.chunk_rows, max(1, self.num_rows))
        self.chunk_rows = rows
        config = {"write_empty_chunks": True}  # see write_chunk
        self.group.create_array("tokens", shape=self.shape, dtype=np.uint16, chunks=(rows, views, seq_len),
                                compressors=_codecs(), fill_value=0, config=config)
        self.group.create_array("labels", data=labels.astype(np.int32), chunks=(rows,), compressors=_codecs(), config=config)
        self._save_progress()

    def _repair_labels(self, labels: np.ndarray) -> None:
        """Write the labels again if a chunk of them is missing or damaged (they are known: no encoding)."""
        array = self.group["labels"]
        for chunk in range(-(-array.shape[0] // array.chunks[0])):
            try:
                _read_chunk(self.path, array, chunk)
            except FormatError as e:
                log.warning("%s; writing the labels again", e)
                array.with_config({"write_empty_chunks": True})[:] = labels.astype(np.int32)
                return

    def _verified(self, done: set[int]) -> set[int]:
        """The chunks of the progress file whose files exist and decode; the others are redone."""
        bad = []
        for chunk in sorted(done):
            try:
                _read_chunk(self.path, self.group["tokens"], chunk)
            except FormatError as e:
                bad.append(chunk)
                log.warning("%s; encoding chunk %d again", e, chunk)
        return done - set(bad)

    def drop_changed(self, current: dict[int, str | None]) -> list[int]:
        """Forget the finished chunks whose inputs' digest is not `current[chunk]` (the images changed since
        they were encoded, or the digest is unknown): they are encoded again. Returns them."""
        changed = sorted(k for k in self.done if k in current and (current[k] is None or current[k] != self.chunk_inputs.get(k)))
        for chunk in changed:
            self.done.discard(chunk)
            self.chunk_inputs.pop(chunk, None)
        if changed:
            log.info("%s: the images of %d finished chunks changed since they were encoded (e.g. chunk %d): "
                     "encoding them again", self.path, len(changed), changed[0])
            self._save_progress()
        return changed

    def _save_progress(self) -> None:
        write_text(self.progress_file, json.dumps({"done_chunks": sorted(self.done),
                                                   "chunk_inputs": {str(k): v for k, v in sorted(self.chunk_inputs.items())}}))

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.num_rows)

    def pending_chunks(self) -> list[int]:
        return [] if self.complete else [k for k in range(self.num_chunks) if k not in self.done]

    def write_chunk(self, chunk: int, tokens: np.ndarray, inputs: list[InputFile] | None = None) -> None:
        """Write one chunk's tokens; `inputs`: the record of the images they were encoded from, one per row."""
        start, stop = self.chunk_range(chunk)
        if tokens.shape[0] != stop - start or (inputs is not None and len(inputs) != stop - start):
            raise ValueError(f"chunk {chunk} needs {stop - start} rows, got {tokens.shape[0]}")
        if inputs is not None:
            digest = chunk_inputs_digest(inputs)
            write_json(self.path / INPUTS_DIR / f"{chunk}.json", {"digest": digest, "files": [list(f) for f in inputs]})
            self.chunk_inputs[chunk] = digest
        # every chunk is written, even one equal to the fill value (which zarr skips by default, and the
        # setting is not stored with the array), so that a missing chunk file always means damage
        self.group["tokens"].with_config({"write_empty_chunks": True})[start:stop] = tokens.astype(np.uint16)
        self.done.add(chunk)
        self._save_progress()

    def finish(self) -> str:
        if self.complete:
            return store_attrs(self.path)["fingerprint"]
        if self.pending_chunks():
            raise RuntimeError(f"{self.path}: chunks {self.pending_chunks()[:5]}... were never written")
        fingerprint = stream_fingerprint(self.path, self.group["tokens"], self.group["labels"], self.shape, self.chunk_rows)
        if len(self.chunk_inputs) == self.num_chunks:
            self.group.attrs["inputs_digest"] = inputs_digest([self.chunk_inputs[k] for k in range(self.num_chunks)])
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


def upgrade_token_store(path: str | os.PathLike) -> str:
    """Rewrite a format-1 store as the current format (chunk checksums, fingerprint kept), built beside and
    swapped in; its tokens are copied, never re-encoded. Returns the fingerprint."""
    import zarr

    path = Path(path)
    attrs = store_attrs(path)
    if attrs is None or "fingerprint" not in attrs:
        raise FormatError(f"{path} is not a complete cca-pipe token store; {REBUILD_STORE}")
    if attrs.get("format_version") == TOKENS_FORMAT_VERSION:
        log.info("%s is already format version %d", path, TOKENS_FORMAT_VERSION)
        return attrs["fingerprint"]
    group = zarr.open_group(str(path), mode="r")
    tokens, labels = group["tokens"], group["labels"]
    keep = {k: v for k, v in attrs.items() if k not in ("format", "format_version", "fingerprint", "build_key", "seq_len")}
    with claim_token_store(path, "cca-pipe upgrade-store") as claim:
        claim.discard_partial()
        writer = TokenStoreWriter(claim.partial, labels[...], tokens.shape[1], tokens.shape[2], keep,
                                  build_key=attrs.get("build_key", "upgraded"), chunk_rows=tokens.chunks[0])
        for chunk in progress(writer.pending_chunks(), desc="upgrade-store", unit="chunk"):
            writer.write_chunk(chunk, tokens[slice(*writer.chunk_range(chunk))])
        fingerprint = writer.finish()
        if fingerprint != attrs["fingerprint"]:
            raise FormatError(f"{path}: its tokens do not match its stored fingerprint (damaged?); nothing was changed; "
                              f"{REBUILD_STORE}")
        claim.commit_path()
    return fingerprint
