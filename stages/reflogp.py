"""Stage `reflogp`: the frozen reference model runs once; its log-likelihoods go to a Parquet cache.

    cca-pipe reflogp --tokens data/tokens/train.zarr --ref data/ar/gpt.pt --out data/reflogp/ref_logp.parquet
Only the reference model is loaded. Provenance (token fingerprint, checkpoint sha256, seed) goes
into the Parquet schema metadata, and `train` checks it (pipeline/formats.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting
from pipeline.distributed import World
from pipeline.families import ModelSource
from pipeline.formats import FAKES_KEY, FormatError, RefCacheParts, claim_ref_cache, fake_columns, read_ref_cache
from pipeline.hub import inputs_record
from pipeline.live import LIVE_DIR, LiveLog
from pipeline.parallel import STRATEGIES, distribute
from pipeline.progress import progress
from pipeline.refcache import (
    MASK_RULE,
    NEGATIVES,
    ReferenceNoise,
    draw_pairs,
    fake_rows,
    reference_fake_columns,
    reference_logps,
)
from pipeline.tokenstore import open_token_store
from pipeline.versions import LOGP_VERSION

from .cli.loading import load_for_store
from .cli.params import as_params

log = logging.getLogger(__name__)

VISITS_FROM_TRAIN = "epochs"  # reflogp.visits: as many as the resolved train settings read epochs


@dataclass
class RefLogpConfig:
    seed: int = setting(0, ge=0)  # fixes each row's view and negative label
    views: str = setting("all", choices=("all", "one"))  # "all": a cache row per (image, view); "one": a row per image, random view
    # "other": uniform over the other classes; "roll": the released scripts' rolled labels (pipeline.refcache)
    negatives: str = setting("other", choices=NEGATIVES)
    # The reference's dropout (LlamaGen's resid/ffn/token) and drop path (rising over the blocks to it), as
    # the released scripts' train-mode reference has them: > 0 runs it in train mode, one seeded draw per
    # cache row keyed by (seed, row, pos/neg/null), whatever batch_size, part_rows or world size; 0: eval mode.
    # train refuses a cache whose rates are not its own (train.reference_noise).
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    drop_path: float = setting(0.0, ge=0.0, lt=1.0)
    # How often train visits each row, each visit with its own view ("one"), negatives and dropout masks (the
    # released scripts redraw them every epoch): "epochs" is ceil(train.epochs), resolved with the settings
    # (stages/cli/main.py resolved_config: resolve_visits); train refuses a cache with fewer visits than the epochs
    # it reads. Not train.lambda / beta: a sweep shares one cache. Cost: reflogp's time grows with the visits
    # (docs/performance.md).
    visits: int | str = setting(VISITS_FROM_TRAIN, ge=1)
    batch_size: int = setting(512, ge=1)
    part_rows: int = setting(4096, ge=1, multiple_of="batch_size")  # resume unit: rows per part file
    # under torchrun: "ddp" holds the whole model on every GPU; "fsdp" shards it (pipeline/parallel.py), the
    # processes then run their forwards in lockstep
    strategy: str = setting("ddp", choices=STRATEGIES)

    def __post_init__(self) -> None:
        check_ranges(self, "reflogp")
        if isinstance(self.visits, str) and self.visits != VISITS_FROM_TRAIN:
            raise ConfigError(f"reflogp.visits = {self.visits!r}: write a number of visits (>= 1) or "
                              f"{VISITS_FROM_TRAIN!r} (ceil(train.epochs))")

    def resolve_visits(self, train_epochs: float) -> RefLogpConfig:
        """This config with visits "epochs" resolved to ceil(train_epochs), the epochs of the resolved train
        settings (one visit per epoch, as the released scripts redraw each row's draws every epoch)."""
        if self.visits != VISITS_FROM_TRAIN:
            return self
        return dataclasses.replace(self, visits=math.ceil(train_epochs))

    @property
    def num_visits(self) -> int:
        """visits as a number: "epochs" is resolved with the other stages' settings (resolve_visits); a config
        built without them (a library call) must say how many."""
        if isinstance(self.visits, str):
            raise ConfigError(f"reflogp.visits = {self.visits!r} is resolved from train.epochs with the settings "
                              "(cca-pipe reflogp); a RefLogpConfig built directly needs a number")
        return self.visits


def run(cfg: RefLogpConfig, tokens_path: Path, ref_path: Path, out: Path, source: ModelSource = ModelSource(),
        world: World | None = None, negatives_path: Path | None = None) -> None:
    """`out` and its parts directory `<out>.partial` must be absent or caches of ours (checked first). Under
    torchrun (`world`) the batches of each part still to compute are dealt out to the processes, and the main
    process writes the part (the resume unit) from what they return, then merges the parts: every process
    works whatever the number of parts, and the cache is the one-process cache, whatever the world size.
    `negatives_path`: a negatives store of these rows drawn by this reference (stages/negatives.py): the cache
    is then DDO's, with the columns fake_row and ref_logp_fake, and ref_logp_fake_j for the image's other fakes
    when the store has ratio r > 1 (pipeline/formats.py)."""
    world = world or World()
    with world.main_only(claim_ref_cache(out)) as claim:
        _reflogp(cfg, tokens_path, ref_path, claim, world, source, negatives_path)


def open_negatives(path: Path, store, tokens_path: Path, ref_sha: str):
    """The negatives store at `path`, checked to pair with the real store's rows and to be the reference's."""
    fakes = open_token_store(path)
    made = fakes.attrs.get("negatives")
    if not isinstance(made, dict):
        raise FormatError(f"--negatives {path} is a token store but not one of negatives (no attribute 'negatives'): pass "
                          "the store `cca-pipe negatives` wrote")
    if made.get("real_tokens_fingerprint") != store.fingerprint or len(fakes.labels) != made.get("ratio", 0) * len(store.labels):
        raise FormatError(f"--negatives {path} was drawn for other real rows than --tokens {tokens_path} (its "
                          "real_tokens_fingerprint differs): draw them again with `cca-pipe negatives --tokens "
                          f"{tokens_path}`")
    if made.get("ref_ckpt_sha256") != ref_sha:
        raise FormatError(f"--negatives {path} was drawn by another reference than --ref (its ref_ckpt_sha256 differs): DDO "
                          "scores the reference's own samples; draw them with this reference (`cca-pipe negatives --ref`)")
    return fakes


def _reflogp(cfg: RefLogpConfig, tokens_path: Path, ref_path: Path, claim, world: World, source: ModelSource,
             negatives_path: Path | None = None) -> None:
    out = claim.target
    store = open_token_store(tokens_path)
    family, model = load_for_store(ref_path, "--ref", store, tokens_path, world, cfg.strategy, source)
    model.set_dropout(cfg.dropout, cfg.drop_path, section="reflogp")  # before any work: VAR has no dropout
    noise = ReferenceNoise(cfg.seed, cfg.dropout, cfg.drop_path)
    pairs = draw_pairs(store.labels, store.tokens.shape[1], store.num_classes, cfg.seed, cfg.views, cfg.negatives,
                       cfg.num_visits)
    ref_sha = file_sha256(ref_path)
    fakes = None if negatives_path is None else open_negatives(negatives_path, store, tokens_path, ref_sha)
    ddo, ratio = {}, 1
    if fakes is not None:
        ratio = int(fakes.attrs["negatives"]["ratio"])
        pairs["fake_row"] = fake_rows(pairs["row"], len(pairs["row"]) // cfg.num_visits, ratio)
        ddo = {FAKES_KEY: fakes.fingerprint, "fakes_ratio": ratio}
    provenance = cache_provenance(cfg, store, ref_sha, family, model, noise, ddo)
    if hub := inputs_record(ref_path, source.vae):  # read from the Hub: {repo, file, revision, commit} (pipeline/hub.py)
        provenance["hub_inputs"] = hub
    parts = RefCacheParts(out, len(pairs["row"]), cfg.part_rows, provenance, claim.partial, create=world.main)
    pending = world.broadcast(parts.pending() if world.main else None)
    if len(pending) < parts.num_parts:
        log.info("resuming %s: %d of %d parts already computed", out, parts.num_parts - len(pending), parts.num_parts)
    sharded = cfg.strategy == "fsdp" and world.size > 1
    if sharded:
        model = distribute(model, world, "fsdp")
    dealt = 0  # batches dealt so far: who gets a part's odd batches goes round the ranks from part to part
    # progress per part (step = part index) while it runs, in the parts' folder: docs/imagenet.md, "Watching a run"
    live = LiveLog(claim.partial / LIVE_DIR, resume=min(pending) if pending and len(pending) < parts.num_parts else 0,
                   total_steps=parts.num_parts, enabled=world.main)
    for k in progress(pending, desc="reflogp parts", unit="part"):
        start, stop = parts.part_range(k)
        logps = _part_logps(model, store.tokens, pairs, start, stop, cfg.batch_size, dealt, world, sharded, noise,
                            None if fakes is None else fakes.tokens, ratio)
        dealt += -(-(stop - start) // cfg.batch_size)
        if not world.main:
            continue
        part = {name: column[start:stop] for name, column in pairs.items()}
        check_finite(logps, part, ref_path, out)
        parts.write_part(k, {**part, **logps})
        live.log_step(k, {"rows_done": stop}, rows=stop - start)
    live.close()
    world.barrier()
    if not world.main:
        return
    parts.merge()
    claim.committed = True
    logps, _ = read_ref_cache(out, store=store)
    ratio = logps["ref_logp_pos"] - logps["ref_logp_null"]
    log.info("cached %d rows (%d visit(s)) -> %s; mean log p(x|c) %.2f, mean log p(x|c)-log p(x|null) %.2f nats",
             len(ratio), cfg.num_visits, out, logps["ref_logp_pos"].mean(), ratio.mean())


def cache_provenance(cfg: RefLogpConfig, store, ref_sha: str, family, model, noise: ReferenceNoise, ddo: dict) -> dict:
    """What a reference cache records of how it was computed (pipeline/formats.py): its inputs, the settings and
    what decides its staleness; `ddo`: the negatives store's fingerprint and ratio of a DDO cache."""
    return {
        "tokens_fingerprint": store.fingerprint,
        "ref_ckpt_sha256": ref_sha,
        "seed": cfg.seed,
        "views": cfg.views,
        "negatives": cfg.negatives,
        "dropout": cfg.dropout,
        "drop_path": cfg.drop_path,
        "visits": cfg.num_visits,
        "mask_rule": MASK_RULE if noise.active else "eval",
        "logp_version": LOGP_VERSION,  # what decides staleness (pipeline.versions)
        "logp_code": family.logp_code(),  # a note: which files computed it
        "settings": as_params(cfg),
        "num_classes": store.num_classes,
        "null_class": model.cfg.null_class,
        "seq_len": int(store.seq_len),
        "batch_size": cfg.batch_size,  # batch composition fixes the float32 sums bit for bit
        **ddo,
    }


def check_finite(logps: dict[str, np.ndarray], part: dict[str, np.ndarray], ref_path: Path, out: Path) -> None:
    """Refuse a part whose log-probs are not all finite, naming the first token store row, before it is written."""
    bad = ~np.isfinite(np.stack(list(logps.values()))).all(0)
    if bad.any():
        raise FloatingPointError(
            f"the reference model {ref_path} gives non-finite log-probs for {int(bad.sum())} of {len(bad)} rows "
            f"(first: token store row {int(part['row'][bad][0])}); its weights are damaged or it does not fit these "
            f"tokens. Nothing was written to {out}")


def _part_logps(model, tokens, pairs: dict[str, np.ndarray], start: int, stop: int, batch_size: int, dealt: int,
                world: World, sharded: bool, noise: ReferenceNoise, fakes=None, ratio: int = 1
                ) -> dict[str, np.ndarray] | None:
    """The reference log-probs of cache rows [start, stop) on the main process (None on the others). The part's
    batches are split into one contiguous run per process, as even as whole batches allow (the odd ones go
    round the ranks, counting on from `dealt`); each batch holds the rows one process would put in it (a
    part is a whole number of batches) and the dropout masks are keyed by cache row, so the cache is the
    one-process cache bit for bit."""
    batches = -(-(stop - start) // batch_size)
    counts = [batches // world.size + ((r - dealt) % world.size < batches % world.size) for r in range(world.size)]
    first = start + sum(counts[: world.rank]) * batch_size
    mine = (first, min(first + counts[world.rank] * batch_size, stop))
    logps = {}
    if mine[1] > mine[0] or sharded:  # a sharded model runs each forward on every process: one without a batch
        run = mine if mine[1] > mine[0] else (start, min(start + batch_size, stop))  # repeats the first
        forwards = max(counts) if sharded else None
        logps = reference_logps(model, tokens, {name: column[run[0]:run[1]] for name, column in pairs.items()}, batch_size,
                                world.device, forwards=forwards, noise=noise, first_row=run[0])
        if fakes is not None:  # DDO: the paired fakes (all `ratio` of the image) under the real rows' labels
            logps.update(reference_fake_columns(model, fakes, pairs["fake_row"][run[0]:run[1]], pairs["label"][run[0]:run[1]],
                                                np.arange(*run), batch_size, world.device, forwards, noise, ratio))
        logps = logps if mine[1] > mine[0] else {}
    shares = world.gather((mine[0], logps))
    if not world.main:
        return None
    columns = ("ref_logp_pos", "ref_logp_neg", "ref_logp_null", *(fake_columns(ratio) if fakes is not None else ()))
    out = {key: np.zeros(stop - start, dtype=np.float64) for key in columns}
    for share_start, share in shares:
        for key, values in share.items():
            out[key][share_start - start : share_start - start + len(values)] = values
    return out
