"""Issue 29: the four "silent wrong results" (exit 0 on main ad9fd3b), each now a refusal or the right value.

1. YAML 1.1 numbers: `lambda: 010` read as 8 and `1:30` as 90 (params files and `--set`).
2. A cache edited in a few rows after it was written trained (the step-0 check scored the first 64 rows of
   the epoch order only): now a content digest written with the cache is verified on every read, and the
   step-0 check samples rows over the whole cache.
3. tokenize called a store "up to date" after a rewrite that kept size and mtime (`cp -p`): the stat key
   now holds ctime and inode too, and `--rehash` hashes every image.
4. A file listed as ours in `.cca-pipe.json` whose bytes the user replaced was overwritten or deleted: it
   is the user's now (kept, or refused where a run writes).
docs/safety.md ("What is and is not detected") states what these tests measure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_hostile_inputs import tiny_world
from worlds import invoke

from pipeline.formats import FormatError, RefCacheParts, read_cache_provenance, read_ref_cache, write_ref_cache
from pipeline.outputs import MARKER, OutputError, StageDir, read_json
from pipeline.refcache import CHECK_ROWS, draw_pairs

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]


# ------------------------------------------------------------------------------------- 1. YAML 1.1 numbers


def test_leading_zeros_and_prefixed_numbers_read_as_yaml_1_2(tmp_path):
    """`010` is 10 (YAML 1.1: octal 8), as DVC's ruamel.yaml reads the same file; 0o10 is octal, 0x10 hex."""
    from stages.cli.params import build, load_params, parse_overrides
    from stages.train import TrainConfig

    (tmp_path / "params.yaml").write_text("train:\n  lambda: 010\n")
    assert build(TrainConfig, load_params(tmp_path / "params.yaml"), "train").lam == 10.0  # ad9fd3b: 8.0
    (tmp_path / "params.yaml").write_text("train:\n  lambda: 010\n  beta: 0o10\n  seed: 0x10\n  lr: 1e-5\n  max_steps: 1_000\n")
    cfg = build(TrainConfig, load_params(tmp_path / "params.yaml"), "train")
    assert (cfg.lam, cfg.beta, cfg.seed, cfg.lr, cfg.max_steps) == (10.0, 8.0, 16, 1e-5, 1000)
    assert build(TrainConfig, {}, "train", overrides=parse_overrides(["train.lambda=010"])).lam == 10.0
    assert parse_overrides(["train.lambda=-010"]) == {"train": {"lambda": -10}}


@pytest.mark.parametrize("how", ["file", "set"])
def test_a_base_60_number_is_refused_in_one_line_naming_the_key(how, tmp_path, monkeypatch, capsys):
    """`lambda: 1:30` was 90.0 (YAML 1.1 base 60); in YAML 1.2 it is the text '1:30', which a number setting
    refuses, naming the file and the key."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if how == "file":
        text = (tmp_path / "params.yaml").read_text()
        (tmp_path / "params.yaml").write_text(text.replace(f"  lambda: {params['train']['lambda']}\n", "  lambda: 1:30\n", 1))
        assert "lambda: 1:30" in (tmp_path / "params.yaml").read_text()
        argv = ["--params", tmp_path / "params.yaml", "config", "train"]
    else:
        argv = ["--params", tmp_path / "params.yaml", "--set", "train.lambda=1:30", "config", "train"]
    code, err = invoke(argv, monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "params.yaml" in lines[0] and "lambda" in lines[0] and "'1:30'" in lines[0], lines[0]


def test_dvc_yaml_variables_read_numbers_as_params_do(tmp_path):
    """`${image_size}` on a dvc.yaml command line: 10, as DVC (YAML 1.2) substitutes it, not 8."""
    from stages.cli.dvcstage import _variables

    (tmp_path / "params.yaml").write_text("image_size: 010\nwhen: 1:30\n")
    assert _variables(tmp_path, {"vars": ["params.yaml"]}) == {"image_size": 10, "when": "1:30"}


# ------------------------------------------------------------------------------------- 2. the reference cache


PROV = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 0, "num_classes": 10, "null_class": 10,
        "seq_len": 4}


def _cache_columns(n: int = 1438) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    pairs = draw_pairs(rng.integers(0, 10, n).astype(np.int32), 1, 10, seed=0)
    return {**pairs, "ref_logp_pos": rng.normal(-300, 5, n), "ref_logp_neg": rng.normal(-310, 5, n),
            "ref_logp_null": rng.normal(-305, 5, n)}


def _edited_copy(path: Path, out: Path, edit) -> Path:
    """The cache with `edit(columns)` applied in place, its metadata (provenance and digest) kept: what an
    edit of the file after `reflogp` wrote it looks like."""
    table = pq.read_table(path)
    columns = {k: table.column(k).to_numpy().copy() for k in table.column_names}
    edit(columns)
    pq.write_table(pa.Table.from_pydict(columns, schema=table.schema), out)
    return out


def _swap_pos_neg(row: int):
    def edit(c):
        c["ref_logp_pos"][row], c["ref_logp_neg"][row] = c["ref_logp_neg"][row], c["ref_logp_pos"][row]
    return edit


@pytest.mark.parametrize("row", [5, 700, 1437])
def test_a_cache_edited_in_one_row_is_refused_on_read(row, tmp_path):
    """The issue's case: ref_logp_pos and ref_logp_neg swapped in one row of a 1,438-row cache. Every check
    but the digest passes it (finite, labels in range, rows complete)."""
    write_ref_cache(tmp_path / "c.parquet", _cache_columns(), PROV)
    read_ref_cache(tmp_path / "c.parquet")  # as written: accepted
    bad = _edited_copy(tmp_path / "c.parquet", tmp_path / "bad.parquet", _swap_pos_neg(row))
    with pytest.raises(FormatError) as e:
        read_ref_cache(bad)
    message = str(e.value)
    assert "bad.parquet" in message and "ref_logp_pos, ref_logp_neg" in message and "cca-pipe reflogp" in message
    assert "ref_logp_null" not in message and "\n" not in message


def test_the_digest_is_of_the_values_in_row_order_and_a_merged_cache_has_the_whole_ones(tmp_path):
    """content_sha256[column] = sha256 of the column's little-endian bytes (derived here with hashlib, not
    the code's helper); a cache merged from parts records the digest of all its rows, not of part 0's."""
    from pipeline.formats import CONTENT_KEY

    columns = _cache_columns()
    expected = {name: hashlib.sha256(np.asarray(columns[name]).astype(dtype).tobytes()).hexdigest() for name, dtype in (
        ("row", "<i8"), ("label", "<i4"), ("neg_label", "<i4"), ("view", "<i2"),
        ("ref_logp_pos", "<f8"), ("ref_logp_neg", "<f8"), ("ref_logp_null", "<f8"))}
    write_ref_cache(tmp_path / "one.parquet", columns, PROV)
    assert read_cache_provenance(tmp_path / "one.parquet")[CONTENT_KEY] == expected
    parts = RefCacheParts(tmp_path / "merged.parquet", 1438, 500, PROV, tmp_path / "merged.parquet.partial")
    for k in parts.pending():
        start, stop = parts.part_range(k)
        parts.write_part(k, {name: v[start:stop] for name, v in columns.items()})
    _edited_copy(parts.part_path(1), parts.part_path(1), _swap_pos_neg(3))  # a part damaged before the merge
    assert parts.pending() == [1]
    parts.write_part(1, {name: v[500:1000] for name, v in columns.items()})
    parts.merge()
    assert pq.ParquetFile(tmp_path / "merged.parquet").metadata.num_row_groups == 3
    assert read_cache_provenance(tmp_path / "merged.parquet")[CONTENT_KEY] == expected
    read_ref_cache(tmp_path / "merged.parquet")
    with pytest.raises(FormatError, match="ref_logp_null"):  # a row in the last part
        read_ref_cache(_edited_copy(tmp_path / "merged.parquet", tmp_path / "bad.parquet",
                                    lambda c: c["ref_logp_null"].__setitem__(1400, c["ref_logp_null"][1400] + 1.0)))


def test_a_cache_written_before_the_digest_is_accepted_with_a_note(tmp_path, caplog):
    """Refusing would throw away the GPU-hours of every older cache: it is read, with one warning line."""
    from pipeline.formats import CONTENT_KEY

    write_ref_cache(tmp_path / "c.parquet", _cache_columns(), PROV)
    table = pq.read_table(tmp_path / "c.parquet")
    meta = {k: v for k, v in table.schema.metadata.items() if k != CONTENT_KEY.encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "old.parquet")
    with caplog.at_level(logging.WARNING):
        columns, provenance = read_ref_cache(tmp_path / "old.parquet")
    assert CONTENT_KEY not in provenance and np.array_equal(columns["ref_logp_pos"], _cache_columns()["ref_logp_pos"])
    notes = [r.getMessage() for r in caplog.records if "no content digest" in r.getMessage()]
    assert len(notes) == 1 and "old.parquet" in notes[0] and "\n" not in notes[0]


def test_step0_rows_cover_the_whole_cache_one_per_span():
    from pipeline.alignment import step0_rows

    n = 1438
    rows = step0_rows(n, seed=0)
    assert len(rows) == CHECK_ROWS == 64
    spans = np.floor(np.arange(65) * n / 64).astype(int)  # span k = [spans[k], spans[k+1])
    assert all(spans[k] <= r < spans[k + 1] for k, r in enumerate(rows))
    assert np.array_equal(rows, step0_rows(n, seed=0)) and not np.array_equal(rows, step0_rows(n, seed=1))
    assert step0_rows(10, seed=0).tolist() == list(range(10))  # a cache smaller than the sample: every row


class _ChunkedTokens(np.ndarray):
    """A token array that says it is stored in chunks of `chunk_rows` rows, as a TokenStore does."""

    chunk_rows = 50


def test_the_step0_check_sees_damage_where_the_first_batch_does_not_reach(tiny_gpt, tmp_path):
    """600 cache rows in 12 store chunks of 50, shuffle_buffer_chunks 2: the epoch order's first 64 rows come
    from 2 chunks. Swapping pos/neg over a chunk they do not visit (values rewritten with a valid digest:
    a cache computed wrong, or written by a tool that recomputed the digest) passed the step-0 check on
    ad9fd3b; it samples every 1/64th of the cache now, so it stops train naming the column."""
    from pipeline.alignment import AlignmentRun
    from pipeline.checkpoint import save_checkpoint
    from pipeline.distributed import World
    from pipeline.families import LLAMAGEN
    from pipeline.loaders import load_gpt
    from pipeline.refcache import CacheMismatch, ReferenceNoise, reference_logps
    from stages.train import TrainConfig

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(600, 1, 16), dtype=np.uint16).view(_ChunkedTokens)
    pairs = draw_pairs(rng.integers(0, 5, size=600).astype(np.int32), 1, 5, seed=1)
    save_checkpoint(tmp_path / "ref.pt", tiny_gpt.state_dict(), tiny_gpt.cfg.to_dict(), kind="llamagen-gpt")
    cache = {**pairs, **reference_logps(load_gpt(tmp_path / "ref.pt"), np.asarray(tokens), pairs, batch_size=100, device=CPU)}
    cfg = TrainConfig(batch_size=8, micro_batch_size=8, shuffle_buffer_chunks=2, uncond_ratio=0.0)

    def run() -> AlignmentRun:
        return AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, cache, cfg, CPU, World(), LLAMAGEN.param_groups)

    run().check_cache(ReferenceNoise(), "cache.parquet")  # the clean cache passes
    first_batch_chunks = set(run().order[:CHECK_ROWS] // 50)
    assert len(first_batch_chunks) <= 2
    damaged = max(set(range(12)) - first_batch_chunks)
    span = slice(50 * damaged, 50 * damaged + 50)
    cache["ref_logp_pos"][span], cache["ref_logp_neg"][span] = cache["ref_logp_neg"][span].copy(), cache["ref_logp_pos"][span].copy()
    with pytest.raises(CacheMismatch, match=r"cache\.parquet: column ref_logp_pos .* at its cache rows ") as e:
        run().check_cache(ReferenceNoise(), "cache.parquet")
    named = [int(r) for r in str(e.value).split("cache rows ")[1].split(" (")[0].split(", ")]
    assert named and all(span.start <= r < span.stop for r in named), named


def test_train_step0_rows_sets_the_check_and_its_cost_is_logged(tiny_gpt, tmp_path, caplog, monkeypatch):
    """train.step0_rows (issue 30 point 3: the check took 8 min 45 s of a 15-minute VAR trial on CPU) is the number
    of rows the step-0 check scores, its cost is logged, 0 turns it off with a warning (a damaged cache then
    trains), and the trained weights are the same whatever it is."""
    import pipeline.alignment
    from pipeline.alignment import AlignmentRun
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import ConfigError
    from pipeline.distributed import World
    from pipeline.families import LLAMAGEN
    from pipeline.loaders import load_gpt
    from pipeline.refcache import ReferenceNoise, check_cache_rows, reference_logps
    from stages.train import TrainConfig

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(200, 1, 16), dtype=np.uint16).view(_ChunkedTokens)
    pairs = draw_pairs(rng.integers(0, 5, size=200).astype(np.int32), 1, 5, seed=1)
    save_checkpoint(tmp_path / "ref.pt", tiny_gpt.state_dict(), tiny_gpt.cfg.to_dict(), kind="llamagen-gpt")
    cache = {**pairs, **reference_logps(load_gpt(tmp_path / "ref.pt"), np.asarray(tokens), pairs, batch_size=100, device=CPU)}
    scored = []
    monkeypatch.setattr(pipeline.alignment, "check_cache_rows", lambda *a, **k: (scored.append(len(a[4])), check_cache_rows(*a, **k)))
    caplog.set_level("INFO")

    def check(step0_rows: int) -> list[str]:
        caplog.clear()
        cfg = TrainConfig(batch_size=8, micro_batch_size=8, uncond_ratio=0.0, step0_rows=step0_rows)
        AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, cache, cfg, CPU, World(), LLAMAGEN.param_groups
                     ).check_cache(ReferenceNoise(), "cache.parquet")
        return [r.getMessage() for r in caplog.records if "step-0 check" in r.getMessage()]

    assert TrainConfig().step0_rows == CHECK_ROWS == 64
    for rows in (64, 10):
        lines = check(rows)
        assert scored[-1] == rows
        assert any(re.fullmatch(rf"step-0 check: {rows} rows scored in \d+\.\d s \(a reflogp pass: 3 sequences per row\); "
                                r"train.step0_rows sets it \(0: off\)", line) for line in lines), lines
    calls = len(scored)
    cache["ref_logp_pos"], cache["ref_logp_neg"] = cache["ref_logp_neg"], cache["ref_logp_pos"]  # damaged: the check's to see
    lines = check(0)  # no CacheMismatch: the damage goes unseen, as the warning says
    assert len(scored) == calls  # not scored at all
    assert len(lines) == 1 and "step-0 check off (train.step0_rows = 0)" in lines[0] and "trains without an error" in lines[0]
    with pytest.raises(ConfigError, match=r"train.step0_rows"):
        TrainConfig(step0_rows=-1)

    cache["ref_logp_pos"], cache["ref_logp_neg"] = cache["ref_logp_neg"], cache["ref_logp_pos"]
    weights = []
    for rows in (0, 64):
        cfg = TrainConfig(batch_size=8, micro_batch_size=8, uncond_ratio=0.0, epochs=0.2, lr=1e-2, step0_rows=rows)
        run = AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
        run.check_cache(ReferenceNoise(), "cache.parquet")
        for batch in run.batches():
            run.step(*batch)
        weights.append(run.finish().state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], tiny_gpt.state_dict()[k]) for k in weights[0])  # it trained


# ------------------------------------------------------------------------------------- 3. tokenize's stat key


def _tree(root: Path, n: int = 6) -> tuple[list[Path], list[str]]:
    (root / "a").mkdir(parents=True)
    paths = []
    for i in range(n):
        (root / "a" / f"{i}.bin").write_bytes(bytes([i]) * 1000)
        paths.append(root / "a" / f"{i}.bin")
    return paths, [p.relative_to(root).as_posix() for p in paths]


def _record(store: Path, inputs: list, chunk_rows: int = 4) -> None:
    from pipeline.outputs import write_json
    from pipeline.tokenstore import INPUTS_DIR, chunk_inputs_digest

    for k, start in enumerate(range(0, len(inputs), chunk_rows)):
        files = inputs[start : start + chunk_rows]
        write_json(store / INPUTS_DIR / f"{k}.json", {"digest": chunk_inputs_digest(files), "files": [list(f) for f in files]})


def _cp_p(source: Path, target: Path) -> None:
    """`cp source tmp; touch -r target tmp; cp -p tmp target`: target's inode, size and mtime, source's bytes."""
    st = target.stat()
    data = source.read_bytes()
    assert len(data) == st.st_size
    with open(target, "r+b") as f:
        f.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_a_rewrite_keeping_size_and_mtime_is_hashed_again(tmp_path, monkeypatch):
    """On ad9fd3b the record's size + mtime_ns matched and the old digest was reused; the ctime moved."""
    import pipeline.tokenstore as ts
    from pipeline.images import content_digest

    paths, names = _tree(tmp_path / "images")
    first = ts.known_inputs(paths, names, {})
    assert first == [None] * 6  # not in a record: hashed by the encoder's loader
    inputs = [ts.input_file(name, ts.read_image_file(p)[1], content_digest(p.read_bytes())) for p, name in zip(paths, names)]
    _record(tmp_path / "store", inputs)
    record = ts.read_input_record(tmp_path / "store")
    reads = []
    real = ts.read_image_file
    monkeypatch.setattr(ts, "read_image_file", lambda p: reads.append(Path(p).name) or real(p))
    assert ts.known_inputs(paths, names, record) == inputs and reads == []  # unchanged: stat() only
    _cp_p(paths[5], paths[1])
    now = ts.known_inputs(paths, names, record)
    assert reads == ["1.bin"] and now[1][3] == content_digest(bytes([5]) * 1000) != inputs[1][3]
    assert now[:1] + now[2:] == inputs[:1] + inputs[2:]
    reads.clear()
    assert ts.known_inputs(paths, names, record, rehash=True)[2:] == inputs[2:] and len(reads) == 6  # --rehash


def test_an_earlier_record_is_hashed_once_then_known_from_stat_again(tmp_path, monkeypatch):
    """A record without ctime and inode (written before them) matches no stat: each image is hashed once,
    refresh_input_record stores the full keys (same digests), and the next run reads nothing."""
    import pipeline.tokenstore as ts
    from pipeline.images import content_digest

    paths, names = _tree(tmp_path / "images")
    inputs = [ts.input_file(name, ts.read_image_file(p)[1], content_digest(p.read_bytes())) for p, name in zip(paths, names)]
    _record(tmp_path / "store", [f[:4] for f in inputs])  # the earlier format: path, size, mtime_ns, sha256
    before = {f: json.loads(f.read_text())["digest"] for f in (tmp_path / "store" / "inputs").glob("*.json")}
    again = ts.known_inputs(paths, names, ts.read_input_record(tmp_path / "store"))
    assert again == inputs
    assert ts.refresh_input_record(tmp_path / "store", again, 4) == 6
    assert {f: json.loads(f.read_text())["digest"] for f in before} == before  # what the chunks were encoded from
    monkeypatch.setattr(ts, "read_image_file", lambda p: pytest.fail(f"{p} was read"))
    assert ts.known_inputs(paths, names, ts.read_input_record(tmp_path / "store")) == inputs
    assert ts.refresh_input_record(tmp_path / "store", inputs, 4) == 0  # nothing to rewrite: nothing written


# ------------------------------------------------------------------------------------- 4. files listed as ours


def _commit(out: Path, files: dict[str, bytes]) -> None:
    with StageDir(out, "train", key="k") as claim:
        work = claim.open_partial()
        for name, data in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        claim.commit()


def test_our_file_overwritten_by_the_user_is_refused_not_replaced(tmp_path):
    """The user's bytes in policy.pt (same size and mtime as ours, as `cp -p` leaves them): the next commit
    stops before moving anything, naming the file; the user's bytes stay."""
    out = tmp_path / "train"
    _commit(out, {"policy.pt": b"ours-1", "log.csv": b"a"})
    (tmp_path / "mine.pt").write_bytes(b"theirs")
    _cp_p(tmp_path / "mine.pt", out / "policy.pt")
    with pytest.raises(OutputError) as e:
        _commit(out, {"policy.pt": b"ours-2", "log.csv": b"b"})
    assert str(e.value).startswith(f"{out / 'policy.pt'} was written by cca-pipe but its bytes have changed since")
    assert "move it away and rerun" in str(e.value) and "\n" not in str(e.value)
    assert (out / "policy.pt").read_bytes() == b"theirs" and (out / "log.csv").read_bytes() == b"a"


def test_our_file_changed_by_the_user_is_kept_when_a_run_no_longer_writes_it(tmp_path):
    out = tmp_path / "train"
    _commit(out, {"policy.pt": b"v1", "checkpoints/0000010.pt": b"c10", "checkpoints/0000020.pt": b"c20"})
    (out / "checkpoints" / "0000010.pt").write_bytes(b"my fine-tune")  # changed: the user's now
    copy = (out / "checkpoints" / "0000020.pt").read_bytes()  # copied back (new inode, same bytes): still ours
    (out / "checkpoints" / "0000020.pt").unlink()
    (out / "checkpoints" / "0000020.pt").write_bytes(copy)
    _commit(out, {"policy.pt": b"v2"})
    assert (out / "checkpoints" / "0000010.pt").read_bytes() == b"my fine-tune"
    assert not (out / "checkpoints" / "0000020.pt").exists() and (out / "policy.pt").read_bytes() == b"v2"
    marker = read_json(out / MARKER)
    assert marker["files"] == ["policy.pt"] and list(marker["written"]) == ["policy.pt"]
    assert marker["written"]["policy.pt"][4] == hashlib.sha256(b"v2").hexdigest()
    with pytest.raises(OutputError, match="0000010.pt is not cca-pipe's own"):  # no longer ours: as any user file
        _commit(out, {"policy.pt": b"v3", "checkpoints/0000010.pt": b"c10"})


def test_a_marker_of_the_earlier_format_still_owns_its_files(tmp_path):
    """No recorded bytes (a directory written before this change): listed files stay ours, as before."""
    out = tmp_path / "train"
    _commit(out, {"policy.pt": b"v1", "old.pt": b"o"})
    marker = read_json(out / MARKER)
    (out / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "written"}))
    (out / "old.pt").write_bytes(b"changed, but nothing says so")
    _commit(out, {"policy.pt": b"v2"})
    assert not (out / "old.pt").exists() and (out / "policy.pt").read_bytes() == b"v2"


# ------------------------------------------------------------------------------------- the cases end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_world(tmp_path_factory.mktemp("integrity"))


def _train_argv(world: Path, cache: Path, out: Path) -> list:
    return ["--params", world / "params.yaml", "train", "--tokens", world / "tokens.zarr", "--cache", cache,
            "--init", world / "gpt.pt", "--out", out]


def test_train_refuses_a_cache_with_one_row_swapped(world, tmp_path, monkeypatch, capsys):
    """The issue's repro through the command line: pos/neg swapped in cache row 5 of 16; exit 2, one line
    naming the cache, no train output."""
    bad = _edited_copy(world / "cache.parquet", tmp_path / "bad.parquet", _swap_pos_neg(5))
    code, err = invoke(_train_argv(world, bad, tmp_path / "train"), monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "bad.parquet" in lines[0] and "ref_logp_pos, ref_logp_neg" in lines[0], err
    assert not (tmp_path / "train").exists() and not (tmp_path / "train.partial").exists()
    code, err = invoke(_train_argv(world, world / "cache.parquet", tmp_path / "train"), monkeypatch, capsys)
    assert code == 0, err


def test_train_keeps_a_policy_the_user_put_in_place_of_ours(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "train"
    assert invoke(_train_argv(world, world / "cache.parquet", out), monkeypatch, capsys)[0] == 0
    theirs = b"x" * (out / "policy.pt").stat().st_size
    (tmp_path / "theirs.pt").write_bytes(theirs)
    _cp_p(tmp_path / "theirs.pt", out / "policy.pt")
    code, err = invoke(_train_argv(world, world / "cache.parquet", out), monkeypatch, capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "policy.pt was written by cca-pipe but its bytes have changed" in lines[0], err
    assert (out / "policy.pt").read_bytes() == theirs


def test_tokenize_sees_a_cp_p_rewrite_and_rehash_rereads_everything(world, tmp_path, monkeypatch, capsys, caplog):
    """`cp other.png tmp; touch -r a.png tmp; cp -p tmp a.png`: the store is rebuilt equal to a fresh one's
    (ad9fd3b: "up to date"); a plain rerun then reads no image; --rehash reads every image."""
    import shutil

    import pipeline.tokenstore as ts

    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    target, source = images / "a" / "1.png", images / "b" / "2.png"
    assert target.stat().st_size == source.stat().st_size  # random 16x16 PNGs: equal sizes
    argv = ["--params", world / "params.yaml", "tokenize", "--images", images, "--vq", world / "vq.pt", "--out", tmp_path / "t.zarr"]
    assert invoke(argv, monkeypatch, capsys)[0] == 0
    _cp_p(source, target)
    with caplog.at_level(logging.INFO):
        assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert "up to date" not in caplog.text and "the images of 1 finished chunks changed" in caplog.text
    fresh = ["--params", world / "params.yaml", "tokenize", "--images", images, "--vq", world / "vq.pt", "--out", tmp_path / "f.zarr"]
    assert invoke(fresh, monkeypatch, capsys)[0] == 0

    def fingerprint(store: Path) -> str:
        return json.loads((store / "zarr.json").read_text())["attributes"]["fingerprint"]

    assert fingerprint(tmp_path / "t.zarr") == fingerprint(tmp_path / "f.zarr") != fingerprint(world / "tokens.zarr")
    reads = []
    real = ts.read_image_file
    monkeypatch.setattr(ts, "read_image_file", lambda p: reads.append(p) or real(p))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert invoke(argv, monkeypatch, capsys)[0] == 0
    assert "is up to date" in caplog.text and reads == []
    assert invoke([*argv, "--rehash"], monkeypatch, capsys)[0] == 0
    assert len(reads) == 8 and fingerprint(tmp_path / "t.zarr") == fingerprint(tmp_path / "f.zarr")
