"""Checkpoints by their Hugging Face Hub names: `hf://org/repo/path/in/repo[@revision]` -> a local file in
huggingface_hub's own cache (its auth, its HF_HUB_OFFLINE), with the commit it resolved to (docs/imagenet.md,
"Checkpoints from the Hub").

The file is then read exactly as a local one (pipeline.checkpoint.load_file: weights only, nothing executed).
Every reference resolved in this process is remembered, so the outputs written by it can record {repo, file,
revision, commit} in their provenance (`inputs_record`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SCHEME = "hf://"
# a Hub commit is a 40-hex sha1; the snapshot folder holding a resolved file is named by it
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub reference that cannot be resolved: one line naming the repo, the file and the fix."""


@dataclass(frozen=True)
class HubRef:
    repo: str  # org/name
    file: str  # path inside the repo
    revision: str | None = None  # as written after @ (a branch, tag or commit); None: main

    @property
    def text(self) -> str:
        return f"{SCHEME}{self.repo}/{self.file}" + (f"@{self.revision}" if self.revision else "")

    def fetch_command(self) -> str:
        """The command that puts the file into the local cache (run where the Hub is reachable)."""
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"huggingface-cli download {self.repo} {self.file}{rev}"


@dataclass(frozen=True)
class Resolved:
    """A reference, the local file it resolved to and the commit of the snapshot holding it."""

    ref: HubRef
    path: Path
    commit: str

    def record(self) -> dict[str, str]:
        """What outputs record of it: {repo, file, revision, commit}."""
        return {"repo": self.ref.repo, "file": self.ref.file, "revision": self.ref.revision or "main",
                "commit": self.commit}


def is_hub_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse(text: str) -> HubRef:
    """`hf://org/repo/path/in/repo[@revision]`; one line naming what is wrong otherwise."""
    if not is_hub_ref(text):
        raise HubError(f"{text!r} is not a Hub reference: write hf://org/repo/path/in/repo[@revision]")
    body = text[len(SCHEME):]
    body, _, revision = body.partition("@")
    parts = [p for p in body.split("/")]
    if len(parts) < 3 or any(not p for p in parts) or ".." in parts:
        raise HubError(f"{text}: a Hub reference names the organisation, the repo and the file, e.g. "
                       "hf://FoundationVision/LlamaGen/c2i_L_384.pt@<commit>")
    if "@" in text and not revision:
        raise HubError(f"{text}: nothing after '@': write a branch, tag or commit, or leave out '@'")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


_RESOLVED: dict[str, Resolved] = {}  # local path -> its reference, for the provenance of this process's outputs


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but read now (its constants are read once, at its import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) if value is None else value.upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """huggingface_hub's cache folder (HF_HUB_CACHE, else $HF_HOME/hub), read now for the same reason."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve(text: str) -> Resolved:
    """The local file of a Hub reference, downloaded through huggingface_hub into its cache unless offline
    (HF_HUB_OFFLINE=1: the cache only); one line naming repo, file and the command that fetches it otherwise."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = parse(text)
    where = f"{ref.text} (repo {ref.repo}, file {ref.file}, revision {ref.revision or 'main'})"
    try:
        local = hf_hub_download(ref.repo, ref.file, revision=ref.revision, cache_dir=cache_dir(), local_files_only=offline())
    except GatedRepoError:
        raise HubError(f"{where}: this repo is gated and this account has no access: accept its terms on the Hub, then "
                       "`huggingface-cli login`") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such repo, or it is private and this account has no access: check the name, or "
                       "`huggingface-cli login` with an account that can read it") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {ref.revision!r}: name an existing branch, tag or commit") from None
    except LocalEntryNotFoundError:  # before EntryNotFoundError: a subclass of it
        raise HubError(_not_cached(ref, where)) from None
    except EntryNotFoundError:
        raise HubError(f"{where}: the repo has no file {ref.file!r} at this revision: check the file's path in the repo") from None
    path = Path(local)
    commit = path.relative_to(_snapshots(ref)).parts[0] if path.is_relative_to(_snapshots(ref)) else ""
    if not COMMIT.match(commit):  # a file from elsewhere (local_dir): never an unpinned record
        raise HubError(f"{where}: resolved to {path}, outside the cache's snapshots/<commit>/ folders")
    resolved = _safetensors_sibling(ref, commit) or Resolved(ref, path, commit)
    _RESOLVED[str(resolved.path)] = resolved
    return resolved


PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def _safetensors_sibling(ref: HubRef, commit: str) -> Resolved | None:
    """The same weights as `<stem>.safetensors` at the same commit, where the repo has them: preferred to a pickle
    (docs/safety.md: a safetensors file holds tensors only; the pickle would be read weights-only anyway)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    stem, suffix = os.path.splitext(ref.file)
    if suffix not in PICKLE_SUFFIXES:
        return None
    sibling = HubRef(ref.repo, f"{stem}.safetensors", ref.revision)
    try:
        path = hf_hub_download(ref.repo, sibling.file, revision=commit, cache_dir=cache_dir(), local_files_only=offline())
    except EntryNotFoundError:  # not in the repo (or, offline, not in the cache): the file named
        return None
    return Resolved(sibling, Path(path), commit)


def _snapshots(ref: HubRef) -> Path:
    return cache_dir() / f"models--{ref.repo.replace('/', '--')}" / "snapshots"


def _not_cached(ref: HubRef, where: str) -> str:
    """Offline and not in the cache: say which part is missing (repo, revision, file) and how to fetch it."""
    snapshots = _snapshots(ref)
    repo_dir = snapshots.parent
    fix = f"run `{ref.fetch_command()}` where the Hub is reachable (or unset HF_HUB_OFFLINE)"
    if not repo_dir.is_dir():
        return f"{where}: not in the local Hub cache {repo_dir.parent} (offline: HF_HUB_OFFLINE=1): {fix}"
    revision = ref.revision or "main"
    ref_file = repo_dir / "refs" / revision
    commit = ref_file.read_text(encoding="ascii").strip() if ref_file.is_file() else revision
    if not (snapshots / commit).is_dir():
        return f"{where}: the local Hub cache holds no revision {revision!r} of this repo (offline): {fix}"
    return f"{where}: the cached revision {commit[:12]} of this repo holds no file {ref.file!r} (offline): {fix}"


def local_path(value: str | os.PathLike) -> Path:
    """A command-line path or Hub reference -> the local file to read."""
    return resolve(value).path if is_hub_ref(value) else Path(value)


def inputs_record(*paths: str | os.PathLike | None) -> list[dict[str, str]]:
    """{repo, file, revision, commit} of each of `paths` resolved from the Hub in this process (all of them when no
    path is given): what an output's provenance records of its Hub inputs."""
    chosen = _RESOLVED.values() if not paths else (_RESOLVED[str(p)] for p in paths if p is not None and str(p) in _RESOLVED)
    return [r.record() for r in chosen]


def resolved_of(path: str | os.PathLike) -> Resolved | None:
    return _RESOLVED.get(str(path))


def forget() -> None:
    """Clear the record (a new command in the same process: tests invoking the CLI in process)."""
    _RESOLVED.clear()


__all__ = ["COMMIT", "HubError", "HubRef", "Resolved", "cache_dir", "forget", "inputs_record", "is_hub_ref", "local_path", "parse",
           "resolve", "resolved_of"]
