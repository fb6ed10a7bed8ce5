"""Stage `pretrain-vq` (embedded default only): a small VQ tokenizer of LlamaGen's design.

    cca-pipe pretrain-vq --images data/images/train --out data/vq/vq.pt
The checkpoint has vq_ds16_c2i.pt's layout ({"model": state_dict}) plus its config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import owned_checkpoint, save_checkpoint
from pipeline.config import check_ranges, setting
from pipeline.images import list_image_folder, load_images, to_unit_range
from pipeline.outputs import Claim, stage_json, write_json, written_by
from pipeline.pretraining import train_vq
from pipeline.tokenizers.vq import VQConfig

from .cli.params import as_params

log = logging.getLogger(__name__)


@dataclass
class PretrainVQConfig:
    image_size: int = setting(16, ge=4)
    codebook_size: int = setting(256, ge=2, le=65536)
    codebook_embed_dim: int = setting(8, ge=1)
    ch: int = setting(32, ge=1)
    ch_mult: list[int] = setting(default_factory=lambda: [1, 2, 2], nonempty=True, ge=1)
    num_res_blocks: int = setting(1, ge=1)
    z_channels: int = setting(32, ge=1)
    norm_groups: int = setting(8, ge=1)
    steps: int = setting(1000, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(2e-3, gt=0.0)
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        check_ranges(self, "pretrain_vq")


def run(cfg: PretrainVQConfig, images: Path, out: Path, device: torch.device) -> None:
    """Writes `out` and `metrics.json` beside it; both must be absent or ours."""
    metrics = out.with_name("metrics.json")
    with Claim(out, what="cca-pipe pretrain-vq", owned=owned_checkpoint("llamagen-vq"),
               sidecars={metrics: written_by("pretrain-vq")}) as claim:
        _pretrain(cfg, images, out, metrics, device)
        claim.committed = True


def _pretrain(cfg: PretrainVQConfig, images: Path, out: Path, metrics: Path, device: torch.device) -> None:
    paths, _, _ = list_image_folder(images)
    data = load_images(paths, cfg.image_size)
    vq_cfg = VQConfig(
        codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim, ch=cfg.ch,
        ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
        norm_groups=cfg.norm_groups, codebook_used_size=cfg.codebook_size,
    )
    model = train_vq(data, vq_cfg, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=device)
    with torch.no_grad():
        x = to_unit_range(data).to(device)
        codes = model.encode(x)
        mse = torch.nn.functional.mse_loss(model.decode_codes(codes), x).item()
    save_checkpoint(out, model.state_dict(), vq_cfg.to_dict(), kind="llamagen-vq", settings=as_params(cfg))
    stats = {"recon_mse": mse, "codes_used": int(codes.unique().numel()), "codebook_size": cfg.codebook_size}
    write_json(metrics, stage_json("pretrain-vq", stats))
    log.info("VQ: reconstruction MSE %.4f, %d/%d codes used -> %s", mse, stats["codes_used"], cfg.codebook_size, out)
