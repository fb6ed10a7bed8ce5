"""Image folders (ImageNet layout: `<root>/<class>/<file>`) and the view transforms tokenize applies."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFolderError(ValueError):
    """A problem with the user's image folder; the message names the files and the fix."""


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels like torchvision's ImageFolder: classes are the sorted sub-folder names.

    Policy: hidden files (".DS_Store", ...) are ignored; any other file without an image extension
    (IMAGE_EXTENSIONS) in a class folder is an error listing them, as is a class folder without images or
    one that is a symbolic link leading nowhere (dangling, a loop), so that a mislabelled or half-copied data
    set is never tokenized silently.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ImageFolderError(f"image folder {root} is a file, not a folder: pass the folder that holds the class "
                               "folders (<root>/<class>/<image files>)")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    # a symbolic link that leads nowhere (dangling, or a loop) would drop out of is_dir() and silently shift
    # every later class index: name it instead
    broken = sorted(str(d) for d in root.iterdir() if d.is_symlink() and not d.name.startswith(".") and not _resolves(d))
    if broken:
        raise ImageFolderError(f"class folder {broken[0]} is a symbolic link that leads nowhere (dangling, or a loop)"
                               f"{f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''}: fix or remove it "
                               "(dropping it would shift every later class index)")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    # an image beside the class folders has no class: it would be left out without a word
    loose = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                   and p.is_file())
    if loose:
        raise ImageFolderError(f"{len(loose)} image files at the top level of {root}, outside any class folder, e.g. "
                               f"{loose[:3]}: move each into its class folder (<root>/<class>/), or out of {root}")
    if not class_names:
        raise ImageFolderError(f"{root} has no class sub-folders; expected <root>/<class>/<image files>")
    paths, labels, strays = [], [], []
    for index, name in enumerate(class_names):
        entries = sorted(p for p in (root / name).iterdir() if not p.name.startswith("."))
        is_image = [p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries]  # one stat each
        files = [p for p, ok in zip(entries, is_image) if ok]
        strays += [p for p, ok in zip(entries, is_image) if not ok]
        if not files:
            raise ImageFolderError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                                   "add its images or remove the folder (it would shift every later class index)")
        paths += files
        labels += [index] * len(files)
    if strays:
        raise ImageFolderError(f"{len(strays)} non-image entries in class folders of {root}, e.g. "
                               f"{[str(p) for p in strays[:5]]}: move them out (accepted: {', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, dtype=np.int32), class_names


def path_key(path: str | os.PathLike) -> str:
    """A path as the same string whatever the locale: its bytes read as UTF-8, any undecodable byte as a
    surrogate escape. Python decodes file names with the locale's encoding (ASCII under a strict C locale,
    docs/safety.md), so str(path) of "café.png" differs between locales and would change a content key."""
    return os.fsencode(path).decode("utf-8", "surrogateescape")


def _resolves(link: Path) -> bool:
    try:
        link.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target (FileNotFoundError), a loop (OSError ELOOP / RuntimeError)
        return False
    return True


StatKey = tuple[int, int, int, int]  # (size, mtime_ns, ctime_ns, inode): what tokenize's stat shortcut compares


def stat_key(st: os.stat_result) -> StatKey:
    """A file's stat key. Size and mtime alone miss a rewrite that keeps both (`cp -p`, `touch -r`); the
    ctime moves on every write and no one can set it, and a replaced file has another inode. The inode
    as a signed 64-bit number (one to one), so that it fits a tensor."""
    ino = st.st_ino - (1 << 64) if st.st_ino >= 1 << 63 else st.st_ino
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, ino


def read_image_file(path: str | os.PathLike) -> tuple[bytes, StatKey]:
    """(bytes, stat key) of an image file, from one open (the key from fstat: that of the bytes read): the
    content key of tokenize hashes these bytes, the decoder reads them, so a first run reads each image
    once. An unreadable file (permissions, an I/O error) is an ImageFolderError saying so: it is not corrupt."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), stat_key(st)
    except OSError as e:
        raise ImageFolderError(f"cannot read image {path} ({type(e).__name__}: {e.strerror or e}): it is unreadable, "
                               "not corrupt; check its permissions (or the disk) and rerun") from e


# PIL's own decompression-bomb threshold (it only warns up to twice this): larger images are refused.
MAX_IMAGE_PIXELS = 89_478_485


def open_rgb(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS,
             fix: str = "replace or remove it, or set tokenize.bad_images: skip", data: bytes | None = None) -> Image.Image:
    """Decode fully and convert any mode to 8-bit RGB: grayscale, palette, RGBA (alpha dropped), CMYK, and
    16-bit grayscale (scaled to 8 bits rather than clipped). Corrupt or truncated files, and images of more
    than `max_pixels` pixels (checked from the header, before decoding), raise ImageFolderError, as does an
    unreadable file (read_image_file). `data`: the file's bytes, if already read (`path` names it)."""
    if data is None:
        data = read_image_file(path)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            # PIL refuses twice its limit with an error we would call corrupt: `max_pixels` is checked below instead
            pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with im:
            if im.size[0] * im.size[1] > max_pixels:
                raise ImageFolderError(
                    f"image {path} is {im.size[0]}x{im.size[1]} = {im.size[0] * im.size[1] / 1e6:.0f} megapixels, more than the "
                    f"limit of {max_pixels / 1e6:.0f} (a decompression bomb?): shrink or remove it, or raise "
                    "tokenize.max_image_pixels")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
                return Image.fromarray(np.round(arr / scale * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except ImageFolderError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageFolderError(f"cannot decode image {path} ({type(e).__name__}: {e}): it is corrupt or truncated; {fix}") from e


def load_rgb(path: str | os.PathLike, size: int) -> np.ndarray:
    """(size, size, 3) uint8; any mode converted to RGB, resized with BICUBIC if needed."""
    im = open_rgb(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def load_images(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([load_rgb(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (LlamaGen's ToTensor + Normalize(0.5, 0.5))."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """LlamaGen's evaluation resize (e.g. 384 -> 256): bicubic on [-1, 1] floats; size <= 0 keeps them. Per
    image: a batch gives the same images as the whole set."""
    if size <= 0 or images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


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


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM/LlamaGen preprocessing: halve with BOX while the short side >= 2*size, BICUBIC-resize the
    short side to size, center crop to size x size."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def _shift_np(arr: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate (H, W, 3) by (dy, dx), replicating the border (background for digits)."""
    H, W = arr.shape[:2]
    padded = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return padded[1 - dy : 1 - dy + H, 1 - dx : 1 - dx + W]


def _ten_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision TenCrop order: top-left, top-right, bottom-left, bottom-right, center, then mirrored."""
    H, W = arr.shape[:2]
    ct, cl = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    crops = [arr[:size, :size], arr[:size, W - size :], arr[H - size :, :size], arr[H - size :, W - size :],
             arr[ct : ct + size, cl : cl + size]]
    mirrored = arr[:, ::-1]
    crops += [c for c in [mirrored[:size, :size], mirrored[:size, W - size :], mirrored[H - size :, :size],
                          mirrored[H - size :, W - size :], mirrored[ct : ct + size, cl : cl + size]]]
    return crops


AUGMENTATIONS = {
    # mode: view names (their order is the A axis of the token store)
    "none": ["center"],
    "flip": ["center", "center_flip"],  # LlamaGen extract_codes_c2i.py without --ten-crop
    "tencrop": [f"{p}{s}" for s in ("", "_flip") for p in ("tl", "tr", "bl", "br", "center")],  # --ten-crop (1.1x)
    "shift1": [f"shift({dy},{dx})" for dy, dx in SHIFT_VIEWS],  # embedded default: every +-1 pixel shift
}


# VAR's training augmentation (utils/data.py): resize the short side to 1.125x with LANCZOS, random crop.
# "randcrop:A" makes A such crops per image, seeded by (image row, view): the same on every run and rank.
RANDCROP_PREFIX = "randcrop:"
VAR_MID_RESO = 1.125


def _randcrop_count(mode: str) -> int | None:
    if not mode.startswith(RANDCROP_PREFIX):
        return None
    count = mode[len(RANDCROP_PREFIX) :]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"augmentation {mode!r}: write randcrop:<number of views>, e.g. randcrop:4")
    return int(count)


def view_names(mode: str) -> list[str]:
    """Names of the A augmentation views a mode produces (recorded in the token store)."""
    count = _randcrop_count(mode)
    if count is not None:
        return [f"randcrop{k}" for k in range(count)]
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation mode {mode!r}; valid: {sorted(AUGMENTATIONS)} or randcrop:<A> (VAR's)")
    return AUGMENTATIONS[mode]


def random_crops(image: Image.Image, size: int, count: int, row: int) -> np.ndarray:
    """VAR's train transform as `count` seeded views: torchvision Resize(round(1.125 size), LANCZOS) of the
    short side, then crops at uniformly drawn offsets (as RandomCrop draws them), no flip."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    arr = np.asarray(TF.resize(image, round(VAR_MID_RESO * size), interpolation=InterpolationMode.LANCZOS))
    h, w = arr.shape[:2]
    rng = np.random.default_rng([row, 0x5A])
    crops = []
    for _ in range(count):
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crops.append(arr[top : top + size, left : left + size])
    return np.stack(crops)


def image_views(image: Image.Image, size: int, mode: str, row: int = 0) -> np.ndarray:
    """All views of one image: uint8 (A, size, size, 3), in the order of `view_names(mode)`.
    `row` (the image's index in the folder listing) seeds the random modes."""
    names = view_names(mode)
    image = image.convert("RGB")
    if mode.startswith(RANDCROP_PREFIX):
        return random_crops(image, size, len(names), row)
    if mode == "tencrop":
        # LlamaGen: center-crop to int(size * 1.1) first, then TenCrop(size)
        return np.stack(_ten_crop(np.asarray(center_crop_arr(image, int(size * 1.1))), size))
    arr = np.asarray(center_crop_arr(image, size))
    if mode == "none":
        return arr[None]
    if mode == "flip":
        return np.stack([arr, arr[:, ::-1]])
    return np.stack([_shift_np(arr, dy, dx) for dy, dx in SHIFT_VIEWS])


def content_digest(data: bytes) -> str:
    """What keys an image's contents (tokenize's input record): sha256 of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


class ImageViews(torch.utils.data.Dataset):
    """(views uint8 (A, size, size, 3), row index, stat key (4,) int64, content digest) per image file; for
    a DataLoader in tokenize. The digest is of the bytes that were decoded (one read per image)."""

    def __init__(self, paths: list[Path], size: int, mode: str, rows: list[int] | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.paths, self.size, self.mode, self.max_pixels = paths, size, mode, max_pixels
        self.rows = list(range(len(paths))) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor, str]:
        row = self.rows[i]
        data, key = read_image_file(self.paths[row])
        views = image_views(open_rgb(self.paths[row], self.max_pixels, data=data), self.size, self.mode, row)
        # a writable copy of the views
        return torch.from_numpy(np.array(views)), row, torch.tensor(key, dtype=torch.int64), content_digest(data)
