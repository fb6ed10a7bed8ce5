"""Model families: everything reflogp, train, eval and info need that differs between LlamaGen and VAR.

Each family is one object (LLAMAGEN, VAR); stages get theirs from a checkpoint (`family_of`), a token
store (`family_of_store`) or a model (`family_of_model`) and never ask which one they hold:
  - "llamagen": next-token prediction, GPT (pipeline.models.llamagen) over VQ-16/VQ-8 codes;
  - "var": next-scale prediction, VARModel (pipeline.models.var) over the multi-scale VQVAE's codes.

A family's model has `cfg.num_classes / null_class / has_null_class / vocab_size / seq_len`, a
`forward(tokens, labels) -> (B, L)` float32 per-token log-probs (teacher forcing: the only way
likelihoods are computed, so DDP/FSDP wrap it unchanged), `set_dropout(dropout, drop_path)`, `blocks()`
(the transformer blocks: FSDP's and activation checkpointing's units), `set_activation_checkpointing(on)`
and `upstream_state_dict()` (what the peer's own code loads). The family object loads tokenizers and
models from the peers' checkpoint layouts, describes the token layout, checks a model against a token
store, samples, builds the optimiser's parameter groups, and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import sampling
from .checkpoint import CheckpointError, expect_kind, extract_state_dict, load_mapped, save_checkpoint
from .codefiles import code_digest
from .loaders import VAR_NESTINGS, config_from_state_dict, load_gpt, load_msvq, load_quantizer, load_var, load_vq
from .models.llamagen import GPT, config_from_spec
from .models.var import VARModel
from .tokenizers.msvq import msvq_config_from_spec
from .tokenizers.vq import vq_config_from_spec

# The modules on the path from tokens to log-probs: the models and their layers, the tokenizers (VAR's input is
# built by its quantiser), the log-softmax sum, the cache's forward loop and autocast. A cache records the digest
# of these files (`logp_code`) as a note only: what makes a cache stale is pipeline.versions.LOGP_VERSION.
LOGP_CODE = ("pipeline.models", "pipeline.tokenizers", "pipeline.logprobs", "pipeline.refcache", "pipeline.device")


class Family:
    """What differs between model families; one instance per family (LLAMAGEN, VAR)."""

    name: ClassVar[str]
    model_kind: ClassVar[str]  # pipeline.checkpoint.KINDS of its generator and its tokenizer
    tokenizer_kind: ClassVar[str]
    model_module: ClassVar[str]  # where its forward is: with pipeline.refcache, the code that computes log-probs
    # the precision its release decodes sampled codes to pixels in on CUDA (every pixel feeds FID and sFID):
    # float32 means no autocast; see decode_precision and docs/imagenet.md "What differs from the release"
    decode_dtype: ClassVar[torch.dtype]
    step_unit: ClassVar[str]  # what its sampler draws per step (its `on_step` calls): a token, or a scale of tokens

    def logp_code(self) -> dict[str, str]:
        """Digest of the code that computes its log-probs (recorded by the cache as a note; never checked)."""
        return code_digest([self.model_module, "pipeline.refcache"], within=LOGP_CODE)

    def decode_precision(self, device: torch.device):
        """The context eval decodes codes to pixels in (pipeline.sampling.generate_images, after the sampler's
        bf16 autocast has closed). On CUDA the release's precision, `decode_dtype` (float32: autocast off, even
        inside an outer one); elsewhere nothing: float32, as every CPU computation here (pipeline.device), so
        CPU samples are bitwise what they were."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        if self.decode_dtype == torch.float32:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=self.decode_dtype)

    def load_tokenizer(self, path: str | os.PathLike, spec: str | None = None):
        raise NotImplementedError

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        """Token-store attributes that describe the token layout (pipeline/formats.py)."""
        raise NotImplementedError

    def load_model(self, path: str | os.PathLike, *, spec: str | None = None, seq_len: int | None = None,
                   tokenizer=None, vae: str | os.PathLike | None = None, vae_model: str | None = None,
                   depth: int | None = None, patch_nums: tuple[int, ...] | None = None) -> torch.nn.Module:
        raise NotImplementedError

    def check_fits(self, model, store_attrs: dict, tokens_path: Path, ckpt: Path) -> None:
        """The model must read the store's tokens: same layout, sequence length, vocabulary and classes."""
        family = store_attrs.get("family", "llamagen")
        if family != self.name:
            raise ValueError(f"token store {tokens_path} holds {family} tokens but {ckpt} is a {self.name} model: "
                             "tokenize with the tokenizer of the model's family")
        if int(store_attrs["codebook_size"]) != model.cfg.vocab_size:  # a larger vocabulary draws codes eval cannot decode
            raise ValueError(f"token store {tokens_path} uses a codebook of {store_attrs['codebook_size']} codes but the model "
                             f"{ckpt} has a vocabulary of {model.cfg.vocab_size}: tokenize with the tokenizer the model was trained on")
        if store_attrs["num_classes"] > model.cfg.num_classes:
            raise ValueError(f"token store {tokens_path} has {store_attrs['num_classes']} classes, model {ckpt} only {model.cfg.num_classes}")
        if int(store_attrs["seq_len"]) != model.cfg.seq_len:
            raise ValueError(f"{tokens_path} has sequences of {store_attrs['seq_len']} tokens, model {ckpt} expects {model.cfg.seq_len}")

    def check_file(self, path: Path, source: ModelSource, layout: dict, image_size: int, classes: int) -> int | None:
        """Before any stage runs (`cca-pipe check`): the generator file `path` can read the tokens of `layout`
        (tokenizer_layout's, at tokenize.image_size `image_size`) of `classes` classes; from its shapes and
        stored config alone, tensors memory-mapped, never built. Raises what loading it later would; returns
        the file's class count where it is known."""
        num_classes = self.file_classes(path, source, layout, image_size)
        if num_classes is not None and classes > num_classes:
            raise ValueError(f"the image folder has {classes} classes but {path} generates {num_classes}: use the model's "
                             "class folders (data_dir) or a checkpoint trained on these classes")
        return num_classes

    def file_classes(self, path: Path, source: ModelSource, layout: dict, image_size: int) -> int | None:
        """check_file's family part: raise on a mismatch; the file's class count where it is known."""
        return None

    def sample(self, model, labels: torch.Tensor, **kwargs) -> sampling.Samples:
        raise NotImplementedError

    def image_size(self, model, tokenizer) -> int:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: the peer's rule for which trainable parameters are decayed."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike, model, state: dict[str, torch.Tensor] | None = None, **extra) -> None:
        """The peer's layout ({"model": upstream state dict}) plus our config and provenance. `state`: the
        model's whole state dict when its live weights are shards (pipeline.parallel.full_state_dict)."""
        save_checkpoint(path, model.upstream_state_dict(state), model.cfg.to_dict(), kind=self.model_kind, **extra)

    def describe_weights(self, state: dict[str, torch.Tensor]) -> str | None:
        """The config readable from an upstream file's weights (for `cca-pipe info`), if any."""
        return None


class LlamaGenFamily(Family):
    name, model_kind, tokenizer_kind, model_module = "llamagen", "llamagen-gpt", "llamagen-vq", "pipeline.models.llamagen"
    decode_dtype = torch.float32  # LlamaGen_sample_ddp.py: the VQ model in float32, decode_code outside any autocast
    step_unit = "token"

    def load_tokenizer(self, path, spec=None):
        return load_vq(path, vq_config_from_spec(spec))

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        if image_size % tokenizer.cfg.downsample:
            raise ValueError(f"tokenize.image_size {image_size} is not a multiple of the tokenizer's downsampling "
                             f"{tokenizer.cfg.downsample}")
        grid = image_size // tokenizer.cfg.downsample
        return {"family": self.name, "seq_len": grid * grid, "grid": grid}

    def load_model(self, path, *, spec=None, seq_len=None, tokenizer=None, vae=None, vae_model=None, depth=None,
                   patch_nums=None) -> GPT:
        """`spec` names the config of upstream files (they carry none): GPT-B ... GPT-3B, or a JSON file."""
        return load_gpt(path, config_from_spec(spec, seq_len))

    def file_classes(self, path, source, layout, image_size):
        # upstream files carry no config and no positional weights (2D RoPE): with a named gpt_model (GPT-L) the
        # block size is the data's, so a c2i_L_256.pt run at 384px cannot be told from its file
        obj = load_mapped(path)
        saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
        if source.gpt_model is not None:
            cfg = config_from_spec(source.gpt_model, None if source.gpt_model.endswith(".json") else layout["seq_len"])
            block, classes = cfg.block_size, cfg.num_classes
        elif saved is None:
            raise CheckpointError(f"checkpoint {path} carries no model config: name one with gpt_model (--gpt-model GPT-B "
                                  "... GPT-3B, or a JSON file of GPTConfig fields)")
        else:
            block, classes = saved.get("block_size"), saved.get("num_classes")
        if isinstance(block, int) and block != layout["seq_len"]:
            fit = image_size // layout["grid"] * int(round(block ** 0.5))
            raise ValueError(f"{path} generates {block} tokens per image, but tokenize.image_size = {image_size} makes "
                             f"{layout['seq_len']} ({layout['grid']} x {layout['grid']}): set image_size to {fit} (the "
                             "checkpoint's resolution), or use the checkpoint made for this one")
        return classes if isinstance(classes, int) else None

    def sample(self, model, labels, **kwargs):
        if kwargs.pop("cfg_schedule", "constant") != "constant":
            raise ValueError("LlamaGen samples with constant guidance: set eval.cfg_schedule to 'constant'")
        return sampling.sample(model, labels, **kwargs)

    def image_size(self, model, tokenizer) -> int:
        return tokenizer.cfg.downsample * int(round(model.cfg.seq_len ** 0.5))

    def param_groups(self, model, weight_decay):
        # LlamaGen's (and CCA's) creat_optimizer: decay every parameter of dim >= 2 (matmuls and embeddings)
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class VARFamily(Family):
    name, model_kind, tokenizer_kind, model_module = "var", "var", "var-vqvae", "pipeline.models.var"
    decode_dtype = torch.float16  # VAR_sample.py: autoregressive_infer_cfg, decode included, under fp16 autocast
    step_unit = "scale"
    # VAR's train.py (and CCA's VAR_finetune.py) never decay 1-d parameters, biases, or these names
    NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
                "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")

    def load_tokenizer(self, path, spec=None):
        return load_msvq(path, msvq_config_from_spec(spec))

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        if image_size != tokenizer.cfg.image_size:
            raise ValueError(f"tokenize.image_size {image_size}: VAR's VQVAE with patch_nums {tokenizer.cfg.patch_nums} "
                             f"needs {tokenizer.cfg.image_size}px images")
        return {"family": self.name, "patch_nums": list(tokenizer.cfg.patch_nums), "seq_len": tokenizer.cfg.seq_len,
                "grid": tokenizer.cfg.patch_nums[-1]}

    def load_model(self, path, *, spec=None, seq_len=None, tokenizer=None, vae=None, vae_model=None, depth=None,
                   patch_nums=None) -> VARModel:
        """VAR's input is built by its VQVAE's quantiser: from the loaded `tokenizer` when given (eval holds the
        whole VQVAE anyway), else read from the VQVAE file `vae`; `depth`, when given, is checked."""
        if tokenizer is not None:
            quantizer = tokenizer.quantize
        elif vae is None:
            raise ValueError(f"{path} is a VAR checkpoint: its input is built by the VQVAE's quantiser, so pass the "
                             "VQVAE checkpoint too (--vae / vae_ckpt, e.g. vae_ch160v4096z32.pth)")
        else:
            expect_kind(vae, (self.tokenizer_kind,), "--vae")
            quantizer = load_quantizer(vae, msvq_config_from_spec(vae_model))
        var = load_var(path, depth=depth, patch_nums=patch_nums or quantizer.cfg.patch_nums)
        return VARModel(var, quantizer)

    def check_fits(self, model, store_attrs, tokens_path, ckpt) -> None:
        super().check_fits(model, store_attrs, tokens_path, ckpt)
        if tuple(store_attrs.get("patch_nums", ())) != model.cfg.patch_nums:
            raise ValueError(f"token store {tokens_path} has scales {store_attrs.get('patch_nums')}, model {ckpt} {model.cfg.patch_nums}")

    def file_classes(self, path, source, layout, image_size):
        obj = load_mapped(path)
        saved = obj.get("config") if isinstance(obj.get("config"), dict) else None
        sd = extract_state_dict(obj, path, VAR_NESTINGS)
        patch_nums = tuple(layout["patch_nums"])
        depth = saved.get("depth") if saved is not None else config_from_state_dict(sd, patch_nums).depth
        if source.depth is not None and source.depth != depth:
            raise CheckpointError(f"checkpoint {path} is VAR-d{depth}, but depth {source.depth} is set: set depth: {depth} "
                                  f"or use var_d{source.depth}.pth")
        positions = sd.get("pos_1LC")
        if positions is not None and positions.shape[1] != layout["seq_len"]:
            raise CheckpointError(f"checkpoint {path} has {positions.shape[1]} positions but the tokenizer's patch_nums "
                                  f"{patch_nums} make {layout['seq_len']}: use the VQVAE the model was trained with")
        classes = sd.get("class_emb.weight")
        return int(classes.shape[0]) - 1 if classes is not None else None  # its last class is the null class

    def sample(self, model, labels, **kwargs):
        return sampling.sample_var(model, labels, **kwargs)

    def image_size(self, model, tokenizer) -> int:
        return tokenizer.cfg.image_size

    def param_groups(self, model, weight_decay):
        decay, no_decay = [], []
        for name, p in model.var.named_parameters():
            if p.requires_grad:
                skip = p.ndim == 1 or name.endswith("bias") or any(k in name for k in self.NO_DECAY)
                (no_decay if skip else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def describe_weights(self, state):
        if not any(k.startswith("blocks.") for k in state):
            return None
        cfg = config_from_state_dict(state)
        return (f"none stored (upstream VAR file); from the weights: depth {cfg.depth}, width {cfg.width}, heads {cfg.heads}, "
                f"{cfg.num_classes} classes + null, vocabulary {cfg.vocab_size}")


LLAMAGEN, VAR = LlamaGenFamily(), VARFamily()
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMAGEN, VAR)}
_BY_KIND = {kind: f for f in FAMILIES.values() for kind in (f.model_kind, f.tokenizer_kind)}
MODEL_KINDS = tuple(f.model_kind for f in FAMILIES.values())
TOKENIZER_KINDS = tuple(f.tokenizer_kind for f in FAMILIES.values())


def family_of(path: str | os.PathLike, role: str, models: bool = True) -> Family:
    """The family of a generator checkpoint (`models`) or of a tokenizer checkpoint, ours or upstream, or one
    clear error naming `role` (the option it was passed as) and what the file is instead."""
    return _BY_KIND[expect_kind(path, MODEL_KINDS if models else TOKENIZER_KINDS, role)]


def family_of_store(attrs: dict) -> Family:
    return FAMILIES[attrs.get("family", "llamagen")]


def family_of_model(model: torch.nn.Module) -> Family:
    return FAMILIES[type(model).family]


@dataclass(frozen=True)
class ModelSource:
    """What reading a generator takes besides its checkpoint path (the CLI's --gpt-model, --vae, --vae-model,
    --depth, and the active preset): upstream files carry no config."""

    gpt_model: str | None = None  # LlamaGen: the config of an upstream GPT (GPT-B ... GPT-3B, or a JSON file)
    vae: Path | None = None  # VAR: the VQVAE whose quantiser builds the model's input
    vae_model: str | None = None  # VAR: that VQVAE's config
    depth: int | None = None  # VAR: the expected depth, checked against the checkpoint
    preset: str | None = None  # the recipe the settings were resolved with, which the model must match (None: any)

    def load_options(self) -> dict:
        """Family.load_model's keywords."""
        return {"spec": self.gpt_model, "vae": self.vae, "vae_model": self.vae_model, "depth": self.depth}


def load_model(path: str | os.PathLike, role: str, **kwargs) -> tuple[Family, torch.nn.Module]:
    """(family, model) of a generator checkpoint; kwargs as Family.load_model."""
    family = family_of(path, role)
    return family, family.load_model(path, **kwargs)


def load_tokenizer(path: str | os.PathLike, spec: str | None = None, role: str = "--vq") -> tuple[Family, torch.nn.Module]:
    family = family_of(path, role, models=False)
    return family, family.load_tokenizer(path, spec)
