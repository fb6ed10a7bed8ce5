"""Stage `pretrain-vq` (embedded default only): a small VQ tokenizer of LlamaGen's design.

    cca-pipe pretrain-vq --images data/images/train --out data/vq/vq.pt
The checkpoint has vq_ds16_c2i.pt's layout ({"model": state_dict}) plus its config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.images import list_image_folder, load_images, to_unit_range
from pipeline.pretraining import train_vq
from pipeline.tokenizers.vq import VQConfig

from .common import write_json

log = logging.getLogger(__name__)


@dataclass
class PretrainVQConfig:
    image_size: int = 16
    codebook_size: int = 256
    codebook_embed_dim: int = 8
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    z_channels: int = 32
    norm_groups: int = 8
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def run(cfg: PretrainVQConfig, images: Path, out: Path, device: torch.device) -> None:
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
    save_checkpoint(out, model.state_dict(), vq_cfg.to_dict(), family="llamagen-vq")
    stats = {"recon_mse": mse, "codes_used": int(codes.unique().numel()), "codebook_size": cfg.codebook_size}
    write_json(out.with_name("metrics.json"), stats)
    log.info("VQ: reconstruction MSE %.4f, %d/%d codes used -> %s", mse, stats["codes_used"], cfg.codebook_size, out)
