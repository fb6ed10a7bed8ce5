"""Stage `train`: fine-tune the policy with CCA over the cached reference log-probs.

    cca-pipe train --tokens data/tokens/train.zarr --cache data/reflogp/ref_logp.parquet \
                   --init data/ar/gpt.pt --out data/train
Only the policy is resident (initialised from the reference checkpoint `--init`); the reference model
is never constructed. The cache must have been made from these tokens and this checkpoint (checked).
Either family (LlamaGen GPT, or VAR with --vae giving the quantiser that builds its input).
Writes policy.pt (the peer's layout: LlamaGen c2i / a VAR state dict under "model"), metrics.jsonl + metrics.csv
(per step), metrics.json (the run's end; log.jsonl, log.csv, summary.json before 2026-12-07: pipeline/formats.py),
live/ (DVCLive's files, per step as the run goes, with throughput and ETA: pipeline/live.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.alignment import DDO, AlignConfig, AlignmentRun, check_reference_noise, check_visits, visit_rows
from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, setting, settings_digest
from pipeline.device import local_bytes, peak_rss_mb, rss_mb
from pipeline.distributed import World
from pipeline.families import ModelSource, family_of, family_of_model
from pipeline.formats import FAKES_KEY, TRAIN_METRICS, TRAIN_STEP_CSV, TRAIN_STEP_LOG, FormatError, read_ref_cache
from pipeline.live import LIVE_DIR, LiveLog, check_mirrors
from pipeline.outputs import StageDir, write_json
from pipeline.parallel import check_batch_rows, check_micro_batches
from pipeline.progress import progress
from pipeline.refcache import CacheMismatch, ReferenceNoise, cache_visits
from pipeline.resume import TrainState
from pipeline.tokenstore import TokenStore, open_token_store

from .cli.common import StepLog
from .cli.loading import load_for_store
from .cli.params import as_params, save_settings

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(AlignConfig):
    """The train section of params.yaml: every alignment setting (pipeline.alignment.AlignConfig: defaults,
    ranges) and what only this stage's recipe uses. params.yaml agrees with the defaults (tested)."""

    # steps between checkpoints <out>/checkpoints/<step>.pt and the resume point (0: final only, no resume)
    save_every: int = setting(0, ge=0, same_result=True)
    # copies of the live metrics (<out>/live, DVCLive) for TensorBoard / W&B (offline); their packages are optional
    tensorboard: bool = setting(False, same_result=True)
    wandb: bool = setting(False, same_result=True)

    def mirrors(self) -> dict[str, bool]:
        return {"tensorboard": self.tensorboard, "wandb": self.wandb}


def save_policy(path: Path, policy, state: dict, cfg: TrainConfig, init_sha256: str, step: int, preset: str | None) -> None:
    """The peer's layout ({"model": upstream state dict, ...}: LlamaGen c2i / VAR), plus our config and
    provenance; `state`: the policy's full state dict (gathered from its shards under FSDP)."""
    family_of_model(policy).save(path, policy, state, init_sha256=init_sha256, train_params=as_params(cfg), preset=preset, steps=step)


def run_key(cfg: TrainConfig, provenance: dict, init_sha: str) -> str:
    """What a resumable state must match to be continued: hyperparameters, cache and initial weights."""
    return settings_digest([cfg, provenance, init_sha])


def run(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, out: Path, source: ModelSource = ModelSource(),
        world: World | None = None, negatives_path: Path | None = None) -> None:
    """`out` must be absent, empty or a train directory of ours; the run is built in `<out>.partial`
    (checkpoints, resume state, logs) and moved into `out` when it finishes (pipeline/outputs.py).
    `source.preset`: the name of the recipe `cfg` was resolved with (checked against the model, recorded).
    Under torchrun (`world`), every process trains its share of each batch (DDP); the main process claims
    the output, logs, checkpoints and commits. train.loss ddo: `cache_path` is a DDO cache (reflogp --negatives)
    of the negatives store at `negatives_path` (checked: its fingerprint is the cache's fakes_fingerprint)."""
    world = world or World()
    check_micro_batches(cfg.batch_size, cfg.micro_batch_size, world.size)  # before anything is claimed or read
    check_mirrors(cfg.mirrors(), "train")
    with world.main_only(StageDir(out, "train")) as claim:
        _train(cfg, tokens_path, cache_path, init, claim, world, source, negatives_path)


def _train(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, claim: StageDir, world: World,
           source: ModelSource, negatives_path: Path | None = None) -> None:
    preset = source.preset
    inputs = _open_inputs(cfg, tokens_path, cache_path, init, negatives_path)
    family, policy = load_for_store(init, "--init", inputs.store, tokens_path, world, cfg.strategy, source)
    baseline_rss_mb = rss_mb()
    started = time.perf_counter()
    run = AlignmentRun(policy, inputs.store.tokens, inputs.cache, cfg, world.device, world, family.param_groups, inputs.visits,
                       inputs.fakes)
    claim.key = run_key(cfg, inputs.provenance, inputs.init_sha)
    folder = _RunFolder.open(claim, world, cfg, run.total_steps)
    if world.main:
        log.info("training %d steps: %g epochs x %d cache rows / batch_size %d%s (the cache holds %d visit(s))",
                 run.total_steps, cfg.epochs, run.rows_per_visit, cfg.batch_size,
                 "" if cfg.max_steps is None else f", capped at train.max_steps = {cfg.max_steps}", inputs.visits)
    _fit(cfg, inputs, run, claim, folder, init, preset)
    seconds = time.perf_counter() - started
    full = run.state_dict()
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
    fakes: object = None  # train.loss ddo: the negatives store's tokens (pipeline.tokenstore.LazyTokens)


def _open_fakes(cfg: TrainConfig, negatives_path: Path | None, provenance: dict, cache_path: Path):
    """train.loss ddo: the negatives store the DDO cache was computed from (its fakes_fingerprint); else none."""
    if cfg.loss != DDO:
        if negatives_path is not None:
            raise ConfigError(f"--negatives {negatives_path} is read by train.loss ddo only, but train.loss is {cfg.loss}: "
                              "set train.loss: ddo, or drop --negatives")
        return None
    if FAKES_KEY not in provenance:
        raise ConfigError(f"train.loss ddo needs a DDO cache, but {cache_path} has no fake column: build it with "
                          "`cca-pipe reflogp --negatives STORE`")
    if negatives_path is None:
        raise ConfigError("train.loss ddo reads the fakes of its cache: pass their store with --negatives")
    fakes = open_token_store(negatives_path)
    if fakes.fingerprint != provenance[FAKES_KEY]:
        raise FormatError(f"{cache_path} is stale: its fakes_fingerprint is not that of --negatives {negatives_path} (the "
                          "negatives were drawn again since): rebuild it with `cca-pipe reflogp --negatives` (or `dvc repro`)")
    return fakes.tokens


def _open_inputs(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path,
                 negatives_path: Path | None = None) -> _Inputs:
    family_of(init, "--init")  # the file's kind, checked before the cache, whose provenance would only say "stale"
    store = open_token_store(tokens_path)
    init_sha = file_sha256(init)
    # the cache's log-prob version is checked by read_ref_cache; its logp_code (files digest) is only a note
    expect = {"tokens_fingerprint": store.fingerprint, "ref_ckpt_sha256": init_sha}
    cache, provenance = read_ref_cache(cache_path, expect=expect, store=store)
    cache_noise = ReferenceNoise.of_cache(provenance)
    check_reference_noise(cfg, cache_noise, str(cache_path))
    visits = cache_visits(provenance)
    rows = visit_rows(cache, visits)
    # before any work: a step's index lists would be built first; an epoch reads one visit's rows
    check_batch_rows(cfg.batch_size, rows, f"of an epoch (a visit) of the reference cache {cache_path}")
    check_visits(cfg, visits, rows, str(cache_path))
    fakes = _open_fakes(cfg, negatives_path, provenance, cache_path)
    store.tokens.cache_chunks = cfg.shuffle_buffer_chunks  # a batch touches at most this many chunks
    return _Inputs(store, cache_path, cache, provenance, cache_noise, init_sha, visits, fakes)


@dataclass
class _RunFolder:
    """`<out>.partial` while the run lasts: its step log, checkpoints and resume point."""

    work: Path
    steps: StepLog
    live: LiveLog  # the same metrics as they come, with throughput and ETA (pipeline/live.py)
    checkpoints: Path
    state: TrainState

    @classmethod
    def open(cls, claim: StageDir, world: World, cfg: TrainConfig, total_steps: int) -> _RunFolder:
        """The claim's partial folder (the main process opens it), with the step log of its resume point if any."""
        work = claim.open_partial() if world.main else claim.partial
        world.barrier()  # every process resumes from what the main process kept (a filesystem they all see)
        steps = StepLog(work, TRAIN_STEP_LOG)
        checkpoints = work / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        state = TrainState(checkpoints, claim.key, world, extra=lambda: {"log_rows": steps.rows})
        if (saved := state.saved()) is not None:
            steps.rows = saved["log_rows"]
            log.info("resuming %s from step %d", claim.target, saved["step"])
        # the live files continue from the resume point: steps a killed process logged past it are dropped
        live = LiveLog(work / LIVE_DIR, resume=saved["step"] if saved else 0, total_steps=total_steps, mirrors=cfg.mirrors(),
                       enabled=world.main)
        return cls(work, steps, live, checkpoints, state)


def _fit(cfg: TrainConfig, inputs: _Inputs, run: AlignmentRun, claim: StageDir, folder: _RunFolder, init: Path,
         preset: str | None) -> None:
    """The recipe's loop: resume (else the step-0 check), then per step its metrics logged, progress, and every
    train.save_every steps a checkpoint and the resume point. A failed step-0 check leaves no trace, a
    non-finite step names the last good checkpoint. A stop signal ends the process (pipeline.distributed):
    the run resumes from its last point."""
    main = run.world.main
    try:
        if not run.resume(folder.state):
            run.check_cache(inputs.cache_noise, str(inputs.cache_path))
        bar = progress(total=run.total_steps, initial=run.first_step, desc="train", unit="step")
        for step, step_tokens in run.batches():
            metrics = run.step(step, step_tokens)
            if main:
                folder.steps(step, metrics)
                folder.live.log_step(step, metrics, rows=cfg.batch_size)
            bar.update(1)
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < run.total_steps:
                full = run.state_dict()  # every process takes part under FSDP
                if main:  # the numbered checkpoint first: a resume point is never ahead of its checkpoint
                    save_policy(folder.checkpoints / f"{done:07d}.pt", run.policy, full, cfg, inputs.init_sha, done, preset)
                run.checkpoint(done, folder.state)
        bar.close()
        run.finish()
    except CacheMismatch:  # the step-0 check, before any update: a bad input leaves no trace
        if main:
            claim.discard_partial()
        raise
    except FloatingPointError as e:
        folder.steps.save()
        folder.live.close()
        good = sorted(folder.checkpoints.glob("[0-9]*.pt"))
        raise FloatingPointError(f"training stopped: {e}. Last good checkpoint: {good[-1] if good else init} "
                                 f"(the step log is in {folder.work / TRAIN_STEP_CSV}).") from e


def _write_summary(cfg: TrainConfig, claim: StageDir, folder: _RunFolder, seconds: float, memory: list[dict],
                   preset: str | None) -> None:
    """The main process's end of a run (after its step log and policy.pt): metrics.json, settings.yaml, the
    run moved into place."""
    steps = folder.steps
    folder.state.clear()
    last = steps.rows[-1]
    summary = {"steps": len(steps.rows), "seconds": seconds, "peak_rss_mb": memory[0]["peak_rss_mb"], "memory": memory,
               "final": last, "params": as_params(cfg)}
    write_json(folder.work / TRAIN_METRICS, summary)
    folder.live.log_summary({"steps": len(steps.rows), "seconds": seconds})
    folder.live.close()  # before the run folder moves into place
    save_settings(folder.work, "train", cfg, preset)
    claim.commit()
    log.info("peak RSS %.0f MB", memory[0]["peak_rss_mb"])
    log.info("trained %d steps in %.1fs: loss %.4f, rewards/pos %.3f, rewards/neg %.3f, accuracy %.3f -> %s",
             len(steps.rows), seconds, last["loss"], last["rewards/pos"], last["rewards/neg"], last["rewards/accuracy"], claim.target)
