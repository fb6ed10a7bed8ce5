"""VAR's multi-scale residual VQVAE (`vae_ch160v4096z32.pth`), checkpoint-compatible with the release.

References: VAR, "Visual Autoregressive Modeling" (Tian et al., 2024), `models/vqvae.py`, `quant.py`,
`basic_vae.py`; facts in docs/upstream.md, "VAR". The encoder/decoder are the latent-diffusion vq-f16
ones (ch_mult 1,1,2,2,4: 16x downsampling; GroupNorm(32) eps 1e-6; one self-attention at the lowest
resolution and in the middle; the attention's q|k|v come from one 1x1 conv `qkv`).

Token layout: the codes of every scale, row-major, concatenated coarse to fine: (B, L) with
L = sum(pn^2) = 680 for patch_nums (1,2,3,4,5,6,8,10,13,16). Scale k of a flat sequence is
`tokens[:, begin[k]:end[k]]` (see `scale_bounds`).

The quantiser (`quantize.*`: the codebook and the 4 shared phi convs) is all that VAR's training input
needs; `MultiScaleQuantizer` is therefore usable on its own (`load_quantizer`), without the
encoder/decoder weights in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_from_json, named_config

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def scale_bounds(patch_nums: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale in the flat token sequence: [(0,1), (1,5), (5,14), ...] for VAR."""
    bounds, cur = [], 0
    for pn in patch_nums:
        bounds.append((cur, cur + pn * pn))
        cur += pn * pn
    return bounds


@dataclass
class MSVQConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: the codebook vectors' width
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS
    share_quant_resi: int = 4  # number of phi convs shared over the scales (VAR's default, the release)
    quant_resi: float = 0.5  # phi(h) = (1 - 0.5) h + 0.5 conv(h)
    quant_conv_ks: int = 3

    def __post_init__(self) -> None:
        self.ch_mult, self.patch_nums = tuple(self.ch_mult), tuple(self.patch_nums)
        if self.share_quant_resi < 2:
            raise ValueError("only partially shared phi convs (share_quant_resi >= 2, the released VQVAE uses 4) are supported")
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            raise ValueError(f"patch_nums {self.patch_nums} must be at least two increasing sizes")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]

    @property
    def codebook_size(self) -> int:  # the name the token store and LlamaGen's VQConfig use
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


MSVQ_CONFIGS = {"vae_ch160v4096z32": {}}  # the released tokenizer is the default config


def msvq_config_from_spec(spec: str | None) -> MSVQConfig | None:
    """None (the checkpoint's own config, else the release's), a name, or a JSON file of MSVQConfig fields."""
    if spec is None:
        return None
    if spec.endswith(".json"):
        return config_from_json(MSVQConfig, spec)
    return named_config(MSVQConfig, spec, MSVQ_CONFIGS, "VAR VQVAE config (--vae-model)")


# ----------------------------------------------------------------------------------------------------
# The quantiser: image features <-> multi-scale codes, and VAR's teacher-forcing input.


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual conv applied to each scale's upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class SharedPhis(nn.Module):
    """K phi convs shared by the scales: scale si uses the conv whose tick is nearest to si / (S - 1)."""

    def __init__(self, channels: int, ratio: float, k: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(k))  # key quant_resi.qresi_ls.<k>
        # upstream's ticks: linspace(1/3K, 1-1/3K) for K = 4, else linspace(1/2K, 1-1/2K)
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def for_scale(self, si: int, num_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (num_scales - 1))))]


class MultiScaleQuantizer(nn.Module):
    """`quantize.*` of the VQVAE: codebook `embedding`, `quant_resi` phis, `ema_vocab_hit_SV` (training stat)."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_nums = cfg.patch_nums
        self.quant_resi = SharedPhis(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, len(self.patch_nums))

    def _scale_codes_to_map(self, codes: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) codes -> (B, Cvae, pn, pn) codebook vectors."""
        return self.embedding(codes).transpose(1, 2).reshape(codes.shape[0], self.cfg.z_channels, pn, pn)

    def _upsampled(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """phi(bicubic upsample of scale si's map to the full grid); the last scale is already full size."""
        full = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.phi(si)(h)

    @torch.no_grad()
    def features_to_codes(self, f: torch.Tensor) -> torch.Tensor:
        """Residual quantisation coarse to fine, (B, Cvae, H, W) float32 -> (B, L) int64 flat codes."""
        B, C, H, W = f.shape
        if H != self.patch_nums[-1] or W != self.patch_nums[-1]:
            raise ValueError(f"feature map {H}x{W} does not match the last scale {self.patch_nums[-1]}: "
                             f"images must be {self.cfg.image_size}px for these patch_nums")
        f_rest, codebook, out = f.float().clone(), self.embedding.weight.float(), []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, C)
            # squared L2 distance, in upstream's order of operations so ties break identically
            dist = (z.square().sum(1, keepdim=True) + codebook.square().sum(1)).addmm_(z, codebook.T, alpha=-2, beta=1)
            codes = dist.argmin(1).view(B, pn * pn)
            f_rest -= self._upsampled(si, self._scale_codes_to_map(codes, pn))
            out.append(codes)
        return torch.cat(out, 1)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [tokens[:, a:b] for a, b in scale_bounds(self.patch_nums)]

    def codes_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """f_hat = sum over scales of phi(upsampled codebook vectors): (B, L) -> (B, Cvae, H, W)."""
        f_hat = None
        for si, (pn, codes) in enumerate(zip(self.patch_nums, self.split(tokens.long()), strict=True)):
            h = self._upsampled(si, self._scale_codes_to_map(codes, pn))
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def next_input(self, si: int, f_hat: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step: add scale si's codes (B, pn^2) into f_hat and return (f_hat, the next scale's
        input (B, pn_next^2, Cvae) = area-downsampled f_hat, or None after the last scale)."""
        f_hat = f_hat + self._upsampled(si, self._scale_codes_to_map(codes, self.patch_nums[si]))
        if si == len(self.patch_nums) - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """VAR's training input from its targets: (B, L) codes -> (B, L - pn_0^2, Cvae) float32, the running
        f_hat area-downsampled to each next scale (upstream `idxBl_to_var_input`). No encoder/decoder needed."""
        B, full = tokens.shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.cfg.z_channels, full, full, dtype=torch.float32)
        inputs = []
        for si, codes in enumerate(self.split(tokens.long())[:-1]):
            f_hat, nxt = self.next_input(si, f_hat, codes)
            inputs.append(nxt)
        return torch.cat(inputs, 1).float()


# ----------------------------------------------------------------------------------------------------
# Encoder / decoder (latent-diffusion vq-f16 layout, VAR's basic_vae.py keys).


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        w = torch.softmax(q.transpose(1, 2) @ k * C**-0.5, dim=2)  # (B, HW_q, HW_k)
        h = (v @ w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as latent diffusion


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution: `block.<i>`, `attn.<i>` (lowest resolution only), `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        g, mult = cfg.norm_groups, cfg.ch_mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, m in enumerate(mult):
            c_out, last = cfg.ch * m, i == len(mult) - 1
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out, g) for _ in range(cfg.num_res_blocks)] if last else []
            self.down.append(Level(blocks, attns, None if last else Downsample(c_out), "downsample"))
            c_in = c_out
        self.mid = Mid(c_in, g)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        g, mult = cfg.norm_groups, cfg.ch_mult
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, 1, 1)
        self.mid = Mid(c, g)
        levels = []
        for i in reversed(range(len(mult))):  # built from the lowest resolution up, stored in level order
            c_out = cfg.ch * mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out, g) for _ in range(cfg.num_res_blocks + 1)] if i == len(mult) - 1 else []
            levels.insert(0, Level(blocks, attns, Upsample(c_out) if i != 0 else None, "upsample"))
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MSVQModel(nn.Module):
    """The VQVAE: `encoder`, `quant_conv`, `quantize`, `post_quant_conv`, `decoder` (upstream keys)."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> (B, L) codes, coarse to fine (the token store's layout)."""
        return self.quantize.features_to_codes(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) codes -> images (B, 3, H, W) in [-1, 1]."""
        f_hat = self.quantize.codes_to_features(tokens)
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)
