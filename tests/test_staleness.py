"""Staleness is decided on purpose (pipeline/versions.py), not by which source files changed (issue 31).

A reference cache records the LOGP_VERSION it was computed by and is refused under another one; its file
digest (logp_code) is a note only. A token store's encoder version enters its build_key from version 2 on.
End to end: in a tiny DVC repository, editing a message of the cache code, a loader's message and a --help
string leaves tokenize and reflogp clean and train accepts the cache; bumping LOGP_VERSION does neither.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from worlds import write_reference_images

from pipeline.formats import FormatError, RefCacheParts, read_ref_cache, write_ref_cache
from pipeline.outputs import OutputError
from pipeline.refcache import draw_pairs
from pipeline.versions import LOGP_VERSION

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROV = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 0, "num_classes": 2, "null_class": 2, "seq_len": 4,
        "logp_code": {"pipeline/refcache.py": "0" * 64}}


def _columns(n: int) -> dict:
    rng = np.random.default_rng(2)
    pairs = draw_pairs(np.arange(n, dtype=np.int32) % 2, 1, 2, seed=0)
    return {**pairs, "ref_logp_pos": rng.normal(-20, 1, n), "ref_logp_neg": rng.normal(-21, 1, n),
            "ref_logp_null": rng.normal(-20, 1, n)}


def test_a_cache_of_another_logp_version_is_refused_in_one_line(tmp_path):
    path = tmp_path / "c.parquet"
    write_ref_cache(path, _columns(6), {**PROV, "logp_version": LOGP_VERSION + 1})
    with pytest.raises(FormatError) as e:
        read_ref_cache(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"log-prob version {LOGP_VERSION + 1}" in message and f"computes version {LOGP_VERSION}" in message
    assert "`cca-pipe reflogp`" in message and "`dvc repro reflogp`" in message


def test_a_cache_whose_code_files_changed_is_accepted(tmp_path):
    """The file digest differs from anything the code has now: a note, no reason to refuse."""
    path = tmp_path / "c.parquet"
    columns = _columns(6)
    write_ref_cache(path, columns, {**PROV, "logp_version": LOGP_VERSION, "logp_code": {"pipeline/refcache.py": "1" * 64}})
    read, meta = read_ref_cache(path, expect={"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64})
    assert np.array_equal(read["ref_logp_pos"], columns["ref_logp_pos"])
    assert meta["logp_code"] == {"pipeline/refcache.py": "1" * 64}


def test_a_cache_from_before_versions_is_version_1_with_a_note(tmp_path, caplog):
    path = tmp_path / "c.parquet"
    write_ref_cache(path, _columns(6), PROV)  # logp_code only, as every cache written before issue 31
    with caplog.at_level(logging.WARNING):
        read_ref_cache(path)
    notes = [r.getMessage() for r in caplog.records if "logp_version" in r.getMessage()]
    assert len(notes) == 1 and "taken as version 1" in notes[0] and str(path) in notes[0]
    assert LOGP_VERSION == 1  # once it is bumped, these caches are refused like any of another version:
    if LOGP_VERSION != 1:  # pragma: no cover - kept for the day of the bump
        with pytest.raises(FormatError, match="log-prob version 1"):
            read_ref_cache(path)


def test_a_resumed_computation_keeps_parts_of_other_code_files_not_of_another_version(tmp_path):
    prov = {**PROV, "logp_version": LOGP_VERSION}
    columns = _columns(8)
    first = RefCacheParts(tmp_path / "c.parquet", 8, 4, prov, tmp_path / "parts")
    first.write_part(0, {k: v[:4] for k, v in columns.items()})
    assert first.pending() == [1]
    edited = {**prov, "logp_code": {"pipeline/refcache.py": "2" * 64}}  # a message edited between the two runs
    assert RefCacheParts(tmp_path / "c.parquet", 8, 4, edited, tmp_path / "parts").pending() == [1]
    bumped = {**prov, "logp_version": LOGP_VERSION + 1}
    assert RefCacheParts(tmp_path / "c.parquet", 8, 4, bumped, tmp_path / "parts").pending() == [0, 1]


def test_a_run_killed_while_writing_a_part_is_resumed_not_refused(tmp_path):
    """SIGKILL runs no `except`: the part being written stays behind as atomic_file's temporary file. The rerun's
    claim takes the folder as its own unfinished cache (it refused it once: a `make test` under load), removes that
    file and computes only the missing part."""
    from pipeline.formats import claim_ref_cache

    prov = {**PROV, "logp_version": LOGP_VERSION}
    columns, out = _columns(8), tmp_path / "c.parquet"
    claim = claim_ref_cache(out)
    first = RefCacheParts(out, 8, 4, prov, claim.partial)
    first.write_part(0, {k: v[:4] for k, v in columns.items()})
    leftover = claim.partial / f".{first.part_path(1).name}.4242.tmp"
    leftover.write_bytes(b"PAR1 half a part")
    claim.check()  # no OutputError
    rerun = RefCacheParts(out, 8, 4, prov, claim.partial)
    assert not leftover.exists() and rerun.pending() == [1]
    (claim.partial / "notes.txt").write_text("mine", encoding="utf-8")  # anything else is still refused
    with pytest.raises(OutputError, match="not cca-pipe's own"):
        claim.check()


def test_the_encoding_version_enters_the_build_key_from_2_on(monkeypatch):
    """Version 1 keeps the key every store was built with (no ImageNet store is encoded again for the version's
    introduction); a bump changes it, and tokenize then encodes every image again."""
    from pipeline.config import settings_digest
    from stages import tokenize

    cfg, paths, labels = tokenize.TokenizeConfig(), [Path("a/0.png"), Path("b/1.png")], np.array([0, 1], np.int32)
    before_versions = settings_digest([cfg, "s" * 64, [tokenize.path_key(p) for p in paths],
                                       hashlib.sha256(labels.tobytes()).hexdigest()])
    monkeypatch.setattr(tokenize, "TOKEN_ENCODING_VERSION", 1)
    assert tokenize.build_key(cfg, paths, labels, "s" * 64) == before_versions
    monkeypatch.setattr(tokenize, "TOKEN_ENCODING_VERSION", 2)
    assert tokenize.build_key(cfg, paths, labels, "s" * 64) != before_versions


# ------------------------------------------------------------------------------- end to end, with DVC

TINY = {"tokenize": {"image_size": 16, "augment": "flip", "batch_size": 8, "chunk_rows": 8},
        "reflogp": {"views": "one", "batch_size": 8, "part_rows": 8, "visits": 1},
        "train": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "save_every": 0}}
GPT = dict(dim=32, n_layer=2, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ = dict(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, norm_groups=8,
          codebook_used_size=32)
# (file, text in it, its edit): a cache message, a loader's message, a --help string
EDITS = [
    ("pipeline/refcache.py", "out of memory computing", "ran out of memory computing"),
    ("pipeline/loaders.py", "carries no model config: name one", "carries no model config; name one"),
    ("stages/cli/main.py", 'help="params file"', 'help="the params file"'),
]


def _run(args: list, cwd: Path, ok: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the copy's code
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The root dvc.yaml's tokenize and reflogp stages, as shipped, on 24 random images, a random VQ and GPT."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.llamagen import GPT as GPTModel
    from pipeline.models.llamagen import GPTConfig
    from pipeline.tokenizers.vq import VQConfig, VQModel

    repo = tmp_path_factory.mktemp("staleness")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("tokenize", "reflogp")}}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_reference_images(repo / "data/images/train", np.random.default_rng(0), classes=3, per_class=8)
    torch.manual_seed(0)
    (repo / "data/vq").mkdir(parents=True)
    (repo / "data/ar").mkdir(parents=True)
    save_checkpoint(repo / "data/vq/vq.pt", VQModel(VQConfig(**VQ)).state_dict(), VQConfig(**VQ).to_dict(), kind="llamagen-vq")
    save_checkpoint(repo / "data/ar/gpt.pt", GPTModel(GPTConfig(**GPT)).state_dict(), GPTConfig(**GPT).to_dict(),
                    kind="llamagen-gpt")
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "staleness@test"], repo)
    _run(["git", "config", "user.name", "staleness"], repo)
    _run([BIN / "dvc", "init", "-q"], repo)
    _run([BIN / "dvc", "config", "core.analytics", "false"], repo)
    _run([BIN / "dvc", "repro", "-q"], repo)
    return repo


def test_editing_messages_and_help_leaves_the_cache_and_tokens_valid(repo: Path):
    assert "up to date" in _run([BIN / "dvc", "status"], repo)
    for name, old, new in EDITS:
        _edit(repo / name, old, new)
    status = _run([BIN / "dvc", "status"], repo)
    assert "up to date" in status and "changed" not in status, status
    train = ["cca-pipe", "train", "--tokens", "data/tokens/train.zarr", "--cache", "data/reflogp/ref_logp.parquet",
             "--init", "data/ar/gpt.pt"]
    _run([*train, "--out", "data/train"], repo)  # the edited code accepts the cache (and its step-0 check passes)
    assert (repo / "data/train/policy.pt").is_file()

    # the same test fails when the version moves: DVC reruns reflogp and train refuses the cache in one line
    _edit(repo / "pipeline/versions.py", f"LOGP_VERSION = {LOGP_VERSION}", f"LOGP_VERSION = {LOGP_VERSION + 1}")
    try:
        status = _run([BIN / "dvc", "status"], repo)
        assert "reflogp" in status and "changed deps" in status, status
        refused = _run([*train, "--out", "data/train2"], repo, ok=False)
        assert f"computed by log-prob version {LOGP_VERSION}, this cca-pipe computes version {LOGP_VERSION + 1}" in refused
        assert "Traceback" not in refused
    finally:
        _edit(repo / "pipeline/versions.py", f"LOGP_VERSION = {LOGP_VERSION + 1}", f"LOGP_VERSION = {LOGP_VERSION}")
    assert "up to date" in _run([BIN / "dvc", "status"], repo)
