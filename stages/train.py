"""Stage `train`: fine-tune the policy with CCA over the cached reference log-probs.

    cca-pipe train --tokens data/tokens/train.zarr --cache data/reflogp/ref_logp.parquet \
                   --init data/ar/gpt.pt --out data/train
Only the policy is resident (initialised from the reference checkpoint `--init`); the reference model
is never constructed. The cache must have been made from these tokens and this checkpoint (checked).
Writes policy.pt (LlamaGen c2i layout), log.csv + log.jsonl (per step), summary.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.alignment import AlignConfig, train_policy
from pipeline.checkpoint import file_sha256, save_checkpoint
from pipeline.formats import read_ref_cache, read_token_store
from pipeline.models.llamagen import config_from_spec, load_gpt
from pipeline.progress import progress

from .common import StepLog, write_json

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    loss: str = "cca"
    beta: float = 0.5
    lam: float = field(default=10.0, metadata={"key": "lambda"})
    lr: float = 3e-5
    weight_decay: float = 0.0
    epochs: float = 1.0
    batch_size: int = 64
    micro_batch_size: int = 64
    uncond_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # steps between checkpoints out/checkpoints/<step>.pt + resume.pt (0: final only, no resume)

    def align_config(self) -> AlignConfig:
        return AlignConfig(**{k: getattr(self, k) for k in AlignConfig.__dataclass_fields__})


def save_policy(path: Path, policy, cfg: TrainConfig, init_sha256: str, step: int) -> None:
    """LlamaGen c2i layout ({"model": state_dict, ...}), plus our config and provenance."""
    save_checkpoint(path, policy.state_dict(), policy.cfg.to_dict(), family="llamagen-gpt",
                    init_sha256=init_sha256, train_params={**cfg.__dict__}, steps=step)


def run_key(cfg: TrainConfig, provenance: dict, init_sha: str) -> str:
    """What a resumable state must match to be continued: hyperparameters, cache and initial weights."""
    return hashlib.sha256(json.dumps([asdict(cfg), provenance, init_sha], sort_keys=True, default=str).encode()).hexdigest()


def run(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, out: Path, device: torch.device,
        gpt_model: str | None = None) -> None:
    store = read_token_store(tokens_path)
    init_sha = file_sha256(init)
    cache, provenance = read_ref_cache(cache_path, expect={"tokens_fingerprint": store.fingerprint, "ref_ckpt_sha256": init_sha})
    policy = load_gpt(init, config_from_spec(gpt_model, store.tokens.shape[2])).to(device)
    steps = StepLog(out, "log")
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path, key = ckpt_dir / "resume.pt", run_key(cfg, provenance, init_sha)
    resume = None
    if resume_path.is_file():
        saved = torch.load(resume_path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            resume = saved["state"]
            policy.load_state_dict(resume["model"])
            steps.rows = saved["log_rows"]
            log.info("resuming %s from step %d", out, resume["step"])
        else:
            log.info("ignoring %s: it belongs to other settings or inputs", resume_path)

    def checkpoint(state: dict) -> None:
        save_policy(ckpt_dir / f"{state['step']:07d}.pt", policy, cfg, init_sha, state["step"])
        tmp = resume_path.with_name(resume_path.name + ".tmp")
        torch.save({"key": key, "state": state, "log_rows": steps.rows}, tmp)
        os.replace(tmp, resume_path)  # atomic: a kill leaves the previous resume point intact

    started = time.perf_counter()
    try:
        train_policy(
            policy, store.tokens, cache, cfg.align_config(), device, on_step=steps,
            progress=lambda total: progress(total=total, desc="train", unit="step"),
            on_checkpoint=checkpoint, checkpoint_every=cfg.save_every, resume=resume,
        )
    except FloatingPointError as e:
        steps.save()
        good = sorted(ckpt_dir.glob("[0-9]*.pt"))
        raise FloatingPointError(f"training stopped: {e}. Last good checkpoint: {good[-1] if good else init} "
                                 f"(the step log is in {out / 'log.csv'}).") from e
    seconds = time.perf_counter() - started
    steps.save()
    save_policy(out / "policy.pt", policy, cfg, init_sha, len(steps.rows))
    resume_path.unlink(missing_ok=True)
    last = steps.rows[-1]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    summary = {"steps": len(steps.rows), "seconds": seconds, "peak_rss_mb": peak_rss_mb, "final": last, "params": asdict(cfg)}
    write_json(out / "summary.json", summary)
    log.info("peak RSS %.0f MB", peak_rss_mb)
    log.info("trained %d steps in %.1fs: loss %.4f, rewards/pos %.3f, rewards/neg %.3f, accuracy %.3f -> %s",
             len(steps.rows), seconds, last["loss"], last["rewards/pos"], last["rewards/neg"], last["rewards/accuracy"], out)
