"""Image folders (ImageNet layout: `<root>/<class>/<file>`) and the view transforms tokenize applies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels like torchvision's ImageFolder: classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not class_names:
        raise ValueError(f"{root} has no class sub-folders; expected <root>/<class>/<image files>")
    paths, labels = [], []
    for index, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int32), class_names


def load_rgb(path: str | os.PathLike, size: int) -> np.ndarray:
    """(size, size, 3) uint8; any mode converted to RGB, resized with BICUBIC if needed."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def load_images(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([load_rgb(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (LlamaGen's ToTensor + Normalize(0.5, 0.5))."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


SHIFT_VIEWS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # 9 views, (0, 0) in the middle


def shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (B, C, H, W) by (dy, dx) pixels, filling with the corner value (background)."""
    if dy == 0 and dx == 0:
        return images
    B, C, H, W = images.shape
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    padded = torch.nn.functional.pad(images, pad, mode="replicate")
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return padded[:, :, y0 : y0 + H, x0 : x0 + W]


def view_names(mode: str) -> list[str]:
    """Names of the A augmentation views a mode produces (recorded in the token store)."""
    if mode == "none":
        return ["identity"]
    if mode == "shift1":
        return [f"shift({dy},{dx})" for dy, dx in SHIFT_VIEWS]
    raise ValueError(f"unknown augmentation mode {mode!r}; valid: 'none', 'shift1'")


def make_views(images: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, A, 3, H, W) views in the order of `view_names(mode)`."""
    if mode == "none":
        return images[:, None]
    if mode == "shift1":
        return torch.stack([shift(images, dy, dx) for dy, dx in SHIFT_VIEWS], dim=1)
    raise ValueError(f"unknown augmentation mode {mode!r}; valid: 'none', 'shift1'")
