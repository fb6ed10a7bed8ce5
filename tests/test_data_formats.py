"""Zarr token store and Parquet reference cache: round trips, schema/attribute checks, stale-cache refusal."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.refcache import draw_pairs
from pipeline.tokenstore import open_token_store, verify_token_store, write_token_store

ATTRS = {"tokenizer_sha256": "ab" * 32, "codebook_size": 100, "image_size": 16, "grid": 2,
         "augmentations": ["a", "b"], "class_names": ["x", "y", "z"]}


def _store(tmp_path, n=50):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (n, 2, 4)).astype(np.uint16)
    labels = rng.integers(0, 3, n).astype(np.int32)
    fp = write_token_store(tmp_path / "t.zarr", tokens, labels, ATTRS, chunk_rows=16)
    return tokens, labels, fp


def test_token_store_round_trip(tmp_path):
    tokens, labels, fp = _store(tmp_path)
    store = open_token_store(tmp_path / "t.zarr")
    assert np.array_equal(store.tokens[:], tokens) and store.tokens[:].dtype == np.uint16
    assert np.array_equal(store.labels, labels) and store.labels.dtype == np.int32
    assert store.fingerprint == fp and store.num_classes == 3
    assert {k: store.attrs[k] for k in ATTRS} == ATTRS
    assert zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["tokens"].chunks == (16, 2, 4)


def test_tampered_store_is_found_by_verify(tmp_path):
    """An edit through zarr (valid chunk, valid checksum) changes the contents: --verify's fingerprint finds it."""
    _store(tmp_path)
    assert verify_token_store(tmp_path / "t.zarr") == []
    z = zarr.open_group(str(tmp_path / "t.zarr"), mode="r+")["tokens"]
    z[3, 0, 0] = (int(z[3, 0, 0]) + 1) % 100
    (problem,) = verify_token_store(tmp_path / "t.zarr")
    assert "t.zarr" in problem and "fingerprint" in problem


@pytest.mark.parametrize("damage", ["flip one byte", "delete the file"])
def test_a_damaged_chunk_fails_the_batches_that_touch_it_only(tmp_path, damage, monkeypatch, capsys):
    """Chunk 1 (rows 16..31) damaged: a batch touching it names the store and the chunk file, other batches
    read, and `cca-pipe info --verify` reports it."""
    import sys

    from stages.cli import main as cli

    tokens, _, _ = _store(tmp_path)
    chunk = tmp_path / "t.zarr" / "tokens" / "c" / "1" / "0" / "0"
    if damage == "flip one byte":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
    else:
        chunk.unlink()
    store = open_token_store(tmp_path / "t.zarr")  # metadata only: opens fine
    rows, views = np.array([0, 5, 40, 49]), np.array([0, 1, 1, 0])
    assert np.array_equal(store.tokens[rows, views], tokens[rows, views])  # chunks 0, 2, 3 only
    with pytest.raises(FormatError, match=r"t\.zarr: chunk file tokens/c/1/0/0 \(rows 16\.\.31\) is (damaged|missing)"):
        store.tokens[np.array([3, 20]), np.array([0, 0])]
    monkeypatch.setattr(sys, "argv", ["cca-pipe", "info", "--verify", str(tmp_path / "t.zarr")])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2 and "tokens/c/1/0/0" in capsys.readouterr().err


def test_open_is_lazy_and_reads_row_ranges(tmp_path):
    tokens, labels, _ = _store(tmp_path, n=50)
    store = open_token_store(tmp_path / "t.zarr")
    assert store.tokens.shape == (50, 2, 4) and store.tokens.num_chunks == 4 and not store.tokens._cache
    assert np.array_equal(store.tokens[10:35], tokens[10:35]) and len(store.tokens._cache) == 3  # chunks 0, 1, 2
    assert np.array_equal(store.labels, labels)


def test_bad_inputs_rejected_at_write(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_token_store(tmp_path / "x.zarr", np.zeros((2, 1, 4), np.int64), np.zeros(2, np.int32), ATTRS)
    with pytest.raises(ValueError, match="missing"):
        write_token_store(tmp_path / "x.zarr", np.zeros((2, 1, 4), np.uint16), np.zeros(2, np.int32), {"grid": 2})
    with pytest.raises(FormatError, match="no zarr.json"):
        open_token_store(tmp_path / "nothing.zarr")


def _cache_columns(n=20):
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, n).astype(np.int32)
    return {"row": np.arange(n), "label": label, "neg_label": ((label + rng.integers(1, 3, n)) % 3).astype(np.int32), "view": rng.integers(0, 2, n).astype(np.int16),
            "ref_logp_pos": rng.normal(-50, 5, n), "ref_logp_neg": rng.normal(-55, 5, n), "ref_logp_null": rng.normal(-52, 5, n)}


PROV = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 3, "num_classes": 3, "null_class": 3, "seq_len": 4}


def test_cache_round_trip_with_provenance(tmp_path):
    cols = _cache_columns()
    write_ref_cache(tmp_path / "c.parquet", cols, PROV)
    read, meta = read_ref_cache(tmp_path / "c.parquet", expect={"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64})
    for k, v in cols.items():
        assert np.array_equal(read[k], v) and read[k].dtype == v.dtype, k
    assert {k: meta[k] for k in PROV} == PROV and meta["format"] == "cca-pipe/ref-logp"


def test_a_cache_is_read_by_row_ranges(tmp_path):
    """A cache merged from parts has one Parquet row group per part; a range of rows reads only its groups."""
    import pyarrow.parquet as pq

    from pipeline.formats import RefCacheParts

    cols = _cache_columns(n=20)
    parts = RefCacheParts(tmp_path / "c.parquet", 20, 8, PROV, tmp_path / "c.parquet.partial")
    for k in parts.pending():
        start, stop = parts.part_range(k)
        parts.write_part(k, {name: v[start:stop] for name, v in cols.items()})
    parts.merge()
    assert pq.ParquetFile(tmp_path / "c.parquet").metadata.num_row_groups == 3
    whole, _ = read_ref_cache(tmp_path / "c.parquet")
    part, _ = read_ref_cache(tmp_path / "c.parquet", rows=(6, 13))
    for name in whole:
        assert np.array_equal(part[name], whole[name][6:13]), name


def test_stale_cache_is_refused_naming_what_changed(tmp_path):
    write_ref_cache(tmp_path / "c.parquet", _cache_columns(), PROV)
    with pytest.raises(FormatError, match=r"stale: its ref_ckpt_sha256 .* `cca-pipe reflogp`"):
        read_ref_cache(tmp_path / "c.parquet", expect={"ref_ckpt_sha256": "d" * 64})
    with pytest.raises(FormatError, match="does not exist"):
        read_ref_cache(tmp_path / "missing.parquet")


def test_negative_pairs():
    labels = np.repeat(np.arange(4), 50).astype(np.int32)
    one = draw_pairs(labels, num_views=3, num_classes=4, seed=0, views="one")
    assert (one["neg_label"] != one["label"]).all()
    assert set(one["neg_label"][labels == 0]) == {1, 2, 3}
    assert set(one["view"]) == {0, 1, 2}
    every = draw_pairs(labels, num_views=3, num_classes=4, seed=0, views="all")
    assert sorted(zip(every["row"], every["view"])) == [(r, v) for r in range(200) for v in range(3)]
    again = draw_pairs(labels, num_views=3, num_classes=4, seed=0, views="all")
    assert all(np.array_equal(every[k], again[k]) for k in every)
