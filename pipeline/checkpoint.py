"""Reading and writing model checkpoints in the peers' formats, safely.

Format we write (LlamaGen's c2i layout, so upstream scripts load it with `checkpoint["model"]`):
    {"model": state_dict, "config": {...model config fields...},
     "family": "llamagen-gpt" | "llamagen-vq" | "var" | "var-vqvae" | "classifier" | a plugin family's kind, ...}
The "family" entry holds the checkpoint's kind (KINDS below; a model family has two kinds, its generator and
its tokenizer, registered by pipeline.families): the key keeps its first name so that files already written
stay readable.
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

import contextlib
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .outputs import atomic_file, file_sha256  # noqa: F401 (file_sha256: imported from here by stages)

_WRAPPER_KEYS = ("model", "module", "state_dict", "ema")
_PREFIXES = ("module.", "_orig_mod.")
_DROPPED_KEYS = ("freqs_cis",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


@contextlib.contextmanager
def _quiet_pickle_protocol():
    """torch's weights_only unpickler warns about any pickle protocol but 2 (files saved with
    pickle_protocol=4, most pickles) before it loads them or we refuse them: a warning line that told the
    user nothing ahead of our one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def _first_line(error: BaseException) -> str:
    """The gist of a library's error: its first sentence (torch's run to a paragraph), or the unpickler's verdict."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return (text.splitlines() or [type(error).__name__])[0].split(". ")[0]


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive; legacy files are a pickle stream starting with the PROTO opcode."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def load_file(path: str | os.PathLike) -> dict:
    """Load a .pt/.pth/.safetensors file into a dict without executing pickled code
    (`torch.load(weights_only=True)`: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: not a valid .safetensors file ({_first_line(e)})") from e
    if not _looks_like_torch_file(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise CheckpointError(f"cannot read checkpoint {path}: it is an incomplete zip archive (truncated or damaged); "
                                      "use an intact copy")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
                              "pass the .pt/.pth/.safetensors file of the model")
    try:
        with _quiet_pickle_protocol():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it contains objects other than tensors and plain containers "
            f"({_first_line(e)}). Re-save only the state dict, e.g. "
            f"torch.save({{'model': model.state_dict()}}, path), or convert it to .safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}. The file is truncated or damaged.") from e
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


def save_torch(path: str | os.PathLike, obj) -> None:
    """torch.save atomically (temporary name, then rename): a kill or a full disk never leaves half a file.

    Same object => same bytes: torch.save given a file name records that name (our temporary one, with the
    pid) as the archive's folder, so it writes through a file object instead (entries `archive/...`, dated
    1980 like every torch.save). Writing through Python also keeps a full disk an OSError (ENOSPC) naming
    the file, where torch's own file writer reports "unexpected pos"."""
    with atomic_file(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:
            # torch's zip writer turns a failed write (a full disk) into "inline_container.cc ... unexpected pos"
            # as it closes; the OSError it hides is in the chain
            cause = next((c for c in _chain(e) if isinstance(c, OSError)), None)
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e


def _chain(error: BaseException):
    """An exception and those it was raised from or during, nearest first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


KIND_KEY = "family"  # the entry naming a checkpoint's kind (its on-disk name predates the word "kind")


def save_checkpoint(path: str | os.PathLike, state_dict: dict, config: dict, kind: str, **extra) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_torch(path, {"model": state, "config": config, KIND_KEY: kind, **extra})


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
    params = {name for name, _ in model.named_parameters()}
    damaged = [k for k in sorted(params & set(state_dict)) if state_dict[k].is_floating_point() and not torch.isfinite(state_dict[k]).all()]
    if damaged:
        raise CheckpointError(f"checkpoint {path} is damaged: {len(damaged)} weight tensors hold NaN or inf values, e.g. "
                              f"{damaged[:4]}; use an intact copy of the checkpoint")
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


def load_mapped(path: str | os.PathLike) -> dict:
    """A torch checkpoint's dict with its tensors memory-mapped, not read: their shapes cost a header's read
    (`cca-pipe check` reads a multi-GB model's shapes so). Legacy (non-zip) files are loaded whole."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return load_file(path)
    try:
        with _quiet_pickle_protocol():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        obj = load_file(path)  # legacy (non-zip) files cannot be memory-mapped; also gives the clear errors
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state dict)")
    return obj


def peek(path: str | os.PathLike) -> tuple[str | None, set[str]]:
    """(the kind our files name in their KIND_KEY entry, None for others; the state-dict keys) without reading
    the tensors' data where the format allows (memory-mapped zip checkpoints, safetensors headers): a
    multi-GB checkpoint's kind is known before it is loaded once, for real."""
    path = Path(path)
    if not path.is_file() or (path.suffix != ".safetensors" and not _looks_like_torch_file(path)):
        load_file(path)  # raises its clear error
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return None, set(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: not a valid .safetensors file ({_first_line(e)})") from e
    obj = load_mapped(path)
    saved_kind = obj.get(KIND_KEY) if isinstance(obj.get(KIND_KEY), str) else None
    keys: set[str] = set()
    stack = [obj]
    while stack:  # any nesting ({"model": ...}, {"trainer": {"var_wo_ddp": ...}}): collect tensor keys
        cur = stack.pop()
        for k, v in cur.items():
            if isinstance(v, torch.Tensor):
                keys.add(k)
            elif isinstance(v, dict):
                stack.append(v)
    return saved_kind, keys


# ----------------------------------------------------------------------------- what a checkpoint is

# kind -> what it is, in errors; the model families' kinds (a generator's and a tokenizer's each) are added by
# their registration (pipeline.families.register_family), which also tells their upstream files apart
KINDS = {
    "classifier": "a cca-pipe image classifier (evaluator)",
    "inception": "an Inception-v3 feature extractor (torch-fidelity's)",
}
_DETECTORS: dict[str, Callable[[set[str]], str | None]] = {}  # kind -> its upstream files' kind from their keys


def register_kind(kind: str, description: str, detect: Callable[[set[str]], str | None] | None = None) -> None:
    """Add a checkpoint kind (`description`: "a LlamaGen GPT (image generator)"); `detect(keys)`: which kind an
    upstream file (no kind entry) is from its state dict's keys, or None."""
    KINDS[kind] = description
    if detect is not None:
        _DETECTORS[kind] = detect


def unregister_kind(kind: str) -> None:
    KINDS.pop(kind, None)
    _DETECTORS.pop(kind, None)


def kind_from(saved_kind: str | None, keys: set[str]) -> str | None:
    """Which KINDS entry a checkpoint is: our files name it; upstream files are told apart by their keys."""
    if saved_kind in KINDS:
        return saved_kind
    for detect in list(_DETECTORS.values()):
        kind = detect(keys)
        if kind is not None:
            return kind
    if any(k.startswith("Mixed_5b.") for k in keys):
        return "inception"
    return None


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    saved, keys = peek(path)
    return kind_from(saved, keys)


def expect_kind(path: str | os.PathLike, allowed: tuple[str, ...], role: str) -> str:
    """The checkpoint's kind if it is one of `allowed`, else one clear error before any model is built:
    "--ref expects a LlamaGen GPT or a VAR transformer, but data/vq/vq.pt is a LlamaGen VQ tokenizer"."""
    saved, keys = peek(path)
    kind = kind_from(saved, keys)
    if kind in allowed:
        return kind
    wanted = " or ".join(KINDS[k] for k in allowed)
    if kind is None:
        what = (f"its {KIND_KEY!r} entry {saved!r} is unknown" if saved is not None
                else f"its keys (e.g. {sorted(keys)[:4]}) belong to no model cca-pipe knows")
        raise CheckpointError(f"{role} expects {wanted}, but {path} is not one: {what}")
    raise CheckpointError(f"{role} expects {wanted}, but {path} is {KINDS[kind]} checkpoint")


def owned_checkpoint(kind: str):
    """Test for an existing file that is a checkpoint of ours of this kind (which a stage may replace)."""

    def owned(path: Path) -> bool:
        try:
            return path.is_file() and peek(path)[0] == kind
        except CheckpointError:
            return False

    return owned
