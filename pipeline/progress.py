"""Progress bars that stay readable in logs: frequent on a terminal, every 30 s when piped (DVC, CI)."""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar; under torchrun only rank 0 draws one."""
    from .distributed import rank_zero

    if not rank_zero():
        kwargs["disable"] = True
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    return tqdm(iterable, **kwargs)


class SampleCounter:
    """Progress of a set of samples drawn by every rank, each its share: rank 0 draws the bar (rate, ETA) and
    counts its own samples times the number of ranks (the shares differ by at most one sample, and an
    all-reduce per batch would make every rank wait for the slowest), capped at the total."""

    def __init__(self, total: int, world_size: int = 1, desc: str = "sampling"):
        self.total, self.world_size, self.counted = total, world_size, 0
        self.bar = progress(total=total, desc=desc, unit="img", leave=False)

    def __call__(self, drawn: int) -> None:
        step = min(drawn * self.world_size, self.total - self.counted)
        self.counted += step
        self.bar.update(step)

    def close(self) -> None:
        self.bar.close()


class StepCounter:
    """Progress within the batch being sampled: its tokens (LlamaGen) or scales (VAR) drawn so far, a second
    bar under SampleCounter's (a unit of 20 samples of a large model sat at 0/20 for 15 minutes: issue 30).
    Called by the sampler after every step as (done, total); tqdm redraws at most every mininterval, so a
    call costs a clock read. Starts over with each batch."""

    def __init__(self, unit: str, desc: str = "batch"):
        self.bar = progress(total=0, desc=desc, unit=unit, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if done <= self.bar.n or self.bar.total != total:  # a new batch
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def significant(value: float, digits: int = 3) -> str:
    """A rate with at least `digits` significant digits and no exponent: 0.000123, 0.400, 45.7, 123, 12345
    (`%.0f` prints a slow 0.4 images/s as 0)."""
    if not math.isfinite(value) or value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits - 1 - math.floor(math.log10(abs(value)))}f}"
