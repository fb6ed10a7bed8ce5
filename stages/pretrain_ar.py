"""Stage `pretrain-ar` (embedded default only): a small LlamaGen-style class-conditional GPT.

    cca-pipe pretrain-ar --tokens data/tokens/train.zarr --out data/ar/gpt.pt
Trained with class dropout to the null class (so CFG works); saved in LlamaGen's c2i layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import owned_checkpoint, save_checkpoint
from pipeline.config import check_ranges, setting
from pipeline.models.llamagen import GPTConfig
from pipeline.outputs import Claim
from pipeline.pretraining import train_gpt
from pipeline.tokenstore import open_token_store

from .cli.common import StepLog
from .cli.params import as_params

log = logging.getLogger(__name__)


@dataclass
class PretrainARConfig:
    dim: int = setting(128, ge=4)
    n_layer: int = setting(4, ge=1)
    n_head: int = setting(4, ge=1)
    multiple_of: int = setting(32, ge=1)
    class_dropout: float = setting(0.1, ge=0.0, lt=1.0)
    epochs: int = setting(20, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(1e-3, gt=0.0)
    weight_decay: float = setting(0.05, ge=0.0)
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self, "pretrain_ar")


def run(cfg: PretrainARConfig, tokens_path: Path, out: Path, device: torch.device) -> None:
    """Writes `out` and its step log (pretrain_log.jsonl/.csv) beside it; all must be absent or ours."""
    logs = {out.with_name(f"pretrain_log.{ext}"): StepLog.owns for ext in ("jsonl", "csv")}
    with Claim(out, what="cca-pipe pretrain-ar", owned=owned_checkpoint("llamagen-gpt"), sidecars=logs) as claim:
        _pretrain(cfg, tokens_path, out, device)
        claim.committed = True


def _pretrain(cfg: PretrainARConfig, tokens_path: Path, out: Path, device: torch.device) -> None:
    store = open_token_store(tokens_path)
    gpt_cfg = GPTConfig(
        dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, multiple_of=cfg.multiple_of,
        vocab_size=int(store.attrs["codebook_size"]), num_classes=store.num_classes,
        block_size=store.seq_len, has_null_class=cfg.class_dropout > 0,
    )
    steps = StepLog(out.parent, "pretrain_log")
    model = train_gpt(
        store.tokens, store.labels, gpt_cfg, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, class_dropout=cfg.class_dropout, seed=cfg.seed, device=device, on_step=steps,
    )
    steps.save()
    save_checkpoint(out, model.state_dict(), gpt_cfg.to_dict(), kind="llamagen-gpt", tokens_fingerprint=store.fingerprint,
                    settings=as_params(cfg))
    log.info("GPT with %.2fM parameters, final loss %.3f -> %s", model.num_params() / 1e6, steps.rows[-1]["loss"], out)
