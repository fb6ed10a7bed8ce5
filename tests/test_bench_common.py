"""The benchmarks' pure helpers (bench/common.py): device resolution, results names, FLOP counts, MFU and
the data-parallel arithmetic. Nothing here times anything."""

from __future__ import annotations

import pytest
import torch

from bench.common import (
    MID,
    compute_dtype,
    decode_flops,
    forward_flops,
    mfu,
    parse_args,
    per_step_seconds,
    resolve_device,
    results_name,
    scaling_efficiency,
    train_step_flops,
    var_sample_flops,
)
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import var_config


def test_devices_resolve_and_missing_cuda_is_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("cuda") == torch.bfloat16
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA"):
                resolve_device(name)
    with pytest.raises(ValueError):
        resolve_device("meta")


def test_parse_args_gives_a_torch_device_and_keeps_added_options(monkeypatch):
    monkeypatch.delenv("BENCH_DEVICE", raising=False)
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    args = parse_args("doc", lambda p: p.add_argument("--rows", type=int, default=3), ["--device", "cpu", "--rows", "5"])
    assert args.device == torch.device("cpu") and args.rows == 5 and not args.quick
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert parse_args(argv=["--device", "cpu"]).quick


def test_results_names_keep_the_cpu_names():
    assert results_name("train_step") == "train_step"
    assert results_name("scale", "cpu", quick=True) == "scale_quick"
    assert results_name("ddp", torch.device("cuda", 1)) == "ddp_cuda"
    assert results_name("ddp", "cuda", quick=True) == "ddp_cuda_quick"


def test_forward_flops_match_the_models_linear_layers():
    """2 x the weights of every matmul (not the embeddings) per position, plus causal attention."""
    cfg = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=100, num_classes=3, block_size=16, multiple_of=16)
    model = GPT(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert forward_flops(cfg, 16) == 2 * 16 * linear + cfg.n_layer * 2 * 16 * 16 * cfg.dim
    assert train_step_flops(cfg, 4) == 3 * 8 * forward_flops(cfg, 16)
    assert train_step_flops(cfg, 4, online_reference=True) == 4 * 8 * forward_flops(cfg, 16)


def test_decode_flops_sum_the_per_token_costs():
    cfg = MID
    per_token = [forward_flops(cfg, t) - forward_flops(cfg, t - 1) for t in range(1, 257)]
    cached = decode_flops(cfg)  # step t attends to t keys: one more than the half square per step
    assert cached == pytest.approx(sum(per_token) + cfg.n_layer * 2 * cfg.dim * 256, rel=1e-12)
    assert cached == pytest.approx(forward_flops(cfg, 256), rel=0.01)
    assert decode_flops(cfg, use_cache=False) == sum(forward_flops(cfg, t) for t in range(1, 257))


def test_var_flops_count_every_linear_layer_once_per_scale():
    """Without attention, the count is 2 x (per-position weights x 680 + per-row AdaLN weights x 10 scales)
    minus word_embed on the first scale."""
    cfg = var_config(2, width=64, heads=2, num_classes=3)
    C, hidden, S, L = cfg.width, round(cfg.width * cfg.mlp_ratio), len(cfg.patch_nums), cfg.seq_len
    per_position = cfg.depth * (4 * C * C + 2 * C * hidden) + C * cfg.vocab_size + cfg.cvae * C
    per_row = cfg.depth * 6 * C * C + 2 * C * C
    attention, seen = 0, 0
    for pn in cfg.patch_nums:
        seen += pn * pn
        attention += cfg.depth * 4 * pn * pn * seen * C
    expected = 2 * (per_position * L + per_row * S - cfg.cvae * C * cfg.patch_nums[0] ** 2) + attention
    assert var_sample_flops(cfg) == expected


def test_mfu_and_scaling_arithmetic():
    assert mfu(50e9, "cpu", peak=200e9) == 0.25
    assert per_step_seconds((2, 3.0), (10, 7.0)) == 0.5
    with pytest.raises(ValueError):
        per_step_seconds((10, 7.0), (10, 8.0))
    assert scaling_efficiency(30.0, 2, 20.0) == 0.75
