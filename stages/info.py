"""`cca-pipe info PATH`: what a token store, reference cache or checkpoint holds (shapes, fingerprints, provenance)."""

from __future__ import annotations

import json
from pathlib import Path


def describe(path: Path, verify: bool = False) -> str:
    """What `path` holds; with `verify`, a token store's every chunk is read (checksums) and its fingerprint
    recomputed, and damage raises FormatError listing every problem."""
    if (path / "zarr.json").is_file():
        return _token_store(path) + (_verify(path) if verify else "")
    if verify:
        raise ValueError(f"{path}: --verify checks token stores (a directory with zarr.json)")
    if path.suffix == ".parquet":
        return _cache(path)
    if path.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        return _checkpoint(path)
    raise ValueError(f"{path}: not a token store (directory with zarr.json), reference cache (.parquet) or checkpoint (.pt/.pth/.safetensors)")


def _token_store(path: Path) -> str:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    tokens, labels = group["tokens"], group["labels"]
    lines = [f"token store {path} (format version {attrs.get('format_version')})",
             f"  tokens  {tokens.shape} {tokens.dtype}  (images, views, tokens per view), chunks {tokens.chunks}",
             f"  labels  {labels.shape} {labels.dtype}",
             f"  status  {'complete' if 'fingerprint' in attrs else 'INCOMPLETE (interrupted tokenize: rerun to resume)'}"]
    for key in ("fingerprint", "family", "seq_len", "patch_nums", "tokenizer_sha256", "codebook_size", "image_size", "grid",
                "augmentations", "num_classes", "source"):
        if key in attrs:
            lines.append(f"  {key:<17}{attrs[key]}")
    names = attrs.get("class_names", [])
    lines.append(f"  class_names      {names[:5]}{' ...' if len(names) > 5 else ''}")
    return "\n".join(lines)


def _verify(path: Path) -> str:
    from pipeline.formats import FormatError
    from pipeline.tokenstore import verify_token_store

    problems = verify_token_store(path)
    if problems:
        raise FormatError(f"{len(problems)} problems: " + " | ".join(problems))
    return "\n  verified         every chunk reads (checksums match) and the fingerprint matches"


def _cache(path: Path) -> str:
    import pyarrow.parquet as pq

    from pipeline.formats import read_cache_provenance

    meta = read_cache_provenance(path)
    pf = pq.ParquetFile(path)
    lines = [f"reference log-prob cache {path}", f"  rows    {pf.metadata.num_rows} in {pf.metadata.num_row_groups} row group(s)",
             f"  columns {', '.join(f'{f.name}:{f.type}' for f in pf.schema_arrow)}"]
    lines += [f"  {k:<19}{v}" for k, v in meta.items()]
    return "\n".join(lines)


def _layout(obj: dict) -> str:
    if "trainer" in obj and isinstance(obj["trainer"], dict):
        inner = [k for k, v in obj["trainer"].items() if isinstance(v, dict)]
        return f"training checkpoint: ['trainer'] holding {inner or 'the state dict'}"
    if "model" in obj:
        return "wrapped: " + ", ".join(sorted(k for k in obj if not hasattr(obj[k], "shape")))
    return "bare state dict"


def _checkpoint(path: Path) -> str:
    from pipeline.checkpoint import KINDS, checkpoint_kind, extract_state_dict, file_sha256, load_file
    from pipeline.families import FAMILIES
    from pipeline.models.var import NESTINGS

    kind = checkpoint_kind(path)
    family = next((f for f in FAMILIES.values() if kind in (f.model_kind, f.tokenizer_kind)), None)
    obj = load_file(path)
    # a VAR transformer's training checkpoint nests it (["trainer"]["var_wo_ddp"]); other files are unwrapped as usual
    state = extract_state_dict(obj, path, NESTINGS if kind == "var" else ())
    n_params = sum(v.numel() for v in state.values())
    lines = [f"checkpoint {path}", f"  sha256             {file_sha256(path)}",
             f"  layout             {_layout(obj)}",
             f"  tensors            {len(state)}, {n_params / 1e6:.2f}M values",
             f"  kind               {KINDS[kind] if kind else 'unknown'}",
             f"  model family       {family.name if family else 'none'}"]
    for key in ("family", "steps", "init_sha256", "tokens_fingerprint"):
        if key in obj:
            lines.append(f"  {key:<19}{obj[key]}")
    if isinstance(obj.get("config"), dict):
        lines.append(f"  config             {json.dumps(obj['config'])}")
    elif family is not None and family.describe_weights(state):
        lines.append(f"  config             {family.describe_weights(state)}")
    else:
        lines.append("  config             none stored (upstream file): pass --gpt-model / --vq-model")
    return "\n".join(lines)
