"""`cca-pipe plan`: will a preset's training fit the GPUs? Per rank, the bytes of weights, gradients,
optimizer state, buffers, activations and logits at the peak of a training step, for DDP and FSDP, with
and without activation checkpointing (pipeline/memplan.py), against a GPU's memory.

    cca-pipe plan --preset llamagen-3B --nproc-per-node 8 --gpu-memory 80GB

The model is the one the preset is meant for (its `model` entry in stages/cli/presets.py), built on the meta
device (shapes only: a 3B model costs nothing to count); the micro-batch, dropout and the preset's
strategy come from the train settings, resolved as `cca-pipe train` resolves them (defaults <- params.yaml
<- preset <- --set), and `--micro-batch-size` overrides train.micro_batch_size.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.families import family_named
from pipeline.host import loader_workers, usable_cpus
from pipeline.memplan import (
    LOADER_WORKER_PRIVATE,
    PREFETCH_FACTOR,
    PROCESS_RESIDENT,
    RESERVE,
    MemoryPlan,
    PlanInputs,
    StagePlan,
    build_meta,
    family_memory,
    fits,
    inputs_from_model,
    plan,
)

from .cli import presets
from .train import TrainConfig

COLUMNS = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True))
GB = 10**9

ROW_NOTES = {
    "weights": "float32 master weights (FSDP: this rank's shard), frozen weights, buffers",
    "gradients": "float32, accumulated over the micro-batches (FSDP: sharded)",
    "optimizer state": "AdamW's two float32 moments (FSDP: sharded)",
    "buffers": "DDP: allreduce buckets (a copy of the gradients); FSDP: gathered root and 2 blocks, a block's gradients",
    "weight copies": "DDP on CUDA: autocast's bf16 copy of every Linear weight, forward to backward",
    "activations": "kept for backward: every block's saved tensors, or with checkpointing each block's input",
    "block backward": "one block's backward: its recomputed activations (checkpointing) and gradients in flight",
    "logits": "float32 logits and the 3 temporaries of their log-sum-exp's backward",
    "optimizer step": "AdamW's temporaries (CUDA foreach: sqrt of every second moment at once)",
}


@dataclass
class PlanReport:
    preset: str
    model: dict  # the preset's model description
    inputs: PlanInputs
    plans: dict[tuple[str, bool], MemoryPlan]  # (strategy, activation checkpointing) -> plan
    configured: tuple[str, bool]  # the train settings' own (strategy, activation_checkpointing)
    gpu_memory: int | None
    tokens_from: str = "the preset's model"  # where the token count comes from

    def fits(self, column: tuple[str, bool]) -> bool | None:
        return None if self.gpu_memory is None else fits(self.plans[column].peak, self.gpu_memory)


def model_description(name: str) -> dict:
    """The preset's model: {"family": ..., and what pipeline.memplan.build_meta needs}."""
    description = presets.preset(name).get("model", {})
    if "family" not in description or len(description) < 2:
        raise ConfigError(f"preset {name!r} names no model to plan for (stages/cli/presets.py: its `model` entry)")
    return description


def make_report(name: str, cfg: TrainConfig, world_size: int, gpu_memory: int | None = None,
                strategies: tuple[str, ...] = ("ddp", "fsdp"), device: str = "cuda",
                grid: tuple[int, str] | None = None) -> PlanReport:
    """`grid`: (tokens per side of the images trained on, where that comes from), else the preset's model as it is."""
    description = dict(model_description(name))
    family = description.pop("family")
    if grid is not None:
        try:
            description = family_memory(family).at_grid(description, grid[0])
        except ValueError as e:
            raise ConfigError(f"{grid[1]}: {e}") from None
    model = build_meta(family, **description)
    inputs = inputs_from_model(model, cfg.micro_batch_size, world_size=world_size, strategy=cfg.strategy, device=device,
                               dropout=cfg.dropout, activation_checkpointing=cfg.activation_checkpointing)
    plans = {(s, c): plan(inputs.variant(strategy=s, activation_checkpointing=c)) for s, c in COLUMNS if s in strategies}
    return PlanReport(name, {"family": family, **description}, inputs, plans, (cfg.strategy, cfg.activation_checkpointing),
                      gpu_memory, grid[1] if grid else "the preset's model")


@functools.cache
def process_resident(stage: str) -> int:
    """What `cca-pipe <stage>` holds before any model, measured on this host now: the VmRSS of a fresh interpreter
    once it has imported what the stage's process imports (`import stages.cli.main, stages.<stage>`, ~2 s). Measured,
    not a constant, because the library pages a process maps differ by host with the same code and wheels (the
    kernel's fault-around, file-backed huge pages): 0.80 GB on the 2026-12-06 machine, 0.55 GB on the 2026-12-07
    one (docs/performance.md). Without Linux's /proc (or if the probe fails): pipeline.memplan.PROCESS_RESIDENT."""
    probe = (f"import stages.cli.main, stages.{stage.replace('-', '_')}, re\n"
             "print(int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)")
    if not Path("/proc/self/status").exists():
        return PROCESS_RESIDENT
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.split()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return PROCESS_RESIDENT


def process_lines(stage: str, host_tensors: int, device: str, workers: int = 0, worker_bytes: int = 0) -> list[str]:
    """The process around the tensors (process_resident) and its loader workers: on the CPU the process's peak
    RSS, what `cca-pipe plan` is checked against (docs/performance.md)."""
    resident = process_resident(stage)
    peak = host_tensors + resident
    where = "process peak" if device == "cpu" else "process host memory"
    lines = [f"{where}: {peak / GB:.2f} GB (the tensors above{' on the host' if device != 'cpu' else ''} + "
             f"{resident / GB:.2f} GB the process holds before any model, measured here: the interpreter, torch and "
             "the libraries)"]
    if workers:
        total = peak + workers * worker_bytes
        lines.append(f"with its loader workers: {total / GB:.2f} GB (+ {workers} x {worker_bytes / GB:.2f} GB: each one's "
                     f"{LOADER_WORKER_PRIVATE / GB:.2f} GB of its own and its {PREFETCH_FACTOR} prefetched batches)")
    return lines


def column_name(column: tuple[str, bool]) -> str:
    strategy, checkpointing = column
    return strategy.upper() + (" + act. ckpt" if checkpointing else "")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_report(report: PlanReport) -> str:
    i = report.inputs
    columns = list(report.plans)
    mixed = "bf16 (DDP: autocast over float32 weights; FSDP: bf16 gathered weights, float32 reduce-scatter)" \
        if i.device == "cuda" else "float32"
    described = ", ".join(f"{k} {v}" for k, v in report.model.items())
    lines = [
        f"memory plan per rank: preset {report.preset} ({described})",
        f"  {i.params_total / 1e9:.3f}B parameters ({i.params_trainable / 1e9:.3f}B trained), {i.layers} blocks of "
        f"{i.params_largest_block / 1e6:.1f}M, width {i.width}, FFN {i.ffn_hidden}, {i.heads} heads, vocabulary {i.vocab}",
        f"  micro-batch {i.sequences // 2} rows = {i.sequences} sequences x {i.positions} tokens per forward, dropout {i.dropout}; "
        f"{i.world_size} process(es); {i.device}: {mixed}",
        f"  tokens per image: {report.tokens_from}",
        "",
    ]
    header = ["GB per rank"] + [column_name(c) + (" *" if c == report.configured else "") for c in columns]
    rows = [[name] + [f"{report.plans[c].rows()[name] / GB:.2f}" for c in columns] for name in next(iter(report.plans.values())).rows()]
    rows.append(["peak during"] + [report.plans[c].peak_phase for c in columns])
    if report.gpu_memory is not None:
        rows.append([f"fits in {report.gpu_memory / GB:.3g} GB"] + ["yes" if report.fits(c) else "no" for c in columns])
    lines.append(_table(rows, header))
    lines.append("")
    if report.configured in report.plans:
        lines.append(f"* the train settings' own (train.strategy {report.configured[0]}, "
                     f"train.activation_checkpointing {str(report.configured[1]).lower()})")
    for name, note in ROW_NOTES.items():
        lines.append(f"  {name}: {note}")
    lines.append("  total (peak): the largest of the logits' backward, a block's backward and the optimizer step "
                 "(their temporaries never coexist); GB = 10^9 bytes")
    if i.world_size == 1:
        lines.append("  one process trains the plain module: DDP and FSDP are the same (no buckets, no sharding)")
    column = report.configured if report.configured in report.plans else columns[0]
    lines += process_lines("train", report.plans[column].peak if i.device == "cpu" else 0, i.device)
    if report.gpu_memory is not None:
        usable = (1 - RESERVE) * report.gpu_memory
        lines.append("")
        for c in columns:
            peak = report.plans[c].peak
            verdict = f"fits in {report.gpu_memory / GB:.3g} GB" if report.fits(c) else "does not fit"
            lines.append(f"{column_name(c)}: {peak / GB:.1f} GB per rank: {verdict} ({usable / GB:.1f} GB usable)")
        lines.append(f"usable = {1 - RESERVE:.0%} of the GPU's memory: {RESERVE:.0%} is kept for the CUDA context, NCCL's buffers "
                     "and the caching allocator's fragmentation, which the plan does not count")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ tokenize and eval memory

STAGES = ("train", "tokenize", "eval", "negatives")


def tokenizer_for(family: str, vq_model: str | None = None):
    """The tokenizer the family named `family` runs (LlamaGen's VQ-16, VAR's VQVAE: its default_tokenizer), or
    `vq_model` (a name or a JSON config, as --vq-model), on the meta device."""
    import torch

    with torch.device("meta"):
        return family_named(family, "the preset's model family").build_tokenizer(vq_model)


def conv_tokenizer_for(family: str, vq_model: str | None = None):
    from pipeline.memplan import conv_tokenizer

    return conv_tokenizer(tokenizer_for(family, vq_model))


@dataclass
class StageReport:
    preset: str
    stage: str
    plan: StagePlan
    described: list[str]  # what the plan is for, one line each
    batch_setting: str  # the setting to lower when it does not fit
    batch_size: int
    device: str
    gpu_memory: int | None
    fitting_batch: int | None = None  # the largest power-of-two fraction of the batch that fits (when it does not)

    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else fits(self.plan.peak, self.gpu_memory)


def _largest_fitting(plan_at, batch_size: int, gpu_memory: int | None) -> int | None:
    """Halve the batch until the plan fits (None when it fits as it is, 0 when not even 1 does)."""
    if gpu_memory is None or fits(plan_at(batch_size).peak, gpu_memory):
        return None
    while batch_size > 1:
        batch_size //= 2
        if fits(plan_at(batch_size).peak, gpu_memory):
            return batch_size
    return 0


def make_tokenize_report(name: str, cfg, gpu_memory: int | None, device: str, vq_model: str | None = None) -> StageReport:
    from pipeline.images import view_names
    from pipeline.memplan import tokenize_plan

    family = model_description(name)["family"]
    t = conv_tokenizer_for(family, vq_model)
    views = len(view_names(cfg.augment))
    workers = loader_workers(cfg.num_workers)
    plan_at = lambda b: tokenize_plan(t, cfg.image_size, b, views, workers)  # noqa: E731
    described = [f"tokenize: {cfg.batch_size} images x {views} view(s) ({cfg.augment}) = {cfg.batch_size * views} "
                 f"encodes per forward at {cfg.image_size}px, float32; tokenizer {t.params / 1e6:.1f}M ({family}: "
                 f"{vq_model or family_named(family).default_tokenizer})",
                 f"{workers} loader worker process(es): tokenize.num_workers {cfg.num_workers}, at most one per CPU this "
                 f"process may use ({usable_cpus()} here; pipeline.host.loader_workers)"]
    return StageReport(name, "tokenize", plan_at(cfg.batch_size), described, "tokenize.batch_size", cfg.batch_size, device,
                       gpu_memory, _largest_fitting(plan_at, cfg.batch_size, gpu_memory))


def make_eval_report(name: str, settings, world_size: int, gpu_memory: int | None, device: str,
                     vq_model: str | None = None, models: int = 2) -> StageReport:
    import math

    from pipeline.memplan import eval_plan

    description = dict(model_description(name))
    family = description.pop("family")
    t = conv_tokenizer_for(family, vq_model)
    if settings.image_size:  # the model samples images of eval.image_size (LlamaGen: block_size (image_size / 16)^2)
        try:
            description = family_memory(family).at_grid(description, settings.image_size // t.downsample)
        except ValueError as e:
            raise ConfigError(f"eval.image_size {settings.image_size}: {e}") from None
    model = build_meta(family, **description)
    side = t.downsample * family_named(family).grid_side(model.cfg)
    image_size = settings.image_size or side
    classes = settings.num_classes or model.cfg.num_classes
    samples = math.ceil(classes * settings.samples_per_class / world_size)
    guided = bool(settings.cfg_scales)
    plan_at = lambda b: eval_plan([model] * models, t, image_size, b, guided, samples, device)  # noqa: E731
    described = [f"eval: {models} model(s) of {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B, eval.batch_size "
                 f"{settings.batch_size} ({'x 2 sequences: guided' if guided else 'no guidance'}), {image_size}px samples, "
                 f"{samples} per unit on each of {world_size} process(es); {device}"]
    return StageReport(name, "eval", plan_at(settings.batch_size), described, "eval.batch_size", settings.batch_size, device,
                       gpu_memory, _largest_fitting(plan_at, settings.batch_size, gpu_memory))


def make_negatives_report(name: str, cfg, world_size: int, gpu_memory: int | None, device: str,
                          vq_model: str | None = None) -> StageReport:
    """`cca-pipe plan --stage negatives`: the reference model of the preset at its own resolution."""
    import math

    from pipeline.memplan import negatives_plan

    description = dict(model_description(name))
    family = description.pop("family")
    t = conv_tokenizer_for(family, vq_model)
    model = build_meta(family, **description)
    image_size = t.downsample * family_named(family).grid_side(model.cfg)
    rows = math.ceil(cfg.chunk_rows / world_size)
    guided = cfg.cfg_scale != 0
    plan_at = lambda b: negatives_plan(model, t, image_size, b, guided, cfg.reencode, rows, device)  # noqa: E731
    described = [f"negatives: the reference ({sum(p.numel() for p in model.parameters()) / 1e9:.3f}B), negatives.batch_size "
                 f"{cfg.batch_size} ({'x 2 sequences: guided' if guided else 'no guidance'}), {image_size}px, "
                 f"{'decoded and re-encoded' if cfg.reencode else 'decoded'}; {rows} fakes of a chunk on each of "
                 f"{world_size} process(es); {device}"]
    return StageReport(name, "negatives", plan_at(cfg.batch_size), described, "negatives.batch_size", cfg.batch_size, device,
                       gpu_memory, _largest_fitting(plan_at, cfg.batch_size, gpu_memory))


def format_stage_report(report: StageReport) -> str:
    p = report.plan
    where = "GPU" if report.device == "cuda" else "machine"
    lines = [f"memory plan per process: {report.stage}, preset {report.preset}", *("  " + d for d in report.described), ""]
    rows = [[k, f"{v / GB:.2f}"] for k, v in p.rows.items()]
    rows += [[f"peak: {k}", f"{v / GB:.2f}"] for k, v in p.phases.items()]
    lines.append(_table(rows, ["GB", report.stage]))
    lines.append(f"peak during {p.peak_phase}: {p.peak / GB:.1f} GB"
                 + (f" on the GPU, and {p.host / GB:.1f} GB of host memory" if p.host else ""))
    lines += process_lines(report.stage, p.peak if report.device == "cpu" else p.host, report.device, p.workers,
                           p.worker_bytes)
    if report.gpu_memory is not None:
        usable = (1 - RESERVE) * report.gpu_memory
        verdict = "fits" if report.fits() else "does not fit"
        lines.append(f"{verdict} in {report.gpu_memory / GB:.3g} GB ({usable / GB:.1f} GB usable) per {where}")
        if report.fitting_batch:
            lines.append(f"lower {report.batch_setting} from {report.batch_size} to {report.fitting_batch} to fit")
        elif report.fitting_batch == 0:
            lines.append(f"even {report.batch_setting} = 1 does not fit: what does not shrink with it (weights, samples "
                         "held) is too large")
    lines.append("GB = 10^9 bytes; each part at its own largest, the peaks add the parts alive together "
                 "(pipeline/memplan.py: counted from the code, checked against measured peaks on the CPU)")
    return "\n".join(lines)
