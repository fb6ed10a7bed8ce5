"""Training one policy over many processes: DDP or FSDP (PyTorch's own), which micro-batches each process
trains, and its full weights.

`train.strategy`:
  - "ddp": every process holds the whole policy and its AdamW state (16 bytes per parameter in fp32);
    DistributedDataParallel averages the gradients.
  - "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block (the family's
    `model.blocks()`), then the root (embeddings, head, norms; VAR's frozen quantiser): each process keeps
    1/N of the weights, gradients and optimizer state and gathers a block's weights only while it runs.
    On CUDA the blocks' gathered weights are bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy),
    like the released LlamaGen_finetune_fsdp.py's bf16 FSDP (which reduces in bf16: we reduce in fp32, a
    documented departure); on CPU everything stays fp32.
A world of one process has nothing to share or shard: both strategies then train the plain module.
Either way a step's micro-batches are dealt out round robin (`deal_micro_batches`). The resumable training
state, written by every process, is pipeline.resume.TrainState.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import World

STRATEGIES = ("ddp", "fsdp")


def distribute(policy: nn.Module, world: World, strategy: str) -> nn.Module:
    """The module to run forward on: `policy` wrapped in DDP, or `policy` itself sharded in place by FSDP
    (its parameters become DTensor shards: build the optimizer's parameter groups after this)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if world.size == 1 or is_sharded(policy):  # nothing to share; or sharded already (e.g. to place it first)
        return policy
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (RoPE tables, VAR's masks) are built identically on every rank: no need to sync them each forward
        return DistributedDataParallel(policy, device_ids=[world.device] if world.device.type == "cuda" else None,
                                       forward_sync_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = world.device.type == "cuda"
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    # the root (embeddings, head, norms: a few % of the parameters) keeps float32 weights: the models run
    # their embeddings and VAR's head with autocast off, in float32 as upstream; autocast makes their matmuls bf16
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    for block in policy.blocks():
        fully_shard(block, mp_policy=blocks)
    fully_shard(policy, mp_policy=root)
    return policy


def place(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """Move a freshly loaded model to this process's device, unless FSDP will shard it: fully_shard moves
    only this process's shard there, so a model larger than one GPU never lands on one whole."""
    if strategy == "fsdp" and world.size > 1:
        return model
    return model.to(world.device)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def deal_micro_batches(batch_size: int, micro_batch_size: int, world: World) -> list[int]:
    """The indices of the micro-batches of each step that this process trains: of the step's
    batch_size / micro_batch_size micro-batches, every world.size-th from its rank on (round robin), so
    every process has as many and the global batch is the one-process batch."""
    check_micro_batches(batch_size, micro_batch_size, world.size)
    return list(range(world.rank, batch_size // micro_batch_size, world.size))


def check_micro_batches(batch_size: int, micro_batch_size: int, processes: int) -> None:
    """A step's micro-batches must be shared equally by the processes; else a JobError suggesting settings that
    work: the largest micro_batch_size up to this one that does, or, where none can (batch_size is not a multiple
    of the process count), the next batch_size that is, or a process count that divides the micro-batches."""
    from .config import JobError

    if batch_size % micro_batch_size:
        raise JobError(f"train.batch_size {batch_size} is not a multiple of train.micro_batch_size {micro_batch_size}")
    n_micro = batch_size // micro_batch_size
    if n_micro % processes == 0:
        return
    problem = (f"train.batch_size / train.micro_batch_size = {batch_size} / {micro_batch_size} = {n_micro} micro-batches per "
               f"step cannot be shared equally by {processes} processes")
    fits = [m for m in range(micro_batch_size, 0, -1) if batch_size % m == 0 and (batch_size // m) % processes == 0]
    if fits:
        raise JobError(f"{problem}: set train.micro_batch_size to {fits[0]} ({batch_size // fits[0]} micro-batches, "
                       f"{batch_size // fits[0] // processes} per process)")
    fewer = max(p for p in range(1, processes) if n_micro % p == 0)
    bigger = -(-batch_size // (processes * micro_batch_size)) * processes * micro_batch_size
    raise JobError(f"{problem}, whatever the micro_batch_size ({batch_size} is not a multiple of {processes}): set "
                   f"train.batch_size to {bigger} (a multiple of {processes} x {micro_batch_size}), or run {fewer} "
                   f"process{'es' if fewer > 1 else ''} in all")


def check_batch_rows(batch_size: int, rows: int, holding: str, trial: str = "") -> None:
    """A step takes train.batch_size cache rows: more than an epoch holds cannot work. Raised by train (the
    cache's real rows) and by `cca-pipe check` (the rows the cache will hold, before any stage runs).
    `holding`: what the rows are, for the message; `trial`: a further fix to suggest."""
    from .config import ConfigError

    if batch_size > rows:
        raise ConfigError(f"train.batch_size = {batch_size} is larger than the {rows} rows {holding}: a step cannot take "
                          f"more rows than an epoch holds; set train.batch_size <= {rows} (and train.micro_batch_size to "
                          f"a divisor of it){trial}")


def accumulating(model: nn.Module, last: bool):
    """The context of one micro-batch's backward: DDP skips its all-reduce until the step's last one
    (gradients accumulate locally); FSDP reduce-scatters every micro-batch into its sharded gradients,
    which is what keeps them at 1/N of the model."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, returning the total norm as a plain tensor (FSDP's is a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's whole state dict on the main process, on CPU; under FSDP a collective every process
    must call (the others get {})."""
    if not is_sharded(policy):
        return {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
