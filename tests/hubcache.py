"""A local Hugging Face Hub cache in huggingface_hub's documented layout (models--{org}--{name}/blobs/<sha256>,
snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<branch> holding the commit), so tests resolve
`hf://` references offline: what `huggingface-cli download` leaves behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_of(*parts: str) -> str:
    """A 40-hex commit id (the Hub's are sha1s), derived from a name so tests can name it."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def add_file(cache: Path, repo: str, file: str, source: Path, commit: str, branch: str | None = "main") -> Path:
    """Put `source` into the cache as `file` of `repo` at `commit` (and point `branch` at it); the snapshot path."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    data = Path(source).read_bytes()
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / file
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    if branch:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / branch).write_text(commit)
    return link


def offline_env(home: Path) -> dict[str, str]:
    """The environment of an offline process whose Hub cache is `home`/hub."""
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}
