"""Negative labels: 'other' (uniform over the other classes) and 'roll' (one seeded cycle), rolled rows
that get their own label back (allowed for 'roll' only, trained as a positive twice, by hand)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from worlds import REF_PROVENANCE, ref_columns

from pipeline.alignment import make_batch
from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.losses import cca_loss
from pipeline.refcache import draw_pairs

# -------------------------------------------------------------------------------------- negatives


def test_other_negatives_never_equal_and_are_uniform():
    """'other': (label + U{1..K-1}) mod K, uniform over the K - 1 other classes; 1200 rows per class,
    each other class expected 400 times (std sqrt(1200 * 1/3 * 2/3) = 16.3), allowed 400 +- 60."""
    labels = np.repeat(np.arange(4), 1200).astype(np.int32)
    pairs = draw_pairs(labels, 1, 4, seed=0, negatives="other")
    assert (pairs["neg_label"] != pairs["label"]).all()
    for c in range(4):
        counts = Counter(pairs["neg_label"][pairs["label"] == c].tolist())
        assert set(counts) == set(range(4)) - {c}
        assert all(340 <= n <= 460 for n in counts.values()), counts


def test_roll_is_one_seeded_cycle():
    """With distinct labels (label = row), a row's negative names the row that follows it in the rolled
    order: following neg_label from row 0 must visit all n rows once and come back (one n-cycle, no row
    its own negative); with repeated labels the negatives are a permutation of the labels (same multiset)."""
    n = 30
    pairs = draw_pairs(np.arange(n, dtype=np.int32), 1, n, seed=5, negatives="roll")
    nxt = pairs["neg_label"]
    seen, row = [], 0
    for _ in range(n):
        seen.append(row)
        row = int(nxt[row])
    assert row == 0 and sorted(seen) == list(range(n))
    labels = np.random.default_rng(0).integers(0, 4, 200).astype(np.int32)
    rolled = draw_pairs(labels, 3, 4, seed=0, views="all", negatives="roll")
    assert sorted(rolled["neg_label"].tolist()) == sorted(rolled["label"].tolist())
    again, other = (draw_pairs(labels, 3, 4, seed=s, views="all", negatives="roll") for s in (0, 1))
    assert all(np.array_equal(rolled[k], again[k]) for k in rolled)
    assert not np.array_equal(rolled["neg_label"], other["neg_label"])


def test_rolled_equal_negatives_are_allowed_only_for_roll(tmp_path):
    """Two classes, 40 rows: the roll gives some rows their own label back; the cache accepts them only when
    its provenance says negatives 'roll', and make_batch marks exactly those rows positive twice."""
    labels = np.arange(40, dtype=np.int32) % 2
    pairs = draw_pairs(labels, 1, 2, seed=0, negatives="roll")
    same = pairs["neg_label"] == pairs["label"]
    assert 0 < same.sum() < 40
    cols = ref_columns(pairs)
    write_ref_cache(tmp_path / "roll.parquet", cols, {**REF_PROVENANCE, "negatives": "roll"})
    read, _ = read_ref_cache(tmp_path / "roll.parquet")
    assert np.array_equal(read["neg_label"], pairs["neg_label"])
    write_ref_cache(tmp_path / "other.parquet", cols, {**REF_PROVENANCE, "negatives": "other"})
    with pytest.raises(FormatError, match="negative label equal to the positive one"):
        read_ref_cache(tmp_path / "other.parquet")
    rows = np.arange(40)
    batch = make_batch(rows, np.zeros((40, 1, 4), np.uint16), read, np.zeros(40, bool), null_class=2)
    assert np.array_equal(batch.positive_twice.numpy(), same)
    assert np.array_equal(batch.labels_neg.numpy(), pairs["neg_label"])  # the label itself, not the null class


def test_positive_twice_row_by_hand():
    """beta 0.5, lambda 10; both rows r_pos = -10 - (-11) = 1, r_neg = -12 - (-10) = -2.
    Ordinary row: (-log sig(0.5) - 10 log sig(1)) / 10 = (0.474076984 + 10 * 0.313261688) / 10 = 0.360669386
    Positive twice: (-log sig(0.5) - log sig(-1)) / 10 = (0.474076984 + 1.313261688) / 10 = 0.178733867
    (the negative term is a positive's, -log sig(+beta r_neg), with weight 1, not lambda)."""
    out = cca_loss(torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0]), torch.tensor([-11.0, -11.0]),
                   torch.tensor([-10.0, -10.0]), beta=0.5, lam=10.0, positive_twice=torch.tensor([False, True]))
    assert out.per_row[0].item() == pytest.approx(0.3606693859362335, rel=1e-6)
    assert out.per_row[1].item() == pytest.approx(0.17873386716983294, rel=1e-6)
