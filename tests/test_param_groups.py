"""The families' weight-decay groups: which parameters decay in LlamaGen's and VAR's released optimisers."""

from __future__ import annotations

import torch
from worlds import TINY_GPT_CFG

from pipeline.families import LLAMAGEN, VAR
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR as VARNet
from pipeline.models.var import VARConfig, VARModel
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel

PN = (1, 2, 3, 4)


# ------------------------------------------------------------------------------- parameter groups


def test_llamagen_decays_exactly_the_matrices():
    """LlamaGen's creat_optimizer: every parameter of dim >= 2 decays (embeddings, projections, output);
    the RMSNorm weights (1-d) do not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT_CFG))
    decay, no_decay = LLAMAGEN.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "cls_embedding.embedding_table.weight", "tok_embeddings.weight", "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight", "output.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _tiny_var_model() -> VARModel:
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8,
                               patch_nums=PN)).eval()
    var = VARNet(VARConfig(depth=2, width=64, heads=2, num_classes=5, vocab_size=64, cvae=8, patch_nums=PN)).eval()
    return VARModel(var, vae.quantize).eval()


def test_var_no_decay_set():
    """VAR's train.py filter_params: no decay for 1-d parameters, names ending in bias, and names holding a
    no-decay key (pos_1LC, pos_start, lvl_embed, scale_mul, ...). Of the tiny VAR's parameters this leaves
    exactly the weight matrices below (lvl_embed.weight is 2-d but named; scale_mul_1H11 is 4-d but named)."""
    model = _tiny_var_model()
    decay, no_decay = VAR.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.var.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    block = ("attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight", "ffn.fc2.weight", "ada_lin.1.weight")
    assert decayed == {"word_embed.weight", "class_emb.weight", "head_nm.ada_lin.1.weight", "head.weight",
                       *(f"blocks.{i}.{k}" for i in range(2) for k in block)}
    kept = {names[id(p)] for p in no_decay["params"]}
    for name in ("pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.1.attn.scale_mul_1H11",
                 "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "head.bias", "word_embed.bias", "blocks.1.ada_lin.1.bias"):
        assert name in kept, name
    assert decayed | kept == set(names.values()) and not decayed & kept
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert not grouped & {id(p) for p in model.quantizer.parameters()}  # the frozen quantiser is in no group
    assert not any(p.requires_grad for p in model.quantizer.parameters())
