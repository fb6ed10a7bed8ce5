"""The embedded default data set: scikit-learn's bundled digits (1797 8x8 images, 10 classes).

Written as an ImageNet-style class-folder tree of RGB PNGs so that every later stage reads it
exactly as it would read ImageNet: `<out>/train/<digit>/<index>.png`, `<out>/test/<digit>/...`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def _test_count(class_images: int, test_fraction: float) -> int:
    """How many of a class's images the test split holds."""
    return int(round(class_images * test_fraction))


def split_counts(test_fraction: float) -> dict[str, tuple[int, int]]:
    """{split: (images, classes)} that write_digits will write, known before it runs (`cca-pipe check`)."""
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=CLASSES)
    test = sum(_test_count(int(n), test_fraction) for n in per_class)
    return {"train": (int(per_class.sum()) - test, CLASSES), "test": (test, CLASSES)}


def write_digits(out: str | os.PathLike, image_size: int, test_fraction: float, seed: int) -> dict[str, int]:
    """Upscale (bicubic) to image_size, split per class with a fixed seed. Returns image counts per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # (1797, 8, 8), white on black
    rng = np.random.default_rng(seed)
    out = Path(out)
    counts = {"train": 0, "test": 0}
    for label in range(CLASSES):
        index = np.flatnonzero(digits.target == label)
        index = index[rng.permutation(len(index))]
        n_test = _test_count(len(index), test_fraction)
        for split, chosen in (("test", index[:n_test]), ("train", index[n_test:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(chosen):
                im = Image.fromarray(images[i], mode="L").resize((image_size, image_size), Image.BICUBIC)
                im.convert("RGB").save(folder / f"{i:04d}.png")
            counts[split] += len(chosen)
    return counts
