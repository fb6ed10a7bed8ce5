"""Stage `train`: fine-tune the policy with CCA over the cached reference log-probs.

    cca-pipe train --tokens data/tokens/train.zarr --cache data/reflogp/ref_logp.parquet \
                   --init data/ar/gpt.pt --out data/train
Only the policy is resident (initialised from the reference checkpoint `--init`); the reference model
is never constructed. The cache must have been made from these tokens and this checkpoint (checked).
Writes policy.pt (LlamaGen c2i layout), log.csv + log.jsonl (per step), summary.json.
"""

from __future__ import annotations

import logging
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
    save_every: int = 0  # steps between intermediate checkpoints out/checkpoints/<step>.pt (0: only the final one)

    def align_config(self) -> AlignConfig:
        return AlignConfig(**{k: getattr(self, k) for k in AlignConfig.__dataclass_fields__})


def save_policy(path: Path, policy, cfg: TrainConfig, init_sha256: str, step: int) -> None:
    """LlamaGen c2i layout ({"model": state_dict, ...}), plus our config and provenance."""
    save_checkpoint(path, policy.state_dict(), policy.cfg.to_dict(), family="llamagen-gpt",
                    init_sha256=init_sha256, train_params={**cfg.__dict__}, steps=step)


def run(cfg: TrainConfig, tokens_path: Path, cache_path: Path, init: Path, out: Path, device: torch.device,
        gpt_model: str | None = None) -> None:
    store = read_token_store(tokens_path)
    cache, provenance = read_ref_cache(
        cache_path, expect={"tokens_fingerprint": store.fingerprint, "ref_ckpt_sha256": file_sha256(init)}
    )
    policy = load_gpt(init, config_from_spec(gpt_model, store.tokens.shape[2])).to(device)
    steps = StepLog(out, "log")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    init_sha = provenance["ref_ckpt_sha256"]
    train_policy(
        policy, store.tokens, cache, cfg.align_config(), device, on_step=steps,
        progress=lambda total: progress(total=total, desc="train", unit="step"),
        on_checkpoint=lambda step, model, _opt: save_policy(out / "checkpoints" / f"{step:07d}.pt", model, cfg, init_sha, step),
        checkpoint_every=cfg.save_every,
    )
    seconds = time.perf_counter() - started
    steps.save()
    save_policy(out / "policy.pt", policy, cfg, init_sha, len(steps.rows))
    last = steps.rows[-1]
    summary = {"steps": len(steps.rows), "seconds": seconds, "final": last, "params": asdict(cfg)}
    write_json(out / "summary.json", summary)
    log.info("trained %d steps in %.1fs: loss %.4f, rewards/pos %.3f, rewards/neg %.3f, accuracy %.3f -> %s",
             len(steps.rows), seconds, last["loss"], last["rewards/pos"], last["rewards/neg"], last["rewards/accuracy"], out)
