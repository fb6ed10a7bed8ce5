"""Loading the peers' checkpoints into our models: upstream layouts (LlamaGen's `{"model": ...}`, VAR's and
CCA's trainer nestings, configless files) and cca-pipe's own, strictly (pipeline.checkpoint).

Apart from the model files (as litgpt keeps conversion apart from the model): what a loader says or checks
is not the computation of tokens or log-probs, so editing it leaves every token store, reference cache and
DVC stage valid (pipeline/versions.py). The upstream layouts are described in docs/upstream.md.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import KIND_KEY, CheckpointError, extract_state_dict, load_file, load_strict
from .config import build_dataclass
from .models.llamagen import GPT, GPTConfig
from .models.var import VAR, VARConfig
from .tokenizers.msvq import VAR_PATCH_NUMS, MSVQConfig, MSVQModel, MultiScaleQuantizer
from .tokenizers.vq import VQConfig, VQModel

# ----------------------------------------------------------------------------- LlamaGen


def load_gpt(path: str | os.PathLike, cfg: GPTConfig | None = None) -> GPT:
    """Load a GPT from an upstream or cca-pipe checkpoint, strictly.

    cfg: required for upstream files (they carry no config: use `gpt_config("GPT-B", block_size=...)`);
    our own files carry their config, which must then agree with cfg if both are given.
    """
    obj = load_file(path)
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    stored = build_dataclass(GPTConfig, saved, f"checkpoint {path}: its config", CheckpointError) if saved is not None else None
    if cfg is None:
        if stored is None:
            raise CheckpointError(f"checkpoint {path} carries no model config: name one, on the command line with "
                                  "--gpt-model GPT-B (GPT-B ... GPT-3B, or a JSON file of GPTConfig fields), in Python "
                                  "with cfg=gpt_config('GPT-B', block_size=256)")
        cfg = stored
    elif stored is not None and stored != cfg:
        raise CheckpointError(f"checkpoint {path} was saved with config {saved}, but {cfg.to_dict()} was requested")
    model = GPT(cfg)
    load_strict(model, extract_state_dict(obj, path), path)
    return model


def load_vq(path: str | os.PathLike, cfg: VQConfig | None = None) -> VQModel:
    """Load a VQ model from `vq_ds16_c2i.pt` (pass cfg=vq_config("VQ-16")) or a cca-pipe checkpoint."""
    obj = load_file(path)
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if cfg is None:
        if saved is None:
            raise CheckpointError(f"checkpoint {path} carries no VQ config: name one, on the command line with --vq-model "
                                  "VQ-16 (or a JSON file of VQConfig fields), in Python with cfg=vq_config('VQ-16')")
        cfg = build_dataclass(VQConfig, saved, f"checkpoint {path}: its config", CheckpointError)
    model = VQModel(cfg)
    load_strict(model, extract_state_dict(obj, path), path)
    return model


# ----------------------------------------------------------------------------- VAR


VAR_NESTINGS = (("trainer", "var_wo_ddp"), ("trainer",))  # VAR's own / CCA's trainer checkpoints


def config_from_state_dict(sd: dict[str, torch.Tensor], patch_nums: tuple[int, ...] = VAR_PATCH_NUMS) -> VARConfig:
    """Everything but patch_nums is readable from the weights' shapes (upstream files carry no config)."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        classes, width = sd["class_emb.weight"].shape
        heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
        vocab, cvae = sd["head.weight"].shape[0], sd["word_embed.weight"].shape[1]
        mlp = sd["blocks.0.ffn.fc1.weight"].shape[0] / width
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a VAR state dict (missing {e}); note that attn_l2_norm=False models "
                              "(no scale_mul_1H11) are not supported") from e
    return VARConfig(depth=depth, width=width, heads=heads, num_classes=classes - 1, vocab_size=vocab, cvae=cvae,
                     patch_nums=patch_nums, mlp_ratio=mlp)


def load_var_state_dict(path: str | os.PathLike) -> tuple[dict, dict | None]:
    obj = load_file(path)
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if saved is not None and obj.get(KIND_KEY) != "var":
        raise CheckpointError(f"checkpoint {path} is a {obj.get(KIND_KEY)!r} checkpoint, not a VAR transformer")
    return extract_state_dict(obj, path, VAR_NESTINGS), saved


def load_var(path: str | os.PathLike, depth: int | None = None, patch_nums: tuple[int, ...] | None = None) -> VAR:
    """Load a VAR transformer strictly from `var_d<depth>.pth`, a VAR/CCA training checkpoint
    (["trainer"]["var_wo_ddp"] / ["trainer"]) or a cca-pipe policy. `depth`, when given, must match."""
    sd, saved = load_var_state_dict(path)
    if saved is not None:
        cfg = build_dataclass(VARConfig, saved, f"checkpoint {path}: its config", CheckpointError)
    else:
        cfg = config_from_state_dict(sd, tuple(patch_nums) if patch_nums else VAR_PATCH_NUMS)
        if sd.get("pos_1LC") is not None and sd["pos_1LC"].shape[1] != cfg.seq_len:
            raise CheckpointError(f"checkpoint {path} has {sd['pos_1LC'].shape[1]} positions but patch_nums "
                                  f"{cfg.patch_nums} make {cfg.seq_len}: tokenize with the scales the model was trained on")
    if patch_nums is not None and tuple(patch_nums) != cfg.patch_nums:
        raise CheckpointError(f"checkpoint {path} uses patch_nums {cfg.patch_nums}, the tokens {tuple(patch_nums)}")
    if depth is not None and depth != cfg.depth:
        raise CheckpointError(f"checkpoint {path} is VAR-d{cfg.depth} ({cfg.depth} blocks, width {cfg.width}), "
                              f"but depth {depth} was requested: set depth: {cfg.depth} or use var_d{depth}.pth")
    model = VAR(cfg)
    load_strict(model, sd, path)
    return model


# VAR's training checkpoints nest the weights: ["trainer"]["vae_local"] (VQVAE training) or a plain dict.
VQVAE_NESTINGS = (("trainer", "vae_wo_ddp"), ("trainer", "vae_local"), ("trainer",))


def _load_msvq_sd(path, cfg: MSVQConfig | None) -> tuple[dict, MSVQConfig]:
    obj = load_file(path)
    saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
    if saved is not None and obj.get(KIND_KEY) != "var-vqvae":
        raise CheckpointError(f"checkpoint {path} is a {obj.get(KIND_KEY)!r} checkpoint, not VAR's VQVAE")
    stored = build_dataclass(MSVQConfig, saved, f"checkpoint {path}: its config", CheckpointError) if saved is not None else None
    if cfg is None:
        cfg = stored if stored is not None else MSVQConfig()
    elif stored is not None and stored != cfg:
        raise CheckpointError(f"checkpoint {path} was saved with config {saved}, but {cfg.to_dict()} was requested")
    sd = extract_state_dict(obj, path, VQVAE_NESTINGS)
    # a training statistic sized by the number of scales; upstream replaces it too when that differs
    hits = sd.get("quantize.ema_vocab_hit_SV")
    if hits is not None and hits.shape[0] != len(cfg.patch_nums):
        sd["quantize.ema_vocab_hit_SV"] = torch.zeros(len(cfg.patch_nums), hits.shape[1])
    return sd, cfg


def load_msvq(path: str | os.PathLike, cfg: MSVQConfig | None = None) -> MSVQModel:
    """The full VQVAE (encoder + quantiser + decoder), strictly, from `vae_ch160v4096z32.pth` or our files."""
    sd, cfg = _load_msvq_sd(path, cfg)
    model = MSVQModel(cfg)
    load_strict(model, sd, path)
    return model


def load_quantizer(path: str | os.PathLike, cfg: MSVQConfig | None = None) -> MultiScaleQuantizer:
    """Only `quantize.*` (codebook + phi convs) of a VQVAE file: what reflogp/train need; strict on those keys."""
    sd, cfg = _load_msvq_sd(path, cfg)
    quant = MultiScaleQuantizer(cfg)
    prefix = "quantize."
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError(f"checkpoint {path} has no 'quantize.*' entries: is it VAR's VQVAE (vae_ch160v4096z32.pth)?")
    load_strict(quant, sub, path)
    return quant

