"""LlamaGen class-conditional GPT (c2i), checkpoint-compatible with the public release.

References:
- LlamaGen, "Autoregressive Model Beats Diffusion" (Sun et al., 2024), `autoregressive/models/gpt.py`;
  facts used here are collected in docs/upstream.md, "LlamaGen".
- Llama: RMSNorm, SwiGLU feed-forward, rotary position embedding (here the 2D variant).

State-dict keys match upstream exactly (`cls_embedding.embedding_table.weight`, `tok_embeddings.weight`,
`layers.N.attention.wqkv.weight`, ...), so `load_state_dict(strict=True)` accepts upstream files once the
wrapper (`{"model": ...}`) and any `freqs_cis` entry are removed (see `pipeline.checkpoint`).

Sequence layout: input = [class embedding] + tok_embeddings(z[:, :-1]); the logit at position p predicts
z[p]. Class dropout is *not* done inside the module (upstream does it in its LabelEmbedder): the training
loop replaces labels by `null_class` itself, so computing a likelihood never drops a label by accident.

`forward(tokens, labels)` is teacher forcing: per-token log-probs (B, N) in float32, the one way reflogp,
train and the tests compute likelihoods (so DDP/FSDP wrap it unchanged); `logits` is the raw network,
also used incrementally by the sampler. Upstream's regularisation (resid, ffn and token dropout, drop
path) is present but off (p = 0) until `set_dropout` turns it on for fine-tuning; it acts only in train mode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_from_json, named_config
from ..logprobs import token_logp
from .layers import DropPath, KeyedDropout, LambdaEmbedding, linear_rates, number_sites, run_blocks


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    num_classes: int = 1000
    # Number of image tokens N (a square grid): 256 at 256px, 576 at 384px with VQ-16.
    block_size: int = 256
    cls_token_num: int = 1
    # FFN hidden = find_multiple(int(2 * 4 * dim / 3), multiple_of): 2048 for GPT-B.
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # True when trained with class dropout: the embedding table then has a null row at index num_classes.
    has_null_class: bool = True
    # A lambda-conditioned policy (paper Table 5): `lambda_embed.*` adds an embedding of lambda to the class
    # token's; dropping those keys leaves LlamaGen's own layout.
    lambda_conditioning: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError("head size must be a multiple of 4 for the 2D rotary embedding")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid of tokens")

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def seq_len(self) -> int:  # tokens per image, the name every model family shares
        return self.block_size

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)


# Named upstream configurations (docs/upstream.md, "Named GPT configurations").
GPT_CONFIGS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A named upstream config (e.g. "GPT-B") with overrides such as block_size=576."""
    return named_config(GPTConfig, name, GPT_CONFIGS, "GPT config (--gpt-model)", **overrides)


def config_from_spec(spec: str | None, block_size: int | None = None) -> GPTConfig | None:
    """Resolve a user's model spec: None (the checkpoint carries its config), a named upstream config
    ("GPT-L", with block_size from the token grid), or a JSON file of GPTConfig fields."""
    if spec is None:
        return None
    if spec.endswith(".json"):
        cfg = config_from_json(GPTConfig, spec)
        if block_size is not None and cfg.block_size != block_size:
            raise ValueError(f"model config {spec} has block_size {cfg.block_size}, but the data has {block_size} tokens")
        return cfg
    return gpt_config(spec, **({"block_size": block_size} if block_size else {}))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d_table(cfg: GPTConfig) -> torch.Tensor:
    """(cls_token_num + block_size, head_dim/2, 2) table of (cos, sin), LlamaGen's 2D RoPE.

    Half of each head rotates with the token's row, the other half with its column. The class
    positions get (0, 0), which zeroes their q/k exactly as upstream does.
    """
    head_dim = cfg.dim // cfg.n_head
    half = head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    grid = math.isqrt(cfg.block_size)
    t = torch.arange(grid, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (grid, half/2)
    angles = torch.cat(
        [f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1
    )  # (grid, grid, half): row angles first, column angles second
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, T, H, hd) by table (T, hd/2, 2), in float32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Static per-layer cache for incremental decoding: (B, H, max_len, hd)."""

    def __init__(self, batch: int, max_len: int, n_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # q | k | v, upstream order
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = KeyedDropout(0.0)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(B, T, self.n_head, self.head_dim), rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.view(B, T, self.n_head, self.head_dim)))  # (B, H, T, hd)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)
        # Causal within the new block; with a cache, every new query also sees all earlier keys.
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)), keys)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = KeyedDropout(0.0)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)), keys)  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, start, keys), keys, 0)
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h), keys), keys, 1)


class ClassEmbedding(nn.Module):
    """Holds `embedding_table` so the key is `cls_embedding.embedding_table.weight` as upstream."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.has_null_class), cfg.dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class GPT(nn.Module):
    family: ClassVar[str] = "llamagen"  # pipeline.families

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = ClassEmbedding(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = KeyedDropout(0.0)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Not persistent: upstream files may carry `freqs_cis`; we always recompute it.
        self.register_buffer("rope", rope_2d_table(cfg), persistent=False)
        self.apply(self._init_weights)
        if cfg.lambda_conditioning:
            self.lambda_embed = LambdaEmbedding(cfg.dim)
        number_sites(self)
        self.activation_checkpointing = False  # a training setting (train.activation_checkpointing), not saved

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks: FSDP's units of sharding (pipeline.parallel), the checkpointed units."""
        return self.layers

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Upstream uses normal(0, 0.02) everywhere and a zero `output`; we keep `output` random so that
        # freshly built test models have non-trivial logits. Pretrained weights overwrite all of it.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_dropout(self, dropout: float = 0.0, drop_path: float = 0.0, section: str = "train") -> None:
        """Fine-tuning regularisation as LlamaGen's: resid, ffn and token dropout p = `dropout`; drop path
        rising linearly over the layers to `drop_path`. Active in train mode only, with keyed masks (the
        forward's dropout_keys). `section`: where the rates come from (VAR's set_dropout names it)."""
        self.tok_dropout.p = dropout
        for layer, rate in zip(self.layers, linear_rates(drop_path, len(self.layers)), strict=True):
            layer.attention.resid_dropout.p = layer.feed_forward.ffn_dropout.p = dropout
            layer.drop_path.rate = rate

    def enable_lambda_conditioning(self, seed: int = 0) -> None:
        """Add a zero-initialised lambda embedding (the policy is unchanged until it trains), drawn from `seed`."""
        if not self.cfg.lambda_conditioning:
            self.cfg = GPTConfig(**{**self.cfg.to_dict(), "lambda_conditioning": True})
            self.lambda_embed = LambdaEmbedding(self.cfg.dim, seed=seed).to(self.output.weight.device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor | None = None,
                dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log p(z_t | z_<t, c) for every token: tokens (B, N), labels (B,) -> (B, N) float32.
        `lam` (B,): the lambda of each row, for a lambda-conditioned policy. `dropout_keys` (B,) int64: each
        sequence's dropout key (pipeline.models.layers.noise_keys), needed in train mode with dropout on."""
        logits = self.logits(labels, tokens[:, :-1], lam=lam, dropout_keys=dropout_keys)
        return token_logp(logits, tokens)  # position p predicts tokens[:, p]

    def class_condition(self, labels: torch.Tensor, lam: torch.Tensor | None) -> torch.Tensor:
        """The class token's embedding (B, C), plus lambda's for a lambda-conditioned policy."""
        cls = self.cls_embedding(labels)
        if self.cfg.lambda_conditioning:
            if lam is None:
                raise ValueError("this policy is lambda-conditioned: give the lambda to sample or score it at (eval.lambdas)")
            cls = cls + self.lambda_embed(lam).to(cls.dtype)
        return cls

    def logits(self, labels: torch.Tensor, tokens: torch.Tensor, start: int = 0, lam: torch.Tensor | None = None,
               dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in float32.

        Teacher forcing (start=0): labels (B,), tokens (B, N-1) = z[:, :-1] -> logits for z[:, :N].
        Incremental decoding (after `setup_kv_cache`): start=0 feeds the class token only (tokens of
        length 0); start=p feeds tokens (B, T) at positions p..p+T-1.
        """
        x = self.tok_embeddings(tokens)  # (B, T, C)
        if start == 0:
            cls = self.class_condition(labels, lam)[:, None, :].to(x.dtype)  # (B, 1, C)
            x = torch.cat([cls.expand(-1, self.cfg.cls_token_num, -1), x], dim=1)
        x = self.tok_dropout(x, dropout_keys)
        rope = self.rope[start : start + x.shape[1]]
        x = run_blocks(self.layers, x, rope, start, dropout_keys, checkpointing=self.activation_checkpointing and self.training)
        return self.output(self.norm(x)).float()

    def upstream_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What LlamaGen's code loads: the state dict as it is (`state`: this model's, gathered from shards)."""
        return self.state_dict() if state is None else state

    def setup_kv_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        max_len = self.cfg.cls_token_num + self.cfg.block_size
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, max_len, attn.n_head, attn.head_dim, dtype, device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
