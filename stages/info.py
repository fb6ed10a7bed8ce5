"""`cca-pipe info PATH`: what a token store, reference cache, checkpoint, sample batch (.npz), eval or train output
folder holds (shapes, fingerprints, provenance; a sample batch's count, classes and order; an eval's methods, seeds
and scores; a train run's steps, time, last step and settings)."""

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
    if path.suffix == ".npz":
        return _samples(path)
    if path.is_dir() and _eval_marker(path):
        return _eval_folder(path)
    if path.is_dir() and (end := _train_end(path)) is not None:
        return _train_folder(path, end)
    raise ValueError(f"{path}: not a token store (directory with zarr.json), reference cache (.parquet), checkpoint "
                     "(.pt/.pth/.safetensors), sample batch (.npz), eval output folder or train output folder (with metrics.json)")


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
    from pipeline.families import family_of_kind, load_plugins

    load_plugins()  # a plugin family's kinds are known before the file's is read
    kind = checkpoint_kind(path)
    family = family_of_kind(kind)
    obj = load_file(path)
    state = extract_state_dict(obj, path, family.checkpoint_nestings(kind) if family else ())
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


# ------------------------------------------------------------------------- train's outputs (stages/train.py)


def _train_end(path: Path) -> tuple[Path, dict] | None:
    """A finished train run's end-of-run file and its record (steps, seconds, final step, params), under its
    current name or the one it had before (pipeline/formats.py train_run_file); None for any other folder."""
    from pipeline.formats import TRAIN_METRICS, train_run_file
    from pipeline.outputs import read_json

    end = train_run_file(path, TRAIN_METRICS)
    record = read_json(end) or {}
    return (end, record) if {"steps", "final", "params"} <= set(record) else None


def _train_folder(path: Path, end: tuple[Path, dict]) -> str:
    from pipeline.formats import TRAIN_STEP_CSV, train_run_file

    file, record = end
    final, params = record["final"], record["params"]
    peak = f", peak RSS {record['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in record else ""
    shown = ("loss", "rewards/pos", "rewards/neg", "rewards/accuracy")
    return "\n".join([
        f"train output {path}",
        f"  steps              {record['steps']} in {record.get('seconds', float('nan')):.1f} s{peak}",
        "  final step         " + ", ".join(f"{k} {final[k]:.4g}" for k in shown if k in final),
        "  settings           " + ", ".join(f"{k} {params[k]}" for k in ("loss", "lambda", "beta", "lr", "epochs") if k in params),
        f"  run record         {file.name}, step log {train_run_file(path, TRAIN_STEP_CSV).name}"])


# ------------------------------------------------------------------------- eval's outputs (stages/eval.py)

# the eval settings shown beside a sample file or an eval folder: what the samples and their scores depend on
SAMPLER_KEYS = ("samples_per_class", "num_classes", "temperature", "top_k", "top_p", "cfg_schedule", "image_size",
                "resize_to", "batch_size", "feature_extractor")


def _eval_marker(path: Path) -> bool:
    """An eval's output: its .cca-pipe.json names the stage (finished, or being built: `<out>.partial`), or,
    copied without that hidden file, its metrics.json is an eval's."""
    from pipeline.outputs import MARKER, read_json

    if (read_json(path / MARKER) or {}).get("stage") == "eval":
        return True
    metrics = read_json(path / "metrics.json") or {}
    return "methods" in metrics and "sampled" in metrics


def _histogram(labels) -> str:
    """'3 classes (0-2), 4 samples each', or '3 classes (0-7), 2 to 5 samples per class (fewest: class 2, most:
    class 0)'."""
    import numpy as np

    classes, counts = np.unique(labels, return_counts=True)
    head = f"{len(classes)} class{'es' if len(classes) != 1 else ''} ({classes[0]}-{classes[-1]})"
    if counts.min() == counts.max():
        return f"{head}, {counts[0]} sample{'s' if counts[0] != 1 else ''} each"
    return (f"{head}, {counts.min()} to {counts.max()} samples per class (fewest: class {classes[counts.argmin()]}, "
            f"most: class {classes[counts.argmax()]})")


def _order(labels, index) -> str:
    """Shuffled (eval's files: sample_index beside the rows) or class-sorted (other samplers, eval before
    2026-12-07): the ADM evaluator's IS takes contiguous splits of the rows (docs/imagenet.md)."""
    import numpy as np

    if index is not None:
        if np.array_equal(index, np.arange(len(index))):
            return "sampling order (sample_index is the identity)"
        text = "shuffled: row i is sample sample_index[i] of the sampling order"
        if labels is not None and np.all(np.diff(labels[np.argsort(index)]) >= 0):
            text += " (class by class)"
        return text
    if labels is None:
        return "unknown (no arr_1 labels, no sample_index)"
    if np.all(np.diff(labels) >= 0):
        return ("class-sorted (no sample_index; labels non-decreasing): the ADM evaluator's IS splits contiguous rows, "
                "each split then holds a few classes")
    return "no sample_index; labels not sorted (a shuffled file of another sampler)"


def _samples(path: Path) -> str:
    from pipeline.formats import SAMPLE_INDEX, inspect_sample_batch

    arrays, labels, index = inspect_sample_batch(path)
    (n, height, width, _), _ = arrays["arr_0"]
    meaning = {"arr_0": "images", "arr_1": "intended labels", SAMPLE_INDEX: "each row's place in the sampling order"}
    lines = [f"sample batch {path} (the ADM evaluator's layout)"]
    lines += [f"  {name:<19}{shape} {dtype}  {meaning.get(name, '')}".rstrip() for name, (shape, dtype) in arrays.items()]
    lines += [f"  {'samples':<19}{n}", f"  {'image size':<19}{height} x {width}",
              f"  {'labels':<19}{'none (no arr_1)' if labels is None else _histogram(labels) if n else 'none (no rows)'}",
              f"  {'order':<19}{_order(labels, index)}"]
    return "\n".join(lines + _made_by(path))


def _read_eval(folder: Path) -> tuple[dict | None, dict | None]:
    """(metrics.json, the eval section of settings.yaml) of an eval folder, each None when absent; a damaged
    one is one error naming it."""
    from .cli.params import SETTINGS_FILE, parse_yaml
    from .report import read_results

    settings_file = folder / SETTINGS_FILE
    settings = parse_yaml(settings_file.read_text(encoding="utf-8"), str(settings_file)) if settings_file.is_file() else None
    metrics_file = folder / "metrics.json"
    metrics = read_results(metrics_file, ("methods", "sampled", "checks", "seeds", "samples_per_method")) \
        if metrics_file.is_file() else None
    return metrics, settings.get("eval") if isinstance(settings, dict) else None


def _made_by(path: Path) -> list[str]:
    """The records of the eval that wrote `path` (<eval>/samples/<method>_seed<k>.npz): method, seed, what was
    sampled, the sampler's settings and the unit's scores."""
    from pipeline.outputs import read_json

    folder = path.parent.parent
    if path.parent.name != "samples" or not _eval_marker(folder):
        return ["  made by            unknown: not in an eval output's samples/ folder (no records of its settings)"]
    metrics, settings = _read_eval(folder)
    unit = (metrics or {}).get("sampled", {})
    seeds = (metrics or {}).get("seeds", settings.get("seeds", []) if settings else [])
    match = [(name, seed) for name in unit for seed in seeds if f"{name}_seed{seed}.npz" == path.name]
    lines = [f"  made by            eval {folder}"]
    if match:
        name, seed = match[0]
        lines.append(f"  method             {name} ({_sampled(unit[name])}), seed {seed}")
    if settings:
        lines.append("  settings           " + ", ".join(f"{k} {settings[k]}" for k in SAMPLER_KEYS if k in settings))
    scores = (read_json(path.with_name(path.name[: -len(".npz")] + ".json")) or {}).get("scores")
    if scores:
        lines.append("  scores             " + _scores(scores))
    return lines


def _sampled(what: dict) -> str:
    """What a method sampled (metrics.json's `sampled`): 'model cca, cfg_scale 1.5' (and the lambda of a
    lambda-conditioned policy)."""
    lam = f", lam {what['lam']:g}" if what.get("lam") is not None else ""
    guidance = f"cfg_scale {what['cfg_scale']:g}" if what["cfg_scale"] else "no guidance"
    return f"model {what['model']}, {guidance}{lam}"


def _scores(scores: dict) -> str:
    from pipeline.progress import significant
    from pipeline.report import TABLE_HEADS

    return ", ".join(f"{TABLE_HEADS.get(k, k)} {significant(v) if k == 'images_per_s' else f'{v:.3f}'}"
                     for k, v in scores.items() if isinstance(v, (int, float)))


def _eval_folder(path: Path) -> str:
    from pipeline.evaluation import format_results
    from pipeline.outputs import read_json

    metrics, settings = _read_eval(path)
    npz = sorted(p.name for p in (path / "samples").glob("*.npz")) if (path / "samples").is_dir() else []
    lines = [f"eval output {path}"]
    if metrics is None:
        lines.append("  status             INCOMPLETE (no metrics.json: an eval running or interrupted; rerun it to resume)")
        for name in npz:
            scores = (read_json(path / "samples" / (name[: -len(".npz")] + ".json")) or {}).get("scores")
            lines.append(f"  {name:<19}{_scores(scores) if scores else 'not scored'}")
        return "\n".join(lines)
    sampled = metrics.get("sampled", {})
    lines += [f"  methods            {', '.join(sampled or metrics['methods'])}",
              f"  seeds              {metrics.get('seeds')}",
              f"  samples            {metrics.get('samples_per_method')} per method and seed, {len(npz)} sample files in samples/",
              f"  reference          {metrics.get('fid_reference')}"]
    lines += [f"  {name:<19}{_sampled(what)}" for name, what in sampled.items()]
    if settings:
        lines.append("  settings           " + ", ".join(f"{k} {settings[k]}" for k in SAMPLER_KEYS if k in settings))
    return "\n".join(lines) + "\n\n" + format_results(metrics)
