"""Random-weight checkpoints in the exact upstream layouts of the public LlamaGen files, at reduced depth
(the real widths and vocabulary, so every shape is the upstream one), loaded strictly through the CLI's
loaders."""

from __future__ import annotations

import torch

from pipeline.loaders import load_gpt
from pipeline.models.llamagen import GPT, config_from_spec, gpt_config


def _logits(model: GPT) -> torch.Tensor:
    torch.manual_seed(1)
    labels = torch.tensor([3, model.cfg.null_class])
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        return model.logits(labels, tokens)


def test_gpt_b_c2i_file_layout(tmp_path):
    """c2i_B_256.pt: {"model": state_dict, ...training extras}, with the `freqs_cis` buffer."""
    cfg = gpt_config("GPT-B", n_layer=1, block_size=256)
    torch.manual_seed(0)
    source = GPT(cfg)
    state = source.state_dict()
    state["freqs_cis"] = torch.randn(257, 32, 2)  # upstream keeps the RoPE table in the state dict
    torch.save({"model": state, "optimizer": {"state": {}}, "steps": 10, "args": {"gpt_model": "GPT-B"}}, tmp_path / "c2i_B_256.pt")
    loaded = load_gpt(tmp_path / "c2i_B_256.pt", cfg)
    assert loaded.cfg.dim == 768 and loaded.cfg.ffn_hidden == 2048 and loaded.cfg.vocab_size == 16384
    assert loaded.cls_embedding.embedding_table.weight.shape == (1001, 768)
    torch.testing.assert_close(_logits(loaded), _logits(source), rtol=0, atol=0)


def test_gpt_xxl_bare_fsdp_layout_with_prefixes(tmp_path):
    """c2i_XXL_384.pt: a bare state dict saved from FSDP; DDP/compile prefixes must be stripped too."""
    cfg = gpt_config("GPT-XXL", n_layer=1, block_size=576)
    torch.manual_seed(0)
    source = GPT(cfg)
    state = {f"_orig_mod.module.{k}": v for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "c2i_XXL_384.pt")
    loaded = load_gpt(tmp_path / "c2i_XXL_384.pt", cfg)
    assert loaded.cfg.dim == 1536 and loaded.cfg.ffn_hidden == 4096
    torch.testing.assert_close(_logits(loaded), _logits(source), rtol=0, atol=0)


def test_named_config_resolves_block_size_from_the_token_grid():
    assert config_from_spec("GPT-L", 576).block_size == 576
    assert config_from_spec("GPT-3B", 256).ffn_hidden == 8704
    assert config_from_spec(None, 256) is None
