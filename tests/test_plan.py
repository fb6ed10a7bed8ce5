"""The memory plan (pipeline/memplan.py, `cca-pipe plan`): hand-computed numbers for a tiny model, the
saved-tensor counts against what autograd really saves, the formula against measured peak memory on the
CPU, and the acceptance case: llamagen-3B on 8 x 80 GB, where DDP does not fit and FSDP does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.families import LLAMAGEN, VAR
from pipeline.host import HUGE_PAGES_ENV, THP_SYSFS
from pipeline.memplan import CPU_FP32, build_meta, fits, inputs_from_model, parse_memory, plan
from pipeline.models.llamagen import GPT, GPTConfig
from stages.cli.main import main
from stages.cli.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(dim=8, n_layer=2, n_head=2, vocab_size=16, num_classes=3, block_size=4, multiple_of=8)


def test_tiny_gpt_hand_computed():
    """C = 8, F = find_multiple(int(2 * 4 * 8 / 3) = 21, 8) = 24, H = 2, V = 16, 2 blocks; 1 row = 2 sequences
    of 1 + 4 - 1 = 4 positions: 8 tokens.
    Parameters: class table 4 x 8 = 32, tokens 16 x 8 = 128, per block wqkv 192 + wo 64 + w1/w3/w2 3 x 192
    + 2 norms 16 = 848, final norm 8, output 128: P = 32 + 128 + 2 x 848 + 8 + 128 = 1992; root 296; Linear
    weights 2 x 832 + 128 = 1792; largest tensor 192. Buffer: the RoPE table (1 + 4) x 2 x 2 floats = 80 B.

    CPU, float32, one process: weights 4P + 80 = 8048, gradients 4P = 7968, AdamW 8P = 15936, no buffers.
    A block per token: float32 norm inputs 2C x 4 + 1/rms 2 x 4 + log-sum-exp H x 4 = 80; x * rsqrt 2C x 4
    = 64; compute (norm outputs 2C, qkv 3C, RoPE'd q/k 2C, SDPA out C, SwiGLU 4F) = 160 x 4 = 640: 784 B.
    Root per token: final norm 8 x 4 + 4 + 8 x 4 + 8 x 4, gather index 8, log-sum-exp 4 = 112 B.
    Kept: 2 x 784 x 8 + 112 x 8 = 13440. Logits 4 x 8 x 16 x 4 = 2048. Block backward (C + F) x 4 x 8 = 1024.
    Step: 2 x 192 x 4 = 1536. State 31952: phases 47440 (logits), 46416 (block), 33488 (step)."""
    model = GPT(TINY)
    inputs = inputs_from_model(model, 1, device="cpu")
    assert (inputs.params_total, inputs.params_root, inputs.params_largest_block, inputs.params_linear,
            inputs.params_largest, inputs.buffer_bytes) == (1992, 296, 848, 1792, 192, 80)
    p = plan(inputs)
    assert (p.weights, p.gradients, p.optimizer, p.buffers, p.weight_copies) == (8048, 7968, 15936, 0, 0)
    assert (p.activations, p.logits, p.block_backward, p.optimizer_step) == (13440, 2048, 1024, 1536)
    assert p.phases == {"logits backward": 47440, "block backward": 46416, "optimizer step": 33488}
    assert p.peak == p.total == 47440 and p.peak_phase == "logits backward"


def test_tiny_gpt_on_4_gpus_hand_computed():
    """The same model on 4 CUDA ranks.

    FSDP (bf16 gathered weights: compute and residual 2 bytes): shard ceil(1992 / 4) = 498 -> weights
    498 x 4 + 80 = 2072, gradients 1992, AdamW 3984; buffers: the root gathered in float32 296 x 4 + its
    gradients 296 x 4 + autocast's bf16 copy of its Linear weights (at most 296 x 2) + 2 blocks 2 x 848 x 2
    + a block's gradients and their float32 copy 848 x (2 + 4) = 11440. A block per
    token: 80 float32 + 2C x 2 = 32 + 160 x 2 = 320: 432; root 32 + 4 + 16 + 16 + 8 + 4 = 80; kept 2 x 432
    x 8 + 80 x 8 = 7552; block backward 32 x 2 x 8 = 512; step (foreach) 498 x 4 = 1992. State 19488: peak
    19488 + 7552 + 2048 = 29088 in the logits' backward.

    DDP (autocast over float32 weights: residual 4, compute 2): state 8048 + 7968 + 15936 + buckets 7968 =
    39920; bf16 weight copies 1792 x 2 = 3584; block 80 + 64 + 320 = 464 per token, root 32 + 4 + 32 + 16
    + 8 + 4 = 96: kept 2 x 464 x 8 + 96 x 8 = 8192; step 7968. Peak 39920 + 3584 + 8192 + 2048 = 53744.
    With checkpointing: kept 2 x 32 x 8 + 768 = 1280; block backward 464 x 8 + 512 = 4224 with that block's
    copies 848 x 2; phases 46832, 39920 + 1696 + 1280 + 4224 = 47120, step 47888: the step is the peak."""
    inputs = inputs_from_model(GPT(TINY), 1, world_size=4, device="cuda")
    fsdp = plan(inputs.variant(strategy="fsdp"))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer, fsdp.buffers, fsdp.weight_copies) == (2072, 1992, 3984, 11440, 0)
    assert (fsdp.activations, fsdp.block_backward, fsdp.optimizer_step, fsdp.peak) == (7552, 512, 1992, 29088)
    ddp = plan(inputs.variant(strategy="ddp"))
    assert (ddp.buffers, ddp.weight_copies, ddp.activations, ddp.optimizer_step, ddp.peak) == (7968, 3584, 8192, 7968, 53744)
    ckpt = plan(inputs.variant(strategy="ddp", activation_checkpointing=True))
    assert (ckpt.activations, ckpt.block_backward, ckpt.block_weight_copies) == (1280, 4224, 1696)
    assert ckpt.phases == {"logits backward": 46832, "block backward": 47120, "optimizer step": 47888}
    assert ckpt.peak_phase == "optimizer step"


def test_one_process_has_no_buckets_and_no_shards():
    inputs = inputs_from_model(GPT(TINY), 1, world_size=1, device="cpu")
    assert plan(inputs.variant(strategy="fsdp")) == plan(inputs.variant(strategy="ddp"))
    assert plan(inputs).buffers == 0
    assert plan(inputs.variant(world_size=2)).buffers == 4 * 1992  # DDP's buckets from 2 processes on
    assert plan(inputs.variant(world_size=2, ddp_gradient_as_bucket_view=True)).buffers == 0


def _saved_bytes(model, tokens, labels) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels, None, torch.arange(len(tokens)))  # dropout keys: any int64 per sequence
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_activation_counts_are_what_autograd_saves(family):
    """Everything kept for backward (plus the saved float32 logits) is what the saved-tensor hooks see."""
    torch.manual_seed(0)
    if family == "llamagen":
        description = {"gpt_model": "GPT-B", "block_size": 64, "dim": 64, "n_layer": 3, "n_head": 4, "vocab_size": 256,
                       "num_classes": 5}
        dropout = 0.1
    else:
        description = {"depth": 3, "width": 64, "heads": 4, "vocab_size": 256, "num_classes": 5, "patch_nums": (1, 2, 3, 4, 6)}
        dropout = 0.0
    model = build_meta(family, "cpu", **description)
    model.set_dropout(dropout)
    model.train()
    rows = 3
    inputs = inputs_from_model(model, rows, device="cpu", dropout=dropout)
    tokens = torch.randint(0, 256, (2 * rows, model.cfg.seq_len))
    labels = torch.randint(0, 5, (2 * rows,))
    expected = plan(inputs).activations + inputs.sequences * inputs.positions * inputs.vocab * 4
    assert _saved_bytes(model, tokens, labels) == pytest.approx(expected, rel=0.02)


def test_each_family_carries_its_block_activations():
    acts = LLAMAGEN.memory.block_activations(TINY, CPU_FP32, dropout=0.1)
    assert acts.block_per_token == 784 + 2 * 8 * 1  # two dropout masks of C: bool (KeyedDropout)
    with pytest.raises(ValueError, match="drop path only"):
        VAR.memory.block_activations(build_meta("var", depth=2).cfg, CPU_FP32, dropout=0.1)


# ---------------------------------------------------------------------------------- measured on the CPU


def test_plan_matches_measured_peak_on_cpu(monkeypatch):
    """Small GPT and VAR models (their state ~tens of MB, activations comparable) trained for 2 steps in a
    fresh process (bench/memory.py: one thread, glibc returning freed tensors): the plan's peak within 25% of
    the measured peak RSS, and so is the saving from activation checkpointing."""
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is not installed (`make test` runs python -m pytest from the root)
    from bench.memory import measure, planned, spec

    gpt = {"gpt_model": "GPT-B", "block_size": 256, "dim": 256, "n_layer": 4, "n_head": 4, "vocab_size": 1024}
    var = {"depth": 4, "width": 256, "heads": 4, "vocab_size": 1024, "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10)}
    specs = [spec("llamagen", gpt, 4, ckpt, dropout=0.1) for ckpt in (False, True)] + \
            [spec("var", var, 4, ckpt) for ckpt in (False, True)]
    measured = [m["peak_bytes"] for m in measure(specs, timeout=240)]
    plans = [planned(s)[1].peak for s in specs]
    report = [f"{s['family']} ckpt={s['activation_checkpointing']}: planned {p / 1e6:.0f} MB, measured {m / 1e6:.0f} MB"
              for s, p, m in zip(specs, plans, measured, strict=True)]
    for p, m in zip(plans, measured, strict=True):
        assert abs(m - p) <= 0.25 * p, report
    for i in (0, 2):  # without minus with checkpointing
        saving, planned_saving = measured[i] - measured[i + 1], plans[i] - plans[i + 1]
        assert planned_saving > 0 and abs(saving - planned_saving) <= 0.25 * planned_saving, report


# ---------------------------------------------------------------------------------- presets and the CLI


def test_every_preset_names_a_model_that_builds_on_meta():
    for name, recipe in PRESETS.items():
        description = dict(recipe["model"])
        model = build_meta(description.pop("family"), **description)
        assert all(p.is_meta for p in model.parameters()), name
    three_b_model = build_meta("llamagen", gpt_model="GPT-3B", block_size=576)
    three_b = plan(inputs_from_model(three_b_model, 2))
    assert 3.0e9 < three_b.weights / 4 < 3.2e9  # LlamaGen's GPT-3B: 3.1B parameters


def test_presets_carry_the_released_micro_batches_and_strategies():
    micro = {name: recipe["train"]["micro_batch_size"] for name, recipe in PRESETS.items()}
    assert {micro[f"var-d{d}"] for d in (16, 20, 24, 30)} == {8, 4, 2} and micro["var-d16"] == 8 and micro["var-d30"] == 2
    assert all(micro[n] == 2 for n in PRESETS if n.startswith("llamagen-"))
    fsdp = {n for n, recipe in PRESETS.items() if recipe["train"].get("strategy") == "fsdp"}
    assert fsdp == {"llamagen-XXL", "llamagen-3B", "llamagen-XXL-cca-cfg", "llamagen-3B-cca-cfg"}


def _plan(*args: str):
    result = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "plan", *args])
    return result


def _gb_row(output: str, name: str) -> list[float]:
    line = next(line for line in output.splitlines() if line.startswith(f"| {name} "))
    return [float(x) for x in line.strip("|").split("|")[1:]]


def test_llamagen_3b_on_8_gpus_ddp_does_not_fit_fsdp_does():
    result = _plan("--preset", "llamagen-3B", "--nproc-per-node", "8", "--gpu-memory", "80GB")
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    header = next(line for line in out.splitlines() if line.startswith("| GB per rank"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == ["DDP", "DDP + act. ckpt", "FSDP *", "FSDP + act. ckpt"]
    weights, total = _gb_row(out, "weights"), _gb_row(out, "total (peak)")
    assert weights[0] == pytest.approx(4 * 3.0967e9 / 1e9, abs=0.01)  # every DDP rank: all float32 weights
    assert weights[2] == pytest.approx(weights[0] / 8, abs=0.01)  # FSDP: 1/8 of them
    usable = 0.9 * 80
    assert total[0] > total[1] > usable > total[2] > total[3]  # DDP does not fit, even with checkpointing; FSDP does
    for row in ("weights", "gradients", "optimizer state", "buffers", "activations", "logits"):
        assert all(v >= 0 for v in _gb_row(out, row))
    assert re.search(r"^\| fits in 80 GB +\| +no \| +no \| +yes \| +yes \|$", out, re.M), out
    assert f"DDP: {total[0]:.1f} GB per rank: does not fit" in out and f"FSDP: {total[2]:.1f} GB per rank: fits in 80 GB" in out


def test_plan_options_and_settings():
    one = _plan("--preset", "var-d16", "--strategy", "fsdp", "--micro-batch-size", "4", "--device", "cpu")
    assert one.exit_code == 0, one.output + repr(one.exception)
    assert "micro-batch 4 rows = 8 sequences x 680 tokens" in one.output and "1 process(es)" in one.output
    header = next(line for line in one.output.splitlines() if line.startswith("| GB per rank"))
    assert [c.strip() for c in header.strip("|").split("|")[1:]] == ["FSDP", "FSDP + act. ckpt"]
    overridden = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "--nproc-per-node", "4",
                                           "--set", "train.micro_batch_size=1", "plan", "--preset", "llamagen-B"])
    assert overridden.exit_code == 0, overridden.output + repr(overridden.exception)
    assert "micro-batch 1 rows = 2 sequences x 576 tokens" in overridden.output and "4 process(es)" in overridden.output


def test_plan_bad_inputs():
    unknown = _plan("--preset", "llamagen-4B", "--nproc-per-node", "8")
    assert unknown.exit_code != 0 and "unknown preset 'llamagen-4B'; known: llamagen-B" in str(unknown.exception)
    bad = _plan("--preset", "llamagen-3B", "--gpu-memory", "eighty")
    assert bad.exit_code == 2 and "80GB, 80GiB or 24G" in bad.output
    none = _plan()
    assert none.exit_code != 0 and "needs a preset" in str(none.exception)


def test_memory_sizes():
    assert parse_memory("80GB") == 80 * 10**9 and parse_memory("80GiB") == 80 * 2**30 and parse_memory("24G") == 24 * 10**9
    assert parse_memory("81559MiB") == 81559 * 2**20 and parse_memory(" 1.5 TB ") == 1.5e12
    for text in ("", "80 XB", "-4GB", "0GB", "GB"):
        with pytest.raises(ValueError, match="80GB, 80GiB or 24G"):
            parse_memory(text)
    assert fits(72 * 10**9, 80 * 10**9) and not fits(72 * 10**9 + 1, 80 * 10**9)


# ------------------------------------------------------------------------------ tokenize and eval memory


def test_encoder_and_decoder_peaks_hand_computed():
    """A tiny VQ: ch 32, ch_mult (1, 2), one res block, z 8, codes of 4 from 16, at 8 x 8 pixels (64), 4 x 4 latents.
    Encoder, float32 elements per image: conv_in 32 x 64 = 2048; level 0 res (x + conv1 + norm2/silu + conv2)
    (32 + 3 x 32) x 64 = 8192; downsample 32 x (64 + 81 + 16) = 5152; level 1 res (32 + 3 x 64) x 16 = 3584, attn
    max(5 x 64 x 16 + 2 x 256, 7 x 64 x 16 + 256) = 7424; mid res 4 x 64 x 16 = 4096, attn 7424; end 4 x 64 x 16 +
    8 x 16 = 4224; nearest 2 x 4 x 16 + 3 x 16 x 16 = 896: the largest is level 0's res, + the image 3 x 64 = 8384.
    Decoder: conv_in (4 + 8 + 64) x 16 = 1216; mid res 4096, attn 7424; level 64 (2 res blocks, attn each at 4 x 4)
    res 4096, attn 7424; upsample 64 x (16 + 2 x 64) = 9216; level 32 at 8 x 8: res (64 + 3 x 32) x 64 = 10240, then
    (32 + 96) x 64 = 8192; end 3 x 32 x 64 = 6144: 10240."""
    from pipeline.memplan import ConvTokenizer, decoder_peak_elements, encoder_peak_elements, tokenize_plan

    t = ConvTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, codebook_size=16,
                      multi_scale=False, params=1000)
    assert encoder_peak_elements(t, 8) == 8384
    assert decoder_peak_elements(t, 8) == 10240
    p = tokenize_plan(t, 8, batch_size=3, views=2)  # 6 encodes per forward
    assert p.rows == {"tokenizer weights": 4000, "uint8 batch": 6 * 192, "encoder forward": 6 * 8384 * 4}
    assert p.peak == 4000 + 1152 + 201216 and p.peak_phase == "encoder forward"


def test_tokenize_and_eval_plans_match_measured_peaks_on_cpu(monkeypatch):
    """The planned bytes beyond the weights against the measured peak RSS of a fresh process (bench/memory.py's
    inference worker): tokenize's encoder forward, eval's decoding (a decoder-bound case) and sampling (KV caches of a
    GPT larger than the tokenizer), eval with the samples held dominating (1000 images of 128px: 49 MB as uint8,
    against 16 MB of decoder; as float32 they were 4x that), InceptionV3's forward; within 25% (seen: 0% to 4%;
    sampling runs sometimes add a constant ~15 MB that no tensor accounts for, the allocator's, hence a KV cache
    of ~70 MB here)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.memory import inference_spec, measure, planned_inference

    small = {"ch": 32, "codebook_size": 1024, "z_channels": 64}
    specs = [
        inference_spec("tokenize", small, 128, 4, views=2),
        inference_spec("eval", small, 128, 4, gpt={"dim": 64, "n_layer": 2, "n_head": 4}, samples=1),
        inference_spec("eval", {"ch": 8, "norm_groups": 8, "ch_mult": (1, 2), "codebook_size": 4096, "z_channels": 16}, 32, 8,
                       gpt={"dim": 256, "n_layer": 8, "n_head": 4}, samples=1),
        inference_spec("eval", {"ch": 8, "norm_groups": 8, "z_channels": 16, "codebook_size": 1024}, 128, 8,
                       gpt={"dim": 64, "n_layer": 2, "n_head": 4}, samples=100),
        inference_spec("scoring", small, 64, 4),
    ]
    phases = []
    for s, m in zip(specs, measure(specs, worker="--inference-worker"), strict=True):
        planned_bytes, phase = planned_inference(s)
        phases.append(phase)
        assert m["peak_bytes"] == pytest.approx(planned_bytes, rel=0.25), (s, phase)
    assert phases == ["encoder forward", "decoding", "sampling", "decoding", "scoring"]


def test_plan_stage_tokenize_says_what_fits():
    """The issue's case at 384px: batch 64 with flip = 128 VQ-16 encodes; per image the image 3 x 384^2 + level 0's
    res block (128 + 3 x 128) x 384^2 = 515 x 147456 floats: 128 x 4 x 75.9M = 38.88 GB."""
    args = ["--set", "tokenize.image_size=384", "--set", "tokenize.augment=flip", "--set", "tokenize.batch_size=64"]
    gpu = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", *args, "plan", "--preset", "llamagen-L",
                                    "--stage", "tokenize", "--gpu-memory", "80GB"])
    assert gpu.exit_code == 0, gpu.output + repr(gpu.exception)
    assert "64 images x 2 view(s) (flip) = 128 encodes per forward at 384px" in gpu.output
    assert _gb_row(gpu.output, "encoder forward") == [pytest.approx(128 * 4 * 515 * 384**2 / 1e9, abs=0.01)]
    assert "fits in 80 GB" in gpu.output
    cpu = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", *args, "plan", "--preset", "llamagen-L",
                                    "--stage", "tokenize", "--device", "cpu", "--gpu-memory", "24GB"])
    assert "does not fit in 24 GB" in cpu.output and "lower tokenize.batch_size from 64 to 32 to fit" in cpu.output


def test_plan_stage_eval_counts_each_part():
    """GPT-B at 384px, 1000 classes x 1 sample, eval.batch_size 8 with guidance (16 sequences): KV caches 12 layers x
    2 x 16 x 577 x 768 x 4 B = 0.68 GB; VQ-16's decoder at 384px: its last level's res block (128 + 3 x 128) x 384^2
    floats per image, x 8 images x 4 B = 2.42 GB; the samples on the host, uint8 as each batch is decoded:
    1000 x 3 x 384^2 B = 0.44 GB."""
    result = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "--set", "eval.batch_size=8", "--set",
                                       "eval.samples_per_class=1", "plan", "--preset", "llamagen-B", "--stage", "eval",
                                       "--gpu-memory", "80GB"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    assert _gb_row(out, "KV caches + logits") == [pytest.approx(12 * 2 * 16 * 577 * 768 * 4 / 1e9, abs=0.01)]
    assert _gb_row(out, "decoder forward") == [pytest.approx(8 * 512 * 384**2 * 4 / 1e9, abs=0.01)]
    assert _gb_row(out, "samples held (host)") == [pytest.approx(1000 * 3 * 384**2 / 1e9, abs=0.01)]
    assert "peak during scoring" in out and "of host memory" in out and "fits in 80 GB" in out  # InceptionV3 at 256 images


def test_out_of_memory_in_tokenize_and_eval_names_the_batch_size(monkeypatch):
    """tokenize's encode and eval's sampling/decoding and scoring turn an allocator error into OutOfMemory naming the
    setting to lower; other errors pass through."""
    from types import SimpleNamespace

    from pipeline import evaluation
    from pipeline.device import OutOfMemory
    from pipeline.tokenizers.encode import encode_views
    from stages import eval as eval_stage

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    views = torch.zeros(8, 2, 16, 16, 3, dtype=torch.uint8)
    with pytest.raises(OutOfMemory, match=r"8 images x 2 views = 16 per forward at 16px: lower tokenize\.batch_size, e\.g\. to 4"):
        encode_views(SimpleNamespace(encode=oom), views, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        encode_views(SimpleNamespace(encode=lambda x: (_ for _ in ()).throw(RuntimeError("a shape mismatch"))), views,
                     torch.device("cpu"))

    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    monkeypatch.setattr(eval_stage, "generate_images", lambda *a, **k: (_ for _ in ()).throw(cpu_oom))
    cfg = eval_stage.EvalConfig(batch_size=64)
    unit = evaluation.Unit("cfg_1", "base", 1.0, 0)
    world = SimpleNamespace(share=lambda rows: rows, device=torch.device("cpu"), size=1, rank=0)
    with pytest.raises(OutOfMemory, match=r"sampling or decoding cfg_1 .*eval\.batch_size = 64 \(2 x 64 sequences.*e\.g\. to 32"):
        models = eval_stage.EvalModels(SimpleNamespace(sample=None, step_unit="token"), None, {"base": None}, torch.zeros(4, dtype=torch.long))
        eval_stage.sample_unit(unit, models, cfg, Path("."), world)

    monkeypatch.setattr(evaluation, "extract_features", oom)
    monkeypatch.setattr(evaluation, "save_npz", lambda *a: None)
    extractor = SimpleNamespace(name="inception-v3-compat")
    with pytest.raises(OutOfMemory, match=r"scoring cfg_1: the feature extractor \(inception-v3-compat\) runs batches of 256"):
        evaluation.score_unit(unit, np.zeros((4, 8, 8, 3), np.uint8), 1.0, eval_stage.EvalConfig(grid_per_class=0),
                              torch.zeros(4, dtype=torch.long), extractor, {}, None, None, Path("."))


# ------------------------------------------------------------------ the settings planned for: those the stage runs


def _pipeline_folder(tmp_path: Path, pipeline: str, **changes) -> Path:
    import yaml

    params = yaml.safe_load((ROOT / "pipelines" / pipeline / "params.yaml").read_text(encoding="utf-8"))
    params.update(changes)
    folder = tmp_path / pipeline
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (folder / "dvc.yaml").write_text((ROOT / "pipelines" / pipeline / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def _settings_block(output: str, stage: str) -> dict:
    import yaml

    return yaml.safe_load(output.split(f"# the {stage} settings planned for", 1)[1].split("\n", 1)[1])


@pytest.mark.parametrize("pipeline", ["imagenet-llamagen", "imagenet-var"])
def test_plan_and_config_agree_on_every_setting_in_each_pipeline_folder(pipeline, tmp_path, monkeypatch):
    """In a pipeline folder whose image_size differs from its sections' (dvc.yaml passes `--set
    tokenize.image_size=${image_size}`), `plan --stage S` plans exactly what `config S` shows: every setting."""
    import yaml

    folder = _pipeline_folder(tmp_path, pipeline, image_size=256, preset="llamagen-B" if "llamagen" in pipeline else "var-d16")
    monkeypatch.chdir(folder)
    for stage in ("tokenize", "eval", "train"):
        config = CliRunner().invoke(main, ["config", stage])
        assert config.exit_code == 0, config.output + repr(config.exception)
        planned = CliRunner().invoke(main, ["plan", "--stage", stage, "--device", "cpu"])
        assert planned.exit_code == 0, planned.output + repr(planned.exception)
        assert _settings_block(planned.output, stage) == yaml.safe_load(config.output), (stage, planned.output)
        assert "as dvc.yaml's stage" in planned.output
    tokenize = CliRunner().invoke(main, ["plan", "--stage", "tokenize", "--device", "cpu"]).output
    assert "at 256px" in tokenize and "384px" not in tokenize


def test_llamagen_train_plan_runs_the_token_count_of_its_store(tmp_path, monkeypatch):
    """GPT-B at 256px trains on 16 x 16 = 256 tokens (positions 1 + 256 - 1), not the preset's 576: read from the
    token store the dvc.yaml train stage names once it exists, before that from what its tokenize stage will write."""
    import json

    from pipeline.tokenstore import TOKENS_FORMAT

    folder = _pipeline_folder(tmp_path, "imagenet-llamagen", image_size=256, preset="llamagen-B")
    monkeypatch.chdir(folder)
    before = CliRunner().invoke(main, ["plan", "--device", "cpu"])
    assert before.exit_code == 0, before.output + repr(before.exception)
    assert "x 256 tokens per forward" in before.output and "tokenize.image_size 256 / 16" in before.output
    (folder / "data/tokens.zarr").mkdir(parents=True)  # the store's attributes are all the plan reads
    (folder / "data/tokens.zarr/zarr.json").write_text(json.dumps({"attributes": {"format": TOKENS_FORMAT, "grid": 12}}))
    stored = CliRunner().invoke(main, ["plan", "--device", "cpu"])
    assert "x 144 tokens per forward" in stored.output and "the token store data/tokens.zarr" in stored.output
    typed = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "plan", "--preset", "llamagen-B", "--tokens",
                                      str(folder / "data/tokens.zarr")])
    assert "x 144 tokens per forward" in typed.output, typed.output
    var = _pipeline_folder(tmp_path, "imagenet-var", image_size=384)  # VAR-d16's last scale is 16: 256px
    monkeypatch.chdir(var)
    wrong = CliRunner().invoke(main, ["plan", "--device", "cpu"])
    assert wrong.exit_code != 0 and "last scale is 16 x 16 tokens, but the tokens are 24 x 24" in str(wrong.exception)


# --------------------------------------------------------------- the process around the tensors: baseline, workers


def test_tokenize_plan_counts_its_loader_workers(monkeypatch):
    """tokenize.num_workers 8 on a machine of 2 usable CPUs starts 2 workers (pipeline.host.loader_workers), each
    planned as its own 0.30 GB + 2 prefetched batches: 4 images x 10 views x 3 x 256^2 uint8 = 7,864,320 B each."""
    import pipeline.host
    from pipeline.host import loader_workers
    from pipeline.memplan import LOADER_WORKER_PRIVATE, ConvTokenizer, tokenize_plan

    monkeypatch.setattr(pipeline.host.os, "sched_getaffinity", lambda pid: {0, 1})
    assert (loader_workers(8), loader_workers(1), loader_workers(0)) == (2, 1, 0)
    t = ConvTokenizer(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, codebook_size=16,
                      multi_scale=False, params=1000)
    p = tokenize_plan(t, 256, batch_size=4, views=10, workers=2)
    assert p.workers == 2 and p.worker_bytes == LOADER_WORKER_PRIVATE + 2 * 7_864_320 and LOADER_WORKER_PRIVATE == 300_000_000
    result = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "--set", "tokenize.num_workers=8", "--set",
                                       "tokenize.image_size=256", "--set", "tokenize.batch_size=4", "--set",
                                       "tokenize.augment=tencrop", "plan", "--preset", "llamagen-B", "--stage", "tokenize",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    peak = float(re.search(r"^process peak: ([0-9.]+) GB", result.output, re.M).group(1))
    total = float(re.search(r"^with its loader workers: ([0-9.]+) GB \(\+ 2 x 0\.32 GB", result.output, re.M).group(1))
    assert total == pytest.approx(peak + 2 * 0.3157, abs=0.011)
    assert "2 loader worker process(es): tokenize.num_workers 8, at most one per CPU" in result.output


def _resident(code: str) -> dict[str, int]:
    """VmRSS and the private bytes of a fresh `python -c code` at its end."""
    import subprocess
    import sys

    probe = ("import re\nstatus = open('/proc/self/status').read()\nroll = open('/proc/self/smaps_rollup').read()\n"
             "print(int(re.search(r'VmRSS:\\s+(\\d+)', status).group(1)) * 1024, "
             "sum(int(x) * 1024 for x in re.findall(r'Private_\\w+:\\s+(\\d+)', roll)))")
    out = subprocess.run([sys.executable, "-c", f"{code}\n{probe}"], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rss, private = map(int, out.stdout.split())
    return {"rss": rss, "private": private}


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's /proc")
def test_process_terms_are_what_this_machines_processes_hold():
    """The plan's process term (stages.plan.process_resident, measured by the plan on its host) is a stage process's
    RSS before any model (`import stages.cli.main, stages.<stage>`, probed here) and what the plan prints; LOADER_WORKER_
    PRIVATE: what a spawned loader worker adds of its own (it imports torch, PIL and pipeline.images to unpickle
    the dataset): each within 10% of this machine's. (A constant 0.80 GB, right on the 2026-12-06 machine, was
    45% over on the 2026-12-07 one: the library pages mapped differ by host.)"""
    from pipeline.memplan import LOADER_WORKER_PRIVATE
    from stages.plan import GB, process_lines, process_resident

    for stage in ("tokenize", "train", "eval", "negatives"):
        probed = _resident(f"import stages.cli.main, stages.{stage}")["rss"]
        assert process_resident(stage) == pytest.approx(probed, rel=0.10), stage
        printed = float(re.search(r"\+ ([0-9.]+) GB the process holds", process_lines(stage, 0, "cpu")[0]).group(1))
        assert printed == pytest.approx(probed / GB, abs=0.01), stage
    worker = _resident("import torch, PIL.Image, pipeline.images")["private"]
    assert worker == pytest.approx(LOADER_WORKER_PRIVATE, rel=0.10)


# ----------------------------------------------------------------- the plan against the stages at the ImageNet shapes


@pytest.fixture(scope="module")
def stage_work(tmp_path_factory):
    return tmp_path_factory.mktemp("stage_memory")


@pytest.mark.parametrize("row", ["tokenize-384", "tokenize-256", "llamagen-train", "llamagen-eval", "var-train"])
def test_plan_matches_the_stages_at_the_imagenet_shapes(row, stage_work, monkeypatch):
    """Issue 30's table: each stage run as the pipeline folder's dvc.yaml runs it, with stand-ins at the real shapes
    (bench/stage_memory.py: VQ-16 + GPT-B at 256 tokens, tokenize ten-crop at 384 and 256px with batch 4, train
    micro-batch 2, eval batch 20, VAR's VQVAE + d16), its peak RSS within 10% of `cca-pipe plan --stage S --device
    cpu` run in the same folder."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.stage_memory import measure_rows

    (result,) = measure_rows([row], stage_work)
    assert abs(result["error"]) <= 0.10, {k: v for k, v in result.items()}


def test_only_the_planned_stages_fix_glibcs_mmap_threshold(monkeypatch):
    """pipeline.host.return_freed_memory (RSS = live tensors, as the plan counts) runs in the processes of the stages
    `cca-pipe plan` plans, and nowhere else: it costs CPU (+37% on pretrain-vq, docs/performance.md)."""
    import pipeline.host

    calls = []
    monkeypatch.setattr(pipeline.host, "return_freed_memory", lambda: calls.append(1) or True)
    for command, expected in (("train", 1), ("tokenize", 1), ("eval", 1), ("negatives", 1), ("pretrain-vq", 0), ("reflogp", 0), ("prepare", 0)):
        calls.clear()
        result = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", command, "--help"])
        assert result.exit_code == 0, result.output
        assert len(calls) == expected, command


HUGE_PAGES_PROBE = """
import sys
from stages.cli.main import run
sys.argv = ["cca-pipe", "--help"]
try:
    run()
except SystemExit:
    pass
import torch
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
rollup = open("/proc/self/smaps_rollup").read().splitlines()
print(next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:")) // 1024)
"""


def _thp_mode() -> str | None:
    try:
        text = Path(THP_SYSFS).read_text(encoding="utf-8")
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="this kernel gives no transparent huge pages")
@pytest.mark.parametrize("user_setting", [None, "0"])
def test_cca_pipe_puts_large_tensors_on_huge_pages_unless_told_not_to(user_setting: str | None):
    """A process started as `cca-pipe` asks PyTorch for huge pages before torch is imported (pipeline/host.py
    use_huge_pages): a 64 MiB tensor is then backed by 2 MiB pages; THP_MEM_ALLOC_ENABLE=0 set by the user is kept."""
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV} | {"OMP_NUM_THREADS": "1"}
    if user_setting is not None:
        if _thp_mode() == "always":
            pytest.skip('THP "always": the kernel backs every large mapping with huge pages, asked or not')
        env[HUGE_PAGES_ENV] = user_setting
    proc = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    huge_mib = int(proc.stdout.split()[-1])
    if user_setting == "0":
        assert huge_mib < 8, huge_mib  # "madvise": huge pages only where asked for
    else:
        assert huge_mib >= 48, huge_mib


def test_no_huge_pages_are_asked_for_where_the_kernel_has_none(monkeypatch, tmp_path: Path):
    """Without THP in the kernel (no sysfs entry) PyTorch's madvise would fail and warn: use_huge_pages leaves the
    environment as it is; with it, it sets the variable unless the user did."""
    import pipeline.host

    monkeypatch.delenv(HUGE_PAGES_ENV, raising=False)
    monkeypatch.setattr(pipeline.host, "THP_SYSFS", str(tmp_path / "no_thp"))
    assert pipeline.host.use_huge_pages() is False and HUGE_PAGES_ENV not in os.environ
    (tmp_path / "no_thp").write_text("always [madvise] never\n", encoding="utf-8")
    assert pipeline.host.use_huge_pages() is True and os.environ[HUGE_PAGES_ENV] == "1"
    monkeypatch.setenv(HUGE_PAGES_ENV, "0")
    assert pipeline.host.use_huge_pages() is False and os.environ[HUGE_PAGES_ENV] == "0"


@pytest.mark.parametrize("guided", [False, True])
def test_the_negatives_plan_is_evals_sampling_and_decoding_plus_tokenizes_encoder(guided: bool):
    """The negatives stage samples as eval does (one model, no feature extractor), decodes as eval does and
    encodes as tokenize does (one view): its parts are those plans' parts at the same batch, its weights eval's
    for one model less InceptionV3's, and each moment's peak the weights plus that moment's part."""
    from pipeline.memplan import FP32, INCEPTION_V3_ELEMENTS, conv_tokenizer, eval_plan, negatives_plan, tokenize_plan
    from stages.plan import tokenizer_for

    model = build_meta("var", depth=16)
    t = conv_tokenizer(tokenizer_for("var"))
    ours = negatives_plan(model, t, 256, 64, guided, True, 512, "cuda")
    ev = eval_plan([model], t, 256, 64, guided, 1000, "cuda")
    tok = tokenize_plan(t, 256, 64, 1)
    assert ours.rows["weights"] == ev.rows["weights"] - INCEPTION_V3_ELEMENTS * FP32
    assert ours.rows["KV caches + logits"] == ev.rows["KV caches + logits"]
    assert ours.rows["decoder forward"] == ev.rows["decoder forward"]
    assert ours.rows["encoder forward"] == tok.rows["encoder forward"]
    assert ours.rows["images of a chunk (host)"] == 512 * 3 * 256 * 256 == ours.host
    assert ours.phases == {"sampling": ours.rows["weights"] + ours.rows["KV caches + logits"],
                           "decoding": ours.rows["weights"] + ours.rows["decoder forward"],
                           "re-encoding": ours.rows["weights"] + ours.rows["encoder forward"]}
    assert "encoder forward" not in negatives_plan(model, t, 256, 64, guided, False, 512, "cuda").rows


def test_plan_stage_negatives_plans_a_ddo_preset_and_says_what_fits():
    result = CliRunner().invoke(main, ["--params", "/nonexistent/params.yaml", "plan", "--stage", "negatives", "--preset",
                                       "var-d16-ddo", "--gpu-memory", "1GB"])
    assert result.exit_code == 0, result.output
    assert "memory plan per process: negatives, preset var-d16-ddo" in result.output
    assert "does not fit in 1 GB" in result.output and "negatives.batch_size" in result.output
