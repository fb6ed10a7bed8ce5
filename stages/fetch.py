"""`cca-pipe fetch NAME=SOURCE ... --out data/checkpoints`: the shipped pipelines' first stage (docs/imagenet.md,
"Checkpoints from the Hub"). Each SOURCE, a local path or a Hub id (`hf://org/repo/file@<commit>`), becomes the
link `--out/NAME` to the file (a Hub file in huggingface_hub's cache: fetched there unless HF_HUB_OFFLINE), which
the later stages name as their DVC dependency: DVC hashes the file behind it, so a new revision or an edited local
file reruns what read it. With --pinned (the shipped pipelines) a Hub id must name its commit: a branch or tag can
move, and `dvc repro` must never take a new revision silently."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.hub import COMMIT, HubError, is_hub_ref, parse, resolve

log = logging.getLogger(__name__)


def parse_inputs(inputs: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for item in inputs:
        name, sep, source = item.partition("=")
        if not sep or not name or not source or "/" in name or name.startswith("."):
            raise ValueError(f"fetch: {item!r}: write NAME=PATH or NAME=hf://org/repo/file@<commit> (NAME: a file name, "
                             "the params.yaml key)")
        pairs.append((name, source))
    return pairs


def target_of(name: str, source: str, pinned: bool) -> Path:
    """The file `source` names (a Hub id resolved into the cache), or one line naming the params key and the fix."""
    if not is_hub_ref(source):
        path = Path(source).absolute()
        if not path.exists():
            raise FileNotFoundError(f"{name} = {source}: not found: fix the path in params.yaml, or put the file there")
        return path
    ref = parse(source)
    if pinned and not (ref.revision and COMMIT.match(ref.revision)):
        resolved = resolve(source)  # the commit it stands for now, to pin (from the cache when offline)
        raise HubError(f"{name} = {source}: not pinned to a commit, so a later `dvc repro` could read another revision: "
                       f"write hf://{ref.repo}/{ref.file}@{resolved.commit} in params.yaml (the commit "
                       f"{ref.revision or 'main'} is at now)")
    return resolve(source).path


def run(inputs: tuple[str, ...], out: Path, pinned: bool = False) -> list[str]:
    """Link each input into `out`; one line per input saying what it is."""
    pairs = parse_inputs(inputs)
    targets = [(name, target_of(name, source, pinned)) for name, source in pairs]  # every input checked before any link
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for (name, target), (_, source) in zip(targets, pairs, strict=True):
        link = out / name
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: a reader sees the old link or the new one
        lines.append(f"{link} -> {source}" + (f" ({target})" if is_hub_ref(source) else ""))
    return lines
