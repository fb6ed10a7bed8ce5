"""The released objective at any number of epochs (issue 28 point 3): the released scripts redraw each row's
view, negative label and the reference's dropout masks at every visit, so the cache holds a draw per (image,
visit), reflogp.visits of them (default: ceil(train.epochs)), and train's epoch e reads visit e."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.alignment import AlignmentRun, loss_for_batch, make_batch, visit_rows, with_online_reference
from pipeline.checkpoint import save_checkpoint
from pipeline.config import ConfigError
from pipeline.distributed import World
from pipeline.families import LLAMAGEN
from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.loaders import load_gpt
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.refcache import ReferenceNoise, check_cache_rows, draw_pairs, reference_logps, row_keys
from pipeline.tokenstore import open_token_store, write_token_store
from stages import reflogp as reflogp_stage
from stages import train as train_stage
from stages.cli.params import load_params
from stages.reflogp import RefLogpConfig

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
GPT_CFG = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=3, block_size=16, multiple_of=16)


@pytest.mark.parametrize("views", ["one", "all"])
@pytest.mark.parametrize("negatives", ["other", "roll"])
def test_visit_0_is_the_one_visit_cache_and_each_visit_draws_its_own(views, negatives):
    labels = np.arange(40, dtype=np.int32) % 5
    one = draw_pairs(labels, 3, 5, seed=7, views=views, negatives=negatives)
    three = draw_pairs(labels, 3, 5, seed=7, views=views, negatives=negatives, visits=3)
    n = len(one["row"])
    assert len(three["row"]) == 3 * n
    for k in one:  # visit 0 bit for bit: a 1-visit cache is the cache before visits existed
        assert np.array_equal(three[k][:n], one[k]) and three[k].dtype == one[k].dtype
    again = draw_pairs(labels, 3, 5, seed=7, views=views, negatives=negatives, visits=3)
    assert all(np.array_equal(again[k], three[k]) for k in three)  # seeded: the same on a rerun
    blocks = [{k: v[i * n : (i + 1) * n] for k, v in three.items()} for i in range(3)]
    for b in blocks:  # each visit holds every image (view) once, with its true label
        assert np.array_equal(b["row"], one["row"]) and np.array_equal(b["label"], one["label"])
        if views == "all":
            assert np.array_equal(b["view"], one["view"])
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # own negatives (and views when drawn): 40-120 draws, never all equal
        assert (blocks[a]["neg_label"] != blocks[b]["neg_label"]).mean() > 0.3
        if views == "one":
            assert (blocks[a]["view"] != blocks[b]["view"]).mean() > 0.3
    if negatives == "other":
        assert (three["neg_label"] != three["label"]).all()


def test_each_visit_is_scored_with_its_own_reference_masks(tiny_gpt):
    """Dropout keys follow the cache row, so visit v of a row (cache row v R + i) has masks of its own: its
    log p(x | null), which depends on neither label, differs between visits under dropout and not in eval
    mode; the visit-0 keys are the one-visit cache's."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(6, 2, 16), dtype=np.uint16)
    pairs = draw_pairs(rng.integers(0, 5, size=6).astype(np.int32), 2, 5, seed=1, views="all", visits=2)
    n = len(pairs["row"]) // 2
    noise = ReferenceNoise(seed=3, dropout=0.3, drop_path=0.2)
    assert torch.equal(row_keys(noise, np.arange(n), CPU), row_keys(noise, np.arange(2 * n), CPU).view(3, 2 * n)[:, :n].reshape(-1))
    tiny_gpt.set_dropout(0.3, 0.2)
    noisy = reference_logps(tiny_gpt, tokens, pairs, batch_size=5, device=CPU, noise=noise)["ref_logp_null"]
    assert (np.abs(noisy[:n] - noisy[n:]) > 1e-3).mean() > 0.8
    clean = reference_logps(tiny_gpt, tokens, pairs, batch_size=5, device=CPU)["ref_logp_null"]
    assert np.abs(clean[:n] - clean[n:]).max() < 1e-4


def _tiny_cache(tiny_gpt, tmp_path, visits: int, noise: ReferenceNoise = ReferenceNoise()):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(12, 2, 16), dtype=np.uint16)
    labels = rng.integers(0, 5, size=12).astype(np.int32)
    save_checkpoint(tmp_path / "ref.pt", tiny_gpt.state_dict(), tiny_gpt.cfg.to_dict(), kind="llamagen-gpt")
    reference = load_gpt(tmp_path / "ref.pt")
    reference.set_dropout(noise.dropout, noise.drop_path)
    pairs = draw_pairs(labels, 2, 5, seed=1, views="all", visits=visits)
    return tokens, {**pairs, **reference_logps(reference, tokens, pairs, batch_size=7, device=CPU, noise=noise)}


def test_cached_loss_equals_online_loss_and_the_step_0_check_passes_on_every_visit(tiny_gpt, tmp_path):
    """Per visit: the loss from the cached columns is the online reference's on the same rows (eval mode), and
    with dropout the policy at step 0, replaying the cache's masks, reproduces every visit's rows."""
    tokens, cache = _tiny_cache(tiny_gpt, tmp_path, visits=3)
    n = visit_rows(cache, 3)
    policy, reference = load_gpt(tmp_path / "ref.pt"), load_gpt(tmp_path / "ref.pt")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for v in range(3):
        rows = v * n + np.arange(n)
        batch = make_batch(rows, tokens, cache, rows % 5 == 0, policy.cfg.null_class)
        online = with_online_reference(reference, batch, CPU)
        a = loss_for_batch(policy, batch, "cca", beta=0.5, lam=10.0, device=CPU)
        b = loss_for_batch(policy, online, "cca", beta=0.5, lam=10.0, device=CPU)
        assert abs(a.ratio_pos).max() > 0.1
        torch.testing.assert_close(a.per_row, b.per_row, rtol=1e-5, atol=1e-5)
    noise = ReferenceNoise(seed=4, dropout=0.4, drop_path=0.3)
    tokens, cache = _tiny_cache(tiny_gpt, tmp_path, visits=2, noise=noise)
    policy = load_gpt(tmp_path / "ref.pt")
    policy.set_dropout(0.4, 0.3)
    n = visit_rows(cache, 2)
    check_cache_rows(policy, policy, tokens, cache, n + np.arange(n), noise, 5, CPU, World(), "c.parquet")  # visit 1


def _align(epochs: float, batch_size: int = 8):
    return train_stage.TrainConfig(beta=0.5, lr=3e-3, epochs=epochs, batch_size=batch_size, micro_batch_size=4,
                                   uncond_ratio=0.0)


def test_epoch_e_reads_visit_e(tiny_gpt, tmp_path):
    """The order: epoch e is a permutation of visit e's rows (the order's draws are the one-visit cache's); and
    in training: with visit 1's reference log-probs shifted, the steps of epoch 0 are unchanged and the first
    step of epoch 1 (and only from there) sees the shift."""
    tokens, cache = _tiny_cache(tiny_gpt, tmp_path, visits=3)
    n = visit_rows(cache, 3)  # 24 rows: 3 steps of 8 an epoch
    run = AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, cache, _align(3.0), CPU, World(device=CPU),
                       LLAMAGEN.param_groups, visits=3)
    one = {k: v[:n] for k, v in cache.items()}
    run1 = AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, one, _align(3.0), CPU, World(device=CPU), LLAMAGEN.param_groups)
    for e in range(3):
        epoch = run.order[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(e * n, (e + 1) * n))
        assert np.array_equal(epoch - e * n, run1.order[e * n : (e + 1) * n])
    shifted = {k: v.copy() for k, v in cache.items()}
    for column in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        shifted[column][n : 2 * n] += 2.0  # visit 1 only
    logs = []
    for c in (cache, shifted):
        run = AlignmentRun(load_gpt(tmp_path / "ref.pt"), tokens, c, _align(2.0), CPU, None, LLAMAGEN.param_groups, visits=3)
        logs.append([run.step(*batch)["rewards/pos"] for batch in run.batches()])
    assert len(logs[0]) == 6
    assert logs[0][:3] == logs[1][:3]  # epoch 0 reads visit 0
    assert abs(logs[0][3] - logs[1][3]) > 0.5  # beta x 2 nats lower rewards from epoch 1's first step


def _stage_world(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 64, "image_size": 16, "grid": 4,
             "augmentations": ["center"], "class_names": ["a", "b", "c"]}
    write_token_store(tmp_path / "t.zarr", rng.integers(0, 64, (8, 1, 16)).astype(np.uint16),
                      np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32), attrs)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    return tmp_path / "t.zarr", tmp_path / "gpt.pt"


def test_train_refuses_fewer_visits_than_epochs_in_one_line_and_reads_them_again_when_told(tmp_path):
    tokens, gpt = _stage_world(tmp_path)
    reflogp_stage.run(RefLogpConfig(batch_size=4, part_rows=8, visits=2), tokens, gpt, tmp_path / "c.parquet")
    cache, meta = read_ref_cache(tmp_path / "c.parquet", store=open_token_store(tokens))
    assert meta["visits"] == 2 and len(cache["row"]) == 16
    cfg = dict(batch_size=4, micro_batch_size=2, uncond_ratio=0.0)
    with pytest.raises(ConfigError) as e:
        train_stage.run(train_stage.TrainConfig(epochs=3, **cfg), tokens, tmp_path / "c.parquet", gpt, tmp_path / "train")
    assert str(e.value) == (f"{tmp_path / 'c.parquet'} holds 2 visit(s) of each row but train.epochs = 3 reads 3: rebuild it "
                            "with reflogp.visits: epochs (or >= 3), or set train.repeat_visits: true to read its draws "
                            "again at every epoch")
    assert not (tmp_path / "train").exists() and not (tmp_path / "train.partial").exists()
    # 2.5 epochs read 3 visits too; a max_steps cap within 2 epochs reads 2
    with pytest.raises(ConfigError, match="reads 3"):
        train_stage.run(train_stage.TrainConfig(epochs=2.5, **cfg), tokens, tmp_path / "c.parquet", gpt, tmp_path / "train")
    train_stage.run(train_stage.TrainConfig(epochs=3, max_steps=4, **cfg), tokens, tmp_path / "c.parquet", gpt, tmp_path / "capped")
    train_stage.run(train_stage.TrainConfig(epochs=3, repeat_visits=True, **cfg), tokens, tmp_path / "c.parquet", gpt,
                    tmp_path / "again")
    assert (tmp_path / "again" / "policy.pt").is_file()


def test_a_cache_missing_a_visit_block_is_refused(tmp_path):
    tokens, gpt = _stage_world(tmp_path)
    reflogp_stage.run(RefLogpConfig(batch_size=4, part_rows=8, visits=2), tokens, gpt, tmp_path / "c.parquet")
    cache, meta = read_ref_cache(tmp_path / "c.parquet")
    write_ref_cache(tmp_path / "cut.parquet", {k: v[:8] for k, v in cache.items()}, meta)
    with pytest.raises(FormatError, match=r"cut\.parquet: 8 cache rows for 2 visit\(s\) of 8 token-store \(row, view\) pairs: 8 missing"):
        read_ref_cache(tmp_path / "cut.parquet", store=open_token_store(tokens))


def _resolved_visits(*args: str) -> int:
    from click.testing import CliRunner

    from stages.cli.main import main

    result = CliRunner().invoke(main, ["--params", str(ROOT / "params.yaml"), *args, "config", "reflogp"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)["reflogp"]["visits"]


def test_visits_epochs_resolves_to_the_train_settings_epochs_and_not_to_lambda_or_beta():
    assert load_params(ROOT / "params.yaml")["reflogp"]["visits"] == "epochs"
    assert _resolved_visits() == 3  # train.epochs 3
    assert _resolved_visits("--set", "train.epochs=2.5") == 3
    assert _resolved_visits("--set", "train.epochs=9") == 9
    assert _resolved_visits("--set", "train.epochs=9", "--set", "reflogp.visits=2") == 2
    assert _resolved_visits("--preset", "llamagen-L") == 1  # the presets' epochs
    assert _resolved_visits("--preset", "llamagen-L-lambda") == 3
    assert RefLogpConfig().resolve_visits(3.0) == RefLogpConfig(visits=3)
    with pytest.raises(ConfigError, match=r"reflogp.visits = 'every'"):
        RefLogpConfig(visits="every")
    with pytest.raises(ConfigError, match=r"needs a number"):
        RefLogpConfig().num_visits
