"""This process's place in a torchrun job, read from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK). No torch here: the CLI asks before it knows whether its command needs torch at all (fetch, report
and --help do not, and importing it costs 1.5 s of a core)."""

from __future__ import annotations

import os


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its environment)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_zero() -> bool:
    """Whether this process is rank 0 of its job (or alone), without a World at hand (logging, progress bars)."""
    return os.environ.get("RANK", "0") == "0"
