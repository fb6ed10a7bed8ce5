"""The guidance formula l_c + s (l_c - l_u), checked by hand on fixed logits through both samplers.

The network's logits are replaced by constants that depend only on whether a row's label is the null
class; with top_k = 1 the sampled token is the argmax of the guided logits, so every sampled token is a
hand-derived value. Three tokens matter (the others sit at -5 in both halves):

    token   l_c    l_u    l_c - l_u    guided l_c + t (l_c - l_u)
      0    -0.5   -1.5       +1           -0.5 + t
      1     1.0    2.0       -1            1.0 - t
      2     0.6    0.6        0            0.6

Token 1 leads while 1 - t > 0.6 (t < 0.4), token 2 while 0.6 > -0.5 + t (t < 1.1), then token 0:

    t = 0   -> (-0.5, 1.0, 0.6)       argmax 1
    t = 0.5 -> ( 0.0, 0.5, 0.6)       argmax 2
    t = 5/6 -> ( 0.333, 0.167, 0.6)   argmax 2
    t = 1   -> ( 0.5, 0.0, 0.6)       argmax 2
    t = 1.5 -> ( 1.0, -0.5, 0.6)      argmax 0
    t = 5/3 -> ( 1.167, -0.667, 0.6)  argmax 0
    t >= 2  -> token 0 leads by >= 0.9 argmax 0
"""

from __future__ import annotations

import pytest
import torch

from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR, VARConfig, VARModel
from pipeline.sampling import sample, sample_var
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel, scale_bounds

V = 16
L_C = torch.full((V,), -5.0)
L_C[:3] = torch.tensor([-0.5, 1.0, 0.6])
L_U = torch.full((V,), -5.0)
L_U[:3] = torch.tensor([-1.5, 2.0, 0.6])


def expected_token(t: float) -> int:
    """argmax of the guided logits, by the thresholds in the module docstring (values near 0.4 and 1.1 unused)."""
    assert abs(t - 0.4) > 0.05 and abs(t - 1.1) > 0.05
    return 1 if t < 0.4 else 2 if t < 1.1 else 0


def test_table_matches_the_formula():
    for t in (0.0, 0.5, 2.5 / 3, 1.0, 1.5, 5 / 3, 2.0, 2.5, 3.0):
        assert int(torch.argmax(L_C + t * (L_C - L_U))) == expected_token(t), t


def test_llamagen_cfg_scale_is_one_plus_s():
    """LlamaGen's generate.py mixes logits = l_u + (l_c - l_u) * cfg_scale; the project (and the CCA paper)
    write l_c + s (l_c - l_u). They are the same for cfg_scale = 1 + s:
        l_u + (1 + s)(l_c - l_u) = l_u + (l_c - l_u) + s (l_c - l_u) = l_c + s (l_c - l_u).
    So LlamaGen's --cfg-scale 2.0 is s = 1 here, and s = 0 (no guidance) is LlamaGen's cfg-scale 1.0."""
    g = torch.Generator().manual_seed(0)
    l_c, l_u = torch.randn(5, V, generator=g), torch.randn(5, V, generator=g)
    for s in (0.0, 0.5, 1.0, 3.0):
        torch.testing.assert_close(l_u + (1 + s) * (l_c - l_u), l_c + s * (l_c - l_u), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- LlamaGen


def _gpt(monkeypatch) -> tuple[GPT, list[int]]:
    """A tiny GPT whose logits are L_C for real labels and L_U for the null label; records each call's batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=V, num_classes=3, block_size=16, multiple_of=16)).eval()
    batches: list[int] = []

    def logits(labels, tokens, start=0, lam=None):
        batches.append(len(labels))
        null = (labels == model.cfg.null_class)[:, None, None]
        out = torch.where(null, L_U, L_C).expand(-1, max(tokens.shape[1], 1), -1)
        return out.float().contiguous()

    monkeypatch.setattr(model, "logits", logits)
    return model, batches


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("s", [0.0, 0.5, 3.0])
def test_llamagen_guided_argmax(monkeypatch, s, use_cache):
    model, batches = _gpt(monkeypatch)
    assert model.cfg.null_class == 3
    labels = torch.tensor([0, 2, 1])
    out = sample(model, labels, cfg_scale=s, top_k=1, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
    assert out.tokens.shape == (3, 16)
    assert (out.tokens == expected_token(s)).all(), out.tokens
    # token_logp is the unguided conditional model's: log_softmax(L_C) at the sampled token
    torch.testing.assert_close(out.token_logp, torch.log_softmax(L_C, -1)[out.tokens])
    assert set(batches) == ({3} if s == 0 else {6})  # s = 0 never computes the null half


# ------------------------------------------------------------------------------- VAR

PN = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def var_model() -> VARModel:
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig(vocab_size=V, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8,
                               patch_nums=PN)).eval()
    var = VAR(VARConfig(depth=2, width=64, heads=2, num_classes=5, vocab_size=V, cvae=8, patch_nums=PN)).eval()
    return VARModel(var, vae.quantize).eval()


def _patch_var(monkeypatch, model: VARModel) -> list[tuple[int, int]]:
    """var.logits(x, cond, mask) -> (rows, L_scale, V): L_U on rows whose class embedding is the null class's
    (the second half of the batch when guidance is on), L_C elsewhere. Records (rows, L_scale) per call."""
    calls: list[tuple[int, int]] = []
    null_emb = model.var.class_emb.weight[model.cfg.null_class]

    def logits(x, cond, attn_mask):
        calls.append((x.shape[0], x.shape[1]))
        null = (cond == null_emb).all(-1)[:, None, None]
        return torch.where(null, L_U, L_C).expand(-1, x.shape[1], -1).float().contiguous()

    monkeypatch.setattr(model.var, "logits", logits)
    return calls


def _per_scale(tokens: torch.Tensor) -> list[set[int]]:
    return [set(tokens[:, a:b].flatten().tolist()) for a, b in scale_bounds(PN)]


@pytest.mark.parametrize(("s", "ts", "tokens"), [  # t = s si / (S - 1), S = 4
    (3.0, [0.0, 1.0, 2.0, 3.0], [1, 2, 0, 0]),
    (2.5, [0.0, 2.5 / 3, 5 / 3, 2.5], [1, 2, 0, 0]),
    (1.5, [0.0, 0.5, 1.0, 1.5], [1, 2, 2, 0]),
])
def test_var_linear_schedule(monkeypatch, var_model, s, ts, tokens):
    """Linear schedule: t = s * si / 3 at scale si; tokens per scale by the table:
    s = 3   -> t 0, 1, 2, 3         -> tokens 1, 2, 0, 0
    s = 2.5 -> t 0, 5/6, 5/3, 5/2   -> tokens 1, 2, 0, 0
    s = 1.5 -> t 0, 0.5, 1, 1.5     -> tokens 1, 2, 2, 0  (t = s si / S, 0 .375 .75 1.125, would give 1, 1, 2, 0)"""
    calls = _patch_var(monkeypatch, var_model)
    labels = torch.tensor([0, 4, 2])
    out = sample_var(var_model, labels, cfg_scale=s, cfg_schedule="linear", top_k=1, top_p=0.0,
                     generator=torch.Generator().manual_seed(0))
    assert _per_scale(out.tokens) == [{expected_token(t)} for t in ts] == [{k} for k in tokens]
    assert calls == [(6, pn * pn) for pn in PN]  # conditional and null halves at every scale


@pytest.mark.parametrize(("s", "token"), [(0.5, 2), (2.5, 0)])
def test_var_constant_schedule(monkeypatch, var_model, s, token):
    """Constant schedule: t = s at every scale, including the first: s = 0.5 -> token 2, s = 2.5 -> token 0."""
    _patch_var(monkeypatch, var_model)
    out = sample_var(var_model, torch.tensor([1, 3]), cfg_scale=s, cfg_schedule="constant", top_k=1, top_p=0.0,
                     generator=torch.Generator().manual_seed(0))
    assert _per_scale(out.tokens) == [{token}] * 4


def test_var_without_guidance_never_computes_the_null_half(monkeypatch, var_model):
    """cfg_scale 0: every call gets B = 3 rows (not 2B), and the tokens are argmax L_C = 1 at every scale."""
    calls = _patch_var(monkeypatch, var_model)
    out = sample_var(var_model, torch.tensor([0, 1, 2]), cfg_scale=0.0, top_k=1, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert calls == [(3, pn * pn) for pn in PN]
    assert _per_scale(out.tokens) == [{1}] * 4
    torch.testing.assert_close(out.token_logp, torch.log_softmax(L_C, -1)[out.tokens])
