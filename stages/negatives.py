"""Stage `negatives`: DDO's fakes, the reference's own samples for the labels of a token store's images.

    cca-pipe negatives --tokens data/tokens/train.zarr --ref data/ar/gpt.pt --vq data/vq/vq.pt \
        --out data/ddo/negatives.zarr

For each image (row) of the real store, `negatives.ratio` samples of the reference at the image's label, with
the family's sampler (guidance-free by default: the paper's reference; cfg, top-k/top-p and temperature are
settings), decoded and re-encoded by the tokenizer (`negatives.reencode`, the released script's way:
docs/ddo.md). Fake row j pairs with real row j // ratio and is drawn from its own stream seeded by
(negatives.seed, j), so the store is the same for any number of processes. One fake per image, not per view:
the sampler never sees a view, and reflogp pairs each of an image's cache rows with the image's fakes.

Writes a token store (pipeline/formats.py; one view, "sample") whose attribute `negatives` records the
provenance: the reference's sha256, the real store's fingerprint, the sampler settings, the seed, the ratio
and the pairing rule. Resumable by chunks as tokenize is (pipeline.tokenstore.TokenStoreWriter); under
torchrun each process draws its share of every chunk and the main process writes it.

Progress per chunk (rows_done, throughput/rows_per_s: one sample per row, eta_s; step = chunk index) goes through
DVCLive, by the main process only, into `<out>.live` beside the store (pipeline/live.py live_beside: the store holds
its rows and nothing else); a resumed run continues its step axis (docs/imagenet.md, "Watching a run").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import file_sha256
from pipeline.config import check_ranges, setting, settings_digest
from pipeline.distributed import World
from pipeline.fakes import draw_fakes
from pipeline.families import ModelSource, load_tokenizer
from pipeline.live import LiveLog, is_live_folder, live_beside
from pipeline.outputs import Claim
from pipeline.progress import progress
from pipeline.tokenstore import TokenStoreWriter, claim_token_store, open_token_store, store_attributes, store_attrs

from .cli.loading import load_for_store
from .cli.params import as_params

log = logging.getLogger(__name__)

PAIRING = "fake row j pairs with real row j // ratio (drawn for its label); sample j is seeded by (seed, j)"
VIEW_NAME = "sample"  # the store's one view


@dataclass
class NegativesConfig:
    seed: int = setting(0, ge=0)  # sample j of the set is drawn from the stream of (seed, j)
    ratio: int = setting(1, ge=1)  # fakes per real image (the released script: 1)
    # the sampler: 0 is the guidance-free reference the paper names (VAR's script samples at its cfg 1.0,
    # a 0 -> 1 ramp over the scales: cfg_scale 1.0 with cfg_schedule linear; docs/ddo.md)
    cfg_scale: float = setting(0.0, ge=0.0)
    cfg_schedule: str = setting("constant", choices=("constant", "linear"))
    temperature: float = setting(1.0, gt=0.0)
    top_k: int = setting(0, ge=0)  # 0: off
    top_p: float = setting(1.0, ge=0.0, le=1.0)  # 1.0 (LlamaGen) or 0.0 (VAR): off
    reencode: bool = True  # decode to pixels and encode again (the released script), else the sampled codes
    batch_size: int = setting(256, ge=1)  # samples per sampler call
    chunk_rows: int = setting(1024, ge=1, multiple_of="batch_size")  # rows per Zarr chunk = resume unit

    def __post_init__(self) -> None:
        check_ranges(self, "negatives")

    def sampler(self) -> dict:
        """The sampler's keyword arguments (pipeline.sampling, through the family's `sample`)."""
        return {"cfg_scale": self.cfg_scale, "cfg_schedule": self.cfg_schedule, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}


def run(cfg: NegativesConfig, tokens_path: Path, ref_path: Path, vq_path: Path, out: Path,
        source: ModelSource = ModelSource(), vq_model: str | None = None, world: World | None = None) -> str | None:
    """Build the store at `<out>.partial` (resumable) and swap it into `out`; `out` and the partial must be
    absent or token stores of ours (checked first). -> its fingerprint on the main process (None on the others)."""
    world = world or World()
    with world.main_only(claim_negatives(out)) as claim:
        return _negatives(cfg, tokens_path, ref_path, vq_path, claim, source, vq_model, world)


def claim_negatives(out: Path) -> Claim:
    """The store's claim (it and its partial: token stores of ours), with its live folder `<out>.live` (ours or absent)."""
    claim = claim_token_store(out, "cca-pipe negatives")
    claim.sidecars[live_beside(out)] = is_live_folder
    return claim


def _plan_chunks(claim, labels: np.ndarray, seq_len: int, attrs: dict, key: str, chunk_rows: int):
    """On the main process: ("done", None, None) when the store is built with this key, else the chunks left to draw
    as (chunk, start, stop), the writer of the partial store and the live log, resumed at the first pending chunk."""
    existing = store_attrs(claim.target) or {}
    if existing.get("build_key") == key and "fingerprint" in existing:
        return "done", None, None
    writer = TokenStoreWriter(claim.partial, labels, 1, seq_len, attrs, key, chunk_rows)
    plan = [(k, *writer.chunk_range(k)) for k in writer.pending_chunks()]
    if len(plan) < writer.num_chunks:
        log.info("resuming %s: %d of %d chunks already drawn", claim.partial, writer.num_chunks - len(plan), writer.num_chunks)
    # the chunks are written in order: the first pending one (or, all drawn, the end) is the step axis's resume point
    live = LiveLog(live_beside(claim.target), resume=plan[0][0] if plan else writer.num_chunks,
                   total_steps=writer.num_chunks)
    return plan, writer, live


def _negatives(cfg: NegativesConfig, tokens_path: Path, ref_path: Path, vq_path: Path, claim, source: ModelSource,
               vq_model: str | None, world: World) -> str | None:
    store = open_token_store(tokens_path)
    family, vq = load_tokenizer(vq_path, vq_model)
    vq_sha = file_sha256(vq_path)
    if vq_sha != store.attrs["tokenizer_sha256"]:
        raise ValueError(f"--vq {vq_path} is not the tokenizer that encoded --tokens {tokens_path} (its sha256 differs from "
                         "the store's tokenizer_sha256): pass the tokenizer the real rows were encoded with, so that real and "
                         "fake tokens are codes of one tokenizer")
    vq = vq.to(world.device).eval()
    _, model = load_for_store(ref_path, "--ref", store, tokens_path, world, "ddp", source)
    model.eval()
    layout = family.tokenizer_layout(vq, store.attrs["image_size"])
    ref_sha = file_sha256(ref_path)
    labels = np.repeat(store.labels, cfg.ratio).astype(np.int32)
    provenance = {"ref_ckpt_sha256": ref_sha, "real_tokens_fingerprint": store.fingerprint, "real_rows": len(store.labels),
                  "seed": cfg.seed, "ratio": cfg.ratio, "pairs": PAIRING, "sampler": cfg.sampler(), "reencode": cfg.reencode}
    attrs = {**store_attributes(layout, vq_sha, vq.cfg.codebook_size, store.attrs["image_size"], [VIEW_NAME],
                                list(store.attrs["class_names"]), str(ref_path), as_params(cfg)),
             "negatives": provenance}
    key = settings_digest([as_params(cfg), ref_sha, vq_sha, store.fingerprint])
    plan = writer = live = None
    if world.main:
        plan, writer, live = _plan_chunks(claim, labels, int(layout["seq_len"]), attrs, key, cfg.chunk_rows)
    plan = world.broadcast(plan)
    if plan == "done":
        if world.main:
            log.info("%s is up to date (same reference, real rows and settings)", claim.target)
            return store_attrs(claim.target)["fingerprint"]
        return None
    for chunk, start, stop in progress(plan, desc="negatives", unit="chunk"):
        mine = world.share(list(range(start, stop)))
        fakes = draw_fakes(family, model, vq, torch.from_numpy(labels[mine]).long(), mine, seed=cfg.seed,
                           batch_size=cfg.batch_size, reencode=cfg.reencode, **cfg.sampler())
        shares = world.gather(fakes)
        if world.main:
            rows = np.empty((stop - start, fakes.shape[1]), np.uint16)
            for r, share in enumerate(shares):
                rows[r :: world.size] = share
            # logged first: a run killed between the two redraws this chunk and drops its row (LiveLog's resume)
            live.log_step(chunk, {"rows_done": stop}, rows=stop - start)
            writer.write_chunk(chunk, rows[:, None])
    if not world.main:
        return None
    live.close()
    fingerprint = writer.finish()
    claim.commit_path()
    log.info("drew %d fakes (%d per image, %s) from %s -> %s (fingerprint %s)", len(labels), cfg.ratio,
             "re-encoded" if cfg.reencode else "sampled codes", ref_path, claim.target, fingerprint[:12])
    return fingerprint
