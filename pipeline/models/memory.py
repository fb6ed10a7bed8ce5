"""What a model of each shipped family holds in memory, counted from its forward code: the tensors one block keeps
for backward (`llamagen_block_activations`, `var_block_activations`), the shape the plan multiplies them by, the
model built from a description on the meta device, and that description at a token grid. Each family object
carries its own as `Family.memory` (pipeline/families.py; a plugin family defines its own in its module), and
`cca-pipe plan` (pipeline/memplan.py) reads them there.

The models do not import this file, so editing a count changes no file that computes tokens or log-probs
(stages/cli/dvcdeps.py: tokenize and reflogp never depend on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..tokenizers.msvq import MSVQConfig, MultiScaleQuantizer
from .llamagen import GPT, gpt_config
from .var import VAR, VARModel, var_config

FP32 = 4  # bytes
BOOL = 1


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the tensors a forward makes.

    param: a parameter as the forward reads it (FSDP's all-gathered param_dtype); compute: the outputs of
    matmuls, attention and the tensors cast for them (bf16 under CUDA autocast); residual: the residual
    stream and the norms' outputs (float32 when the parameters are: LlamaGen's embeddings are float32
    and float32 + bf16 promotes to float32; bf16 when FSDP's parameters are bf16); autocast_weight_copies:
    autocast casts each float32 Linear weight to bf16 once per forward and the copies stay alive
    (cached by autocast, then saved by the matmuls for backward); dropout_mask: what dropout saves per
    element (a bool mask on every device: pipeline.models.layers.KeyedDropout's torch.where)."""

    param: int
    compute: int
    residual: int
    autocast_weight_copies: bool
    dropout_mask: int

    @property
    def mixed(self) -> bool:
        return self.compute != FP32



@dataclass(frozen=True)
class FamilyMemory:
    """What the plan needs of a model family (its object's `memory`): the activation counts, the shape, the model
    from a description, and the description at a token grid."""

    block_activations: Callable[..., Activations]  # (model config, Precision, dropout) -> Activations
    shape: Callable[..., ModelShape]  # model config -> ModelShape
    build: Callable[..., nn.Module]  # the model from a description (a preset's `model` keys but `family`)
    at_grid: Callable[[dict, int], dict]  # the description for images of grid x grid tokens (the store trained on)


@dataclass(frozen=True)
class Activations:
    """Bytes one forward keeps for backward, from a family's forward code.

    block_*: one transformer block, everything autograd saves in it (per token, per sequence, and per
    block whatever the batch); block_input_per_token: what activation checkpointing keeps of a block (its
    input); block_backward_per_token: the gradients in flight inside a block's backward beyond its saved
    tensors; root_per_token: outside the blocks, without the logits (counted apart)."""

    block_per_token: float
    block_per_sequence: float
    block_constant: float
    block_input_per_token: float
    block_backward_per_token: float
    root_per_token: float


def llamagen_block_activations(cfg, precision: Precision, dropout: float = 0.0) -> Activations:
    """LlamaGen's TransformerBlock (pipeline/models/llamagen.py), C = dim, F = ffn_hidden, H = n_head.

    Saved per token (checked against autograd's saved tensors by tests/test_plan.py):
      attention_norm (RMSNorm): its input as float32 (x itself when float32, else its .float() copy) C;
        the float32 1/rms (1); x * rsqrt cast back (saved by `* weight`) C in the residual dtype; the
        output, saved by wqkv: C in the compute dtype (autocast saves its bf16 copy; the float32 one dies)
      wqkv output 3C: q, k, v are views of it and SDPA saves v, so all of it stays alive
      RoPE'd q and k (new tensors, saved by SDPA) 2C; the rotations save only the shared cos/sin table
      SDPA (flash on CPU and CUDA): its output C (laid out (B, T, H, hd), so `transpose(1, 2).reshape`
        is a view and wo saves no copy) and the float32 log-sum-exp, H
      resid dropout (p > 0, train mode): its bool mask C (KeyedDropout)
      h = x + attention: saved as float32 by ffn_norm, C (+ its 1/rms); ffn_norm's x * rsqrt C residual,
        its output C compute
      SwiGLU: w1 out a (saved by silu), silu(a) and w3 out b (saved by their product), the product
        (saved by w2): 4F compute
      ffn dropout (p > 0): its mask C
    The block's output is the next block's input (counted there) or the final norm's (the root's).
    Backward in flight: the incoming gradient C and one FFN hidden gradient F.
    """
    C, F, H = cfg.dim, cfg.ffn_hidden, cfg.n_head
    masks = 2 * C * precision.dropout_mask if dropout > 0 else 0
    per_token = (
        2 * C * FP32 + 2 * FP32 + H * FP32  # the norms' float32 inputs and 1/rms; SDPA's log-sum-exp
        + 2 * C * precision.residual  # x * rsqrt of both norms
        + (2 * C + 3 * C + 2 * C + C + 4 * F) * precision.compute  # norm outputs, qkv, RoPE'd q/k, SDPA out, SwiGLU
        + masks
    )
    # final norm: float32 input, x * rsqrt, output (saved by `output`); the gather's int64 index and the
    # float32 log-sum-exp of token_logp; the token dropout's mask
    root = C * FP32 + FP32 + C * precision.residual + C * precision.compute + 8 + FP32 + (C * precision.dropout_mask if dropout > 0 else 0)
    return Activations(block_per_token=per_token, block_per_sequence=0.0, block_constant=0.0,
                       block_input_per_token=C * precision.residual,
                       block_backward_per_token=(C + F) * precision.compute, root_per_token=root)


def var_block_activations(cfg, precision: Precision, dropout: float = 0.0) -> Activations:
    """VAR's AdaLNSelfAttn (pipeline/models/var.py), C = width, F = round(C mlp_ratio), H = heads, L = seq_len.

    Saved per token:
      ln_wo_grad (x2): its input x / x1 (residual) and output (float32: layer_norm runs in float32 under
        autocast), with mean and rstd (2 float32 each); 4C + 4
      LN(x)(1 + scale) + shift, saved by the Linear after it (mat_qkv, fc1): 2C compute
      qkv 3C compute: q, k, v are views of it; F.normalize saves the q and k views and their norms (2H)
      q / |q| (saved by the product with the temperature, which requires grad) C float32; the scaled q
        and the normalised k cast to the compute dtype, saved by SDPA: 2C compute
      SDPA (flash on CPU, memory-efficient on CUDA with the additive mask): output C (a (B, L, H, hd)
        layout, so the reshape for proj is a view), the float32 log-sum-exp H
      proj output, saved by `* gamma1` (gamma requires grad) C; fc2 output, saved by `* gamma2`, C
      FFN: fc1 output (saved by gelu) and gelu's output (saved by fc2): 2F compute
    Per sequence: ada_lin's SiLU output C and its 6C modulations (kept alive by the gamma/scale/shift views),
    scale1 + 1 and scale2 + 1: 9C. Per block: the L x L additive mask cast to the compute dtype under
    autocast, saved by SDPA (on CPU it is the buffer itself). Drop path (x * keep, keep has no gradient)
    saves only the per-sample keep mask; VAR has no dropout.
    Backward in flight: the incoming gradient C and one FFN hidden gradient F.
    """
    if dropout:
        raise ValueError(f"dropout {dropout}: VAR is regularised by drop path only")
    C, H, L = cfg.width, cfg.heads, cfg.seq_len
    F = round(cfg.width * cfg.mlp_ratio)
    per_token = (
        2 * C * precision.residual + 2 * C * FP32 + 4 * FP32  # the two layer norms: inputs, outputs, statistics
        + C * FP32 + 3 * H * FP32  # q / |q|; the q and k norms and SDPA's log-sum-exp
        + (2 * C + 3 * C + 2 * C + C + 2 * C + 2 * F) * precision.compute  # Linear inputs, qkv, q/k for SDPA, out, gated outputs, FFN
    )
    # head_nm: the last block's output, its layer norm, the modulated input of `head`; word_embed's input
    # (the quantiser's Cvae features, float32); the gather's index and the log-sum-exp
    root = C * precision.residual + C * FP32 + C * precision.compute + cfg.cvae * FP32 + 8 + FP32
    return Activations(block_per_token=per_token, block_per_sequence=9 * C * precision.compute,
                       block_constant=L * L * precision.compute if precision.mixed else 0.0,
                       block_input_per_token=C * precision.residual,
                       block_backward_per_token=(C + F) * precision.compute, root_per_token=root)


@dataclass(frozen=True)
class ModelShape:
    width: int
    ffn_hidden: int
    heads: int
    layers: int
    vocab: int
    positions: int  # tokens per sequence the transformer runs over (and logits it makes)


def llamagen_shape(cfg) -> ModelShape:
    # input = class token(s) + z[:, :-1]
    return ModelShape(cfg.dim, cfg.ffn_hidden, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.cls_token_num + cfg.block_size - 1)


def var_shape(cfg) -> ModelShape:
    return ModelShape(cfg.width, round(cfg.width * cfg.mlp_ratio), cfg.heads, cfg.depth, cfg.vocab_size, cfg.seq_len)


def build_llamagen(gpt_model: str, block_size: int, **overrides) -> nn.Module:
    """A LlamaGen GPT by its upstream name ("GPT-3B") and token count (576 at 384px), with any GPTConfig
    overrides, on torch's current default device (the meta device: no memory)."""
    return GPT(gpt_config(gpt_model, block_size=block_size, **overrides))


def build_var(depth: int, **overrides) -> nn.Module:
    """VAR-d<depth> (any VARConfig overrides) with the quantiser that builds its input (frozen; 0.2M
    parameters for the release's VQVAE), on torch's current default device."""
    cfg = var_config(depth, **overrides)
    quantizer = MultiScaleQuantizer(MSVQConfig(vocab_size=cfg.vocab_size, z_channels=cfg.cvae, patch_nums=cfg.patch_nums))
    return VARModel(VAR(cfg), quantizer)


def llamagen_at_grid(description: dict, grid: int) -> dict:
    """LlamaGen's GPT runs over as many tokens as the store's images have (block_size = grid^2: 256 at 256px)."""
    return {**description, "block_size": grid * grid}


def var_at_grid(description: dict, grid: int) -> dict:
    """VAR's token count is its scales' (patch_nums), whatever the store: the last scale is the grid."""
    last = var_config(description.get("depth", 16), **{k: v for k, v in description.items() if k != "depth"}).patch_nums[-1]
    if grid != last:
        raise ValueError(f"VAR's last scale is {last} x {last} tokens, but the tokens are {grid} x {grid}")
    return description


LLAMAGEN_MEMORY = FamilyMemory(llamagen_block_activations, llamagen_shape, build_llamagen, llamagen_at_grid)
VAR_MEMORY = FamilyMemory(var_block_activations, var_shape, build_var, var_at_grid)
