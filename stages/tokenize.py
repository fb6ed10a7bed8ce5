"""Stage `tokenize`: class-folder images -> frozen VQ tokenizer (LlamaGen's VQ or VAR's multi-scale VQVAE) -> Zarr token store.

    cca-pipe tokenize --images data/images/train --vq data/vq/vq.pt --out data/tokens/train.zarr
    cca-pipe tokenize --images /data/imagenet/train --vq vq_ds16_c2i.pt --vq-model VQ-16 --out tokens.zarr

Preprocessing is LlamaGen's (ADM center crop, [-1, 1]); `tokenize.augment` picks the views: none (A=1),
flip (A=2), tencrop (A=10, of a 1.1x center crop), shift1 (A=9, the embedded default). Class index =
sorted folder order (torchvision ImageFolder). Resumable: finished chunks are kept, so rerunning after
an interruption continues and gives the same arrays as an uninterrupted run (encode batches never
straddle chunks). Keyed by content: the store keeps each image's size, mtime_ns, ctime_ns, inode and
sha256 (its input record), so a rerun on an unchanged tree is "up to date" after one stat() per image, an
image whose bytes changed (same name) makes it encode again, and a resumed run re-encodes every finished
chunk whose images changed (a store never mixes old and new encodings). `--rehash` hashes every image
whatever its stat (docs/safety.md says which edits the stat shortcut sees). Runs on CUDA when present (float32, as LlamaGen's
extract_codes_c2i.py).
Format: pipeline/formats.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting, settings_digest
from pipeline.families import load_tokenizer
from pipeline.host import loader_workers
from pipeline.hub import inputs_record
from pipeline.images import ImageFolderError, ImageViews, list_image_folder, open_rgb, path_key, view_names
from pipeline.progress import progress
from pipeline.tokenizers.encode import encode_views
from pipeline.tokenstore import (
    InputFile,
    TokenStoreWriter,
    chunk_inputs_digest,
    claim_token_store,
    damaged_chunks,
    input_file,
    inputs_digest,
    known_inputs,
    read_input_record,
    refresh_input_record,
    reopen_for_update,
    store_attributes,
    store_attrs,
)
from pipeline.versions import TOKEN_ENCODING_VERSION

from .cli.params import as_params

log = logging.getLogger(__name__)


@dataclass
class TokenizeConfig:
    image_size: int = setting(16, ge=1)
    augment: str = "shift1"  # none | flip | tencrop | shift1 | randcrop:<A> (VAR's resize 1.125x + random crop, A views)
    batch_size: int = setting(256, ge=1)  # images per encoder forward
    chunk_rows: int = setting(512, ge=1, multiple_of="batch_size")  # rows per Zarr chunk = resume unit
    # DataLoader processes decoding images (spawned: safe next to zarr's threads); at most one per usable CPU
    # (pipeline.host.loader_workers: more add memory, not speed)
    num_workers: int = setting(0, ge=0)
    # Corrupt/truncated images: "error" stops at the first one (naming it, leaving no store behind);
    # "skip" decodes every image once up front, drops the bad ones (listed in the store's attribute
    # skipped_files) and still fails if more than max_bad_fraction of the images are bad.
    bad_images: str = setting("error", choices=("error", "skip"))
    max_bad_fraction: float = setting(0.001, ge=0.0, le=1.0)
    # Scale-out: dask_workers > 0 encodes chunks on a dask cluster (a LocalCluster of that many worker
    # processes, or the cluster at dask_scheduler, e.g. "tcp://host:8786"); each worker loads the
    # tokenizer once and encodes with one thread; on CUDA, worker k on GPU k (dask_workers = the GPU count). Chunks are encoded with the same batches, so the tokens
    # are identical to an in-process run with one thread (OMP_NUM_THREADS=1); with another thread count,
    # float summation order differs and an exact near-tie between two codes may flip (seen: 1 code in 24,576).
    dask_workers: int = setting(0, ge=0)
    dask_scheduler: str = ""
    # Images above this many pixels are refused (a decompression bomb: a 144-megapixel PNG takes 1.7 GB to
    # decode); PIL's own default limit. ImageNet's largest images have about 12 million.
    max_image_pixels: int = setting(89_478_485, ge=1)

    def __post_init__(self) -> None:
        check_ranges(self, "tokenize")
        try:
            view_names(self.augment)
        except ValueError as e:
            raise ConfigError(f"tokenize.augment: {e}") from None


def build_key(cfg: TokenizeConfig, paths: list[Path], labels: np.ndarray, tokenizer_sha256: str) -> str:
    """Everything that determines the tokens; a store with another key is not resumed but rebuilt. The
    encoder's version (pipeline.versions) enters it from version 2 on: the stores of version 1 keep their key."""
    version = [] if TOKEN_ENCODING_VERSION == 1 else [TOKEN_ENCODING_VERSION]
    return settings_digest([cfg, tokenizer_sha256, [path_key(p) for p in paths], hashlib.sha256(labels.tobytes()).hexdigest(),
                            *version])


def drop_bad_images(paths: list[Path], labels: np.ndarray, max_fraction: float,
                    max_pixels: int) -> tuple[list[Path], np.ndarray, list[str]]:
    """The "skip" policy: decode every image once; keep the readable ones."""
    bad = []
    for i, path in enumerate(progress(paths, desc="checking images", unit="img")):
        try:
            open_rgb(path, max_pixels)
        except ImageFolderError:
            bad.append(i)
    if len(bad) > max_fraction * len(paths):
        raise ImageFolderError(f"{len(bad)} of {len(paths)} images cannot be decoded (more than tokenize.max_bad_fraction = "
                               f"{max_fraction}), e.g. {[str(paths[i]) for i in bad[:5]]}: repair the data set")
    keep = np.setdiff1d(np.arange(len(paths)), bad)
    if bad:
        log.warning("skipping %d undecodable images, e.g. %s", len(bad), [str(paths[i]) for i in bad[:3]])
    return [paths[i] for i in keep], labels[keep], [str(paths[i]) for i in bad]


def encode_chunks(loader, vq, writer: TokenStoreWriter, chunk_rows: int, total: int, device: torch.device,
                  names: list[str]) -> None:
    """Encode batches in row order and write each chunk, with the record of its images (`names`: their paths
    relative to the image folder), as soon as its last row is encoded."""
    chunk_tokens: list[np.ndarray] = []
    chunk_inputs: list[InputFile] = []
    with progress(total=total, desc="tokenize", unit="img") as bar:
        for batch, row_index, keys, digests in loader:
            chunk_tokens.append(encode_views(vq, batch, device))
            chunk_inputs += [input_file(names[int(r)], tuple(k), d) for r, k, d in zip(row_index, keys.tolist(), digests)]
            bar.update(len(batch))
            chunk = int(row_index[0]) // chunk_rows
            if int(row_index[-1]) + 1 == writer.chunk_range(chunk)[1]:  # chunk complete: write it, record it done
                writer.write_chunk(chunk, np.concatenate(chunk_tokens), chunk_inputs)
                chunk_tokens, chunk_inputs = [], []


_WORKER_TOKENIZERS: dict = {}


def worker_device(device: str) -> str:
    """A dask worker's device: with "cuda", the GPU of its index (LocalCluster names workers 0, 1, ...;
    workers started by hand with CUDA_VISIBLE_DEVICES see one GPU each)."""
    if device != "cuda" or not torch.cuda.is_available():
        return device
    from distributed import get_worker

    name = str(get_worker().name)
    return f"cuda:{int(name) % torch.cuda.device_count() if name.isdigit() else 0}"


def encode_rows(paths: list[Path], rows: list[int], cfg: TokenizeConfig, vq_path: str, vq_model: str | None,
                device: str) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """One chunk on a dask worker: decode the images, encode them in cfg.batch_size batches (as the
    in-process path does), return uint16 (rows, A, L) and each image's (stat key, digest). The tokenizer is loaded once per worker process; on a
    machine with several GPUs each worker encodes on its own (worker k on GPU k mod the GPU count)."""
    device = worker_device(device)
    key = (vq_path, vq_model, device)
    if key not in _WORKER_TOKENIZERS:
        torch.set_num_threads(1)  # one thread per worker process: the cluster provides the parallelism
        _WORKER_TOKENIZERS[key] = load_tokenizer(vq_path, vq_model)[1].to(device).eval()
    vq = _WORKER_TOKENIZERS[key]
    dataset = ImageViews(paths, cfg.image_size, cfg.augment, rows, cfg.max_image_pixels)
    out, files = [], []
    for start in range(0, len(rows), cfg.batch_size):
        items = [dataset[i] for i in range(start, min(start + cfg.batch_size, len(rows)))]
        out.append(encode_views(vq, torch.stack([item[0] for item in items]), torch.device(device)))
        files += [(tuple(item[2].tolist()), item[3]) for item in items]
    return np.concatenate(out), files


@contextlib.contextmanager
def distributed_log_level(level: int) -> Iterator[None]:
    """dask's own loggers in this process at `level` (its scheduler and nannies run here) while inside."""
    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def local_cluster(workers: int):
    """A LocalCluster whose worker processes stay quiet and leave Ctrl-C to us: they start with SIGINT
    ignored (inherited; Python keeps an ignored SIGINT), so a Ctrl-C interrupts this process alone, which
    closes them, instead of printing a KeyboardInterrupt traceback from each; and their own logging shows
    only critical messages (at shutdown they log ERROR tracebacks about the scheduler they lost; a task's
    error re-raises here from its future)."""
    from distributed import LocalCluster

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    env_before = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    os.environ["DASK_LOGGING__DISTRIBUTED"] = "critical"  # read by each worker process as it imports distributed
    try:
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        if env_before is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED")
        else:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = env_before
        if main:
            signal.signal(signal.SIGINT, previous)


def encode_chunks_dask(cfg: TokenizeConfig, paths: list[Path], vq_path: Path, vq_model: str | None,
                       writer: TokenStoreWriter, pending: list[int], device: torch.device, names: list[str]) -> None:
    from distributed import Client

    with distributed_log_level(logging.ERROR):  # not its INFO chatter, nor its warnings about a busy event loop
        if cfg.dask_scheduler:
            client, cluster = Client(cfg.dask_scheduler), None
        else:
            cluster = local_cluster(cfg.dask_workers)
            client = Client(cluster)
        try:
            _run_dask_chunks(client, cfg, paths, vq_path, vq_model, writer, pending, device, names)
        finally:
            with distributed_log_level(logging.CRITICAL + 1):  # closing: what it logs now is about closing
                client.close()
                if cluster is not None:
                    cluster.close()


def _run_dask_chunks(client, cfg: TokenizeConfig, paths: list[Path], vq_path: Path, vq_model: str | None,
                     writer: TokenStoreWriter, pending: list[int], device: torch.device, names: list[str]) -> None:
    from distributed import as_completed

    remote_paths = client.scatter(paths, broadcast=True)
    futures = {client.submit(encode_rows, remote_paths, list(range(*writer.chunk_range(k))), cfg, str(vq_path),
                             vq_model, device.type, pure=False): k for k in pending}
    with progress(total=len(futures), desc=f"tokenize (dask, {len(client.scheduler_info()['workers'])} workers)",
                  unit="chunk") as bar:
        for future in as_completed(futures):
            tokens, files = future.result()  # errors in a task re-raise here
            chunk = futures[future]
            start = writer.chunk_range(chunk)[0]
            writer.write_chunk(chunk, tokens, [input_file(names[start + i], *f) for i, f in enumerate(files)])
            bar.update(1)


def run(cfg: TokenizeConfig, images: Path, vq_path: Path, out: Path, device: torch.device, vq_model: str | None = None,
        rehash: bool = False) -> str:
    """Build the store at `<out>.partial` (resumable) and swap it into `out` when complete; `out` and the
    partial store must be absent or token stores of ours (pipeline/outputs.py), checked before any work.
    `rehash`: hash every image the store's record holds, whatever its stat (pipeline.tokenstore.known_inputs)."""
    with claim_token_store(out) as claim:
        return _tokenize(cfg, images, vq_path, claim, device, vq_model, rehash)


def _tokenize(cfg: TokenizeConfig, images: Path, vq_path: Path, claim, device: torch.device, vq_model: str | None,
              rehash: bool = False) -> str:
    names = view_names(cfg.augment)
    paths, labels, class_names = list_image_folder(images)
    skipped: list[str] = []
    if cfg.bad_images == "skip":
        paths, labels, skipped = drop_bad_images(paths, labels, cfg.max_bad_fraction, cfg.max_image_pixels)
    family, vq = load_tokenizer(vq_path, vq_model)
    vq = vq.to(device).eval()
    layout = family.tokenizer_layout(vq, cfg.image_size)  # family, seq_len, grid (+ patch_nums for VAR)
    seq_len = layout["seq_len"]
    sha = file_sha256(vq_path)
    attrs = store_attributes(layout, sha, vq.cfg.codebook_size, cfg.image_size, names, class_names, str(images),
                             as_params(cfg), skipped)
    if hub := inputs_record(vq_path):  # read from the Hub: {repo, file, revision, commit} (pipeline/hub.py)
        attrs["hub_inputs"] = hub
    key = build_key(cfg, paths, labels, sha)
    rel_names = relative_names(images, paths)
    record = input_record(claim, key)
    inputs = known_inputs(paths, rel_names, record, rehash)
    if fingerprint := up_to_date(claim, key, inputs, record, cfg.chunk_rows):
        return fingerprint
    out = claim.partial
    writer = TokenStoreWriter(out, labels, len(names), seq_len, attrs, key, cfg.chunk_rows)
    writer.drop_changed({k: chunk_digest(inputs, writer.chunk_range(k)) for k in writer.done})
    pending = writer.pending_chunks()
    if len(pending) < writer.num_chunks:
        log.info("resuming %s: %d of %d chunks already done", out, writer.num_chunks - len(pending), writer.num_chunks)
    rows = [r for k in pending for r in range(*writer.chunk_range(k))]
    loader = torch.utils.data.DataLoader(
        ImageViews(paths, cfg.image_size, cfg.augment, rows, cfg.max_image_pixels), batch_size=cfg.batch_size, shuffle=False,
        num_workers=loader_workers(cfg.num_workers), multiprocessing_context="spawn" if loader_workers(cfg.num_workers) else None,
    )
    try:
        if cfg.dask_workers or cfg.dask_scheduler:
            encode_chunks_dask(cfg, paths, vq_path, vq_model, writer, pending, device, rel_names)
        else:
            encode_chunks(loader, vq, writer, cfg.chunk_rows, len(rows), device, rel_names)
    except ImageFolderError:
        claim.discard_partial()  # the input must change, so nothing here could be resumed
        raise
    fingerprint = writer.finish()
    claim.commit_path()
    refresh_stat_keys(claim.target, inputs, record, cfg.chunk_rows)  # chunks kept whose images were touched
    log.info("tokenized %d images x %d views x %d tokens -> %s (fingerprint %s)", len(paths), len(names), seq_len,
             claim.target, fingerprint[:12])
    return fingerprint


def up_to_date(claim, key: str, inputs: list, record: dict, chunk_rows: int) -> str | None:
    """The fingerprint of the store at claim.target if it was built with this build key from these image contents
    and every chunk decodes (its stat keys refreshed); else None, with the store reopened in claim.partial for an
    update that encodes only the chunks whose images changed or whose files are damaged."""
    existing = store_attrs(claim.target) or {}
    if existing.get("build_key") != key or "fingerprint" not in existing:
        return None
    unchanged = existing.get("inputs_digest") == whole_inputs_digest(inputs, chunk_rows)
    # vouch only for chunks that are there and decode: train and reflogp send a damaged store back here
    damaged = damaged_chunks(claim.target) if unchanged else []
    if unchanged and not damaged:
        refresh_stat_keys(claim.target, inputs, record, chunk_rows)
        log.info("%s is up to date (same image contents, tokenizer and settings)", claim.target)
        return existing["fingerprint"]
    if damaged:
        log.warning("%s: %d chunk files are missing or damaged (%s): encoding them again", claim.target,
                    len(damaged), damaged[0])
    else:
        log.info("%s: images changed since it was built (or it has no input record): encoding the chunks that "
                 "hold them again", claim.target)
    if (store_attrs(claim.partial) or {}).get("build_key") != key:  # else: resume the unfinished update
        reopen_for_update(claim.target, claim.partial)
    return None


# ----------------------------------------------------------------------------------------- content keys


def input_record(claim, key: str) -> dict:
    """The input record (path -> size, mtime_ns, digest) of the stores of ours built from these image paths
    and settings: the finished store's, updated by an unfinished one's (see known_inputs)."""
    record = {}
    for store in (claim.target, claim.partial):
        if (store_attrs(store) or {}).get("build_key") == key:
            record.update(read_input_record(store))
    return record


def refresh_stat_keys(store: Path, inputs: list, record: dict, chunk_rows: int) -> None:
    """Record the new stat keys of images hashed again with unchanged bytes (only when there are any: an
    unchanged tree's rerun writes nothing)."""
    if any(f is not None and record.get(f[0]) != ((f[1], f[2], f[4], f[5]), f[3]) for f in inputs):
        if n := refresh_input_record(store, inputs, chunk_rows):
            log.info("%s: recorded the new stat of %d images whose bytes are unchanged (touched, copied or moved; "
                     "they are known from stat() again)", store, n)


def relative_names(root: Path, paths: list[Path]) -> list[str]:
    return [path_key(p.relative_to(root).as_posix()) for p in paths]


def chunk_digest(inputs: list, rows: tuple[int, int]) -> str | None:
    """The digest of the inputs of the rows [start, stop), None while an image's digest is unknown."""
    files = inputs[rows[0] : rows[1]]
    return None if any(f is None for f in files) else chunk_inputs_digest(files)


def whole_inputs_digest(inputs: list, chunk_rows: int) -> str | None:
    digests = [chunk_digest(inputs, (start, start + chunk_rows)) for start in range(0, len(inputs), chunk_rows)]
    return None if None in digests else inputs_digest(digests)
