"""Model families: what reflogp, train and eval need from an autoregressive image model.

Two families share one interface, so the stages, the loss and the cache never ask which one runs:
  - "llamagen": next-token prediction, GPT (pipeline.models.llamagen) over VQ-16/VQ-8 codes;
  - "var": next-scale prediction, VARModel (pipeline.models.var) over the multi-scale VQVAE's codes.
A family model has `cfg.num_classes / null_class / has_null_class / vocab_size / seq_len`,
`sequence_token_logp(tokens, labels) -> (B, L)` float32 log-probs (teacher forcing; logprobs.sequence_logp
sums them) and `upstream_state_dict()` (what the peer's own code loads). `sample` dispatches to the
family's sampler; a tokenizer has `encode(images) -> (B, L)` and `decode_codes(tokens) -> images`.
The family of a checkpoint is read from it: our files name it, upstream ones are told apart by their keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import expect_kind, save_checkpoint
from .models.llamagen import GPT, config_from_spec, load_gpt
from .models.var import VARModel, load_var
from .tokenizers.msvq import MSVQModel, MultiScaleQuantizer, load_msvq, load_quantizer, msvq_config_from_spec
from .tokenizers.vq import VQModel, load_vq, vq_config_from_spec

_FAMILY = {"llamagen-gpt": "llamagen", "llamagen-vq": "llamagen", "var": "var", "var-vqvae": "var"}
MODELS, TOKENIZERS = ("llamagen-gpt", "var"), ("llamagen-vq", "var-vqvae")


def family_of(path: str | os.PathLike, role: str = "this command") -> str:
    """"llamagen" or "var" for a model or tokenizer checkpoint (ours or upstream), or a clear error."""
    return _FAMILY[expect_kind(path, MODELS + TOKENIZERS, role)]


def load_model(path: str | os.PathLike, *, gpt_model: str | None = None, seq_len: int | None = None,
               vae: str | os.PathLike | MultiScaleQuantizer | None = None, vae_model: str | None = None,
               depth: int | None = None, patch_nums: tuple[int, ...] | None = None, role: str = "the model checkpoint") -> GPT | VARModel:
    """A family model from its checkpoint. LlamaGen: `gpt_model` names the config of upstream files.
    VAR: the quantiser that builds the model's input comes from the VQVAE file `vae` (config `vae_model`:
    default the release's), or is passed already loaded (eval holds the whole VQVAE anyway); `depth`,
    when given, is checked against the checkpoint."""
    family = _FAMILY[expect_kind(path, MODELS, role)]
    if family == "llamagen":
        return load_gpt(path, config_from_spec(gpt_model, seq_len))
    if vae is None:
        raise ValueError(f"{path} is a VAR checkpoint: its input is built by the VQVAE's quantiser, so pass the "
                         "VQVAE checkpoint too (--vae / vae_ckpt, e.g. vae_ch160v4096z32.pth)")
    if not isinstance(vae, MultiScaleQuantizer):
        expect_kind(vae, ("var-vqvae",), "--vae")
    quantizer = vae if isinstance(vae, MultiScaleQuantizer) else load_quantizer(vae, msvq_config_from_spec(vae_model))
    var = load_var(path, depth=depth, patch_nums=patch_nums or quantizer.cfg.patch_nums)
    return VARModel(var, quantizer)


def save_model(path: str | os.PathLike, model: GPT | VARModel, **extra) -> None:
    """The peer's layout ({"model": upstream state dict}) plus our config and provenance."""
    family = "var" if isinstance(model, VARModel) else "llamagen-gpt"
    save_checkpoint(path, model.upstream_state_dict(), model.cfg.to_dict(), family=family, **extra)


def load_tokenizer(path: str | os.PathLike, spec: str | None = None, role: str = "--vq") -> VQModel | MSVQModel:
    """LlamaGen's VQ (encode -> (B, h*w)) or VAR's multi-scale VQVAE (encode -> (B, 680))."""
    if _FAMILY[expect_kind(path, TOKENIZERS, role)] == "var":
        return load_msvq(path, msvq_config_from_spec(spec))
    return load_vq(path, vq_config_from_spec(spec))


def tokenizer_attrs(tokenizer: VQModel | MSVQModel, image_size: int) -> dict:
    """Token-store attributes that describe the token layout (pipeline/formats.py)."""
    if isinstance(tokenizer, MSVQModel):
        if image_size != tokenizer.cfg.image_size:
            raise ValueError(f"tokenize.image_size {image_size}: VAR's VQVAE with patch_nums {tokenizer.cfg.patch_nums} "
                             f"needs {tokenizer.cfg.image_size}px images")
        return {"family": "var", "patch_nums": list(tokenizer.cfg.patch_nums), "seq_len": tokenizer.cfg.seq_len,
                "grid": tokenizer.cfg.patch_nums[-1]}
    if image_size % tokenizer.cfg.downsample:
        raise ValueError(f"tokenize.image_size {image_size} is not a multiple of the tokenizer's downsampling {tokenizer.cfg.downsample}")
    grid = image_size // tokenizer.cfg.downsample
    return {"family": "llamagen", "seq_len": grid * grid, "grid": grid}


def image_size(model: GPT | VARModel, tokenizer: VQModel | MSVQModel) -> int:
    if isinstance(model, VARModel):
        return tokenizer.cfg.image_size
    return tokenizer.cfg.downsample * int(round(model.cfg.seq_len ** 0.5))


def check_model_fits_tokens(model: GPT | VARModel, store_attrs: dict, seq_len: int, tokens_path: Path, ckpt: Path) -> None:
    """The model must read the store's tokens: same family layout, sequence length, vocabulary and classes."""
    family = store_attrs.get("family", "llamagen")
    model_family = "var" if isinstance(model, VARModel) else "llamagen"
    if family != model_family:
        raise ValueError(f"token store {tokens_path} holds {family} tokens but {ckpt} is a {model_family} model: "
                         "tokenize with the tokenizer of the model's family")
    if isinstance(model, VARModel) and tuple(store_attrs.get("patch_nums", ())) != model.cfg.patch_nums:
        raise ValueError(f"token store {tokens_path} has scales {store_attrs.get('patch_nums')}, model {ckpt} {model.cfg.patch_nums}")
    if int(store_attrs["codebook_size"]) > model.cfg.vocab_size:
        raise ValueError(f"token store {tokens_path} uses a codebook of {store_attrs['codebook_size']} codes but the model "
                         f"{ckpt} has a vocabulary of {model.cfg.vocab_size}: tokenize with the tokenizer the model was trained on")
    if store_attrs["num_classes"] > model.cfg.num_classes:
        raise ValueError(f"token store {tokens_path} has {store_attrs['num_classes']} classes, model {ckpt} only {model.cfg.num_classes}")
    if seq_len != model.cfg.seq_len:
        raise ValueError(f"{tokens_path} has sequences of {seq_len} tokens, model {ckpt} expects {model.cfg.seq_len}")


def sample(model: GPT | VARModel, labels: torch.Tensor, **kwargs):
    """The family's sampler -> pipeline.sampling.Samples (codes and their unguided conditional log-probs)."""
    from . import sampling

    if isinstance(model, VARModel):
        return sampling.sample_var(model, labels, **kwargs)
    if kwargs.pop("cfg_schedule", "constant") != "constant":
        raise ValueError("LlamaGen samples with constant guidance: set eval.cfg_schedule to 'constant'")
    return sampling.sample(model, labels, **kwargs)

