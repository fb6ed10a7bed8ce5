"""VAR class-conditional next-scale transformer (`var_d{16,20,24,30}.pth`), checkpoint-compatible.

References: VAR, "Visual Autoregressive Modeling" (Tian et al., 2024), `models/var.py`, `basic_var.py`;
facts in docs/upstream.md, "VAR".

Sequence layout (L = 680 for patch_nums 1..16): position 0 is the start slot (class embedding +
`pos_start`) and predicts the 1x1 scale; the positions of scale k > 0 hold the running reconstruction
f_hat area-downsampled to scale k (the quantiser's teacher-forcing input, `word_embed` maps its 32
channels to C) and predict scale k's codes. The logit at position p predicts token p (no shift).
Attention is block-causal over scales (a position sees its own scale and the coarser ones).
Conditioning: the class embedding drives every block's AdaLN (6 modulations) and the head's (2).

Unlike upstream `forward`, the module never drops labels: the training loop substitutes the null class
(row `num_classes`) itself, so a likelihood is never computed with a randomly dropped label.
Drop-path is off unless `drop_path_rate > 0` (or `VARModel.set_dropout`) and the module is in train
mode; reflogp (eval mode) and the policy at step 0 then compute identical, deterministic log-probs.

`VARModel` pairs the transformer with the frozen quantiser it reads its input from; it is what the
pipeline trains and samples (pipeline.families). Its checkpoint keeps only the transformer's upstream keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..logprobs import token_logp
from ..tokenizers.msvq import VAR_PATCH_NUMS, MultiScaleQuantizer, scale_bounds
from .layers import DropPath, LambdaEmbedding, linear_rates, number_sites, run_blocks

# log(100) as upstream computes it (a float32 tensor's log), the cap of the attention temperature
_MAX_SCALE_MUL = float(torch.log(torch.tensor(100)))


@dataclass
class VARConfig:
    depth: int = 16
    width: int = 0  # C; 0: 64 * depth (upstream: head dim 64)
    heads: int = 0  # 0: depth
    num_classes: int = 1000  # class_emb has num_classes + 1 rows; the last is the null class
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0  # upstream pretraining used 0.1 * depth / 24
    lambda_conditioning: bool = False  # `lambda_embed.*` (paper Table 5): lambda's embedding added to the class's

    def __post_init__(self) -> None:
        self.patch_nums = tuple(self.patch_nums)
        self.width = self.width or 64 * self.depth
        self.heads = self.heads or self.depth
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    has_null_class = True  # VAR is always trained with class dropout

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def to_dict(self) -> dict:
        return asdict(self)


def var_config(depth: int, **overrides) -> VARConfig:
    """The release's config for a depth (16, 20, 24, 30): C = 64 depth, heads = depth."""
    return VARConfig(depth=depth, **overrides)


class SelfAttention(nn.Module):
    """l2-normalised q/k with a learned per-head temperature exp(min(scale_mul, log 100)); softmax scale 1."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, self.heads = cfg.width, cfg.heads
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # k has no bias; upstream stores zeros
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.caching = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        # the temperature is a float32 parameter: cast back so SDPA runs in the autocast dtype (bf16 on CUDA)
        q = (F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(_MAX_SCALE_MUL).exp()).to(v.dtype)
        k = F.normalize(k, dim=-1).to(v.dtype)
        if self.caching:  # sampling: queries of the current scale see every earlier scale's keys
            if self.cache is not None:
                k, v = torch.cat((self.cache[0], k), 2), torch.cat((self.cache[1], v), 2)
            self.cache = (k, v)
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        hidden = round(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 attn(LN(x)(1 + scale1) + shift1); x += gamma2 ffn(LN(x)(1 + scale2) + shift2), the six
    modulations from SiLU -> Linear(C, 6C) of the class embedding (`ada_lin.1`)."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        self.C = cfg.width
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(cfg)
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_mask: torch.Tensor | None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, attn_mask) * gamma1, keys, 0)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2, keys, 1)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.C = cfg.width
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class VAR(nn.Module):
    """The transformer alone: exactly upstream's state-dict keys (`var_d16.pth` loads strictly)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.seq_len
        self.first_l = cfg.patch_nums[0] ** 2
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        rates = linear_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg, rates[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        # scale index of every position, and the block-causal additive mask (0 where scale(j) <= scale(i))
        level = torch.cat([torch.full((pn * pn,), i, device="cpu") for i, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", level[None].contiguous())
        mask = torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.reshape(1, 1, L, L).contiguous())
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, std=init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        if cfg.lambda_conditioning:  # after the init above: its last layer must stay zero
            self.lambda_embed = LambdaEmbedding(C)
        number_sites(self)
        self.activation_checkpointing = False  # a training setting (train.activation_checkpointing), not saved

    def condition(self, labels: torch.Tensor, lam: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector (B, C) of AdaLN and the start token: the class embedding, plus lambda's for
        a lambda-conditioned policy."""
        cond = self.class_emb(labels)
        if self.cfg.lambda_conditioning:
            if lam is None:
                raise ValueError("this policy is lambda-conditioned: give the lambda to sample or score it at (eval.lambdas)")
            cond = cond + self.lambda_embed(lam).to(cond.dtype)
        return cond

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Embedded first scale (B, first_l, C): class embedding + pos_start + level/position embeddings."""
        lvl_pos = self.lvl_embed(self.lvl_1L[:, : self.first_l]) + self.pos_1LC[:, : self.first_l]
        return cond[:, None, :].expand(-1, self.first_l, -1) + self.pos_start + lvl_pos

    def scale_tokens(self, si: int, features: torch.Tensor) -> torch.Tensor:
        """Embedded input of scale si > 0 from its (B, pn^2, Cvae) teacher-forcing features."""
        a, b = scale_bounds(self.cfg.patch_nums)[si]
        return self.word_embed(features.float()) + self.lvl_embed(self.lvl_1L[:, a:b]) + self.pos_1LC[:, a:b]

    def logits(self, x: torch.Tensor, cond: torch.Tensor, attn_mask: torch.Tensor | None,
               dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        x = run_blocks(self.blocks, x, cond, attn_mask, dropout_keys,
                       checkpointing=self.activation_checkpointing and self.training)
        return self.head(self.head_nm(x.float(), cond)).float()

    def forward(self, labels: torch.Tensor, teacher_input: torch.Tensor, lam: torch.Tensor | None = None,
                dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: labels (B,), teacher_input (B, L - first_l, Cvae) -> logits (B, L, V) float32."""
        with torch.autocast(teacher_input.device.type, enabled=False):  # embeddings in float32, as upstream
            cond = self.condition(labels, lam)
            first = cond[:, None, :].expand(-1, self.first_l, -1) + self.pos_start
            x = torch.cat((first, self.word_embed(teacher_input.float())), 1)
            x = x + self.lvl_embed(self.lvl_1L.expand(len(labels), -1)) + self.pos_1LC
        return self.logits(x, cond, self.attn_bias_for_masking, dropout_keys)

    def set_caching(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.caching, block.attn.cache = enabled, None


class VARModel(nn.Module):
    """VAR + the frozen quantiser that turns codes into its input: the family interface
    (pipeline.families) over next-scale prediction. Only `var` is trained; `quantizer` never changes."""

    family: ClassVar[str] = "var"  # pipeline.families

    def __init__(self, var: VAR, quantizer: MultiScaleQuantizer):
        super().__init__()
        if quantizer.cfg.patch_nums != var.cfg.patch_nums or quantizer.cfg.z_channels != var.cfg.cvae:
            raise ValueError(f"VAR (patch_nums {var.cfg.patch_nums}, Cvae {var.cfg.cvae}) and its VQVAE quantiser "
                             f"(patch_nums {quantizer.cfg.patch_nums}, Cvae {quantizer.cfg.z_channels}) do not fit")
        if quantizer.cfg.vocab_size != var.cfg.vocab_size:
            raise ValueError(f"VAR predicts {var.cfg.vocab_size} codes but the VQVAE has {quantizer.cfg.vocab_size}")
        self.var = var
        self.quantizer = quantizer.requires_grad_(False)
        self.cfg = var.cfg

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor | None = None,
                dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log p(token_p | coarser scales, c) for all L positions: tokens (B, L), labels (B,)
        -> (B, L) float32. `lam` (B,): each row's lambda, for a lambda-conditioned policy. `dropout_keys`
        (B,) int64: each sequence's drop-path key (pipeline.models.layers.noise_keys), needed in train mode
        with drop path on."""
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):  # float32, as upstream
            teacher_input = self.quantizer.teacher_forcing_input(tokens)
        return token_logp(self.var(labels, teacher_input, lam, dropout_keys), tokens)

    def enable_lambda_conditioning(self, seed: int = 0) -> None:
        """Add a zero-initialised lambda embedding (the policy is unchanged until it trains), drawn from `seed`."""
        if not self.cfg.lambda_conditioning:
            # a new config, not an edit of one other models may share (VAR(cfg) keeps the object it is given)
            self.cfg = self.var.cfg = replace(self.cfg, lambda_conditioning=True)
            self.var.lambda_embed = LambdaEmbedding(self.cfg.width, seed=seed).to(self.var.head.weight.device)

    def set_dropout(self, dropout: float = 0.0, drop_path: float = 0.0, section: str = "train") -> None:
        """VAR's fine-tuning regularisation: drop path rising linearly over the blocks to `drop_path`
        (the release: 0.1 x depth / 24); active in train mode only. VAR's recipe has no dropout. `section`:
        the params.yaml section the rates come from (train, or reflogp for the reference), for the error."""
        if dropout:
            raise ConfigError(f"{section}.dropout = {dropout}: VAR is regularised by drop path only ({section}.drop_path); "
                              f"set {section}.dropout to 0")
        self.cfg.drop_path_rate = drop_path
        for block, rate in zip(self.var.blocks, linear_rates(drop_path, len(self.var.blocks)), strict=True):
            block.drop_path.rate = rate

    def upstream_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What VAR's code loads: the transformer's state dict, without the quantiser (it stays in the VQVAE
        file). `state`: this whole model's state dict (gathered from shards), else the live weights."""
        if state is None:
            return self.var.state_dict()
        return {k.removeprefix("var."): v for k, v in state.items() if k.startswith("var.")}

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks: FSDP's units of sharding (pipeline.parallel), the checkpointed units."""
        return self.var.blocks

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.var.activation_checkpointing = enabled

    def train(self, mode: bool = True) -> VARModel:
        super().train(mode)
        self.quantizer.eval()
        return self
