"""Progress bars that stay readable in logs: frequent on a terminal, every 30 s when piped (DVC, CI)."""

from __future__ import annotations

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
