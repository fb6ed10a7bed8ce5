"""`cca-pipe reflogp --negatives`: the DDO cache (pipeline/formats.py) on the tiny world of
tests/test_negatives_stage.py. ref_logp_fake is log p_ref(fake | real row's label) computed here by a plain
forward (eval mode) and by pipeline.ddo.reference_columns (dropout: the "fake" masks); the CCA columns are those
of a cache without negatives; the content digest and the step-0 check cover the new column; negatives of other
rows or another reference are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_negatives_stage import GPT_CFG, make_world
from worlds import invoke

from pipeline.checkpoint import save_checkpoint
from pipeline.distributed import World
from pipeline.families import load_model
from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.logprobs import sequence_logp
from pipeline.models.llamagen import GPT
from pipeline.refcache import CacheMismatch, ReferenceNoise, check_cache_rows
from pipeline.tokenstore import open_token_store

CPU = torch.device("cpu")


def cca(root: Path, monkeypatch, capsys, *argv) -> str:
    code, err = invoke(["--params", root / "params.yaml", "--device", "cpu", *argv], monkeypatch, capsys)
    assert code == 0, err
    return err


def ddo_world(root: Path, monkeypatch, capsys, *overrides, ratio: int = 1) -> Path:
    make_world(root, rows=6, reencode=False, ratio=ratio)
    sets = [x for o in overrides for x in ("--set", o)]
    cca(root, monkeypatch, capsys, "negatives", "--tokens", root / "real.zarr", "--ref", root / "gpt.pt", "--vq",
        root / "vq.pt", "--out", root / "fakes.zarr")
    common = ["--tokens", root / "real.zarr", "--ref", root / "gpt.pt"]
    cca(root, monkeypatch, capsys, *sets, "reflogp", *common, "--out", root / "cca.parquet")
    cca(root, monkeypatch, capsys, *sets, "reflogp", *common, "--negatives", root / "fakes.zarr", "--out", root / "ddo.parquet")
    return root


def test_the_fake_column_is_the_reference_on_the_paired_fake_under_the_real_label(tmp_path, monkeypatch, capsys):
    root = ddo_world(tmp_path, monkeypatch, capsys, "reflogp.visits=2")
    real, fakes = open_token_store(root / "real.zarr"), open_token_store(root / "fakes.zarr")
    cca_cols, _ = read_ref_cache(root / "cca.parquet", store=real)
    cols, meta = read_ref_cache(root / "ddo.parquet", store=real)
    assert meta["fakes_fingerprint"] == fakes.fingerprint and meta["fakes_ratio"] == 1
    for name, column in cca_cols.items():  # the CCA columns are unchanged by the fakes beside them
        assert np.array_equal(cols[name], column), name
    assert np.array_equal(cols["fake_row"], cols["row"])  # ratio 1: image i's fake is fake row i, every view and visit
    _, gpt = load_model(root / "gpt.pt", "--ref")
    with torch.no_grad():
        x = torch.from_numpy(fakes.tokens[0:6][cols["fake_row"], 0].astype(np.int64))
        expected = sequence_logp(gpt.eval(), torch.from_numpy(cols["label"].astype(np.int64)), x).double().numpy()
    np.testing.assert_allclose(cols["ref_logp_fake"], expected, rtol=1e-6, atol=1e-4)
    assert np.ptp(cols["ref_logp_fake"]) > 0.1


def test_with_dropout_the_fake_column_has_the_fake_masks_of_pipeline_ddo(tmp_path, monkeypatch, capsys):
    from pipeline.ddo import reference_columns

    root = ddo_world(tmp_path, monkeypatch, capsys, "reflogp.dropout=0.3", "reflogp.views=one")
    real, fakes = open_token_store(root / "real.zarr"), open_token_store(root / "fakes.zarr")
    cols, meta = read_ref_cache(root / "ddo.parquet", store=real)
    _, gpt = load_model(root / "gpt.pt", "--ref")
    gpt.set_dropout(0.3, 0.0, section="reflogp")
    noise = ReferenceNoise(meta["seed"], 0.3, 0.0)
    real_x = torch.from_numpy(real.tokens[cols["row"], cols["view"]].astype(np.int64))
    fake_x = torch.from_numpy(fakes.tokens[0:6][cols["fake_row"], 0].astype(np.int64))
    online = reference_columns(gpt, real_x, fake_x, torch.from_numpy(cols["label"].astype(np.int64)), 4, CPU, noise)
    for name in ("ref_logp_pos", "ref_logp_fake", "ref_logp_null"):
        np.testing.assert_allclose(cols[name], online[name], rtol=1e-6, atol=1e-4, err_msg=name)
    gpt.set_dropout(0.0, 0.0, section="reflogp")
    plain = reference_columns(gpt, real_x, fake_x, torch.from_numpy(cols["label"].astype(np.int64)), 4, CPU)
    assert np.abs(plain["ref_logp_fake"] - cols["ref_logp_fake"]).max() > 1e-2  # the masks were applied


def test_the_content_digest_and_the_step0_check_cover_the_fake_column(tmp_path, monkeypatch, capsys):
    root = ddo_world(tmp_path, monkeypatch, capsys)
    real, fakes = open_token_store(root / "real.zarr"), open_token_store(root / "fakes.zarr")
    cols, meta = read_ref_cache(root / "ddo.parquet", store=real)
    _, gpt = load_model(root / "gpt.pt", "--ref")
    rows = np.arange(len(cols["row"]))
    check_cache_rows(gpt, gpt, real.tokens, cols, rows, ReferenceNoise(), 4, CPU, World(), "ddo.parquet", fakes.tokens)
    swapped = {**cols, "ref_logp_fake": cols["ref_logp_fake"][::-1].copy()}
    with pytest.raises(CacheMismatch, match="column ref_logp_fake"):
        check_cache_rows(gpt, gpt, real.tokens, swapped, rows, ReferenceNoise(), 4, CPU, World(), "ddo.parquet", fakes.tokens)
    # a cell edited after the cache was written: its digest refuses it
    table = pq.read_table(root / "ddo.parquet")
    edited = {name: table.column(name).to_numpy().copy() for name in table.column_names}
    edited["ref_logp_fake"][0] += 1.0
    write_ref_cache(root / "edited.parquet", edited, meta)  # a fresh digest, then the old one put back:
    forged = pq.read_table(root / "edited.parquet")
    pq.write_table(forged.replace_schema_metadata(table.schema.metadata), root / "edited.parquet")
    with pytest.raises(FormatError, match="ref_logp_fake"):
        read_ref_cache(root / "edited.parquet", store=real)


def test_negatives_of_other_rows_or_another_reference_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    root = ddo_world(tmp_path, monkeypatch, capsys)
    torch.manual_seed(5)
    save_checkpoint(root / "other.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    argv = ["--params", root / "params.yaml", "--device", "cpu", "reflogp", "--tokens", root / "real.zarr", "--ref",
            root / "other.pt", "--negatives", root / "fakes.zarr", "--out", root / "x.parquet"]
    code, err = invoke(argv, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "another reference" in errors[0] and "Traceback" not in err
    argv[argv.index(root / "fakes.zarr")] = root / "real.zarr"
    code, err = invoke(argv, monkeypatch, capsys)
    assert code != 0 and "not one of negatives" in err
    assert not (root / "x.parquet").exists()


# ------------------------------------------------------------------------------------------ train.loss ddo

TRAIN_SETS = ["train.loss=ddo", "train.epochs=1", "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3"]


def train_ddo(root: Path, monkeypatch, capsys, out: Path, *sets: str, negatives: Path | None = None) -> tuple[int, str]:
    argv = ["--params", root / "params.yaml", "--device", "cpu", *[x for o in (*TRAIN_SETS, *sets) for x in ("--set", o)],
            "train", "--tokens", root / "real.zarr", "--cache", root / "ddo.parquet", "--init", root / "gpt.pt", "--out", out]
    return invoke([*argv, *(["--negatives", negatives] if negatives else [])], monkeypatch, capsys)


def test_train_ddo_starts_at_the_ratio_zero_loss_and_moves_the_policy(tmp_path, monkeypatch, capsys):
    """Step 0's policy is the reference: every ratio 0, so each conditional row costs (1 + alpha) ln 2 / max(alpha, 1)
    (docs/ddo.md): alpha 4 -> 5 ln 2 / 4 = 0.866434; with train.uncond_ratio 0 that is the step's loss."""
    import json
    import math

    root = ddo_world(tmp_path, monkeypatch, capsys, "reflogp.visits=1")
    code, err = train_ddo(root, monkeypatch, capsys, root / "run", "train.alpha=4", "train.uncond_ratio=0",
                          negatives=root / "fakes.zarr")
    assert code == 0, err
    steps = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3  # 12 cache rows (6 images x 2 views) / batch 4
    assert steps[0]["loss"] == pytest.approx(5 * math.log(2) / 4, abs=1e-5)
    assert steps[-1]["loss"] != pytest.approx(steps[0]["loss"], abs=1e-4)
    assert (root / "run" / "settings.yaml").read_text().count("loss: ddo") == 1


def test_train_ddo_refuses_missing_or_redrawn_negatives_in_one_line(tmp_path, monkeypatch, capsys):
    root = ddo_world(tmp_path, monkeypatch, capsys, "reflogp.visits=1")
    code, err = train_ddo(root, monkeypatch, capsys, root / "run")
    assert code != 0 and "--negatives" in err and "Traceback" not in err
    # the negatives drawn again (another seed) after the cache was computed: the cache is stale
    cca(root, monkeypatch, capsys, "--set", "negatives.seed=5", "negatives", "--tokens", root / "real.zarr", "--ref",
        root / "gpt.pt", "--vq", root / "vq.pt", "--out", root / "fakes.zarr")
    code, err = train_ddo(root, monkeypatch, capsys, root / "run", negatives=root / "fakes.zarr")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "stale" in errors[0] and "fakes_fingerprint" in errors[0]
    # a CCA cache under train.loss ddo
    code, err = invoke(["--params", root / "params.yaml", "--device", "cpu", *[x for o in TRAIN_SETS for x in ("--set", o)],
                        "train", "--tokens", root / "real.zarr", "--cache", root / "cca.parquet", "--init", root / "gpt.pt",
                        "--negatives", root / "fakes.zarr", "--out", root / "run"], monkeypatch, capsys)
    assert code != 0 and "reflogp --negatives" in err
    assert not (root / "run").exists()


def test_ratio_two_pairs_every_cache_row_with_both_fakes_of_its_image(tmp_path, monkeypatch, capsys):
    """negatives.ratio 2: image i's fakes are store rows 2i and 2i + 1. Cache row k of visit v pairs with both:
    slot 0 (fake_row, column ref_logp_fake) is fake 2i + v mod 2, slot 1 (ref_logp_fake_1) the other one, each
    the reference's plain log-prob under the real label. The step-0 check covers the second column, train
    reads both fakes of a row (and starts at the ratio-zero loss, 5 ln 2 / 4 with alpha 4, whatever the ratio)."""
    import json
    import math

    from pipeline.alignment import AlignConfig, AlignmentRun, visit_keys
    from pipeline.families import LLAMAGEN

    root = ddo_world(tmp_path, monkeypatch, capsys, "reflogp.visits=2", "reflogp.views=one", ratio=2)
    real, fakes = open_token_store(root / "real.zarr"), open_token_store(root / "fakes.zarr")
    cols, meta = read_ref_cache(root / "ddo.parquet", store=real)
    assert meta["fakes_ratio"] == 2 and list(cols)[-3:] == ["fake_row", "ref_logp_fake", "ref_logp_fake_1"]
    visit = np.arange(12) // 6
    assert np.array_equal(cols["fake_row"], 2 * cols["row"] + visit)
    other = 2 * cols["row"] + 1 - visit
    _, gpt = load_model(root / "gpt.pt", "--ref")
    labels = torch.from_numpy(cols["label"].astype(np.int64))
    with torch.no_grad():
        for name, store_rows in (("ref_logp_fake", cols["fake_row"]), ("ref_logp_fake_1", other)):
            x = torch.from_numpy(fakes.tokens[0:12][store_rows, 0].astype(np.int64))
            expected = sequence_logp(gpt.eval(), labels, x).double().numpy()
            np.testing.assert_allclose(cols[name], expected, rtol=1e-6, atol=1e-4, err_msg=name)
    assert np.abs(cols["ref_logp_fake"] - cols["ref_logp_fake_1"]).min() > 1e-3  # two different fakes
    rows = np.arange(12)
    check_cache_rows(gpt, gpt, real.tokens, cols, rows, ReferenceNoise(), 4, CPU, World(), "ddo.parquet", fakes.tokens)
    swapped = {**cols, "ref_logp_fake_1": cols["ref_logp_fake"]}
    with pytest.raises(CacheMismatch, match="column ref_logp_fake_1"):
        check_cache_rows(gpt, gpt, real.tokens, swapped, rows, ReferenceNoise(), 4, CPU, World(), "ddo.parquet", fakes.tokens)

    # train's micro-batch holds both fakes of each row, in slot order, with a key per fake
    cfg = AlignConfig(loss="ddo", batch_size=4, micro_batch_size=4, uncond_ratio=0.0)
    run = AlignmentRun(gpt, real.tokens, cols, cfg, CPU, None, LLAMAGEN.param_groups, visits=2, fakes=fakes.tokens)
    picked = np.array([7, 0, 11])
    keys = visit_keys(0, np.arange(3), 2)
    batch = run._ddo_batch(picked, np.zeros(3, bool), real.tokens[cols["row"][picked], cols["view"][picked]], keys)
    assert batch.fake.shape == (3, 2, 16) and batch.ref_logp_fake.shape == (3, 2) and len(keys) == 9
    for k, row in enumerate(picked):
        assert np.array_equal(batch.fake[k, 0].numpy(), fakes.tokens[0:12][cols["fake_row"][row], 0])
        assert np.array_equal(batch.fake[k, 1].numpy(), fakes.tokens[0:12][other[row], 0])
        assert batch.ref_logp_fake[k].tolist() == [cols["ref_logp_fake"][row], cols["ref_logp_fake_1"][row]]

    code, err = train_ddo(root, monkeypatch, capsys, root / "run", "train.alpha=4", "train.uncond_ratio=0",
                          negatives=root / "fakes.zarr")
    assert code == 0, err
    steps = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2  # 6 cache rows a visit / batch 4, one epoch
    assert steps[0]["loss"] == pytest.approx(5 * math.log(2) / 4, abs=1e-5)
    assert steps[1]["rewards/neg"] != pytest.approx(0.0, abs=1e-6)  # the policy moved on both fakes' mean

    # out of memory: the hint counts a row's sequences, the real one and its 2 fakes
    import pipeline.alignment as alignment

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alignment, "ddo_loss_for_batch", oom)
        code, err = train_ddo(root, monkeypatch, capsys, root / "oom", negatives=root / "fakes.zarr")
    assert code != 0 and "train.micro_batch_size = 2 rows per forward (up to 6 sequences)" in err, err
