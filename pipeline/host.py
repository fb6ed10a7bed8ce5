"""The host machine around the tensors: the CPUs a process may use, the pages its tensors get and how it returns
freed memory.

Kept apart from pipeline/device.py, whose code is part of the reference caches' log-prob code digest
(pipeline.families.LOGP_CODE): nothing here changes a log-probability.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a batch job's share, not the whole node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def loader_workers(setting: int) -> int:
    """The DataLoader processes to start for a `num_workers` setting: at most one per usable CPU. Image decoding is
    CPU-bound, so a worker beyond the CPUs adds no speed, but costs a whole process (torch and PIL imported,
    its prefetched batches: `cca-pipe plan` counts each); e.g. the ImageNet pipelines' 8 is 2 on a 2-core machine."""
    return min(setting, usable_cpus())


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's (c10/core/alloc_cpu.cpp): read once, at the first CPU allocation
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"  # Linux with transparent huge pages built in


def use_huge_pages() -> bool:
    """Ask PyTorch to back CPU tensors of 2 MiB or more with transparent huge pages (THP_MEM_ALLOC_ENABLE=1: 2 MiB
    alignment and madvise(MADV_HUGEPAGE)), unless the environment already says (0 turns it off); whether it is on.

    With the mmap threshold below, each large tensor is fresh memory that the kernel zero-fills page by page, one
    fault per 4 KiB. With 2 MiB pages the tiny tokenize took 0.36 M faults instead of 2.28 M and 11.1 CPU s instead of
    13.8; the stand-in LlamaGen eval (InceptionV3 at 299px) 39.5 instead of 44.6 (docs/performance.md). Only the
    backing changes: no value, and not the bytes `cca-pipe plan` counts (bench/memory.py measures its peaks with it
    on, as the stages run). c10 reads the variable once, at the first allocation, so it is set before torch is imported
    (stages/cli/main.py run); a kernel with THP off ("never") just keeps 4 KiB pages, and on one without THP (no
    sysfs entry: madvise would fail, and PyTorch warn) or off Linux nothing is asked.
    """
    if not os.path.exists(THP_SYSFS):
        return os.environ.get(HUGE_PAGES_ENV) == "1"
    return os.environ.setdefault(HUGE_PAGES_ENV, "1") == "1"


MMAP_THRESHOLD = 64 * 1024  # bytes: allocations from this size on are mapped on their own and unmapped when freed


def return_freed_memory() -> bool:
    """Make glibc give freed tensors' memory back to the system (mallopt M_MMAP_THRESHOLD; whether it could).

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed and keeps blocks under it in
    its heap: a training step's activations and per-parameter temporaries (each a few MB) then stay resident after
    they are freed, and the process's RSS follows the largest set ever freed, not the tensors alive: GPT-B's
    step measured 3.51 GB against 2.93 GB of live tensors (docs/performance.md). A fixed threshold also stops the
    dynamic raise. Without glibc (macOS, musl) nothing changes. It costs CPU (each freed block is unmapped, each
    new one zero-filled: +37% on pretrain-vq), so the CLI sets it only for the stages `cca-pipe plan` plans."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD (malloc.h)
