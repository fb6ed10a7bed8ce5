"""A third model family, defined outside pipeline/ and stages/ as a user's plugin would be (docs/families.md):
a strip tokenizer and a tiny autoregressive model over its strips. Importing this module registers it;
`CCA_PIPE_FAMILIES=toy_family` makes every `cca-pipe` command import it (tests/test_third_family.py).

Token layout ("toy"): an image of S x S pixels is S / strip horizontal strips, top to bottom, one token
each: the codebook entry (a grey level in [-1, 1]) nearest the strip's mean over its pixels and channels.
A 1-D sequence of L = S / strip tokens: no square grid, no scales.
The model: position t sees its class (or the null class) and the mean embedding of tokens z_<t (a causal
prefix mean), through one residual MLP block, to logits over the codebook.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pipeline.checkpoint import CheckpointError, extract_state_dict, load_file, load_strict
from pipeline.config import ConfigError
from pipeline.families import Family, KVCache, ModelSource, register_family
from pipeline.logprobs import token_logp
from pipeline.models.memory import FP32, Activations, FamilyMemory, ModelShape, Precision
from pipeline.sampling import Samples, draw, filter_logits, uniforms_for


@dataclass(frozen=True)
class StripConfig:
    codebook_size: int = 8
    strip: int = 4  # pixel rows per token

    def to_dict(self) -> dict:
        return asdict(self)


class StripTokenizer(nn.Module):
    def __init__(self, cfg: StripConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Parameter(torch.linspace(-1, 1, cfg.codebook_size), requires_grad=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, S / strip) codes."""
        b, _, s, _ = images.shape
        means = images.float().mean(dim=(1, 3)).view(b, s // self.cfg.strip, self.cfg.strip).mean(-1)
        return (means[..., None] - self.codebook).abs().argmin(-1)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L) codes -> (B, 3, L * strip, L * strip): each strip filled with its grey level."""
        rows = self.codebook[codes].repeat_interleave(self.cfg.strip, dim=1)  # (B, S)
        return rows[:, None, :, None].expand(-1, 3, -1, rows.shape[1]).contiguous()


@dataclass(frozen=True)
class ToyConfig:
    num_classes: int = 2
    vocab_size: int = 8
    seq_len: int = 4
    dim: int = 16
    has_null_class: bool = True
    lambda_conditioning: bool = False

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)


class ToyModel(nn.Module):
    family: ClassVar[str] = "toy"

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_emb = nn.Embedding(cfg.num_classes + int(cfg.has_null_class), cfg.dim)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.dim) * 0.1)
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.Tanh())])
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.checkpointing = False

    def logits(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, V) float32 logits of every position given tokens (B, T <= L), of which position t reads z_<t."""
        emb = self.tok_emb(tokens[:, : self.cfg.seq_len - 1])  # (B, T', C)
        prefix = torch.cumsum(emb, dim=1) / torch.arange(1, emb.shape[1] + 1, device=emb.device)[None, :, None]
        past = F.pad(prefix, (0, 0, 1, self.cfg.seq_len - 1 - emb.shape[1]))  # position 0 sees no token
        h = self.cls_emb(labels)[:, None, :] + self.pos[None] + past
        for block in self.mlp:
            h = h + (torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
                     if self.checkpointing and self.training else block(h))
        return self.head(h).float()

    def forward(self, tokens, labels, lam=None, dropout_keys=None) -> torch.Tensor:
        if lam is not None:
            raise ValueError("a toy model is not lambda-conditioned")
        return token_logp(self.logits(labels, tokens), tokens)

    def set_dropout(self, dropout: float = 0.0, drop_path: float = 0.0, section: str = "train") -> None:
        if dropout or drop_path:
            raise ConfigError(f"{section}.dropout / {section}.drop_path: a toy model has neither; set them to 0")

    def blocks(self) -> nn.ModuleList:
        return self.mlp

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = enabled

    def upstream_state_dict(self, state=None) -> dict[str, torch.Tensor]:
        return self.state_dict() if state is None else state

    def enable_lambda_conditioning(self, seed: int = 0) -> None:
        raise ConfigError("train.lambda_conditioning: a toy model has no lambda embedding; set it to null")


def toy_block_activations(cfg: ToyConfig, precision: Precision, dropout: float = 0.0) -> Activations:
    """What ToyModel's forward keeps for backward, C = dim. Per token in its block: the Linear's input and Tanh's
    output, 2C. Outside it: the head's input C, the gather's int64 index and the float32 log-sum-exp of token_logp
    (the logits are counted apart). Left out: a few bytes per sequence (the label, the prefix mean's divisor).
    In a block's backward: the incoming gradient and the Linear's output gradient, 2C."""
    if dropout:
        raise ValueError(f"dropout {dropout}: a toy model has none")
    C = cfg.dim
    return Activations(block_per_token=2 * C * precision.compute, block_per_sequence=0.0, block_constant=0.0,
                       block_input_per_token=C * precision.residual, block_backward_per_token=2 * C * precision.compute,
                       root_per_token=C * precision.compute + 8 + FP32)


def toy_shape(cfg: ToyConfig) -> ModelShape:
    return ModelShape(width=cfg.dim, ffn_hidden=cfg.dim, heads=1, layers=1, vocab=cfg.vocab_size, positions=cfg.seq_len)


def toy_at_grid(description: dict, grid: int) -> dict:
    """A toy model runs over one token per strip: `grid` of them."""
    return {**description, "seq_len": grid}


TOY_MEMORY = FamilyMemory(toy_block_activations, toy_shape, lambda **description: ToyModel(ToyConfig(**description)),
                          toy_at_grid)


class ToyFamily(Family):
    name, model_kind, tokenizer_kind, model_module = "toy", "toy-ar", "toy-strips", "toy_family"
    decode_dtype = torch.float32
    step_unit = "strip"
    model_described, tokenizer_described = "a toy strip generator", "a toy strip tokenizer"
    default_tokenizer = "toy strips"
    memory = TOY_MEMORY

    def logp_code(self) -> dict[str, str]:
        # its forward is this file: a cache records its digest (pipeline.codefiles follows pipeline/ only)
        return {"tests/toy_family.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), **super().logp_code()}

    def load_tokenizer(self, path, spec=None):
        obj = load_file(path)
        tokenizer = StripTokenizer(StripConfig(**obj["config"]))
        load_strict(tokenizer, extract_state_dict(obj, path), path)
        return tokenizer

    def build_tokenizer(self, spec=None):
        return StripTokenizer(StripConfig())

    def tokenizer_layout(self, tokenizer, image_size):
        if image_size % tokenizer.cfg.strip:
            raise ValueError(f"tokenize.image_size {image_size} is not a multiple of the strip height {tokenizer.cfg.strip}")
        strips = image_size // tokenizer.cfg.strip
        return {"family": self.name, "seq_len": strips, "grid": strips}

    def load_model(self, path, source=ModelSource(), *, layout=None, tokenizer=None):
        obj = load_file(path)
        if not isinstance(obj.get("config"), dict):
            raise CheckpointError(f"{path} carries no toy model config")
        model = ToyModel(ToyConfig(**obj["config"]))
        load_strict(model, extract_state_dict(obj, path), path)
        return model

    def sample(self, model, labels, *, cfg_scale=0.0, temperature=1.0, top_k=0, top_p=1.0, uniforms=None, lam=None,
               cfg_schedule="constant", on_step=None, generator=None) -> Samples:
        if lam is not None or cfg_schedule != "constant":
            raise ValueError("a toy model samples without lambda and with constant guidance")
        n, guided = model.cfg.seq_len, cfg_scale != 0.0
        uniforms = uniforms_for(labels, n, generator, uniforms)
        tokens = torch.zeros(len(labels), n, dtype=torch.long, device=labels.device)
        logps = torch.zeros(len(labels), n, dtype=torch.float32, device=labels.device)
        with torch.no_grad():
            for t in range(n):  # no cache: every step reads the whole prefix again
                cond = model.logits(labels, tokens[:, :t])[:, t]
                logits = cond
                if guided:
                    uncond = model.logits(torch.full_like(labels, model.cfg.null_class), tokens[:, :t])[:, t]
                    logits = cond + cfg_scale * (cond - uncond)
                probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
                tokens[:, t] = draw(probs, uniforms[:, t])
                logps[:, t] = torch.log_softmax(cond, -1).gather(-1, tokens[:, t : t + 1])[:, 0]
                if on_step is not None:
                    on_step(t + 1, n)
        return Samples(tokens, logps)

    def image_size(self, model, tokenizer):
        return model.cfg.seq_len * tokenizer.cfg.strip

    def grid_side(self, cfg):
        return cfg.seq_len

    def step_tokens(self, cfg):
        return 1

    def sampling_cache(self, cfg):
        return KVCache(0, 0, 0, weights_dtype=True)  # none: each step recomputes the prefix

    def param_groups(self, model, weight_decay):
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


TOY = register_family(ToyFamily())
