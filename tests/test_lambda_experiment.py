"""A lambda experiment (`dvc exp run -S train.lambda=3`) on the tiny pipeline (tests/tiny_pipeline.py, a copy of
its own) must reuse the tokens and the reference cache: only train and eval rerun."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_pipeline import BIN, _run, copy_of


@pytest.fixture
def repo(tiny_pipeline: Path, tmp_path: Path) -> Path:
    return copy_of(tiny_pipeline, tmp_path / "repo")


def test_lambda_experiment_reuses_reference_cache(repo: Path):
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    cache_before = (repo / "data/reflogp/ref_logp.parquet").stat().st_mtime_ns
    log = _run([str(BIN / "dvc"), "exp", "run", "-S", "train.lambda=3"], repo)
    for stage in ("prepare", "pretrain-vq", "tokenize", "pretrain-ar", "reflogp"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'eval'" in log
    assert (repo / "data/reflogp/ref_logp.parquet").stat().st_mtime_ns == cache_before
