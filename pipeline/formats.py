"""On-disk data formats, documented and validated in one place.

Token store (stage `tokenize`; code in pipeline/tokenstore.py), a Zarr v3 group, e.g. `data/tokens/train.zarr`:
    tokens   (N, A, L) uint16   VQ codes; A augmented views per image. Layout by `family`:
                                  "llamagen": L = grid*grid tokens, row-major;
                                  "var": L = sum(pn^2) (680), the pn x pn maps of `patch_nums`, each
                                  row-major, concatenated coarse to fine (scale k = tokens[..., b_k:e_k])
    labels   (N,)      int32    class index in [0, num_classes), ImageFolder order (sorted folder names)
    attrs:   format ("cca-pipe/tokens"), format_version (2), family ("llamagen" | "var" | a plugin family's
             registered name, pipeline.families; absent: "llamagen"), seq_len (L),
             patch_nums (var only), tokenizer_sha256, codebook_size, image_size, grid, augmentations
             (list of view names, length A), class_names (list, length num_classes), num_classes,
             build_key (digest of the image paths, labels, tokenizer and settings), settings (the resolved
             tokenize settings), inputs_digest (sha256 of the chunks' input digests, in order: what the
             images contained; absent in stores written without an input record, e.g. import-codes),
             fingerprint (sha256 of the shapes/dtypes header + tokens bytes + labels bytes, computed chunk by
             chunk when the store is finished; present only once it is complete). The encoder's version
             (pipeline.versions.TOKEN_ENCODING_VERSION) is part of build_key from version 2 on.
    inputs/<k>.json  the input record of chunk k: {"digest": sha256 of its [[path, sha256], ...],
             "files": [[path relative to the image folder, size, mtime_ns, sha256 of the file's bytes, ctime_ns,
             inode (signed 64-bit)], ...]} one entry per row (entries written before ctime and inode were kept
             have the first four only). tokenize re-checks an unchanged tree with one stat() per image (size,
             mtime_ns, ctime_ns and inode equal to the record: its digest is reused; DVC's rule, plus ctime and
             inode, which a rewrite keeping size and mtime moves), hashes only images whose stat changed (or all,
             with --rehash), records the new stat of those whose bytes had not changed, and is "up to date"
             only if build_key and inputs_digest both match.
A store of DDO's fakes (stage `negatives`, docs/ddo.md) has the same arrays and attributes with one view
("sample"), labels the real rows' repeated ratio times, and the attribute `negatives`: {ref_ckpt_sha256 (the
reference that drew them), real_tokens_fingerprint and real_rows (the real store they pair with), seed,
ratio, pairs (fake row j pairs with real row j // ratio, drawn from the stream of (seed, j)), sampler
(cfg_scale, cfg_schedule, temperature, top_k, top_p), reencode (decoded and encoded again by the tokenizer)};
`settings` holds the negatives settings and `source` the reference's path; it has no input record.
Chunked along N (chunk_rows rows; labels chunked alike), codecs: Blosc zstd + bitshuffle, then crc32c (a
checksum zarr verifies on every read); every chunk is written (a missing chunk file is damage). While being
written, `progress.json` lists finished chunks and the digest of each one's inputs ({"done_chunks": [k, ...],
"chunk_inputs": {"k": digest}}), so an interrupted tokenize resumes (TokenStoreWriter), encoding again any
finished chunk whose images changed since.
Format 1 (no checksums) is converted by `cca-pipe upgrade-store` (same tokens, same fingerprint).

Reference log-prob cache (stage `reflogp`), a Parquet file, e.g. `data/reflogp/ref_logp.parquet`:
    One cache row per image (reflogp.views = "one") or per (image, view) ("all"), per visit: a cache of V
    visits (reflogp.visits) holds V blocks of R rows, visit v at cache rows [v R, (v+1) R), each block
    every image (view) once with its own seeded views ("one"), negatives and dropout masks; train's
    epoch e reads visit e. Visit 0 is the one-visit cache row for row (pipeline.refcache.draw_pairs).
    row            int64    index into the token store
    label          int32    c
    neg_label      int32    c_neg, fixed at cache time (seeded); != c unless negatives "roll"
    view           int16    which augmentation view of the row, fixed at cache time (seeded)
    ref_logp_pos   float64  log p_phi(x_view | c)      (sum over L tokens, float32 log-softmax)
    ref_logp_neg   float64  log p_phi(x_view | c_neg)
    ref_logp_null  float64  log p_phi(x_view | null)   (used by unconditional rows, CCA+CFG)
    schema metadata (provenance, checked by `train`): format, format_version, tokens_fingerprint,
             ref_ckpt_sha256, seed, views, negatives ("other" | "roll": rows with neg_label == label are
             then positives twice), num_classes, null_class, seq_len, batch_size, logp_version (pipeline.versions.LOGP_VERSION of the
             code that computed it: a reader refuses another version; absent in caches written before versions
             were recorded: taken as 1, with a note), logp_code ({source file: sha256} of that code: a note for
             the curious, never a reason to refuse; a resumed computation ignores it too), settings,
             dropout and drop_path (the reference's rates; 0: eval mode; absent in older caches: 0), mask_rule
             ("eval", or how the train-mode masks were drawn: one draw per cache row keyed by (seed, row,
             pos|neg|null), pipeline.models.layers.noise_keys; independent of batch_size, parts and processes),
             content_sha256 ({column: sha256 of its values in row order, as little-endian bytes of the schema's
             type}, of the whole file, written with it; verified on every whole read, so any change to the values
             after they were written is refused; absent in caches written before it existed: accepted with a note),
             visits (the number of visit blocks; absent in older caches: 1)
    A DDO cache (reflogp --negatives STORE, docs/ddo.md) has two more columns, after those:
    fake_row       int64    the row of the negatives store (stages/negatives.py) paired with this cache row:
                            image i's fakes are rows [i r, (i+1) r) (r: the store's ratio), visit v takes fake
                            v mod r (pipeline.refcache.fake_rows)
    ref_logp_fake  float64  log p_phi(x_fake | c), c the real row's label, with the masks of role "fake"
                            (pipeline.models.layers.SEPARATE_ROLES), the null-label mask being the real row's
    ref_logp_fake_j float64 (only with ratio r > 1, j = 1 .. r-1) the same of the image's fake in slot j, store
                            row i r + (v + j) mod r, masks of role "fake" slot j (pipeline.models.layers
                            noise_keys): every cache row pairs with all r fakes of its image (the loss's fake
                            term is their mean, docs/ddo.md), slot 0 being fake_row
    and in its provenance fakes_fingerprint (the negatives store's fingerprint, checked by train) and
    fakes_ratio. Its content_sha256 covers these columns; a reader of before refuses it (schema).

Sample batch (stage `eval`, read by `score`, `report` and `info`), the ADM evaluator's `.npz`, e.g.
`data/eval/samples/cca_seed0.npz`:
    arr_0         (N, H, W, 3) uint8   the images, in a shuffled order: the ADM evaluator's IS takes
                                       contiguous splits of arr_0 (docs/imagenet.md, "Evaluation protocol")
    arr_1         (N,) int64           each image's intended class, paired with arr_0 row by row
    sample_index  (N,) int64           row i of arr_0/arr_1 is sample sample_index[i] of the set's sampling
                                       order (class by class); absent in files of other samplers
arr_0 and arr_1 come first (the evaluator reads arr_0 by name and ignores the other arrays); np.savez dates
every entry 1980-01-01, so the same samples give the same bytes.

Train run folder (stage `train`, e.g. `data/train`): policy.pt, settings.yaml, checkpoints/ and
    metrics.jsonl  one JSON object per optimiser step: {"step", "loss", "rewards/pos", "rewards/neg", "lr", ...}
    metrics.csv    the same rows as CSV (x = step), for `dvc plots`
    metrics.json   the run's end: steps, seconds, peak_rss_mb, memory, final (the last step's row), params
                   (train's resolved settings); a dvc.yaml `metrics:` file, as eval's metrics.json (`dvc metrics show`)
    live/          DVCLive's files, written as the run goes (pipeline/live.py): plots/metrics/<name>.tsv (step,
                   value) per metric, metrics.json (the latest values); absent in runs written before 2026-12-07
Runs written before 2026-12-07 named these log.jsonl, log.csv and summary.json; readers take either
(train_run_file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .live import LIVE_DIR
from .outputs import Claim, atomic_file, is_atomic_leftover
from .versions import LOGP_VERSION

log = logging.getLogger(__name__)


# a train run folder's files (see the module's docstring); StepLog writes TRAIN_STEP_LOG + ".jsonl" / ".csv"
TRAIN_STEP_LOG = "metrics"
TRAIN_STEP_CSV = f"{TRAIN_STEP_LOG}.csv"  # what `dvc plots` and the report read
TRAIN_METRICS = "metrics.json"
_OLD_TRAIN_NAMES = {"metrics.json": "summary.json", "metrics.jsonl": "log.jsonl", "metrics.csv": "log.csv"}


def train_run_file(folder: str | os.PathLike, name: str) -> Path:
    """`folder/name`, `name` one of a train folder's metrics.json, metrics.jsonl, metrics.csv; in a run written
    before they had these names, where only the old name (summary.json, log.jsonl, log.csv) exists, that file."""
    path, old = Path(folder) / name, Path(folder) / _OLD_TRAIN_NAMES[name]
    return old if not path.exists() and old.exists() else path


TOKENS_FORMAT = "cca-pipe/tokens"
TOKENS_FORMAT_VERSION = 2
TOKENS_LEGACY_FAMILY = "llamagen"  # a store without a `family` attribute (written before VAR) holds LlamaGen's tokens
CACHE_FORMAT = "cca-pipe/ref-logp"
CACHE_FORMAT_VERSION = 1


class FormatError(ValueError):
    """A data file that does not match its documented format; the message names the file and the fix."""


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
# A DDO cache (reflogp --negatives, docs/ddo.md) is a CCA cache with two more columns, after CACHE_SCHEMA's
DDO_FIELDS = [("fake_row", pa.int64()), ("ref_logp_fake", pa.float64())]
DDO_CACHE_SCHEMA = pa.schema([*CACHE_SCHEMA, *DDO_FIELDS])
FAKES_KEY = "fakes_fingerprint"  # provenance key of a DDO cache: the negatives store's fingerprint


def fake_columns(ratio: int) -> tuple[str, ...]:
    """A DDO cache's log-prob columns of the fakes each row pairs with, by slot: ref_logp_fake (slot 0, the fake
    of fake_row), then ref_logp_fake_1 ... ref_logp_fake_{r-1} for negatives of ratio r > 1."""
    return ("ref_logp_fake", *(f"ref_logp_fake_{j}" for j in range(1, ratio)))


def cached_fake_columns(columns) -> tuple[str, ...]:
    """The fake columns (fake_columns) among a cache's column names; () for a CCA cache."""
    ratio = 0
    while fake_columns(ratio + 1)[-1] in columns:
        ratio += 1
    return fake_columns(ratio) if ratio else ()


def ddo_cache_schema(ratio: int) -> pa.Schema:
    """A DDO cache's schema for negatives of `ratio` fakes per image: DDO_CACHE_SCHEMA, then the slots > 0."""
    return pa.schema([*DDO_CACHE_SCHEMA, *((name, pa.float64()) for name in fake_columns(ratio)[1:])])


def cache_schema(columns) -> pa.Schema:
    """The schema of a cache of these column names: a DDO cache's when it has ref_logp_fake, else CCA's."""
    fakes = cached_fake_columns(columns)
    return ddo_cache_schema(len(fakes)) if fakes else CACHE_SCHEMA
_CACHE_META = ("tokens_fingerprint", "ref_ckpt_sha256", "seed", "num_classes", "null_class", "seq_len")
REBUILD_CACHE = "rebuild it with `cca-pipe reflogp` (or `dvc repro reflogp`)"
CONTENT_KEY = "content_sha256"  # provenance key: the digest of each column's values, written with the cache
NOTE_KEYS = ("logp_code",)  # provenance recorded for people, never compared (a resumed computation keeps its parts)


class ColumnDigests:
    """sha256 of each cache column's values in row order, as little-endian bytes of its schema type: what
    a cache's CONTENT_KEY records. Fed part by part (update), it gives the digest of the concatenation."""

    def __init__(self):
        self.hashes = {f.name: hashlib.sha256() for f in CACHE_SCHEMA}

    def update(self, columns: dict[str, np.ndarray]) -> ColumnDigests:
        schema = cache_schema(columns)
        for f in schema:
            self.hashes.setdefault(f.name, hashlib.sha256())
            dtype = np.dtype(f.type.to_pandas_dtype()).newbyteorder("<")
            self.hashes[f.name].update(np.ascontiguousarray(np.asarray(columns[f.name]), dtype=dtype).tobytes())
        return self

    def hexdigests(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self.hashes.items()}


def _with_meta(schema: pa.Schema, meta: dict) -> pa.Schema:
    return schema.with_metadata({k.encode(): json.dumps(v).encode() for k, v in meta.items()})


def _cache_table(columns: dict[str, np.ndarray], provenance: dict) -> pa.Table:
    missing = [k for k in _CACHE_META if k not in provenance]
    if missing:
        raise ValueError(f"cache provenance missing: {missing}")
    schema = cache_schema(columns)
    columns = {f.name: np.asarray(columns[f.name]) for f in schema}
    # the digest is always of these columns (a provenance read from another cache may carry that one's)
    meta = {**{k: v for k, v in provenance.items() if k != CONTENT_KEY}, "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION, CONTENT_KEY: ColumnDigests().update(columns).hexdigests()}
    return pa.Table.from_pydict(columns, schema=_with_meta(schema, meta))


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
    """An unfinished cache of ours: a directory of nothing but part files (and their .gitignore, the progress
    reflogp logs there: a LIVE_DIR folder, pipeline/live.py, and the temporary file of a part being written when
    the run was killed)."""
    return path.is_dir() and all(p.name == ".gitignore" or (p.name.startswith("part-") and p.suffix == ".parquet")
                                 or (p.name == LIVE_DIR and p.is_dir()) or is_atomic_leftover(p) for p in path.iterdir())


def claim_ref_cache(path: str | os.PathLike) -> Claim:
    return Claim(path, what="cca-pipe reflogp", owned=is_ref_cache, owned_partial=_is_parts_dir)


class RefCacheParts:
    """Resumable computation of a cache: rows are computed in parts of `part_rows`, each written atomically
    to `<dir>/part-<k>.parquet` with the provenance (`dir`: the Claim's `.partial` directory); a rerun keeps
    the parts whose provenance matches and whose values match their digest, and computes the rest; `merge()` writes the single cache file and
    removes the parts."""

    def __init__(self, path: str | os.PathLike, num_rows: int, part_rows: int, provenance: dict, parts_dir: Path,
                 create: bool = True):
        self.path, self.num_rows, self.part_rows = Path(path), num_rows, max(1, part_rows)
        self.provenance = provenance
        self.dir = parts_dir
        if create:  # by one process (the main one under torchrun)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / ".gitignore").write_text("# partial reference cache, merged and removed when complete\n*\n", encoding="utf-8")
            for leftover in filter(is_atomic_leftover, self.dir.iterdir()):  # a part a killed run was writing
                leftover.unlink(missing_ok=True)

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
                    table = pq.read_table(p)
                    rows = table.num_rows
                    if CONTENT_KEY in meta and ColumnDigests().update(
                            {name: table.column(name).to_numpy() for name in table.column_names}).hexdigests() != meta[CONTENT_KEY]:
                        rows = -1  # its values are not those written: the merged cache's digest would vouch for them
                except Exception:  # a damaged part is recomputed
                    meta, rows = {}, -1
                if all(meta.get(key) == value for key, value in self.provenance.items() if key not in NOTE_KEYS) and \
                        rows == self.part_range(k)[1] - self.part_range(k)[0]:
                    done.append(k)
        return [k for k in range(self.num_parts) if k not in done]

    def write_part(self, k: int, columns: dict[str, np.ndarray]) -> None:
        write_ref_cache(self.part_path(k), columns, self.provenance)

    def merge(self) -> None:
        """One file, each part a Parquet row group (so a range of rows is read without the rest), with the
        content digest of all its rows (a first pass over the parts: they are small next to the tokens)."""
        digests = ColumnDigests()
        for k in range(self.num_parts):
            table = pq.read_table(self.part_path(k))
            digests.update({name: table.column(name).to_numpy() for name in table.column_names})
        schema = pq.read_schema(self.part_path(0))
        meta = {k.decode(): json.loads(v) for k, v in (schema.metadata or {}).items()}
        schema = _with_meta(schema, {**meta, CONTENT_KEY: digests.hexdigests()})
        with atomic_file(self.path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for k in range(self.num_parts):
                writer.write_table(pq.read_table(self.part_path(k)))
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


def read_ref_cache(path: str | os.PathLike, expect: dict | None = None, store=None, rows: tuple[int, int] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """Read the cache, check its schema, that its provenance matches `expect` (e.g. the tokens'
    fingerprint and the reference checkpoint's sha256) and its contents (validate_ref_cache; against the
    token store, a pipeline.tokenstore.TokenStore, when given). `rows` = (start, stop): only those cache
    rows, reading only the row groups that hold them (their contents checked, not the whole cache's
    completeness). Returns (columns, provenance)."""
    path = Path(path)
    meta = read_cache_provenance(path)
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise FormatError(f"{path}: not a cca-pipe reference cache v{CACHE_FORMAT_VERSION}; {REBUILD_CACHE}")
    version = cache_logp_version(path, meta)
    if version != LOGP_VERSION:
        raise FormatError(f"{path} is stale: its log-probs were computed by log-prob version {version!r}, this cca-pipe "
                          f"computes version {LOGP_VERSION}; {REBUILD_CACHE}")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            if isinstance(value, dict) and isinstance(meta.get(key), dict):  # a digest per source file
                changed = sorted(k for k in set(value) | set(meta[key]) if value.get(k) != meta[key].get(k))
                what = f"its {key} differs in {changed}: that code changed since the cache was computed"
            else:
                what = f"its {key} is {meta.get(key)!r} but the current input has {value!r}"
            raise FormatError(f"{path} is stale: {what}. Rebuild it with `cca-pipe reflogp` (or `dvc repro reflogp`).")
    try:
        table = pq.read_table(path) if rows is None else _read_rows(pq.ParquetFile(path), *rows)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path}: cannot read its rows ({e}); {REBUILD_CACHE}") from e
    schema = table.schema.remove_metadata()
    documented = ddo_cache_schema(int(meta.get("fakes_ratio", 1))) if FAKES_KEY in meta else CACHE_SCHEMA
    if not schema.equals(documented):
        raise FormatError(f"{path}: columns {schema.names} ({', '.join(map(str, schema.types))}) differ from the documented "
                          f"schema ({', '.join(f'{f.name}: {f.type}' for f in documented)}); {REBUILD_CACHE}")
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    validate_ref_cache(path, columns, meta, store, complete=rows is None)
    if rows is None:
        verify_cache_content(path, columns, meta)
    return columns, meta


def cache_logp_version(path: Path, meta: dict):
    """The LOGP_VERSION a cache was computed by. Caches written before versions were recorded carry only the
    file digest (logp_code), which is no reason to refuse (rebuilding an ImageNet cache costs GPU-hours):
    they are version 1, the version of the code that wrote them, with a note; train's step-0 check still
    recomputes 64 of their rows (docs/safety.md)."""
    if "logp_version" in meta:
        return meta["logp_version"]
    log.warning("%s records no logp_version (written before cca-pipe versioned its log-prob computation): taken as "
                "version 1; train's step-0 check recomputes some of its rows", path)
    return 1


def verify_cache_content(path: Path, columns: dict[str, np.ndarray], meta: dict) -> None:
    """Refuse a cache whose values are not the ones written with it (its CONTENT_KEY): a cell edited, rows
    swapped, a column replaced. A cache written before the digest existed is accepted with a note."""
    recorded = meta.get(CONTENT_KEY)
    if recorded is None:
        log.warning("%s has no content digest (written before cca-pipe recorded one): its values cannot be checked "
                    "against what was written; %s to add one", path, REBUILD_CACHE)
        return
    now = ColumnDigests().update(columns).hexdigests()
    changed = [name for name in now if not isinstance(recorded, dict) or recorded.get(name) != now[name]]
    if changed:
        raise FormatError(f"{path}: the values of column(s) {', '.join(changed)} are not those written with the cache "
                          f"(its {CONTENT_KEY} differs): it was edited or damaged after `cca-pipe reflogp` wrote it; "
                          f"{REBUILD_CACHE}")


def _read_rows(parquet: pq.ParquetFile, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, from the row groups that overlap them only."""
    groups, first, offset = [], None, 0
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return parquet.schema_arrow.empty_table()
    return parquet.read_row_groups(groups).slice(start - first, stop - start)


def validate_ref_cache(path: Path, columns: dict[str, np.ndarray], meta: dict, store=None, complete: bool = True) -> None:
    """The cache's contents, checked once at read time (one clear error instead of a NaN loss steps later,
    an IndexError, or training on garbage): finite log-probs; rows, views and labels in range; with the
    token store: labels equal the store's and every expected (row, view) present exactly once; negatives
    differ from their positives."""

    def fail(what: str, bad: np.ndarray) -> None:
        first = int(np.flatnonzero(bad)[0])
        raise FormatError(f"{path}: {int(bad.sum())} cache rows {what} (first: cache row {first}); {REBUILD_CACHE}")

    for name in (*LOGP_COLUMNS, *cached_fake_columns(columns)):
        bad = ~np.isfinite(columns[name])
        if bad.any():
            fail(f"have a non-finite {name}", bad)
    if "fake_row" in columns and (columns["fake_row"] < 0).any():
        fail("have a negative fake_row", columns["fake_row"] < 0)
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
    if not complete:
        return
    visits = meta.get("visits", 1)
    if not isinstance(visits, int) or visits < 1:
        raise FormatError(f"{path}: provenance visits is {visits!r}; {REBUILD_CACHE}")
    per_visit = n * a if meta.get("views") == "all" else n
    keys = rows.astype(np.int64) * a + views if meta.get("views") == "all" else rows.astype(np.int64)
    expected = visits * per_visit
    if len(keys) == expected:  # each visit block holds every (row, view) once
        keys = keys + np.arange(len(keys)) // per_visit * per_visit
    counts = np.bincount(keys, minlength=expected)
    if len(keys) != expected or (counts != 1).any():
        missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
        unit = "(row, view) pairs" if meta.get("views") == "all" else "rows"
        raise FormatError(f"{path}: {len(keys)} cache rows for {visits} visit(s) of {per_visit} token-store {unit}: {missing} "
                          f"missing, {repeated} present more than once; {REBUILD_CACHE}")


# ----------------------------------------------------------------------------- sample batch (ADM evaluator)

SAMPLE_INDEX = "sample_index"
ADM_LAYOUT = "the ADM evaluator's layout: arr_0 uint8 N x H x W x 3 images, 0-255"


def write_sample_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, sample_index: np.ndarray) -> None:
    """The batch atomically, arrays in the documented order (arr_0, arr_1 first)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels, **{SAMPLE_INDEX: sample_index})


def read_sample_batch(path: str | os.PathLike, labels: bool = False,
                      sample_order: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(arr_0 checked to be uint8 N x H x W x 3, arr_1 checked to pair with it if `labels` and the file has it,
    else None), in the file's order, or with `sample_order` in sampling order (sorted back by sample_index,
    when the file has one)."""
    path = Path(path)
    unreadable = f"samples {path} is not a readable .npz of arrays ({{}}): expected {ADM_LAYOUT}"
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # not an archive, or a pickle
        raise FormatError(unreadable.format(" ".join(str(e).split())[:200])) from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise FormatError(unreadable.format("it holds one bare array, a .npy") + "; save it with np.savez(path, arr_0=images)")
    try:
        with f:
            if "arr_0" not in f.files:
                raise FormatError(f"samples {path} has no arr_0 (it holds {', '.join(f.files) or 'no arrays'}): expected "
                                  f"{ADM_LAYOUT}; save them with np.savez(path, arr_0=images)")
            images = f["arr_0"]
            found = f["arr_1"] if labels and "arr_1" in f.files else None
            index = f[SAMPLE_INDEX] if sample_order and SAMPLE_INDEX in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a damaged member
        if isinstance(e, FormatError):
            raise
        raise FormatError(unreadable.format(" ".join(str(e).split())[:200])) from e
    _check_sample_images(path, images.shape, images.dtype)
    if found is not None:
        _check_sample_labels(path, found.shape, found.dtype, len(images))
    if index is not None:
        _check_sample_index(path, index, len(images))
        rows = np.argsort(index)
        images, found = images[rows], None if found is None else found[rows]
    return images, found


def _check_sample_images(path: Path, shape: tuple, dtype: np.dtype) -> None:
    if dtype != np.uint8:
        raise FormatError(f"samples {path}: arr_0 is {dtype}, expected uint8 pixels 0-255 ({ADM_LAYOUT}): "
                          "convert the images to uint8 before saving")
    if len(shape) != 4 or shape[-1] != 3:
        hint = ("it looks channels-first (N x 3 x H x W): save arr_0.transpose(0, 2, 3, 1)"
                if len(shape) == 4 and shape[1] == 3 else "save the images as one N x H x W x 3 array")
        raise FormatError(f"samples {path}: arr_0 has shape {shape}, expected N x H x W x 3 (channels last); {hint}")


def _check_sample_labels(path: Path, shape: tuple, dtype: np.dtype, n: int) -> None:
    if tuple(shape) != (n,) or dtype.kind not in "iu":
        raise FormatError(f"samples {path}: arr_1 is {dtype} {tuple(shape)}, expected the {n} integer labels "
                          "of arr_0's images, or no arr_1")


def _check_sample_index(path: Path, index: np.ndarray, n: int) -> None:
    if index.shape != (n,) or not np.array_equal(np.sort(index), np.arange(n)):
        raise FormatError(f"samples {path}: {SAMPLE_INDEX} is not a permutation of the {n} rows: rewrite "
                          "the file with `cca-pipe eval`, or drop that array")


def sample_batch_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array of an .npz as (shape, dtype), from the .npy headers alone: arr_0 of 50,000 256px images is
    9.8 GB, never read to describe the file. One FormatError naming the file if it is not an .npz of arrays."""
    path = Path(path)
    unreadable = f"samples {path} is not a readable .npz of arrays ({{}}): expected {ADM_LAYOUT}"
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise FormatError(unreadable.format("it holds one bare array, a .npy") +
                                  "; save it with np.savez(path, arr_0=images)")
        arrays = {}
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in readers:
                        raise ValueError(f"{name}: .npy format version {version}")
                    shape, _, dtype = readers[version](member)
                arrays[name[: -len(".npy")]] = (tuple(shape), dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(unreadable.format(" ".join(str(e).split())[:200])) from e
    return arrays


def inspect_sample_batch(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], np.ndarray | None,
                                                          np.ndarray | None]:
    """(sample_batch_header, arr_1 or None, sample_index or None), checked as read_sample_batch checks them,
    without reading arr_0: what `cca-pipe info` describes."""
    path = Path(path)
    arrays = sample_batch_header(path)
    if "arr_0" not in arrays:
        raise FormatError(f"samples {path} has no arr_0 (it holds {', '.join(arrays) or 'no arrays'}): expected "
                          f"{ADM_LAYOUT}; save them with np.savez(path, arr_0=images)")
    _check_sample_images(path, *arrays["arr_0"])
    n = arrays["arr_0"][0][0]
    if "arr_1" in arrays:
        _check_sample_labels(path, *arrays["arr_1"], n)
    try:
        with np.load(path, allow_pickle=False) as f:
            labels = f["arr_1"] if "arr_1" in arrays else None
            index = f[SAMPLE_INDEX] if SAMPLE_INDEX in arrays else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FormatError(f"samples {path}: an array cannot be read ({' '.join(str(e).split())[:200]}): the file is "
                          "damaged; write it again") from e
    if index is not None:
        _check_sample_index(path, index, n)
    return arrays, labels, index
