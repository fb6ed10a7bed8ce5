"""The LlamaGen GPT: upstream state-dict keys and shapes, and logits against an independent implementation
written from the equations in docs/upstream.md ("LlamaGen") (explicit loops, no shared code)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.models.llamagen import GPT, GPTConfig, gpt_config
from pipeline.tokenizers.vq import VQModel, vq_config

# key/shape lists of the released GPT-B and VQ-16 checkpoints (docs/upstream.md, "LlamaGen"; copied into the tests)
REFERENCE = Path(__file__).resolve().parent / "golden"


def _reference_shapes(name: str, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines():
        m = re.match(r"^(\S+) \(([\d, ]+)\)$", line.strip())
        if not m:
            continue
        key, shape = m.group(1), tuple(int(x) for x in m.group(2).replace(" ", "").rstrip(",").split(","))
        if key.startswith("layers.0.") and layers:
            for n in range(layers):
                shapes[key.replace("layers.0.", f"layers.{n}.")] = shape
        else:
            shapes[key] = shape
    return shapes


@pytest.mark.parametrize("block_size", [256, 576])
def test_gpt_b_keys_and_shapes_match_upstream(block_size):
    with torch.device("meta"):
        model = GPT(gpt_config("GPT-B", block_size=block_size))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _reference_shapes("llamagen_gpt_b_state_dict.txt", layers=12)


def test_vq16_keys_and_shapes_match_upstream():
    with torch.device("meta"):
        model = VQModel(vq_config("VQ-16"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _reference_shapes("llamagen_vq16_state_dict.txt", layers=0)


def reference_logits(sd: dict, cfg: GPTConfig, label: int, tokens: list[int]) -> torch.Tensor:
    """One sequence, float64, written from the reference's equations with explicit loops."""
    d, H = cfg.dim, cfg.n_head
    hd = d // H
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return x / torch.sqrt((x * x).mean() + cfg.norm_eps) * w

    # 2D RoPE angles per position: class position -> (cos 0, sin 0); image token p at (row, col) of the grid
    g = int(math.isqrt(cfg.block_size))
    half = hd // 2
    freqs = [1.0 / cfg.rope_base ** ((2 * i) / half) for i in range(half // 2)]

    def angles(pos: int) -> list[float] | None:
        if pos < cfg.cls_token_num:
            return None
        row, col = divmod(pos - cfg.cls_token_num, g)
        return [row * f for f in freqs] + [col * f for f in freqs]

    def rotate(v: torch.Tensor, pos: int) -> torch.Tensor:  # v: (hd,)
        a = angles(pos)
        out = torch.zeros_like(v)
        if a is None:
            return out  # cos = sin = 0 zeroes the class position's q and k
        for i in range(hd // 2):
            c, s = math.cos(a[i]), math.sin(a[i])
            out[2 * i] = v[2 * i] * c - v[2 * i + 1] * s
            out[2 * i + 1] = v[2 * i + 1] * c + v[2 * i] * s
        return out

    xs = [sd["cls_embedding.embedding_table.weight"][label]] + [sd["tok_embeddings.weight"][t] for t in tokens]
    T = len(xs)
    for n in range(cfg.n_layer):
        p = f"layers.{n}."
        hs = [rms(x, sd[p + "attention_norm.weight"]) for x in xs]
        qkv = [sd[p + "attention.wqkv.weight"] @ h for h in hs]
        q = [v[:d] for v in qkv]
        k = [v[d : 2 * d] for v in qkv]
        v_ = [v[2 * d :] for v in qkv]
        new = []
        for t in range(T):
            heads = []
            for h in range(H):
                sl = slice(h * hd, (h + 1) * hd)
                qt = rotate(q[t][sl], t)
                scores = torch.stack([qt @ rotate(k[j][sl], j) / math.sqrt(hd) for j in range(t + 1)])
                w = torch.softmax(scores, 0)
                heads.append(sum(w[j] * v_[j][sl] for j in range(t + 1)))
            attn = sd[p + "attention.wo.weight"] @ torch.cat(heads)
            hid = xs[t] + attn
            f = rms(hid, sd[p + "ffn_norm.weight"])
            a, b = sd[p + "feed_forward.w1.weight"] @ f, sd[p + "feed_forward.w3.weight"] @ f
            new.append(hid + sd[p + "feed_forward.w2.weight"] @ (a * torch.sigmoid(a) * b))
        xs = new
    return torch.stack([sd["output.weight"] @ rms(x, sd["norm.weight"]) for x in xs])


def test_logits_match_an_independent_implementation():
    cfg = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=50, num_classes=7, block_size=9, multiple_of=16)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    tokens = [3, 17, 42, 5, 0, 49, 8, 21]  # 8 inputs -> logits for all 9 image tokens
    for label in (2, cfg.null_class):
        with torch.no_grad():
            ours = model.logits(torch.tensor([label]), torch.tensor([tokens]))[0].double()
        expected = reference_logits(model.state_dict(), cfg, label, tokens)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_teacher_forcing_is_causal(tiny_gpt):
    tokens = torch.randint(0, 64, (1, 15))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 64
    with torch.no_grad():
        a, b = tiny_gpt.logits(torch.tensor([1]), tokens), tiny_gpt.logits(torch.tensor([1]), changed)
    # input t feeds logit position t + 1 (the class token is position 0)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
