"""LlamaGen's VQ tokenizer (VQGAN-style conv encoder/decoder with an l2-normalised low-dim codebook).

Reference: LlamaGen `tokenizer/tokenizer_image/vq_model.py`; facts in docs/upstream.md, "VQ tokenizer".
Keys match `vq_ds16_c2i.pt` exactly (`encoder.conv_blocks.N.res.M...`, `quantize.embedding.weight`,
`quantize.codebook_used`, `quant_conv`, `post_quant_conv`), so the public file loads with strict=True.

Images enter in [-1, 1], (B, 3, H, W). Codes are row-major over the (H/ds, W/ds) latent grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_from_json, named_config


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    # Channels per level are ch * ch_mult[i]; downsampling factor is 2 ** (len(ch_mult) - 1).
    ch: int = 128
    ch_mult: tuple[int, ...] = field(default=(1, 1, 2, 2, 4))
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1, as upstream
    z_channels: int = 256
    norm_groups: int = 32
    # Size of the `quantize.codebook_used` usage buffer upstream keeps (65536 in vq_ds16_c2i.pt).
    codebook_used_size: int = 65536

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                raise ValueError(f"channels {c} are not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "ch_mult": list(self.ch_mult)}


VQ_CONFIGS: dict[str, dict] = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
}


def vq_config(name: str, **overrides) -> VQConfig:
    return named_config(VQConfig, name, VQ_CONFIGS, "VQ config (--vq-model)", **overrides)


def vq_config_from_spec(spec: str | None) -> VQConfig | None:
    """None (the checkpoint carries its config), a named config ("VQ-16"), or a JSON file of VQConfig fields."""
    if spec is None:
        return None
    if spec.endswith(".json"):
        return config_from_json(VQConfig, spec)
    return vq_config(spec)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions, 1x1 conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2)  # (B, C, HW)
        v = self.v(h).flatten(2)  # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * C**-0.5, dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad, as upstream


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for i in range(levels):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if i == levels - 1:
                    block.attn.append(AttnBlock(block_in, g))
            if i != levels - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g), AttnBlock(block_in, g), ResnetBlock(block_in, block_in, g)])
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g), AttnBlock(block_in, g), ResnetBlock(block_in, block_in, g)])
        self.conv_blocks = nn.ModuleList()
        for i in range(levels):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[levels - i - 1]
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if i == 0:
                    block.attn.append(AttnBlock(block_in, g))
            if i != levels - 1:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        self.register_buffer("codebook_used", torch.zeros(cfg.codebook_used_size))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)  # (K, D), l2-normalised rows

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) for z (B, D, h, w): nearest l2-normalised code to l2-normalised z."""
        zf = F.normalize(z.permute(0, 2, 3, 1).float(), dim=-1)  # (B, h, w, D)
        cb = self.codebook().float()
        d = zf.pow(2).sum(-1, keepdim=True) + cb.pow(2).sum(-1) - 2 * zf @ cb.T  # (B, h, w, K)
        return d.argmin(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) normalised code vectors."""
        return self.codebook()[codes].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))  # (B, D, h, w)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, h*w), row-major."""
        return self.quantize.nearest(self.encode_latent(images)).flatten(1)

    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (B, L) -> images (B, 3, H, W), roughly in [-1, 1]."""
        if grid is None:
            side = int(round(codes.shape[1] ** 0.5))
            grid = (side, side)
        zq = self.quantize.lookup(codes.view(codes.shape[0], *grid))
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, images: torch.Tensor, commit_beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, codebook+commitment loss, codes). Straight-through estimator."""
        z = F.normalize(self.encode_latent(images), dim=1)
        codes = self.quantize.nearest(z)
        zq = self.quantize.lookup(codes)
        vq_loss = F.mse_loss(zq, z.detach()) + commit_beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()
        return self.decoder(self.post_quant_conv(zq)), vq_loss, codes.flatten(1)
