"""A per-rank GPU memory plan for CCA training: bytes of weights, gradients, optimizer state, working
buffers, activations and logits at the peak of a training step, for DDP or FSDP2, with or without
activation checkpointing (`cca-pipe plan`).

The model state is AdamW's in float32: weights 4P, gradients 4P, two moments 8P bytes for P trainable
parameters (`train.strategy: ddp` keeps all of it on every rank; `fsdp` shards it over the N ranks and
adds the unsharded working set). Activations are counted tensor by tensor from our forward code
(what autograd saves for backward: each family object's `memory`, pipeline/models/memory.py for the shipped
ones), per token and per sequence; one forward holds 2 x micro_batch_size sequences (positives and negatives, concatenated
by pipeline.alignment.policy_logps). The formula is checked against measured peaks on CPU
(tests/test_plan.py, bench/memory.py).

The peak of a step is the largest of three moments, which never coexist:
  - the backward of the logits: everything kept for backward (with autocast's bf16 weight copies) + the
    logits' 4 float32 copies;
  - the backward of a block: everything kept + (with checkpointing) the block's recomputed activations
    + the gradients in flight inside it;
  - the optimizer step: the state + AdamW's temporaries (activations and weight copies are freed by then).
The state (weights, gradients, optimizer state, buffers) is present at all three: gradients are assumed
alive through forward and backward, as they are from the second micro-batch of a gradient accumulation on.

Not counted: the CUDA context and the caching allocator's fragmentation (the plan's user keeps a margin,
see `fits`), tensors of a few bytes per token or per sequence where not listed, train's data loader workers.
The process around the tensors (PROCESS_RESIDENT) is added by `cca-pipe plan`'s process line (stages/plan.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .families import family_named, family_of_model
from .models.memory import BOOL, FP32, FamilyMemory, Precision

STRATEGIES = ("ddp", "fsdp")
DEVICES = ("cuda", "cpu")

CPU_FP32 = Precision(param=FP32, compute=FP32, residual=FP32, autocast_weight_copies=False, dropout_mask=BOOL)
# DDP on CUDA: float32 parameters under bf16 autocast (pipeline.device.autocast)
CUDA_AUTOCAST = Precision(param=FP32, compute=2, residual=FP32, autocast_weight_copies=True, dropout_mask=BOOL)
# FSDP2 on CUDA: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the unsharded parameters are bf16
CUDA_FSDP_BF16 = Precision(param=2, compute=2, residual=2, autocast_weight_copies=False, dropout_mask=BOOL)


def precision_for(device: str, strategy: str) -> Precision:
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if device == "cpu":
        return CPU_FP32
    return CUDA_FSDP_BF16 if strategy == "fsdp" else CUDA_AUTOCAST


def family_memory(family: str) -> FamilyMemory:
    """What the plan needs of the registered family `family` (its object's `memory`), or one clear error."""
    memory = family_named(family).memory
    if memory is None:
        raise ValueError(f"model family {family!r} gives cca-pipe plan no memory counts: set its Family.memory "
                         "(a pipeline.models.memory.FamilyMemory; docs/families.md)")
    return memory


def build_meta(family: str, device: str | torch.device = "meta", **description) -> nn.Module:
    """A model of `family` from its description (a preset's `model` keys: {"gpt_model": "GPT-3B",
    "block_size": 576}, {"depth": 30}), by default on the meta device: shapes without storage, so a 3B model
    costs nothing."""
    try:
        with torch.device(device):
            return family_memory(family).build(**description)
    except TypeError as e:
        raise ValueError(f"{family} model description {description}: {e}") from e


@dataclass(frozen=True)
class PlanInputs:
    """What the plan is computed from: the model's parameter counts and shape, the batch, the strategy."""

    family: str
    memory: FamilyMemory = field(repr=False)  # the family's activation counts
    model_cfg: object = field(repr=False)  # the family's config (GPTConfig, VARConfig): its activation counts read it
    params_total: int  # every parameter, frozen ones too (VAR's quantiser)
    params_trainable: int
    params_root: int  # trainable parameters outside model.blocks(): embeddings, head, final norm
    params_largest_block: int
    params_largest: int  # the largest trainable tensor (per-tensor temporaries of backward and AdamW on CPU)
    params_linear: int  # trainable nn.Linear weights (autocast's bf16 copies)
    buffer_bytes: int  # non-parameter buffers (RoPE table, VAR's mask), on every rank
    sequences: int  # per forward: 2 x micro_batch_size (positive and negative labels)
    width: int
    ffn_hidden: int
    heads: int
    layers: int
    vocab: int
    positions: int
    world_size: int = 1
    strategy: str = "ddp"
    activation_checkpointing: bool = False
    device: str = "cuda"  # cuda: bf16 compute; cpu: float32 throughout
    dropout: float = 0.0  # LlamaGen's resid/ffn/token dropout in train mode: its masks are kept
    ddp_gradient_as_bucket_view: bool = False  # DDP's default: its buckets are a second copy of the gradients

    def __post_init__(self) -> None:
        precision_for(self.device, self.strategy)  # names a bad value
        if self.world_size < 1 or self.sequences < 1:
            raise ValueError(f"world_size {self.world_size} and sequences {self.sequences} must be at least 1")

    def variant(self, **changes) -> PlanInputs:
        return replace(self, **changes)


def inputs_from_model(model: nn.Module, micro_batch_size: int, **settings) -> PlanInputs:
    """PlanInputs for a model of either family (real or on the meta device): parameters counted from
    `model.blocks()` and the rest, the shape from its config; `settings` are PlanInputs' own fields
    (world_size, strategy, activation_checkpointing, device, dropout)."""
    memory = family_memory(model.family)
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks = [sum(p.numel() for p in block.parameters() if p.requires_grad) for block in model.blocks()]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad)
    shape = memory.shape(model.cfg)
    return PlanInputs(
        family=model.family, memory=memory, model_cfg=model.cfg,
        params_total=sum(p.numel() for p in model.parameters()), params_trainable=sum(p.numel() for p in trainable),
        params_root=sum(p.numel() for p in trainable) - sum(blocks), params_largest_block=max(blocks),
        params_largest=max(p.numel() for p in trainable), params_linear=linear,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        sequences=2 * micro_batch_size, width=shape.width, ffn_hidden=shape.ffn_hidden, heads=shape.heads,
        layers=shape.layers, vocab=shape.vocab, positions=shape.positions, **settings)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank. Each row is that part's size at its own largest; `peak` adds up the parts alive
    together at each moment of the step (see the module docstring), `peak_phase` names the largest."""

    weights: int  # float32 master weights (sharded under FSDP), frozen weights, model buffers
    gradients: int
    optimizer: int  # AdamW's two float32 moments
    buffers: int  # DDP's gradient buckets; FSDP's unsharded working set
    weight_copies: int  # autocast's bf16 copies of the float32 Linear weights (DDP on CUDA), forward and backward only
    block_weight_copies: int  # those alive in a block's backward: all of them, or with checkpointing that block's
    activations: int  # kept for backward through the whole backward (every block's, or with checkpointing their inputs)
    block_backward: int  # one block's backward: its recomputed activations (checkpointing) + gradients in flight
    logits: int  # float32 logits (saved by log-sum-exp) and the three temporaries of its backward
    optimizer_step: int  # AdamW's temporaries during step()

    @property
    def state(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def phases(self) -> dict[str, int]:
        return {"logits backward": self.state + self.weight_copies + self.activations + self.logits,
                "block backward": self.state + self.block_weight_copies + self.activations + self.block_backward,
                "optimizer step": self.state + self.optimizer_step}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def total(self) -> int:  # the plan's total: the peak
        return self.peak

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    def rows(self) -> dict[str, int]:
        """The table's rows (the parts, then the peak)."""
        return {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer,
                "buffers": self.buffers, "weight copies": self.weight_copies, "activations": self.activations,
                "block backward": self.block_backward, "logits": self.logits, "optimizer step": self.optimizer_step,
                "total (peak)": self.peak}


def plan(inputs: PlanInputs) -> MemoryPlan:
    """The per-rank breakdown, in bytes. One process trains the plain module whatever the strategy
    (pipeline.parallel.distribute): no DDP buckets, no sharding."""
    n, P = inputs.world_size, inputs.params_trainable
    strategy = inputs.strategy if n > 1 else "ddp"
    precision = precision_for(inputs.device, strategy)
    acts = inputs.memory.block_activations(inputs.model_cfg, precision, dropout=inputs.dropout)
    frozen = inputs.params_total - P  # VAR's quantiser: in the root's FSDP group, never trained
    tokens = inputs.sequences * inputs.positions
    block_saved = acts.block_per_token * tokens + acts.block_per_sequence * inputs.sequences + acts.block_constant
    root = acts.root_per_token * tokens
    if inputs.activation_checkpointing:
        # checkpoint keeps each block's input; in backward one block at a time is recomputed, after the
        # logits' backward has finished (so the two never coexist)
        kept = inputs.layers * acts.block_input_per_token * tokens + root
        block_backward = block_saved + acts.block_backward_per_token * tokens
    else:
        kept = inputs.layers * block_saved + root
        block_backward = acts.block_backward_per_token * tokens
    # token_logp: logsumexp saves the float32 logits; its backward computes grad * exp(logits - lse) with both
    # intermediates alive (3 more copies); the gather's scattered gradient comes after they are freed
    logits = 4 * tokens * inputs.vocab * FP32
    if strategy == "ddp":
        shard, frozen_kept = P, frozen
        # the allreduce buckets: a float32 copy of every gradient (bucket_cap_mb only sizes the pieces); none
        # at one process (no DDP) or with gradient_as_bucket_view (the gradients are views of them)
        buffers = P * FP32 if n > 1 and not inputs.ddp_gradient_as_bucket_view else 0
    else:
        shard, frozen_kept = math.ceil(P / n), math.ceil(frozen / n)
        block = inputs.params_largest_block
        # the root's group keeps float32 weights (pipeline.parallel.distribute: embeddings and VAR's head run
        # with autocast off); on CUDA autocast adds a bf16 copy of its Linear weights (at most the root)
        root_copies = inputs.params_root * precision.compute if precision.mixed else 0
        buffers = (
            (inputs.params_root + frozen) * FP32  # the root's group, unsharded through forward and backward
            + inputs.params_root * FP32 + root_copies  # its gradients (the head's from the logits' backward on)
            + 2 * block * precision.param  # the block being computed and the next one, prefetched
            + block * (precision.param + FP32)  # a block's unsharded gradients and their float32 reduce-scatter input
        )
    copies = block_copies = 0
    if precision.autocast_weight_copies:
        # autocast casts every float32 Linear weight to bf16 once and caches it for the whole forward (so all
        # are alive while the logits are computed, checkpointing or not); the matmuls save them for backward,
        # except under checkpointing, where a block's backward recomputes only its own
        copies = inputs.params_linear * precision.compute
        block_copies = inputs.params_largest_block * precision.compute if inputs.activation_checkpointing else copies
    if inputs.device == "cuda":
        step = shard * FP32  # foreach AdamW: sqrt(exp_avg_sq) of every parameter at once
    else:  # one tensor at a time: sqrt(exp_avg_sq), then its division by the bias correction
        step = 2 * math.ceil(inputs.params_largest / (n if strategy == "fsdp" else 1)) * FP32
    return MemoryPlan(weights=(shard + frozen_kept) * FP32 + inputs.buffer_bytes, gradients=shard * FP32, optimizer=2 * shard * FP32,
                      buffers=int(buffers), weight_copies=int(copies), block_weight_copies=int(block_copies),
                      activations=int(kept), block_backward=int(block_backward), logits=int(logits), optimizer_step=int(step))


# ------------------------------------------------------------------------------------------ memory sizes

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """"80GB", "80GiB", "24G", "81559MiB" -> bytes (GB and G: 10^9, GiB: 2^30)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"GPU memory {text!r}: write a size such as 80GB, 80GiB or 24G (GB and G are 10^9 bytes, GiB 2^30)")
    return int(float(match.group(1)) * _UNITS[unit])


RESERVE = 0.10  # of the GPU's memory, kept for the CUDA context, NCCL and the caching allocator's fragmentation

# ------------------------------------------------------------------------------ the process around the tensors
#
# What a stage's process holds besides its tensors, measured (docs/performance.md, "Memory plan against the stages
# at the ImageNet shapes"; Linux x86-64, Python 3.11, torch 2.14 CPU; tests/test_plan.py checks both against this
# machine's processes):
#   PROCESS_RESIDENT: the resident memory of `cca-pipe <stage>` before any model is built: the interpreter, torch,
#     numpy, zarr, pyarrow, PIL and our modules, code and data pages (VmRSS after `import stages.cli.main,
#     stages.<stage>`). `cca-pipe plan` measures it on its host (stages/plan.py process_resident: 0.80 GB on the
#     2026-12-06 machine, 0.55-0.58 GB on the 2026-12-07 one); this figure is the fallback where it cannot. On the
#     CPU it is part of the peak RSS; on CUDA it is host memory beside the GPU's.
#   LOADER_WORKER_PRIVATE: a spawned DataLoader worker's own memory once it has imported what unpickling its
#     dataset imports (torch, PIL, pipeline.images): 0.30 GB private (smaps_rollup Private_Dirty; its other
#     0.45 GB of RSS are library pages shared with the main process, counted once, in PROCESS_RESIDENT).
PROCESS_RESIDENT = 800_000_000
LOADER_WORKER_PRIVATE = 300_000_000
PREFETCH_FACTOR = 2  # torch's DataLoader default: batches each worker holds ready


def loader_worker_bytes(batch_bytes: int) -> int:
    """One DataLoader worker: its private memory and the batches it has made and not yet handed over."""
    return LOADER_WORKER_PRIVATE + PREFETCH_FACTOR * batch_bytes


def fits(peak: int, gpu_memory: int, reserve: float = RESERVE) -> bool:
    return peak <= (1 - reserve) * gpu_memory


# ------------------------------------------------------------------------------ tokenize and eval memory
#
# Inference holds no gradients, so a forward's peak is the largest set of tensors alive at one moment:
# counted below module by module from the code (pipeline/tokenizers/vq.py and msvq.py share the latent-
# diffusion layout; torch-fidelity's InceptionV3), in float32 elements per image, with the block's input
# counted as alive (its caller still holds it until the block returns). Checked against measured peaks on
# the CPU (tests/test_plan.py, bench/memory.py).

# torch-fidelity's FeatureExtractorInceptionV3: 23,850,960 parameters + 34,526 BatchNorm buffers (counted
# from the module torch-fidelity 0.3 builds)
INCEPTION_V3_ELEMENTS = 23_885_486
INCEPTION_BATCH = 256  # pipeline.metrics.extract_features' batch (torch-fidelity's loop)


@dataclass(frozen=True)
class ConvTokenizer:
    """A VQ tokenizer's encoder/decoder shape: LlamaGen's VQConfig and VAR's MSVQConfig both give it."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int  # the encoder's output channels
    embed_dim: int  # the codebook vectors' width (after quant_conv)
    codebook_size: int
    multi_scale: bool  # VAR's residual quantiser (one distance matrix per scale) or LlamaGen's single nearest
    params: int

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def conv_tokenizer(tokenizer: nn.Module) -> ConvTokenizer:
    """The shape of a VQModel or MSVQModel (real or on the meta device)."""
    cfg = tokenizer.cfg
    multi_scale = hasattr(cfg, "patch_nums")
    return ConvTokenizer(cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.z_channels,
                         cfg.z_channels if multi_scale else cfg.codebook_embed_dim, cfg.codebook_size, multi_scale,
                         sum(p.numel() for p in tokenizer.parameters()) + sum(b.numel() for b in tokenizer.buffers()))


def _resnet(c_in: int, c_out: int, pixels: int) -> int:
    # input x (held by the caller), conv1's output, norm2's and silu's outputs, then conv2's output beside silu's
    # (the norm's is freed when silu returns): x + 3 outputs; the shortcut and the sum come after conv1's is freed
    return (c_in + 3 * c_out) * pixels


def _attention(c: int, pixels: int) -> int:
    # x, its norm, q, k, v, then the (HW x HW) scores and their scaled copy; later x, q, k, v, weights, output,
    # proj_out's output and the sum
    return max(5 * c * pixels + 2 * pixels * pixels, 7 * c * pixels + pixels * pixels)


def encoder_peak_elements(t: ConvTokenizer, image_size: int) -> int:
    """Float32 elements per image alive at the encoder's largest moment (VQModel.encode, MSVQModel's
    encode): the image itself (encode_views' x, alive throughout) + the largest block's live tensors."""
    side, image, c_in = image_size, 3 * image_size**2, t.ch
    phases = [t.ch * side**2]  # conv_in's output
    for level, mult in enumerate(t.ch_mult):
        c, last = t.ch * mult, level == len(t.ch_mult) - 1
        for _ in range(t.num_res_blocks):
            phases.append(_resnet(c_in, c, side**2))
            c_in = c
            if last:
                phases.append(_attention(c, side**2))
        if not last:  # the input, its asymmetric zero pad and the strided conv's output
            phases.append(c * (side**2 + (side + 1) ** 2 + (side // 2) ** 2))
            side //= 2
    pixels = side**2
    phases += [_resnet(c_in, c_in, pixels), _attention(c_in, pixels),
               4 * c_in * pixels + t.z_channels * pixels]  # mid's input and output, norm_out, silu; conv_out's
    if t.multi_scale:  # one scale at a time: the residual, its (pn^2 x V) distances, the last scale's largest
        phases.append(2 * t.embed_dim * pixels + pixels * t.codebook_size)
    else:  # nearest: |z|^2 + |e|^2, (2z) @ e^T and their difference, each (hw x K)
        phases.append(2 * t.embed_dim * pixels + 3 * pixels * t.codebook_size)
    return image + max(phases)


def decoder_peak_elements(t: ConvTokenizer, image_size: int) -> int:
    """Float32 elements per image alive at the decoder's largest moment (decode_codes): the mirror of the
    encoder with num_res_blocks + 1 blocks per level; an upsample holds its input, the 2x nearest copy and
    the conv's output; the end holds the last block's output, its norm and silu, then the image."""
    side = image_size // t.downsample
    c_in = t.ch * t.ch_mult[-1]
    phases = [(t.embed_dim + t.z_channels + c_in) * side**2, _resnet(c_in, c_in, side**2), _attention(c_in, side**2)]
    for level, mult in enumerate(reversed(t.ch_mult)):
        c = t.ch * mult
        for _ in range(t.num_res_blocks + 1):
            phases.append(_resnet(c_in, c, side**2))
            c_in = c
            if level == 0:
                phases.append(_attention(c, side**2))
        if level != len(t.ch_mult) - 1:
            phases.append(c * (side**2 + 2 * (2 * side) ** 2))
            side *= 2
    phases.append(3 * c_in * side**2)
    return max(phases)


def inception_peak_elements() -> int:
    """torch-fidelity's InceptionV3 per image: its largest moment is Conv2d_2b_3x3 (BasicConv2d: conv, then
    BatchNorm's output beside the conv's, relu in place) with its input alive: 32 + 2 x 64 channels at 147 x
    147 (the image resized to 299 x 299 before it, 3 channels, is smaller and freed by then)."""
    return (32 + 2 * 64) * 147 * 147


@dataclass(frozen=True)
class StagePlan:
    """Bytes of a stage's parts (rows) and of its peak on the device (and on the host, where it differs)."""

    stage: str
    rows: dict[str, int]  # the parts, each at its own largest
    phases: dict[str, int]  # the peak of each moment of the stage on the device: weights + that moment's tensors
    host: int = 0  # on CUDA, the host memory the stage holds beside the device's (0 on the CPU: counted in phases)
    workers: int = 0  # loader worker processes beside it
    worker_bytes: int = 0  # each one's (loader_worker_bytes)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def tokenize_plan(t: ConvTokenizer, image_size: int, batch_size: int, views: int, workers: int = 0) -> StagePlan:
    """tokenize: the frozen tokenizer (float32, whole) + one encoder forward of batch_size x views images
    (pipeline/tokenizers/encode.py encode_views), + the uint8 batch the loader hands over; beside the process, `workers`
    loader processes (pipeline.host.loader_workers), each with its prefetched batches."""
    images = batch_size * views
    weights = t.params * FP32
    encoder = encoder_peak_elements(t, image_size) * images * FP32
    batch = images * 3 * image_size**2  # uint8
    return StagePlan("tokenize", {"tokenizer weights": weights, "uint8 batch": batch, "encoder forward": encoder},
                     {"encoder forward": weights + batch + encoder}, workers=workers, worker_bytes=loader_worker_bytes(batch))


def kv_cache_bytes(model: nn.Module, sequences: int, device: str) -> int:
    """Sampling's KV caches for `sequences` (2 x eval.batch_size with guidance): LlamaGen's static
    (B, H, cls + block_size, hd) k and v per layer in the weights' dtype (float32); VAR's per-scale
    concatenation in the compute dtype (bf16 under CUDA autocast), one layer's old cache alive beside the new."""
    cache = family_of_model(model).sampling_cache(model.cfg)
    dtype_bytes = FP32 if cache.weights_dtype else precision_for(device, "ddp").compute
    return cache.layers * 2 * sequences * cache.positions * cache.width * dtype_bytes


def sampling_step_bytes(model: nn.Module, batch: int, sequences: int, device: str) -> int:
    """One sampling step beside the caches: the logits of every sequence (float32 after the head), the
    guided mix, its temperature-scaled copy, the filtered logits and the probabilities (4 x batch); and one
    block's transient of the step's tokens (input, qkv, output, FFN hidden and activation). LlamaGen steps
    one token, VAR a whole scale (its last is the largest)."""
    shape = family_memory(model.family).shape(model.cfg)
    tokens = family_of_model(model).step_tokens(model.cfg)
    logits = (sequences + 4 * batch) * tokens * shape.vocab * FP32
    block = sequences * tokens * (5 * shape.width + 2 * shape.ffn_hidden) * precision_for(device, "ddp").compute
    return logits + block


def eval_plan(models: list[nn.Module], t: ConvTokenizer, image_size: int, batch_size: int, guided: bool,
              samples: int, device: str, extractor_elements: int = INCEPTION_V3_ELEMENTS) -> StagePlan:
    """eval: the models sampled (base and policy), the tokenizer and the feature extractor, all whole on
    every rank (stages/eval.py), and three moments that never coexist: sampling a batch (KV caches +
    logits), decoding it (the VQ decoder at eval.batch_size, counted in float32: LlamaGen's decode precision,
    an upper bound under VAR's fp16 autocast, where the group norms still run in float32; pipeline.families) and scoring (InceptionV3 at its batch of 256).
    `samples`: one unit's images on this rank; generate_images turns each decoded batch to uint8 as it comes
    and keeps the set as one uint8 (N, S, S, 3) array on the host, and precision/recall holds two (10000 x N)
    float32 distance blocks."""
    model = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))
    sequences = 2 * batch_size if guided else batch_size
    weights = (sum(sum(p.numel() for p in m.parameters()) for m in models) + t.params + extractor_elements) * FP32
    sampling = kv_cache_bytes(model, sequences, device) + sampling_step_bytes(model, batch_size, sequences, device)
    decode = decoder_peak_elements(t, image_size) * batch_size * FP32
    scoring = inception_peak_elements() * min(INCEPTION_BATCH, samples) * FP32
    held = samples * 3 * image_size**2  # uint8
    distances = 2 * min(10_000, samples) * samples * FP32
    rows = {"weights": weights, "KV caches + logits": sampling, "decoder forward": decode, "feature extractor": scoring,
            "samples held (host)": held, "precision/recall (host)": distances}
    on_device = {"sampling": weights + sampling, "decoding": weights + decode, "scoring": weights + scoring}
    if device == "cpu":  # the host is the device: the uint8 samples drawn so far (at most the set) are alive too
        return StagePlan("eval", rows, {"sampling": weights + sampling + held, "decoding": weights + decode + held,
                                        "scoring": weights + scoring, "precision/recall": weights + distances})
    return StagePlan("eval", rows, on_device, host=max(held, distances))


def negatives_plan(model: nn.Module, t: ConvTokenizer, image_size: int, batch_size: int, guided: bool, reencode: bool,
                   rows: int, device: str) -> StagePlan:
    """negatives (stages/negatives.py): the reference and the tokenizer, whole on every rank, and three moments
    that never coexist, each at negatives.batch_size: sampling a batch (KV caches + logits, as eval's), decoding
    it (the decoder forward, float32 as eval_plan counts it) and, with `reencode`, encoding the uint8 images again
    (tokenize's encoder forward, one view). `rows`: a chunk's fakes on this rank, whose decoded uint8 images
    are held until they are encoded (pipeline.fakes.draw_fakes)."""
    weights = (sum(p.numel() for p in model.parameters()) + t.params) * FP32
    sequences = 2 * batch_size if guided else batch_size
    sampling = kv_cache_bytes(model, sequences, device) + sampling_step_bytes(model, batch_size, sequences, device)
    decode = decoder_peak_elements(t, image_size) * batch_size * FP32
    encode = encoder_peak_elements(t, image_size) * batch_size * FP32 if reencode else 0
    held = rows * 3 * image_size**2  # uint8
    parts = {"weights": weights, "KV caches + logits": sampling, "decoder forward": decode,
             **({"encoder forward": encode} if reencode else {}), "images of a chunk (host)": held}
    phases = {"sampling": weights + sampling, "decoding": weights + decode,
              **({"re-encoding": weights + encode} if reencode else {})}
    if device == "cpu":
        return StagePlan("negatives", parts, {k: v + held for k, v in phases.items()})
    return StagePlan("negatives", parts, phases, host=held)
