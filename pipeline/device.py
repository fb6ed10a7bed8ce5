"""Device selection and mixed precision: CUDA with bf16 autocast when present, float32 on CPU."""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    """"auto" (a GPU if there is one), "cpu", "cuda" or "cuda:N"; a device this machine lacks is a ConfigError
    saying so (torch would fail later, with a traceback, at the first tensor moved there)."""
    from .config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    mps = device is not None and device.type == "mps" and torch.backends.mps.is_available()  # Apple GPUs, as before
    if device is None or (device.type not in ("cpu", "cuda") and not mps):
        raise ConfigError(f"--device {name}: cca-pipe runs on auto, cpu, cuda or cuda:N (N: a GPU's index), or mps on a Mac with one")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use (torch "
                              f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                              "run with --device cpu (or auto), or on a GPU node")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} (cuda:0"
                              f"{f' ... cuda:{count - 1}' if count > 1 else ''}): choose one of them")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (keeps CPU results exact and reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class OutOfMemory(RuntimeError):
    """Raised instead of a bare allocator error, with the parameter to lower."""


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def rss_mb() -> float:
    """This process's resident memory now (MiB; Linux /proc, else its peak)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def local_bytes(tensors) -> int:
    """Bytes of memory these tensors hold in this process: a DTensor (an FSDP shard) counts its local part
    only, and a storage several of them view (FSDP's flat gradient buffers) counts once."""
    storages = {}
    for t in tensors:
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
