from __future__ import annotations

import pytest
import torch

from pipeline.models.llamagen import GPT, GPTConfig

TINY_GPT = dict(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=16, multiple_of=16)


@pytest.fixture
def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY_GPT)).eval()
