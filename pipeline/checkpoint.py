"""Reading and writing model checkpoints in the peers' formats, safely.

Format we write (LlamaGen's c2i layout, so upstream scripts load it with `checkpoint["model"]`):
    {"model": state_dict, "config": {...model config fields...},
     "family": "llamagen-gpt" | "llamagen-vq" | "var" | "var-vqvae" | "classifier", ...}
For "var" the state dict is exactly the VAR transformer's (what `var_d16.pth` holds); the quantiser it
reads its input from stays in the VQVAE file.
Extra keys hold only plain Python values, so `torch.load(..., weights_only=True)` reads the file.

Upstream files we read: `{"model": sd}` (c2i_B/L/XL, vq_ds16_c2i.pt), a bare state dict (XXL/3B saved from
FSDP), `{"module": sd}` (DeepSpeed), `{"state_dict": sd}`; keys may carry `module.`/`_orig_mod.` prefixes
(DDP, torch.compile) and a `freqs_cis` buffer that we recompute. `.safetensors` files hold a bare state dict.
VAR: plain state dicts (`var_d16.pth`, `vae_ch160v4096z32.pth`); its training checkpoints nest them under
["trainer"]["var_wo_ddp"] / ["trainer"] (`extract_state_dict(..., nestings=...)` unwraps them).
Nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

_WRAPPER_KEYS = ("model", "module", "state_dict", "ema")
_PREFIXES = ("module.", "_orig_mod.")
_DROPPED_KEYS = ("freqs_cis",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_file(path: str | os.PathLike) -> dict:
    """Load a .pt/.pth/.safetensors file into a dict without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains objects other than tensors and plain containers "
            f"({str(e).splitlines()[0]}). Re-save only the state dict, e.g. "
            f"torch.save({{'model': model.state_dict()}}, path), or convert it to .safetensors."
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. The file may be truncated or not a torch file.") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state dict)")
    return obj


def extract_state_dict(obj: dict, path: str | os.PathLike = "<memory>",
                       nestings: tuple[tuple[str, ...], ...] = ()) -> dict[str, torch.Tensor]:
    """Unwrap the upstream layouts, strip DDP/compile prefixes, drop buffers we recompute.

    `nestings`: key paths a model family's training checkpoints nest their weights under, tried first,
    e.g. (("trainer", "var_wo_ddp"), ("trainer",)) for VAR; the first that leads to a dict of tensors wins.
    Then one level of the common wrappers ({"model": ...}, {"module": ...}, ...)."""
    sd = obj
    for nesting in nestings:
        cur = obj
        for key in nesting:
            cur = cur.get(key) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and cur and all(isinstance(v, torch.Tensor) for v in cur.values()):
            sd = cur
            break
    else:
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                sd = obj[key]
                break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        while k.startswith(_PREFIXES):  # any mix, e.g. "_orig_mod.module." from compile over DDP
            k = k[len(next(p for p in _PREFIXES if k.startswith(p))) :]
        if k in _DROPPED_KEYS:
            continue
        out[k] = v
    return out


def save_checkpoint(path: str | os.PathLike, state_dict: dict, config: dict, family: str, **extra) -> None:
    """Write atomically (temporary name, then rename) so an interrupted save never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        torch.save({"model": state, "config": config, "family": family, **extra}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill must not leave half a file behind
        raise


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "<memory>") -> None:
    """load_state_dict(strict=True), but first one error listing every missing/unexpected key and wrong shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {missing[:8]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {unexpected[:8]}")
        if shapes:
            parts.append(f"{len(shapes)} wrong shapes {shapes[:8]}")
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(parts)
            + ". Check that the model config (size, vocabulary, classes, sequence length) matches the checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)


def peek(path: str | os.PathLike) -> tuple[str | None, set[str]]:
    """(the file's "family" entry if it is one of ours, its state-dict keys) without reading the tensors'
    data where the format allows (memory-mapped zip checkpoints, safetensors headers): a multi-GB
    checkpoint's family is known before it is loaded once, for real."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return None, set(f.keys())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError):
        obj = load_file(path)  # legacy (non-zip) files cannot be memory-mapped; also gives the clear errors
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state dict)")
    family = obj.get("family") if isinstance(obj.get("family"), str) else None
    keys: set[str] = set()
    stack = [obj]
    while stack:  # any nesting ({"model": ...}, {"trainer": {"var_wo_ddp": ...}}): collect tensor keys
        cur = stack.pop()
        for k, v in cur.items():
            if isinstance(v, torch.Tensor):
                keys.add(k)
            elif isinstance(v, dict):
                stack.append(v)
    return family, keys
