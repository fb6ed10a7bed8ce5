"""Stage `train`: fine-tune the policy with CCA over the cached reference log-probs.

    cca-pipe train --tokens data/tokens/train.zarr --cache data/reflogp/ref_logp.parquet \
                   --init data/ar/gpt.pt --out data/train
Only the policy is resident (initialised from the reference checkpoint `--init`); the reference model
is never constructed. The cache must have been made from these tokens and this checkpoint (checked).
Either family (LlamaGen GPT, or VAR with --vae giving the quantiser that builds its input).
Writes policy.pt (the peer's layout: LlamaGen c2i / a VAR state dict under "model"), log.csv + log.jsonl (per step), summary.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.alignment import LR_SCHEDULES, AlignConfig, epochs_read, run_steps, train_policy, visit_rows
from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting, settings_digest
from pipeline.device import local_bytes, peak_rss_mb, rss_mb
from pipeline.distributed import World
from pipeline.families import Family, ModelSource, family_of, family_of_model
from pipeline.formats import read_ref_cache
from pipeline.losses import LOSSES
from pipeline.outputs import StageDir, write_json
from pipeline.parallel import STRATEGIES, check_batch_rows, check_micro_batches, full_state_dict
from pipeline.progress import progress
from pipeline.refcache import CHECK_ROWS, CacheMismatch, ReferenceNoise, cache_visits
from pipeline.resume import TrainState
from pipeline.tokenstore import TokenStore, open_token_store

from .common import StepLog
from .loading import load_for_store
from .params import as_params, save_settings

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The train section of params.yaml; these defaults are the embedded default's (params.yaml agrees, tested).
    The ImageNet recipes are presets (stages/presets.py)."""

    loss: str = setting("cca", choices=tuple(LOSSES))
    beta: float = setting(0.5, gt=0.0)  # > 0: a negative beta would push the policy the wrong way
    lam: float = setting(10.0, key="lambda", ge=0.0)
    lr: float = setting(1e-4, gt=0.0)
    # "constant", or VAR's "lin0": linear warm-up over warmup_fraction of the steps from warmup_start x lr,
    # 5% of the rest at lr, then linear decay to end_ratio x lr (VAR utils/lr_control.py)
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES)
    warmup_fraction: float = setting(0.02, ge=0.0, lt=1.0)
    warmup_start: float = setting(0.005, ge=0.0, le=1.0)
    end_ratio: float = setting(0.1, ge=0.0, le=1.0)
    # AdamW; decay only the family's decayed parameters (LlamaGen: dim >= 2; VAR: not its no-decay set),
    # cosine-annealed from weight_decay to weight_decay_end (None: constant), as VAR's lr_wd_annealing
    weight_decay: float = setting(0.0, ge=0.0)
    weight_decay_end: float | None = setting(None, ge=0.0)
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.95], ge=0.0, lt=1.0)
    grad_clip: float = setting(1.0, gt=0.0)
    loss_scale: float = setting(1.0, gt=0.0)  # the loss is multiplied by this before backward (see presets.py)
    # fine-tuning regularisation, active in train mode only, masks keyed by (seed, visit, pos/neg):
    # LlamaGen's resid/ffn/token dropout, drop path rising over the blocks (VAR's only regulariser)
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    drop_path: float = setting(0.0, ge=0.0, lt=1.0)
    # "matched": the cache's reference must have seen these dropout / drop_path rates (reflogp.dropout,
    # reflogp.drop_path), as the released scripts' train-mode reference; "any": accept another (e.g. an
    # eval-mode cache under a policy with dropout, whose step-0 ratios then average -D, not 0)
    reference_noise: str = setting("matched", choices=("matched", "any"))
    # cache rows the step-0 check scores (spread over the cache), a reflogp pass over them before the first step;
    # 0: no check (a warning says what is given up)
    step0_rows: int = setting(CHECK_ROWS, ge=0)
    epochs: float = setting(3.0, gt=0.0)  # epoch e reads the cache's visit e (reflogp.visits)
    # false: refuse a cache with fewer visits than the epochs this run reads; true: epoch e reads visit e mod
    # visits, so each row meets the same view, negative and reference masks again (before issue 28's fix)
    repeat_visits: bool = False
    # a cap on the optimiser steps: a run trains ceil(epochs x cache rows / batch_size) steps, at most this
    # many (smoke runs and budgets; the schedules span the capped run); null: no cap. train prints the count
    max_steps: int | None = setting(None, ge=1)
    batch_size: int = setting(64, ge=1, multiple_of="micro_batch_size")  # global batch of cache rows
    micro_batch_size: int = setting(32, ge=1)  # rows per forward; gradient accumulation makes up the batch
    uncond_ratio: float = setting(0.1, ge=0.0, lt=1.0)
    seed: int = setting(0, ge=0)
    # data order: token-store chunks are shuffled, then rows within groups of this many chunks
    # (pipeline.alignment.epoch_order); a store of at most this many chunks is shuffled uniformly
    shuffle_buffer_chunks: int = setting(16, ge=1)
    num_workers: int = setting(0, ge=0)  # DataLoader processes reading tokens while the model trains
    # under torchrun: "ddp" keeps the whole policy and its AdamW state on every GPU (16 bytes per parameter);
    # "fsdp" shards them over the processes (models larger than a GPU: `cca-pipe plan`; pipeline/parallel.py)
    strategy: str = setting("ddp", choices=STRATEGIES)
    # recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False
    # One policy for a range of lambdas (paper Table 5): {min: 1, max: 8103} draws each row's lambda
    # log-uniformly in it and feeds it to a zero-initialised lambda embedding (train.lambda is then unused);
    # null: the usual fixed-lambda policy
    lambda_conditioning: dict[str, float] | None = None
    # steps between checkpoints <out>/checkpoints/<step>.pt and the resume point (0: final only, no resume)
    save_every: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas = {self.betas}: AdamW takes two betas, e.g. [0.9, 0.95]")
        if self.lambda_conditioning is not None:
            lc = self.lambda_conditioning
            if set(lc) != {"min", "max"} or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lc.values()) \
                    or not 0 < lc["min"] < lc["max"]:
                raise ConfigError(f"train.lambda_conditioning = {lc!r}: write {{min: 1, max: 8103}} (0 < min < max), or null")

    @property
    def lambda_range(self) -> tuple[float, float] | None:
        lc = self.lambda_conditioning
        return None if lc is None else (float(lc["min"]), float(lc["max"]))

    def align_config(self) -> AlignConfig:
        return AlignConfig(**{k: getattr(self, k) for k in AlignConfig.__dataclass_fields__})


def save_policy(path: Path, policy, state: dict, cfg: TrainConfig, init_sha256: str, step: int, preset: str | None) -> None:
    """The peer's layout ({"model": upstream state dict, ...}: LlamaGen c2i / VAR), plus our config and
    provenance; `state`: the policy's full state dict (gathered from its shards under FSDP)."""
    family_of_model(policy).save(path, policy, state, init_sha256=init_sha256, train_params=as_params(cfg), preset=preset, steps=step)


def check_reference_noise(cfg: TrainConfig, cache_noise: ReferenceNoise, cache_path: Path) -> None:
    """train.reference_noise "matched": the cache's reference dropout is the policy's (one line otherwise)."""
    cached, ours = (cache_noise.dropout, cache_noise.drop_path), (cfg.dropout, cfg.drop_path)
    if cfg.reference_noise == "matched" and cached != ours:
        raise ConfigError(
            f"{cache_path} was computed with reflogp.dropout = {cached[0]}, reflogp.drop_path = {cached[1]}, but "
            f"train.dropout = {ours[0]}, train.drop_path = {ours[1]}: the step-0 log-ratios would not average 0. "
            f"Rebuild the cache with the train rates, or set train.reference_noise: any to train against it anyway")


def run_key(cfg: TrainConfig, provenance: dict, init_sha: str) -> str:
    """What a resumable state must match to be continued: hyperparameters, cache and initial weights."""
    return settings_digest([cfg, provenance, init_sha])


def run(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, out: Path, source: ModelSource = ModelSource(),
        world: World | None = None) -> None:
    """`out` must be absent, empty or a train directory of ours; the run is built in `<out>.partial`
    (checkpoints, resume state, logs) and moved into `out` when it finishes (pipeline/outputs.py).
    `source.preset`: the name of the recipe `cfg` was resolved with (checked against the model, recorded).
    Under torchrun (`world`), every process trains its share of each batch (DDP); the main process claims
    the output, logs, checkpoints and commits."""
    world = world or World()
    check_micro_batches(cfg.batch_size, cfg.micro_batch_size, world.size)  # before anything is claimed or read
    with world.main_only(StageDir(out, "train")) as claim:
        _train(cfg, tokens_path, cache_path, init, claim, world, source)


def _train(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, claim: StageDir, world: World,
           source: ModelSource) -> None:
    preset = source.preset
    inputs = _open_inputs(cfg, tokens_path, cache_path, init)
    family, policy = load_for_store(init, "--init", inputs.store, tokens_path, world, cfg.strategy, source)
    policy.set_dropout(cfg.dropout, cfg.drop_path)
    if cfg.lambda_conditioning is not None:
        policy.enable_lambda_conditioning(seed=cfg.seed)
    claim.key = run_key(cfg, inputs.provenance, inputs.init_sha)
    folder = _RunFolder.open(claim, world)
    rows = visit_rows(inputs.cache, inputs.visits)
    total = run_steps(cfg.epochs, rows, cfg.batch_size, cfg.max_steps)
    if world.main:
        log.info("training %d steps: %g epochs x %d cache rows / batch_size %d%s (the cache holds %d visit(s))", total,
                 cfg.epochs, rows, cfg.batch_size, "" if cfg.max_steps is None else f", capped at train.max_steps = {cfg.max_steps}",
                 inputs.visits)
    baseline_rss_mb = rss_mb()
    started = time.perf_counter()
    _fit(cfg, inputs, family, policy, claim, folder, world, init, preset)
    seconds = time.perf_counter() - started
    full = full_state_dict(policy)  # every process takes part under FSDP
    # per process: RSS before the training loop and at its peak (CUDA: peak allocated), the bytes of its
    # trainable weights (1/N of the model's under FSDP; gradients as many, AdamW's moments twice): `cca-pipe plan`
    memory = world.gather({"baseline_rss_mb": baseline_rss_mb, "peak_rss_mb": peak_rss_mb(),
                           "weight_bytes": local_bytes(p for p in policy.parameters() if p.requires_grad),
                           **({"cuda_peak_mb": torch.cuda.max_memory_allocated(world.device) / 2**20}
                              if world.device.type == "cuda" else {})})
    if world.main:
        folder.steps.save()
        save_policy(folder.work / "policy.pt", policy, full, cfg, inputs.init_sha, len(folder.steps.rows), preset)
        _write_summary(cfg, claim, folder, seconds, memory, preset)


@dataclass
class _Inputs:
    """The token store and the reference cache made from it and the initial weights (checked)."""

    store: TokenStore
    cache_path: Path
    cache: dict[str, np.ndarray]
    provenance: dict
    cache_noise: ReferenceNoise
    init_sha: str
    visits: int  # the cache's visit blocks (reflogp.visits)


def _open_inputs(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path) -> _Inputs:
    family_of(init, "--init")  # the file's kind, checked before the cache, whose provenance would only say "stale"
    store = open_token_store(tokens_path)
    init_sha = file_sha256(init)
    # the cache's log-prob version is checked by read_ref_cache; its logp_code (files digest) is only a note
    expect = {"tokens_fingerprint": store.fingerprint, "ref_ckpt_sha256": init_sha}
    cache, provenance = read_ref_cache(cache_path, expect=expect, store=store)
    cache_noise = ReferenceNoise.of_cache(provenance)
    check_reference_noise(cfg, cache_noise, cache_path)
    visits = cache_visits(provenance)
    rows = visit_rows(cache, visits)
    # before any work: a step's index lists would be built first; an epoch reads one visit's rows
    check_batch_rows(cfg.batch_size, rows, f"of an epoch (a visit) of the reference cache {cache_path}")
    check_visits(cfg, visits, rows, cache_path)
    store.tokens.cache_chunks = cfg.shuffle_buffer_chunks  # a batch touches at most this many chunks
    return _Inputs(store, cache_path, cache, provenance, cache_noise, init_sha, visits)


def check_visits(cfg: TrainConfig, visits: int, rows: int, cache_path: Path) -> None:
    """Each epoch reads a visit of its own (one line otherwise), unless train.repeat_visits."""
    needed = epochs_read(cfg.epochs, rows, cfg.batch_size, cfg.max_steps)
    if visits < needed and not cfg.repeat_visits:
        raise ConfigError(
            f"{cache_path} holds {visits} visit(s) of each row but train.epochs = {cfg.epochs:g} reads {needed}: rebuild it with "
            f"reflogp.visits: epochs (or >= {needed}), or set train.repeat_visits: true to read its draws again at every epoch")


@dataclass
class _RunFolder:
    """`<out>.partial` while the run lasts: its step log, checkpoints and resume point."""

    work: Path
    steps: StepLog
    checkpoints: Path
    state: TrainState

    @classmethod
    def open(cls, claim: StageDir, world: World) -> _RunFolder:
        """The claim's partial folder (the main process opens it), with the step log of its resume point if any."""
        work = claim.open_partial() if world.main else claim.partial
        world.barrier()  # every process resumes from what the main process kept (a filesystem they all see)
        steps = StepLog(work, "log")
        checkpoints = work / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        state = TrainState(checkpoints, claim.key, world, extra=lambda: {"log_rows": steps.rows})
        if (saved := state.saved()) is not None:
            steps.rows = saved["log_rows"]
            log.info("resuming %s from step %d", claim.target, saved["step"])
        return cls(work, steps, checkpoints, state)


def _fit(cfg: TrainConfig, inputs: _Inputs, family: Family, policy, claim: StageDir, folder: _RunFolder, world: World,
         init: Path, preset: str | None) -> None:
    """train_policy over the inputs, checkpointing into the run folder; a failed step-0 check leaves no trace,
    a non-finite step names the last good checkpoint."""
    def checkpoint(step: int, full: dict) -> None:
        save_policy(folder.checkpoints / f"{step:07d}.pt", policy, full, cfg, inputs.init_sha, step, preset)

    try:
        train_policy(
            policy, inputs.store.tokens, inputs.cache, cfg.align_config(), world.device, family.param_groups,
            on_step=folder.steps, progress=lambda total: progress(total=total, desc="train", unit="step"),
            on_checkpoint=checkpoint, checkpoint_every=cfg.save_every, train_state=folder.state, world=world,
            cache_noise=inputs.cache_noise, cache_name=str(inputs.cache_path), visits=inputs.visits,
        )
    except CacheMismatch:  # the step-0 check, before any update: a bad input leaves no trace
        if world.main:
            claim.discard_partial()
        raise
    except FloatingPointError as e:
        folder.steps.save()
        good = sorted(folder.checkpoints.glob("[0-9]*.pt"))
        raise FloatingPointError(f"training stopped: {e}. Last good checkpoint: {good[-1] if good else init} "
                                 f"(the step log is in {folder.work / 'log.csv'}).") from e


def _write_summary(cfg: TrainConfig, claim: StageDir, folder: _RunFolder, seconds: float, memory: list[dict],
                   preset: str | None) -> None:
    """The main process's end of a run (after its step log and policy.pt): summary.json, settings.yaml, the
    run moved into place."""
    steps = folder.steps
    folder.state.clear()
    last = steps.rows[-1]
    summary = {"steps": len(steps.rows), "seconds": seconds, "peak_rss_mb": memory[0]["peak_rss_mb"], "memory": memory,
               "final": last, "params": as_params(cfg)}
    write_json(folder.work / "summary.json", summary)
    save_settings(folder.work, "train", cfg, preset)
    claim.commit()
    log.info("peak RSS %.0f MB", memory[0]["peak_rss_mb"])
    log.info("trained %d steps in %.1fs: loss %.4f, rewards/pos %.3f, rewards/neg %.3f, accuracy %.3f -> %s",
             len(steps.rows), seconds, last["loss"], last["rewards/pos"], last["rewards/neg"], last["rewards/accuracy"], claim.target)
