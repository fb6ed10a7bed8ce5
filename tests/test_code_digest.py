"""The code digest that makes a reference cache stale: it covers the forward path's files (following
imports) and nothing else, and a cache computed by other code is refused naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from worlds import REF_PROVENANCE, ref_columns

from pipeline import codefiles
from pipeline.families import LLAMAGEN, VAR
from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.refcache import draw_pairs

# ------------------------------------------------------------------------------------ code digest


def test_stale_logp_code_is_refused_naming_the_file(tmp_path):
    current = LLAMAGEN.logp_code()
    assert {"pipeline/models/llamagen.py", "pipeline/refcache.py", "pipeline/logprobs.py"} <= set(current)
    old = {**current, "pipeline/models/llamagen.py": "0" * 64}
    pairs = draw_pairs(np.arange(6, dtype=np.int32) % 2, 1, 2, seed=0)
    write_ref_cache(tmp_path / "c.parquet", ref_columns(pairs), {**REF_PROVENANCE, "logp_code": old})
    with pytest.raises(FormatError, match=r"stale: its logp_code differs in \['pipeline/models/llamagen.py'\]"):
        read_ref_cache(tmp_path / "c.parquet", expect={"logp_code": current})
    read_ref_cache(tmp_path / "c.parquet", expect={"logp_code": old})  # the code it was computed with: accepted


def test_logp_code_covers_the_forward_path_only(tmp_path, monkeypatch):
    """Editing the lock or atomic-write code (outputs.py), the config or checkpoint readers keeps a reference
    cache valid; editing the model's forward or the log-prob sum makes it stale, naming the file."""
    import shutil

    shutil.copytree(codefiles.ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codefiles, "ROOT", tmp_path)
    before = {family.name: family.logp_code() for family in (LLAMAGEN, VAR)}
    assert {"pipeline/logprobs.py", "pipeline/refcache.py", "pipeline/models/layers.py"} <= set(before["var"])
    for harmless in ("outputs.py", "config.py", "checkpoint.py", "distributed.py", "progress.py", "memplan.py"):
        path = tmp_path / "pipeline" / harmless
        path.write_text(path.read_text() + "\n# edited\n")
    assert {family.name: family.logp_code() for family in (LLAMAGEN, VAR)} == before
    forward = tmp_path / "pipeline/models/llamagen.py"
    forward.write_text(forward.read_text().replace("return token_logp(", "return 0.0 + token_logp("))
    after = LLAMAGEN.logp_code()
    assert [k for k in after if after[k] != before["llamagen"][k]] == ["pipeline/models/llamagen.py"]
    pairs = draw_pairs(np.arange(6, dtype=np.int32) % 2, 1, 2, seed=0)
    write_ref_cache(tmp_path / "c.parquet", ref_columns(pairs), {**REF_PROVENANCE, "logp_code": before["llamagen"]})
    with pytest.raises(FormatError, match=r"differs in \['pipeline/models/llamagen.py'\]"):
        read_ref_cache(tmp_path / "c.parquet", expect={"logp_code": after})


def test_code_digest_follows_imports(tmp_path, monkeypatch):
    """A tiny package: pipeline/a.py does `from . import b`; the digest of ["pipeline.a"] covers a.py, b.py
    and the package's __init__.py; editing b.py changes only b.py's entry, and a cache computed before
    the edit is refused naming pipeline/b.py."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\n\ndef f():\n    return b.g()\n")
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    monkeypatch.setattr(codefiles, "ROOT", tmp_path)
    before = codefiles.code_digest(["pipeline.a"])
    assert set(before) == {"pipeline/__init__.py", "pipeline/a.py", "pipeline/b.py"}
    (pkg / "unrelated.py").write_text("X = 2\n")
    assert codefiles.code_digest(["pipeline.a"]) == before
    (pkg / "b.py").write_text("def g():\n    return 2\n")
    after = codefiles.code_digest(["pipeline.a"])
    assert [k for k in before if before[k] != after[k]] == ["pipeline/b.py"]
    pairs = draw_pairs(np.arange(6, dtype=np.int32) % 2, 1, 2, seed=0)
    write_ref_cache(tmp_path / "c.parquet", ref_columns(pairs), {**REF_PROVENANCE, "logp_code": before})
    with pytest.raises(FormatError, match=r"differs in \['pipeline/b.py'\]"):
        read_ref_cache(tmp_path / "c.parquet", expect={"logp_code": after})
