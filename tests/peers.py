"""Stand-ins for the peers' model classes as an exported config.json meets them (docs/upstream.md, "Exported
config"): LlamaGen's `ModelArgs` with its own fields and defaults, and VAR's `VARHF` / `VQVAE` constructors with
their own parameter names and defaults, so an unknown or misspelt key is a TypeError as it would be upstream.
What they build is our model of the same equations and state-dict names (tests/test_upstream_checkpoints.py),
from the values the peer's class reads, the way it reads them."""

from __future__ import annotations

from dataclasses import field, make_dataclass

from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR, VARConfig

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


# autoregressive/models/gpt.py `ModelArgs`: its fields in its order, with its defaults (a dataclass: any other
# keyword is a TypeError)
MODEL_ARGS_DEFAULTS = (
    ("dim", 4096), ("n_layer", 32), ("n_head", 32), ("n_kv_head", None), ("multiple_of", 256), ("ffn_dim_multiplier", None),
    ("rope_base", 10000), ("norm_eps", 1e-5), ("initializer_range", 0.02), ("token_dropout_p", 0.1),
    ("attn_dropout_p", 0.0), ("resid_dropout_p", 0.1), ("ffn_dropout_p", 0.1), ("drop_path_rate", 0.0),
    ("num_classes", 1000), ("caption_dim", 2048), ("class_dropout_prob", 0.1), ("model_type", "c2i"),
    ("vocab_size", 16384), ("cls_token_num", 1), ("block_size", 256), ("max_batch_size", 32), ("max_seq_len", 2048),
)
ModelArgs = make_dataclass("ModelArgs", [(name, object, field(default=value)) for name, value in MODEL_ARGS_DEFAULTS])


def llamagen_transformer(args) -> GPT:
    """`Transformer(args)`: FFN hidden as its FeedForward computes it, kv heads as its Attention reads them, the
    null row as its LabelEmbedder adds it (class_dropout_prob > 0), a c2i class embedding."""
    assert args.model_type == "c2i", args.model_type
    assert (args.n_kv_head or args.n_head) == args.n_head, "grouped kv heads: not the released layout"
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    cfg = GPTConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab_size,
                    num_classes=args.num_classes, block_size=args.block_size, cls_token_num=args.cls_token_num,
                    multiple_of=args.multiple_of, norm_eps=args.norm_eps, rope_base=float(args.rope_base),
                    has_null_class=args.class_dropout_prob > 0)
    assert cfg.ffn_hidden == find_multiple(hidden, args.multiple_of)
    return GPT(cfg)


def vqvae_arguments(vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False, quant_conv_ks=3,
                    quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0, v_patch_nums=VAR_PATCH_NUMS,
                    test_mode=True) -> dict:
    """models/vqvae.py `VQVAE.__init__`'s parameters: what VAR reads of the VQVAE (Cvae, V)."""
    return {"vocab_size": vocab_size, "z_channels": z_channels}


def var_hf(vae_kwargs: dict, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_rate=0.0,
           attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=False,
           patch_nums=VAR_PATCH_NUMS, flash_if_available=True, fused_if_available=True) -> VAR:
    """models/var.py `VARHF(vae_kwargs, ...)`: VQVAE(**vae_kwargs), then VAR's constructor. Our VAR has the
    released structure only (l2-normalised attention, one ada_lin per block) and never drops labels in forward,
    so the others must be those (cond_drop_rate 0: upstream forward would drop labels at random)."""
    vae = vqvae_arguments(**vae_kwargs)
    assert attn_l2_norm and not shared_aln and cond_drop_rate == 0 and drop_rate == attn_drop_rate == 0
    cfg = VARConfig(depth=depth, width=embed_dim, heads=num_heads, num_classes=num_classes, vocab_size=vae["vocab_size"],
                    cvae=vae["z_channels"], patch_nums=tuple(patch_nums), mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                    drop_path_rate=drop_path_rate)
    return VAR(cfg)
