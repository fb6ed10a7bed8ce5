"""VAR (next-scale prediction): upstream layouts, equations, sampler vs teacher forcing, cache exactness.

Reduced models (2 blocks, width 64, scales 1,2,3,4 on a 4x4 latent) with random weights; the full-size
configs are checked on the meta device against docs/upstream.md, "VAR" (keys, shapes, parameter counts).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.alignment import loss_for_batch, make_batch, policy_logps
from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.families import VAR as VAR_FAMILY
from pipeline.families import ModelSource, family_of, load_model
from pipeline.loaders import load_msvq, load_quantizer, load_var
from pipeline.losses import cca_loss
from pipeline.models.var import VAR, VARConfig, VARModel, var_config
from pipeline.refcache import draw_pairs, reference_logps
from pipeline.sampling import filter_logits_var, sample_var
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel, scale_bounds
from stages.train import TrainConfig

CPU = torch.device("cpu")
PN = (1, 2, 3, 4)
TINY_VAE = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8, patch_nums=PN)
TINY_VAR = dict(depth=2, width=64, heads=2, num_classes=5, vocab_size=64, cvae=8, patch_nums=PN)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Random values in every parameter (gammas, biases, temperatures too), so no term is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig(**TINY_VAE)).eval()
    _randomize(vae.quantize, 1, std=0.5)
    var = VAR(VARConfig(**TINY_VAR)).eval()
    _randomize(var, 2)
    return vae, VARModel(var, vae.quantize).eval()


# ------------------------------------------------------------------------------- layouts, configs


def test_full_size_configs_match_the_release():
    """Keys, shapes and parameter counts of var_d16..d30 and vae_ch160v4096z32 (docs/upstream.md, "VAR")."""
    counts = {16: 310.28, 20: 600.92, 24: 1033.40, 30: 2010.02}
    with torch.device("meta"):
        for depth, millions in counts.items():
            model = VAR(var_config(depth))
            assert round(model.num_params() / 1e6, 2) == millions
        sd, C = VAR(var_config(16)).state_dict(), 1024
        vae = MSVQModel(MSVQConfig())
    shapes = {"pos_start": (1, 1, C), "pos_1LC": (1, 680, C), "lvl_1L": (1, 680), "attn_bias_for_masking": (1, 1, 680, 680),
              "word_embed.weight": (C, 32), "class_emb.weight": (1001, C), "lvl_embed.weight": (10, C),
              "blocks.15.attn.mat_qkv.weight": (3 * C, C), "blocks.0.attn.scale_mul_1H11": (1, 16, 1, 1),
              "blocks.0.attn.zero_k_bias": (C,), "blocks.3.ada_lin.1.weight": (6 * C, C),
              "head_nm.ada_lin.1.weight": (2 * C, C), "head.weight": (4096, C)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    assert per_block == {"attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.mat_qkv.weight",
                         "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight",
                         "ffn.fc2.bias", "ada_lin.1.weight", "ada_lin.1.bias"}
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == 108.95
    vsd = vae.state_dict()
    assert tuple(vsd["quantize.embedding.weight"].shape) == (4096, 32)
    assert tuple(vsd["quantize.ema_vocab_hit_SV"].shape) == (10, 4096)
    assert {k for k in vsd if "qresi_ls" in k} == {f"quantize.quant_resi.qresi_ls.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    assert {k.split(".")[0] for k in vsd} == {"encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"}
    assert [b for b in scale_bounds(MSVQConfig().patch_nums)] == [(0, 1), (1, 5), (5, 14), (14, 30), (30, 55), (55, 91),
                                                                  (91, 155), (155, 255), (255, 424), (424, 680)]


def test_phi_choice_per_scale_matches_the_reference():
    with torch.device("meta"):
        quant = MSVQModel(MSVQConfig()).quantize
    chosen = [list(quant.quant_resi.qresi_ls).index(quant.phi(si)) for si in range(10)]
    assert chosen == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_upstream_layouts_load_strictly_with_identical_outputs(world, tmp_path):
    vae, model = world
    sd = model.var.state_dict()
    torch.save(sd, tmp_path / "var_d2.pth")  # released weights: a plain state dict
    torch.save({"trainer": {"var_wo_ddp": sd, "vae_local": vae.state_dict()}, "args": {"depth": 2}}, tmp_path / "ar-ckpt-last.pth")
    torch.save({"trainer": {f"module.{k}": v for k, v in sd.items()}, "epoch": 0}, tmp_path / "cca-trainer.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    tokens = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    labels = torch.tensor([1, 4])
    expected = model(tokens, labels)
    for name in ("var_d2.pth", "ar-ckpt-last.pth", "cca-trainer.pth"):
        assert family_of(tmp_path / name, "--ref") is VAR_FAMILY
        loaded = VARModel(load_var(tmp_path / name, depth=2, patch_nums=PN), load_quantizer(tmp_path / "vae.pth", MSVQConfig(**TINY_VAE)))
        torch.testing.assert_close(loaded.eval()(tokens, labels), expected, rtol=0, atol=0)
    for name in ("vae.pth", "ar-ckpt-last.pth"):  # the release's VQVAE file, and the copy in VAR's trainer state
        full = load_msvq(tmp_path / name, MSVQConfig(**TINY_VAE))
        assert torch.equal(full.encode(torch.zeros(1, 3, 64, 64)), vae.encode(torch.zeros(1, 3, 64, 64)))
    assert family_of(tmp_path / "vae.pth", "--vq", models=False) is VAR_FAMILY


def test_wrong_checkpoints_are_clear_errors(world, tmp_path):
    vae, model = world
    sd = model.var.state_dict()
    torch.save(sd, tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match=r"VAR-d2 .* depth 16 was requested"):
        load_var(tmp_path / "var.pth", depth=16, patch_nums=PN)
    with pytest.raises(CheckpointError, match="patch_nums"):
        load_var(tmp_path / "var.pth")  # the release's 10 scales do not fit a 30-position model
    torch.save({k: v for k, v in sd.items() if "scale_mul_1H11" not in k}, tmp_path / "no_l2.pth")
    with pytest.raises(CheckpointError, match="scale_mul_1H11"):
        load_var(tmp_path / "no_l2.pth", patch_nums=PN)
    torch.save({k: v for k, v in sd.items() if k != "head.bias"}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys.*head.bias"):
        load_var(tmp_path / "missing.pth", patch_nums=PN)
    with pytest.raises(ValueError, match="VQVAE checkpoint"):
        load_model(tmp_path / "var.pth", "--ref")  # VAR needs its quantiser


# ------------------------------------------------------------------------------- equations


def _reference_logits(sd: dict, cfg: VARConfig, labels: torch.Tensor, teacher_input: torch.Tensor) -> torch.Tensor:
    """var.md's equations written out directly from the state dict, position by position for attention."""
    C, H = cfg.width, cfg.heads
    hd = C // H
    level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)])
    cond = sd["class_emb.weight"][labels]
    x = torch.cat([cond[:, None] + sd["pos_start"][0], teacher_input @ sd["word_embed.weight"].T + sd["word_embed.bias"]], 1)
    x = x + sd["lvl_embed.weight"][level] + sd["pos_1LC"][0]
    L = x.shape[1]

    def ln(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + cfg.norm_eps)

    for n in range(cfg.depth):
        p = lambda k: sd[f"blocks.{n}.{k}"]  # noqa: E731
        mods = F.silu(cond) @ p("ada_lin.1.weight").T + p("ada_lin.1.bias")
        g1, g2, s1, s2, b1, b2 = mods.chunk(6, dim=-1)
        h = ln(x) * (1 + s1[:, None]) + b1[:, None]
        q, k, v = (h @ p("attn.mat_qkv.weight").T).split(C, -1)
        q, v = q + p("attn.q_bias"), v + p("attn.v_bias")
        out = torch.zeros_like(x)
        for head in range(H):
            sl = slice(head * hd, (head + 1) * hd)
            qh, kh = F.normalize(q[..., sl], dim=-1), F.normalize(k[..., sl], dim=-1)
            qh = qh * torch.exp(torch.clamp(p("attn.scale_mul_1H11")[0, head, 0, 0], max=math.log(100)))
            for i in range(L):
                visible = level <= level[i]
                w = torch.softmax((qh[:, i : i + 1] @ kh[:, visible].transpose(1, 2)), -1)
                out[:, i, sl] = (w @ v[:, visible, sl])[:, 0]
        x = x + (out @ p("attn.proj.weight").T + p("attn.proj.bias")) * g1[:, None]
        h = ln(x) * (1 + s2[:, None]) + b2[:, None]
        ffn = F.gelu(h @ p("ffn.fc1.weight").T + p("ffn.fc1.bias"), approximate="tanh") @ p("ffn.fc2.weight").T + p("ffn.fc2.bias")
        x = x + ffn * g2[:, None]
    scale, shift = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).chunk(2, -1)
    x = ln(x) * (1 + scale[:, None]) + shift[:, None]
    return x @ sd["head.weight"].T + sd["head.bias"]


def _reference_teacher_input(vae: MSVQModel, tokens: torch.Tensor) -> torch.Tensor:
    """var.md: for each next scale, embed that scale's codes, bicubic-upsample, phi, add into f_hat,
    area-downsample the running f_hat to the next scale's size."""
    q, pns = vae.quantize, vae.cfg.patch_nums
    B, full = tokens.shape[0], pns[-1]
    f_hat = torch.zeros(B, vae.cfg.z_channels, full, full)
    out, start = [], 0
    for si, pn in enumerate(pns[:-1]):
        emb = q.embedding.weight[tokens[:, start : start + pn * pn]].transpose(1, 2).reshape(B, -1, pn, pn)
        start += pn * pn
        conv = q.quant_resi.qresi_ls[{4: [0, 1, 2, 3], 10: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]}[len(pns)][si]]  # nearest tick
        up = F.interpolate(emb, size=(full, full), mode="bicubic")
        f_hat = f_hat + 0.5 * up + 0.5 * F.conv2d(up, conv.weight, conv.bias, padding=1)
        out.append(F.interpolate(f_hat, size=(pns[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2))
    return torch.cat(out, 1)


def test_logits_follow_the_reference_equations(world):
    vae, model = world
    tokens = vae.encode(torch.rand(3, 3, 64, 64) * 2 - 1)
    labels = torch.tensor([0, 3, 5])  # 5 = the null class
    teacher_input = model.quantizer.teacher_forcing_input(tokens)
    torch.testing.assert_close(teacher_input, _reference_teacher_input(vae, tokens), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours = model.var(labels, teacher_input)
        ref = _reference_logits(model.var.state_dict(), model.cfg, labels, teacher_input)
    assert ours.shape == (3, 30, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.1  # random weights give non-trivial logits: the comparison is not vacuous


def test_quantiser_round_trip_and_nearest_codes(world):
    """Encoding picks, at every scale, the nearest codebook vector of the remaining residual."""
    vae, _ = world
    q = vae.quantize
    f = torch.randn(2, 8, 4, 4)
    codes = q.features_to_codes(f)
    rest = f.clone()
    for si, (a, b) in enumerate(scale_bounds(PN)):
        pn = PN[si]
        z = rest if si == len(PN) - 1 else F.interpolate(rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, 8)
        expected = torch.cdist(z, q.embedding.weight).argmin(1).view(2, -1)
        assert torch.equal(codes[:, a:b], expected)
        emb = q.embedding(codes[:, a:b]).transpose(1, 2).reshape(2, 8, pn, pn)
        rest = rest - q.phi(si)(emb if si == len(PN) - 1 else F.interpolate(emb, size=(4, 4), mode="bicubic"))
    torch.testing.assert_close(q.codes_to_features(codes), f - rest, rtol=1e-5, atol=1e-5)


def test_likelihood_is_deterministic_in_train_mode_without_label_dropout(world):
    vae, model = world
    tokens = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    labels = torch.tensor([1, 2])
    model.train()
    try:
        a, b = model(tokens, labels), model(tokens, labels)
    finally:
        model.eval()
    assert torch.equal(a, b)  # no label dropout, drop-path off at rate 0
    assert not model.quantizer.training
    null = model(tokens, torch.full((2,), model.cfg.null_class))
    assert (null - a).abs().max() > 1e-3  # the label matters


# ------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("cfg_scale,schedule,top_k,top_p", [(0.0, "linear", 0, 0.0), (1.5, "linear", 0, 0.0),
                                                           (2.0, "constant", 10, 0.9)])
def test_sampler_logps_equal_teacher_forcing_per_scale(world, cfg_scale, schedule, top_k, top_p):
    _, model = world
    labels = torch.tensor([0, 1, 2, 4])
    out = sample_var(model, labels, cfg_scale=cfg_scale, cfg_schedule=schedule, top_k=top_k, top_p=top_p,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forced = model(out.tokens, labels)
    for a, b in scale_bounds(PN):  # per scale, float32: KV-cached scale-by-scale == one masked forward
        torch.testing.assert_close(out.token_logp[:, a:b], forced[:, a:b], rtol=0, atol=1e-5)
    assert out.tokens.shape == (4, 30) and out.tokens.max() < 64


def test_guidance_changes_samples_and_upstream_null_half_does_not(world):
    _, model = world
    labels = torch.arange(5).repeat(4)
    free = sample_var(model, labels, generator=torch.Generator().manual_seed(1))
    upstream = sample_var(model, labels, generator=torch.Generator().manual_seed(1), upstream_null_half=True)
    assert torch.equal(free.tokens, upstream.tokens)  # the null half is pure waste at cfg 0
    guided = sample_var(model, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(free.tokens, guided.tokens)
    # linear schedule: t = 0 at the first scale, so its 1x1 token is drawn from the unguided logits
    assert torch.equal(free.tokens[:, 0], guided.tokens[:, 0])
    constant = sample_var(model, labels, cfg_scale=3.0, cfg_schedule="constant", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(constant.tokens, guided.tokens)
    via_family = VAR_FAMILY.sample(model, labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(via_family.tokens, free.tokens)


def test_on_step_sees_every_scale_and_changes_no_sample(world):
    """eval's progress within a batch (issue 30 point 3): one call per scale drawn, samples bitwise unchanged."""
    _, model = world
    labels = torch.arange(5)
    for scale in (0.0, 2.0):
        steps = []
        seen = VAR_FAMILY.sample(model, labels, cfg_scale=scale, generator=torch.Generator().manual_seed(4),
                                 on_step=lambda done, total: steps.append((done, total)))
        plain = sample_var(model, labels, cfg_scale=scale, generator=torch.Generator().manual_seed(4))
        assert steps == [(k, len(PN)) for k in range(1, len(PN) + 1)]
        assert torch.equal(seen.tokens, plain.tokens) and torch.equal(seen.token_logp, plain.token_logp)


def test_top_k_top_p_as_upstream_by_hand():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = lambda t: torch.isfinite(t)[0].tolist()  # noqa: E731
    assert kept(filter_logits_var(logits.clone(), top_k=2, top_p=0.0)) == [False, True, False, True, False]
    # ascending: 0.05, 0.1, 0.15, 0.3, 0.4; cumsum 0.05, 0.15, 0.30, 0.60, 1.0; removed where <= 1 - 0.75 = 0.25
    assert kept(filter_logits_var(logits.clone(), top_k=0, top_p=0.75)) == [False, True, False, True, True]
    assert kept(filter_logits_var(logits.clone(), top_k=0, top_p=0.0)) == [True] * 5
    assert kept(filter_logits_var(logits.clone(), top_k=0, top_p=0.01)) == [False, True, False, False, False]


# ------------------------------------------------------------------------------- cache exactness


def test_fresh_var_policy_reproduces_cached_reference_and_online_loss(world, tmp_path):
    vae, model = world
    rng = np.random.default_rng(0)
    images = torch.rand(12, 3, 64, 64) * 2 - 1
    tokens = vae.encode(images).numpy().astype(np.uint16).reshape(6, 2, 30)  # 6 images x 2 views
    labels = rng.integers(0, 5, size=6).astype(np.int32)
    torch.save(model.var.state_dict(), tmp_path / "var.pth")
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    (tmp_path / "vae.json").write_text(json.dumps(TINY_VAE))
    source = ModelSource(vae=tmp_path / "vae.pth", vae_model=str(tmp_path / "vae.json"))
    load = lambda: load_model(tmp_path / "var.pth", "--ref", source, layout={"patch_nums": PN})[1].eval()  # noqa: E731
    pairs = draw_pairs(labels, 2, 5, seed=3, views="all")
    cache = {**pairs, **reference_logps(load(), tokens, pairs, batch_size=5, device=CPU)}
    policy = load()
    rows = np.arange(len(cache["row"]))
    uncond = rows % 3 == 0
    batch = make_batch(rows, tokens, cache, uncond, policy.cfg.null_class)
    with torch.no_grad():
        pos, neg = policy_logps(policy, batch, CPU)
    assert (pos.double() - batch.ref_logp_pos).abs().max() < 1e-3
    assert (neg.double() - batch.ref_logp_neg).abs().max() < 1e-3
    with torch.no_grad():  # move the policy: cached-reference loss == online-reference loss
        for p in policy.var.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cached = loss_for_batch(policy, batch, "cca", beta=0.02, lam=50.0, device=CPU)
    reference = load()
    with torch.no_grad():
        ref_pos = reference(batch.tokens, batch.labels_pos).sum(-1)
        ref_neg = reference(batch.tokens, batch.labels_neg).sum(-1)
    pos, neg = policy_logps(policy, batch, CPU)
    online = cca_loss(pos, neg, ref_pos, ref_neg, beta=0.02, lam=50.0, positive_twice=batch.positive_twice)
    assert cached.ratio_pos.abs().max() > 0.1
    torch.testing.assert_close(cached.per_row, online.per_row, rtol=1e-5, atol=1e-5)


def test_saved_policy_is_an_upstream_state_dict(world, tmp_path):
    _, model = world
    VAR_FAMILY.save(tmp_path / "policy.pt", model, steps=3)
    state = torch.load(tmp_path / "policy.pt", map_location="cpu", weights_only=True)
    assert state["family"] == "var" and set(state["model"]) == set(VAR(VARConfig(**TINY_VAR)).state_dict())
    VAR(VARConfig(**TINY_VAR)).load_state_dict(state["model"], strict=True)
    assert load_var(tmp_path / "policy.pt").cfg == model.cfg
    save_checkpoint(tmp_path / "other.pt", {}, {}, kind="classifier")
    with pytest.raises(CheckpointError, match="classifier"):
        family_of(tmp_path / "other.pt", "--ref")


def test_var_policy_trains_with_a_frozen_quantiser(world):
    """AlignmentRun trains VAR unchanged: step 0 is the ratio-zero loss (1 + lambda) ln 2 / lambda, only the
    transformer moves, and the positives end above the negatives."""
    from pipeline.alignment import AlignmentRun

    vae, model = world
    tokens = vae.encode(torch.rand(16, 3, 64, 64) * 2 - 1).numpy().astype(np.uint16).reshape(8, 2, 30)
    labels = (np.arange(8) % 5).astype(np.int32)
    pairs = draw_pairs(labels, 2, 5, seed=0, views="all")
    cache = {**pairs, **reference_logps(model, tokens, pairs, batch_size=16, device=CPU)}
    policy = VARModel(VAR(model.cfg), model.quantizer)
    policy.var.load_state_dict(model.var.state_dict())
    quantizer_before = {k: v.clone() for k, v in policy.quantizer.state_dict().items()}
    cfg = TrainConfig(beta=0.5, lam=10.0, lr=1e-3, epochs=6.0, batch_size=8, micro_batch_size=4, uncond_ratio=0.0)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, VAR_FAMILY.param_groups)
    logged = [run.step(*batch) for batch in run.batches()]
    assert math.isclose(logged[0]["loss"], 11 * math.log(2) / 10, rel_tol=1e-4)
    assert logged[-1]["rewards/margin"] > logged[0]["rewards/margin"] + 1.0
    assert all(torch.equal(quantizer_before[k], v) for k, v in policy.quantizer.state_dict().items())
    assert not torch.equal(policy.var.head.weight, model.var.head.weight)


def test_tokens_of_the_other_family_are_refused(world, tmp_path):
    _, model = world
    llamagen_store = {"codebook_size": 64, "num_classes": 5, "seq_len": 30}  # no family attribute: LlamaGen tokens
    with pytest.raises(ValueError, match="llamagen tokens but .* is a var model"):
        VAR_FAMILY.check_fits(model, llamagen_store, tmp_path / "t.zarr", tmp_path / "var.pth")
    var_store = {"family": "var", "patch_nums": [1, 2, 4], "codebook_size": 64, "num_classes": 5, "seq_len": 21}
    with pytest.raises(ValueError, match="sequences of 21 tokens"):
        VAR_FAMILY.check_fits(model, var_store, tmp_path / "t.zarr", tmp_path / "var.pth")
    with pytest.raises(ValueError, match="scales"):
        VAR_FAMILY.check_fits(model, {**var_store, "seq_len": 30}, tmp_path / "t.zarr", tmp_path / "var.pth")
    VAR_FAMILY.check_fits(model, {**var_store, "patch_nums": list(PN), "seq_len": 30}, tmp_path / "t.zarr", tmp_path / "var.pth")


def test_randcrop_views_are_vars_train_transform_seeded_per_image():
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from pipeline.images import image_views, view_names

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    views = image_views(image, 64, "randcrop:3", row=7)
    assert views.shape == (3, 64, 64, 3) and view_names("randcrop:3") == ["randcrop0", "randcrop1", "randcrop2"]
    resized = np.asarray(TF.resize(image, 72, interpolation=InterpolationMode.LANCZOS))  # round(1.125 * 64)
    assert resized.shape[:2] == (72, 96)
    for view in views:  # each view is a 64 x 64 window of the resized image
        hits = [(t, s) for t in range(72 - 63) for s in range(96 - 63) if np.array_equal(resized[t : t + 64, s : s + 64], view)]
        assert hits
    assert np.array_equal(views, image_views(image, 64, "randcrop:3", row=7))  # seeded: same on every run
    assert not np.array_equal(views, image_views(image, 64, "randcrop:3", row=8))  # differs between images
    with pytest.raises(ValueError, match="randcrop:<number of views>"):
        view_names("randcrop:x")


def test_var_training_resumes_to_identical_weights(world, tmp_path):
    """The resume point of a VAR policy (transformer + frozen quantiser) restarts training exactly."""
    from pipeline.alignment import AlignmentRun
    from pipeline.distributed import World
    from pipeline.resume import TrainState

    vae, model = world
    tokens = vae.encode(torch.rand(8, 3, 64, 64) * 2 - 1).numpy().astype(np.uint16).reshape(8, 1, 30)
    labels = (np.arange(8) % 5).astype(np.int32)
    pairs = draw_pairs(labels, 1, 5, seed=0, views="all")
    cache = {**pairs, **reference_logps(model, tokens, pairs, batch_size=8, device=CPU)}
    cfg = TrainConfig(beta=0.5, lam=10.0, lr=1e-3, epochs=2.0, batch_size=4, micro_batch_size=2, uncond_ratio=0.25)

    def fresh() -> VARModel:
        policy = VARModel(VAR(model.cfg), model.quantizer)
        policy.var.load_state_dict(model.var.state_dict())
        return policy

    def train(policy, train_state: TrainState | None = None, stop_at: int | None = None):
        run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, VAR_FAMILY.param_groups)
        run.resume(train_state)
        for step, step_tokens in run.batches():
            run.step(step, step_tokens)
            if step + 1 == stop_at:
                run.checkpoint(stop_at, train_state)
                break
        return run.finish()

    full = train(fresh())
    train(fresh(), TrainState(tmp_path, "run", World()), stop_at=2)  # leaves the point of step 2
    assert json.loads((tmp_path / "resume.json").read_text())["step"] == 2
    resumed = train(fresh(), TrainState(tmp_path, "run", World()))  # steps 3 and 4 only
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_new_lambda_embedding_follows_its_seed_not_the_global_generator(world):
    """Train adds the embedding before anything seeds torch: drawn from torch's global generator, two runs
    (or two FSDP ranks) of one recipe started from different first layers. Both families, one mechanism."""
    from pipeline.models.llamagen import GPT, GPTConfig

    _, model = world

    def fresh_embedding(family: str, global_seed: int, seed: int) -> dict:
        if family == "var":
            policy = VARModel(VAR(model.cfg), model.quantizer)
        else:
            policy = GPT(GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16))
        torch.manual_seed(global_seed)
        policy.enable_lambda_conditioning(seed=seed)
        embed = policy.var.lambda_embed if family == "var" else policy.lambda_embed
        return {k: v.clone() for k, v in embed.state_dict().items()}

    for family in ("var", "llamagen"):
        a, b, other = fresh_embedding(family, 1, 0), fresh_embedding(family, 2, 0), fresh_embedding(family, 1, 1)
        assert all(torch.equal(a[k], b[k]) for k in a), family
        assert not torch.equal(a["mlp.0.weight"], other["mlp.0.weight"]), family
        assert not a["mlp.2.weight"].any() and not a["mlp.2.bias"].any()  # still adds nothing at step 0
