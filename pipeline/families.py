"""Model families: everything reflogp, train, eval, info and plan need that differs between model families.

Each family is one object (LLAMAGEN, VAR, and any a plugin registers: `register_family`, docs/families.md);
stages get theirs from a checkpoint (`family_of`), a token store (`family_of_store`), a model
(`family_of_model`) or its registered name (`family_named`) and never ask which one they hold:
  - "llamagen": next-token prediction, GPT (pipeline.models.llamagen) over VQ-16/VQ-8 codes;
  - "var": next-scale prediction, VARModel (pipeline.models.var) over the multi-scale VQVAE's codes.

The contracts are typing Protocols: `Model` (what a family's model offers every stage: its `cfg`
(`ModelConfig`), a teacher-forced `forward(tokens, labels) -> (B, L)` float32 per-token log-probs, the only
way likelihoods are computed, so DDP/FSDP wrap it unchanged, `set_dropout`, `blocks()` (FSDP's and
activation checkpointing's units), `set_activation_checkpointing(on)` and `upstream_state_dict()`),
`Tokenizer` (encode images to codes, decode codes to images) and `FamilyContract` (what stages call on a
family: `Family` below implements it). The family object loads tokenizers and models from the peers'
checkpoint layouts, describes the token layout, checks a model against a token store, samples, builds the
optimiser's parameter groups, and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch

from . import sampling
from .checkpoint import (
    CheckpointError,
    expect_kind,
    extract_state_dict,
    load_mapped,
    register_kind,
    save_checkpoint,
    unregister_kind,
)
from .codefiles import code_digest
from .formats import TOKENS_LEGACY_FAMILY
from .loaders import VAR_NESTINGS, config_from_state_dict, load_gpt, load_msvq, load_quantizer, load_var, load_vq
from .models.llamagen import GPT, GPTConfig, config_from_spec
from .models.memory import LLAMAGEN_MEMORY, VAR_MEMORY, FamilyMemory
from .models.var import VARConfig, VARModel
from .tokenizers.msvq import MSVQConfig, MSVQModel, msvq_config_from_spec
from .tokenizers.vq import VQModel, vq_config_from_spec

# The modules on the path from tokens to log-probs: the models and their layers, the tokenizers (VAR's input is
# built by its quantiser), the log-softmax sum, the cache's forward loop and autocast. A cache records the digest
# of these files (`logp_code`) as a note only: what makes a cache stale is pipeline.versions.LOGP_VERSION.
LOGP_CODE = ("pipeline.models", "pipeline.tokenizers", "pipeline.logprobs", "pipeline.refcache", "pipeline.device")


# ------------------------------------------------------------------------------------------- the contracts


@runtime_checkable
class ModelConfig(Protocol):
    """A family model's `cfg`: what the stages read of any family's config."""

    num_classes: int  # classes 0 .. num_classes - 1
    null_class: int  # the label of the unconditional (class-dropout) condition
    has_null_class: bool  # trained with class dropout: guidance and train.uncond_ratio need it
    vocab_size: int  # codes 0 .. vocab_size - 1 (the tokenizer's codebook)
    seq_len: int  # tokens per image (the token store's L)
    lambda_conditioning: bool  # has a lambda embedding (train.lambda_conditioning)

    def to_dict(self) -> dict: ...  # saved with the checkpoint, read back by the family's load_model


@runtime_checkable
class Model(Protocol):
    """What a family's model (an nn.Module) offers the stages beside nn.Module's own methods."""

    cfg: ModelConfig
    family: ClassVar[str]  # its family's registered name (family_of_model)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor | None = None,
                dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log p(z_t | z_<t, c): tokens (B, L) int64, labels (B,) -> (B, L) float32. `lam` (B,):
        a lambda-conditioned policy's lambdas; `dropout_keys` (B,) int64: each sequence's dropout key
        (pipeline.models.layers.noise_keys), so masks do not depend on the batch (train mode, dropout on)."""
        ...

    def set_dropout(self, dropout: float = 0.0, drop_path: float = 0.0, section: str = "train") -> None: ...

    def blocks(self) -> torch.nn.ModuleList: ...  # FSDP's units of sharding, activation checkpointing's units

    def set_activation_checkpointing(self, enabled: bool) -> None: ...

    def upstream_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...

    def enable_lambda_conditioning(self, seed: int = 0) -> None: ...  # train.lambda_conditioning


@runtime_checkable
class Tokenizer(Protocol):
    """A family's tokenizer: images (B, 3, H, W) in [-1, 1] -> codes (B, L) (stages/tokenize.py), and back."""

    cfg: Any  # with codebook_size

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor: ...


class KVCache(NamedTuple):
    """The shape of a family's sampling caches (pipeline.memplan.kv_cache_bytes): `layers` caches, each k and
    v of (sequences, positions, width), in the weights' dtype or (`weights_dtype` False) the compute dtype."""

    layers: int
    positions: int
    width: int
    weights_dtype: bool


@dataclass(frozen=True)
class ModelSource:
    """What reading a generator takes besides its checkpoint path (the CLI's --gpt-model, --vae, --vae-model,
    --depth, and the active preset): upstream files carry no config. Each family reads the fields it needs
    (Family.load_model); the others leave them alone."""

    gpt_model: str | None = None  # LlamaGen: the config of an upstream GPT (GPT-B ... GPT-3B, or a JSON file)
    vae: Path | None = None  # VAR: the VQVAE whose quantiser builds the model's input
    vae_model: str | None = None  # VAR: that VQVAE's config
    depth: int | None = None  # VAR: the expected depth, checked against the checkpoint
    preset: str | None = None  # the recipe the settings were resolved with, which the model must match (None: any)

    def for_own_checkpoint(self) -> ModelSource:
        """For a checkpoint of ours (a trained policy: it carries its config): only the checks (depth) apply."""
        return ModelSource(depth=self.depth, preset=self.preset)


@runtime_checkable
class FamilyContract(Protocol):
    """What the stages call on a family (Family implements it; a plugin subclasses Family)."""

    name: str
    model_kind: str
    tokenizer_kind: str
    step_unit: str
    memory: FamilyMemory | None

    def logp_code(self) -> dict[str, str]: ...
    def decode_precision(self, device: torch.device) -> contextlib.AbstractContextManager: ...
    def load_tokenizer(self, path: str | os.PathLike, spec: str | None = None) -> Tokenizer: ...
    def build_tokenizer(self, spec: str | None = None) -> Tokenizer: ...
    def tokenizer_layout(self, tokenizer: Tokenizer, image_size: int) -> dict: ...
    def sampling_layout(self, tokenizer: Tokenizer, image_size: int) -> dict: ...
    def layout_problem(self, attrs: Mapping, seq_len: int) -> str | None: ...
    def load_model(self, path: str | os.PathLike, source: ModelSource = ..., *, layout: Mapping | None = None,
                   tokenizer: Tokenizer | None = None) -> Model: ...
    def check_fits(self, model: Model, store_attrs: dict, tokens_path: Path, ckpt: Path) -> None: ...
    def check_file(self, path: Path, source: ModelSource, layout: dict, image_size: int, classes: int) -> int | None: ...
    def sample(self, model: Model, labels: torch.Tensor, **kwargs) -> sampling.Samples: ...
    def image_size(self, model: Model, tokenizer: Tokenizer) -> int: ...
    def grid_side(self, cfg: ModelConfig) -> int: ...
    def step_tokens(self, cfg: ModelConfig) -> int: ...
    def sampling_cache(self, cfg: ModelConfig) -> KVCache: ...
    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]: ...
    def save(self, path: str | os.PathLike, model: Model, state: dict[str, torch.Tensor] | None = None, **extra) -> None: ...
    def checkpoint_nestings(self, kind: str) -> tuple: ...
    def describe_weights(self, state: dict[str, torch.Tensor]) -> str | None: ...
    def peer_config(self, config: Mapping) -> dict: ...


# ------------------------------------------------------------------------------------------- the families


class Family:
    """What differs between model families; one instance per family (LLAMAGEN, VAR, a plugin's), registered
    with `register_family`. Subclasses set the class attributes and implement the methods that raise here."""

    name: ClassVar[str]
    model_kind: ClassVar[str]  # pipeline.checkpoint.KINDS of its generator and its tokenizer
    tokenizer_kind: ClassVar[str]
    model_module: ClassVar[str]  # where its forward is: with pipeline.refcache, the code that computes log-probs
    # the precision its release decodes sampled codes to pixels in on CUDA (every pixel feeds FID and sFID):
    # float32 means no autocast; see decode_precision and docs/imagenet.md "What differs from the release"
    decode_dtype: ClassVar[torch.dtype]
    step_unit: ClassVar[str]  # what its sampler draws per step (its `on_step` calls): a token, or a scale of tokens
    # pipeline.checkpoint.KINDS' words for its two kinds ("a LlamaGen GPT (image generator)"), in its errors
    model_described: ClassVar[str]
    tokenizer_described: ClassVar[str]
    default_tokenizer: ClassVar[str]  # the tokenizer its pipeline runs (build_tokenizer(None)), as `cca-pipe plan` names it
    # what `cca-pipe plan` counts of its models (pipeline.models.memory.FamilyMemory); None: it cannot be planned
    memory: ClassVar[FamilyMemory | None] = None

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

    def upstream_kind(self, keys: set[str]) -> str | None:
        """Which of its kinds an upstream file (no kind entry) is, from its state dict's keys; None: neither."""
        return None

    def load_tokenizer(self, path: str | os.PathLike, spec: str | None = None) -> Tokenizer:
        raise NotImplementedError

    def build_tokenizer(self, spec: str | None = None) -> Tokenizer:
        """A freshly built tokenizer of config `spec` (a name or a JSON file, as --vq-model; None: its pipeline's,
        `default_tokenizer`), on torch's current default device (`cca-pipe plan` builds it on the meta device)."""
        raise NotImplementedError

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        """Token-store attributes that describe the token layout (pipeline/formats.py): "family", "seq_len",
        "grid" (tokens per side of the last token map) and the family's own (VAR: "patch_nums")."""
        raise NotImplementedError

    def sampling_layout(self, tokenizer, image_size: int) -> dict:
        """The layout a model samples at eval.image_size `image_size` (eval's --base: an upstream file's
        sequence length); by default the tokenizer's layout at that size."""
        return self.tokenizer_layout(tokenizer, image_size)

    def layout_problem(self, attrs: Mapping, seq_len: int) -> str | None:
        """What is wrong with a token store's layout attributes for rows of `seq_len` tokens (None: nothing);
        pipeline.tokenstore names the store and the fix."""
        return None

    def load_model(self, path: str | os.PathLike, source: ModelSource = ModelSource(), *, layout: Mapping | None = None,
                   tokenizer=None) -> Model:
        """The generator at `path`. `source`: the command line's model options, of which the family reads its
        own; `layout`: the token layout it must read (a store's attributes, tokenizer_layout's), when known;
        `tokenizer`: the loaded tokenizer, when the stage holds it."""
        raise NotImplementedError

    def check_fits(self, model, store_attrs: dict, tokens_path: Path, ckpt: Path) -> None:
        """The model must read the store's tokens: same layout, sequence length, vocabulary and classes."""
        family = store_attrs.get("family", TOKENS_LEGACY_FAMILY)
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

    def grid_side(self, cfg) -> int:
        """Tokens per side of the (last) token map the model generates: its images are that x the tokenizer's
        downsampling pixels wide."""
        raise NotImplementedError

    def step_tokens(self, cfg) -> int:
        """Tokens its sampler draws in its largest step (pipeline.memplan: the step's logits)."""
        raise NotImplementedError

    def sampling_cache(self, cfg) -> KVCache:
        """The shape of its sampler's KV caches (pipeline.memplan)."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: the peer's rule for which trainable parameters are decayed."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike, model, state: dict[str, torch.Tensor] | None = None, **extra) -> None:
        """The peer's layout ({"model": upstream state dict}) plus our config and provenance. `state`: the
        model's whole state dict when its live weights are shards (pipeline.parallel.full_state_dict)."""
        save_checkpoint(path, model.upstream_state_dict(state), model.cfg.to_dict(), kind=self.model_kind, **extra)

    def checkpoint_nestings(self, kind: str) -> tuple:
        """Where a training checkpoint of `kind` nests its state dict (pipeline.checkpoint.extract_state_dict)."""
        return ()

    def describe_weights(self, state: dict[str, torch.Tensor]) -> str | None:
        """The config readable from an upstream file's weights (for `cca-pipe info`), if any."""
        return None

    peer_class: ClassVar[str] = ""  # how the peer builds its class from an exported config.json (the model card says it)

    def peer_config(self, config: Mapping) -> dict:
        """`cca-pipe export`'s config.json: the model config `config` (a checkpoint of ours: cfg.to_dict()) in the
        peer's own field names, so that the peer's class is built from it as `peer_class` says."""
        raise ValueError(f"the {self.name} family names no peer class to build from a config.json: export is for "
                         "LlamaGen and VAR policies")


LLAMAGEN_CLASS_DROPOUT = 0.1  # ModelArgs' default class_dropout_prob, the release's pretraining rate


class LlamaGenFamily(Family):
    name, model_kind, tokenizer_kind, model_module = "llamagen", "llamagen-gpt", "llamagen-vq", "pipeline.models.llamagen"
    decode_dtype = torch.float32  # LlamaGen_sample_ddp.py: the VQ model in float32, decode_code outside any autocast
    step_unit = "token"
    model_described, tokenizer_described = "a LlamaGen GPT (image generator)", "a LlamaGen VQ tokenizer"
    default_tokenizer = "VQ-16"
    memory = LLAMAGEN_MEMORY
    peer_class = "`Transformer(ModelArgs(**config))` of LlamaGen's autoregressive/models/gpt.py"

    def peer_config(self, config):
        """LlamaGen's ModelArgs fields (docs/upstream.md, "Exported config"): the same network (FFN hidden from
        multiple_of, no ffn_dim_multiplier; as many kv heads as heads); class_dropout_prob > 0 is what gives the
        class table its null row; dropouts and KV-cache sizes keep ModelArgs' defaults (they change no weight)."""
        cfg = GPTConfig(**config)
        return {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_head,
                "multiple_of": cfg.multiple_of, "ffn_dim_multiplier": None, "rope_base": cfg.rope_base,
                "norm_eps": cfg.norm_eps, "num_classes": cfg.num_classes,
                "class_dropout_prob": LLAMAGEN_CLASS_DROPOUT if cfg.has_null_class else 0.0, "model_type": "c2i",
                "vocab_size": cfg.vocab_size, "cls_token_num": cfg.cls_token_num, "block_size": cfg.block_size}

    def upstream_kind(self, keys):
        if any(".attention.wqkv." in k for k in keys) or "tok_embeddings.weight" in keys:
            return self.model_kind
        if any("conv_blocks" in k for k in keys):
            return self.tokenizer_kind
        return None

    def load_tokenizer(self, path, spec=None):
        return load_vq(path, vq_config_from_spec(spec))

    def build_tokenizer(self, spec=None):
        return VQModel(vq_config_from_spec(spec or self.default_tokenizer))

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        if image_size % tokenizer.cfg.downsample:
            raise ValueError(f"tokenize.image_size {image_size} is not a multiple of the tokenizer's downsampling "
                             f"{tokenizer.cfg.downsample}")
        grid = image_size // tokenizer.cfg.downsample
        return {"family": self.name, "seq_len": grid * grid, "grid": grid}

    def load_model(self, path, source=ModelSource(), *, layout=None, tokenizer=None) -> GPT:
        """`source.gpt_model` names the config of upstream files (they carry none): GPT-B ... GPT-3B, or a JSON
        file; its block size is the layout's sequence length."""
        spec, seq_len = source.gpt_model, (layout or {}).get("seq_len")
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
        return tokenizer.cfg.downsample * self.grid_side(model.cfg)

    def grid_side(self, cfg) -> int:
        return int(round(cfg.seq_len ** 0.5))  # row-major grid x grid tokens

    def step_tokens(self, cfg) -> int:
        return 1

    def sampling_cache(self, cfg) -> KVCache:
        # a static cache per layer of the class tokens and the whole block, in the weights' dtype (float32)
        return KVCache(cfg.n_layer, cfg.cls_token_num + cfg.block_size, cfg.dim, weights_dtype=True)

    def param_groups(self, model, weight_decay):
        # LlamaGen's (and CCA's) creat_optimizer: decay every parameter of dim >= 2 (matmuls and embeddings)
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class VARFamily(Family):
    name, model_kind, tokenizer_kind, model_module = "var", "var", "var-vqvae", "pipeline.models.var"
    decode_dtype = torch.float16  # VAR_sample.py: autoregressive_infer_cfg, decode included, under fp16 autocast
    step_unit = "scale"
    model_described, tokenizer_described = "a VAR transformer (image generator)", "VAR's multi-scale VQVAE tokenizer"
    default_tokenizer = "VAR VQVAE"
    memory = VAR_MEMORY
    peer_class = "`VARHF(**config)` of VAR's models/var.py (its VQVAE built from `vae_kwargs`)"

    def peer_config(self, config):
        """VARHF's constructor arguments (docs/upstream.md, "Exported config"): VAR's, as build_vae_var passes
        them, plus `vae_kwargs` for the VQVAE it builds (the release's, with this model's codebook: its weights are
        not in the export, load vae_ch160v4096z32.pth into it). cond_drop_rate 0: upstream `forward` drops labels
        in eval mode too, so a policy's teacher-forced logits need it off (sampling never reads it)."""
        cfg = VARConfig(**config)
        vae = MSVQConfig(vocab_size=cfg.vocab_size, z_channels=cfg.cvae, patch_nums=cfg.patch_nums)
        return {"vae_kwargs": {"vocab_size": vae.vocab_size, "z_channels": vae.z_channels, "ch": vae.ch,
                               "quant_conv_ks": vae.quant_conv_ks, "quant_resi": vae.quant_resi,
                               "share_quant_resi": vae.share_quant_resi, "v_patch_nums": list(vae.patch_nums),
                               "test_mode": True},
                "num_classes": cfg.num_classes, "depth": cfg.depth, "embed_dim": cfg.width, "num_heads": cfg.heads,
                "mlp_ratio": cfg.mlp_ratio, "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": cfg.drop_path_rate,
                "norm_eps": cfg.norm_eps, "shared_aln": False, "cond_drop_rate": 0.0, "attn_l2_norm": True,
                "patch_nums": list(cfg.patch_nums)}
    # VAR's train.py (and CCA's VAR_finetune.py) never decay 1-d parameters, biases, or these names
    NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
                "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")

    def upstream_kind(self, keys):
        if any(k.endswith("attn.scale_mul_1H11") for k in keys):
            return self.model_kind
        if any("quant_resi.qresi_ls" in k for k in keys):
            return self.tokenizer_kind
        return None

    def load_tokenizer(self, path, spec=None):
        return load_msvq(path, msvq_config_from_spec(spec))

    def build_tokenizer(self, spec=None):
        return MSVQModel(msvq_config_from_spec(spec) or MSVQConfig())

    def sampling_layout(self, tokenizer, image_size: int) -> dict:
        # its scales are the VQVAE's (patch_nums), whatever eval.image_size: the model reads them from the quantiser
        return self.tokenizer_layout(tokenizer, tokenizer.cfg.image_size)

    def layout_problem(self, attrs, seq_len):
        patch_nums = attrs.get("patch_nums")
        if not patch_nums or sum(pn * pn for pn in patch_nums) != seq_len:
            return (f"VAR tokens of length {seq_len} but attribute patch_nums {patch_nums} "
                    f"gives {sum(pn * pn for pn in patch_nums or [])}")
        return None

    def tokenizer_layout(self, tokenizer, image_size: int) -> dict:
        if image_size != tokenizer.cfg.image_size:
            raise ValueError(f"tokenize.image_size {image_size}: VAR's VQVAE with patch_nums {tokenizer.cfg.patch_nums} "
                             f"needs {tokenizer.cfg.image_size}px images")
        return {"family": self.name, "patch_nums": list(tokenizer.cfg.patch_nums), "seq_len": tokenizer.cfg.seq_len,
                "grid": tokenizer.cfg.patch_nums[-1]}

    def load_model(self, path, source=ModelSource(), *, layout=None, tokenizer=None) -> VARModel:
        """VAR's input is built by its VQVAE's quantiser: from the loaded `tokenizer` when given (eval holds the
        whole VQVAE anyway), else read from the VQVAE file `source.vae`; `source.depth`, when given, is checked;
        its scales are the layout's patch_nums, else the quantiser's."""
        if tokenizer is not None:
            quantizer = tokenizer.quantize
        elif source.vae is None:
            raise ValueError(f"{path} is a VAR checkpoint: its input is built by the VQVAE's quantiser, so pass the "
                             "VQVAE checkpoint too (--vae / vae_ckpt, e.g. vae_ch160v4096z32.pth)")
        else:
            expect_kind(source.vae, (self.tokenizer_kind,), "--vae")
            quantizer = load_quantizer(source.vae, msvq_config_from_spec(source.vae_model))
        patch_nums = (layout or {}).get("patch_nums")
        var = load_var(path, depth=source.depth, patch_nums=patch_nums or quantizer.cfg.patch_nums)
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

    def grid_side(self, cfg) -> int:
        return cfg.patch_nums[-1]  # its last scale

    def step_tokens(self, cfg) -> int:
        return cfg.patch_nums[-1] ** 2  # a whole scale per step, the last the largest

    def sampling_cache(self, cfg) -> KVCache:
        # each block's (and the head's) cache grows by a scale per step to all seq_len positions, in the compute dtype
        return KVCache(cfg.depth + 1, cfg.seq_len, cfg.width, weights_dtype=False)

    def checkpoint_nestings(self, kind):
        # a VAR transformer's training checkpoint nests it (["trainer"]["var_wo_ddp"]); its VQVAE's is unwrapped as usual
        return VAR_NESTINGS if kind == self.model_kind else ()

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


# ------------------------------------------------------------------------------------------- the registry

FAMILIES: dict[str, Family] = {}  # name -> family, in registration order: read it through families()
_BY_KIND: dict[str, Family] = {}
PLUGINS_ENV = "CCA_PIPE_FAMILIES"  # comma-separated modules that register families when imported
ENTRY_POINTS = "cca_pipe.families"  # or an installed package's entry points of this group (docs/families.md)
_entry_points_loaded = False


def register_family(family: Family) -> Family:
    """Make `family` known to every stage: family_of (its checkpoint kinds), family_of_store and
    family_of_model (its name), `cca-pipe info`, `cca-pipe plan`. Plugins call it when imported."""
    if family.name in FAMILIES or {family.model_kind, family.tokenizer_kind} & set(_BY_KIND):
        raise ValueError(f"model family {family.name!r} (kinds {family.model_kind!r}, {family.tokenizer_kind!r}) is "
                         "already registered: give the new family its own name and kinds")
    register_kind(family.model_kind, family.model_described, family.upstream_kind)
    register_kind(family.tokenizer_kind, family.tokenizer_described)
    FAMILIES[family.name] = family
    _BY_KIND.update({family.model_kind: family, family.tokenizer_kind: family})
    return family


def unregister_family(name: str) -> None:
    """Forget a registered family (a test's or a session's plugin)."""
    family = FAMILIES.pop(name)
    for kind in (family.model_kind, family.tokenizer_kind):
        _BY_KIND.pop(kind)
        unregister_kind(kind)


def load_plugins() -> None:
    """Import the family plugins not imported yet: the entry points of group "cca_pipe.families" of the
    installed packages (each a module that registers its families, or a Family) and the modules
    $CCA_PIPE_FAMILIES names (comma-separated); every registry lookup calls it."""
    global _entry_points_loaded
    import importlib
    import sys
    from importlib.metadata import entry_points

    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINTS):
            loaded = point.load()
            if isinstance(loaded, Family) and loaded.name not in FAMILIES:
                register_family(loaded)
    for module in (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if module and module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"${PLUGINS_ENV} names the family plugin {module!r}, which cannot be imported ({e}): "
                                 "fix the name or the PYTHONPATH") from None


def families() -> dict[str, Family]:
    """The registered families by name (the built-in ones and the plugins'), in registration order."""
    load_plugins()
    return FAMILIES


def model_kinds() -> tuple[str, ...]:
    return tuple(f.model_kind for f in families().values())


def tokenizer_kinds() -> tuple[str, ...]:
    return tuple(f.tokenizer_kind for f in families().values())


def family_named(name: str, what: str = "model family") -> Family:
    """The registered family `name`, or one clear error listing the known ones."""
    known = families()
    if name not in known:
        raise ValueError(f"{what} {name!r} is not a registered model family (known: {', '.join(known)}): register it "
                         f"with a plugin module named in ${PLUGINS_ENV} (docs/families.md)")
    return known[name]


def family_of(path: str | os.PathLike, role: str, models: bool = True) -> Family:
    """The family of a generator checkpoint (`models`) or of a tokenizer checkpoint, ours or upstream, or one
    clear error naming `role` (the option it was passed as) and what the file is instead."""
    kinds = model_kinds() if models else tokenizer_kinds()
    return _BY_KIND[expect_kind(path, kinds, role)]


def family_of_kind(kind: str | None) -> Family | None:
    """The family a checkpoint kind (pipeline.checkpoint.checkpoint_kind) belongs to, if any."""
    load_plugins()
    return _BY_KIND.get(kind)


def family_of_store(attrs: Mapping) -> Family:
    return family_named(attrs.get("family", TOKENS_LEGACY_FAMILY), "token store family")


def family_of_model(model: torch.nn.Module) -> Family:
    return family_named(type(model).family)


LLAMAGEN, VAR = register_family(LlamaGenFamily()), register_family(VARFamily())


def load_model(path: str | os.PathLike, role: str, source: ModelSource = ModelSource(), **kwargs) -> tuple[Family, Model]:
    """(family, model) of a generator checkpoint; source and kwargs (layout, tokenizer) as Family.load_model."""
    family = family_of(path, role)
    return family, family.load_model(path, source, **kwargs)


def load_tokenizer(path: str | os.PathLike, spec: str | None = None, role: str = "--vq") -> tuple[Family, Tokenizer]:
    family = family_of(path, role, models=False)
    return family, family.load_tokenizer(path, spec)
