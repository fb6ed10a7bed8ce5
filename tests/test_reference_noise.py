"""The reference sees the recipe's dropout (issue 22 item 1) and a cache that contradicts itself is refused
by train's step-0 check (issue 21 item 4).

Dropout and drop-path masks are keyed per sequence (pipeline.models.layers): the cache scores each row with
one seeded draw keyed by (reflogp.seed, row, role), the policy draws its own keyed by (train.seed, visit),
and the step-0 check replays the cache's draw with the policy, which at step 0 is the reference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from worlds import invoke

from pipeline.alignment import make_batch, policy_logps, visit_keys
from pipeline.checkpoint import save_checkpoint
from pipeline.formats import read_cache_provenance, write_ref_cache
from pipeline.models.layers import keep_mask, noise_keys
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.refcache import ReferenceNoise, draw_pairs, reference_logps
from stages.cli import main as cli

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
GPT_CFG = dict(dim=32, n_layer=2, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
_PATTERNS = np.random.default_rng(0).integers(0, 32, size=(3, 16))  # one token sequence per class


def _rows(n: int = 300, seed: int = 1):
    """n rows of one view: the class's pattern with 20% of its tokens replaced at random, and their pairs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    tokens = _PATTERNS[labels].copy()
    noisy = rng.random(tokens.shape) < 0.2
    tokens[noisy] = rng.integers(0, 32, size=int(noisy.sum()))
    return tokens[:, None, :].astype(np.uint16), draw_pairs(labels.astype(np.int32), 1, 3, seed=1, views="one")


@pytest.fixture(scope="module")
def trained() -> dict:
    return train_tiny_gpt()


def train_tiny_gpt() -> dict:
    """The state dict of a tiny GPT trained (40 Adam steps) on the class patterns: dropout then costs it likelihood (D > 0), as
    it does a pretrained model; a random one's log-probs only scatter under dropout."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CFG))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        for step in range(40):
            tokens, pairs = _rows(32, seed=100 + step)
            loss = -model(torch.from_numpy(tokens[:, 0].astype(np.int64)), torch.from_numpy(pairs["label"].astype(np.int64))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _gpt(state: dict) -> GPT:
    model = GPT(GPTConfig(**GPT_CFG))
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------------ the masks


def test_masks_are_a_function_of_key_site_and_element_only():
    keys = noise_keys(5, np.arange(64), "pos")
    mask = keep_mask(keys, 7, 1000, 0.1)
    assert mask.shape == (64, 1000) and abs(float(mask.float().mean()) - 0.9) < 0.01  # keep probability 1 - p
    assert torch.equal(keep_mask(keys[10:20], 7, 1000, 0.1), mask[10:20])  # batch composition does not matter
    assert torch.equal(keep_mask(keys.flip(0), 7, 1000, 0.1), mask.flip(0))
    assert not torch.equal(keep_mask(keys, 8, 1000, 0.1), mask)  # another site, other masks
    assert not torch.equal(keep_mask(noise_keys(5, np.arange(64), "neg"), 7, 1000, 0.1), mask)  # another role
    assert not torch.equal(keep_mask(noise_keys(6, np.arange(64), "pos"), 7, 1000, 0.1), mask)  # another seed
    # sites and elements are not correlated: masks of two sites agree as often as independent draws would
    other = keep_mask(keys, 8, 1000, 0.1)
    assert abs(float((mask & other).float().mean()) - 0.81) < 0.01


def test_training_with_dropout_and_no_keys_is_an_error(trained):
    model = _gpt(trained)
    model.set_dropout(0.1, 0.0)
    model.train()
    tokens, labels = torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dropout_keys"):
        model(tokens, labels)
    model.eval()
    assert torch.equal(model(tokens, labels), model(tokens, labels, None, noise_keys(0, np.arange(2), "pos")))


def test_cache_does_not_depend_on_batch_size_or_first_row(trained):
    """One seeded draw per cache row: batch_size 8 and 16 give the same cache (up to float32 rounding of the
    batch), and a part computed on its own (first_row) equals the same rows of the whole."""
    model = _gpt(trained)
    model.set_dropout(0.1, 0.1)
    tokens, pairs = _rows(48)
    noise = ReferenceNoise(seed=3, dropout=0.1, drop_path=0.1)
    by8 = reference_logps(model, tokens, pairs, 8, CPU, noise=noise)
    by16 = reference_logps(model, tokens, pairs, 16, CPU, noise=noise)
    part = reference_logps(model, tokens, {k: v[16:32] for k, v in pairs.items()}, 16, CPU, noise=noise, first_row=16)
    eval_mode = reference_logps(model, tokens, pairs, 16, CPU)
    for column in by8:
        np.testing.assert_allclose(by8[column], by16[column], rtol=0, atol=1e-4)
        np.testing.assert_array_equal(part[column], by16[column][16:32])
        assert np.abs(by16[column] - eval_mode[column]).max() > 0.1  # the masks are live


def test_first_step_logps_of_a_row_do_not_depend_on_the_micro_batch(trained):
    """The policy's masks are keyed by (train.seed, visit): a row's log-probs are the same in a micro-batch
    of 4 or of 12 rows."""
    policy = _gpt(trained)
    policy.set_dropout(0.1, 0.1)
    policy.train()
    tokens, pairs = _rows(12)
    cache = {**pairs, **reference_logps(_gpt(trained), tokens, pairs, 12, CPU)}
    rows, uncond = np.arange(12), np.zeros(12, bool)
    with torch.no_grad():
        whole = policy_logps(policy, make_batch(rows, tokens, cache, uncond, 3, dropout_keys=visit_keys(0, rows)), CPU)
        parts = [policy_logps(policy, make_batch(rows[i : i + 4], tokens, cache, uncond[i : i + 4], 3,
                                                 dropout_keys=visit_keys(0, rows[i : i + 4])), CPU) for i in (0, 4, 8)]
    for got, parted in zip(whole, zip(*parts, strict=True), strict=True):
        torch.testing.assert_close(got, torch.cat(parted), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------- step-0 ratios (issue 22)


def _step0_ratios(state: dict, cache_noise: ReferenceNoise, rate: float, drop_path: float) -> np.ndarray:
    """log p_theta - log p_phi of the positive sequences at step 0: the policy (the reference's weights, in
    train mode with its own masks) against a cache computed with `cache_noise`."""
    reference = _gpt(state)
    reference.set_dropout(cache_noise.dropout, cache_noise.drop_path)
    tokens, pairs = _rows(300)
    cache = {**pairs, **reference_logps(reference, tokens, pairs, 100, CPU, noise=cache_noise)}
    policy = copy.deepcopy(reference)
    policy.set_dropout(rate, drop_path)
    policy.train()
    rows = np.arange(300)
    with torch.no_grad():
        pos, _ = policy_logps(policy, make_batch(rows, tokens, cache, np.zeros(300, bool), 3,
                                                 dropout_keys=visit_keys(7, rows)), CPU)
    return pos.double().numpy() - cache["ref_logp_pos"]


def _z(ratios: np.ndarray) -> float:
    return float(ratios.mean() / (ratios.std(ddof=1) / np.sqrt(len(ratios))))


@pytest.mark.parametrize("dropout, drop_path", [(0.1, 0.0), (0.0, 0.2)], ids=["dropout", "drop-path"])
def test_step0_ratio_is_zero_mean_against_a_matched_cache_and_minus_d_against_an_eval_cache(trained, dropout, drop_path):
    matched = _step0_ratios(trained, ReferenceNoise(seed=3, dropout=dropout, drop_path=drop_path), dropout, drop_path)
    eval_mode = _step0_ratios(trained, ReferenceNoise(), dropout, drop_path)
    assert abs(_z(matched)) < 3  # within 3 standard errors of 0
    assert _z(eval_mode) < -3 and eval_mode.mean() < -0.1  # -D: dropout costs likelihood, far beyond 3 SE
    assert matched.std() > 0.1  # the matched cache is noisy too (not an eval-mode cache compared with itself)


# ------------------------------------------------------------------------ the cache through the stages


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained):
    """A token store of 24 images x 2 views, a tiny GPT and a cache computed with dropout 0.1."""
    from PIL import Image

    from pipeline.tokenizers.vq import VQConfig, VQModel

    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    vq_cfg = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                      norm_groups=8, codebook_used_size=32)
    torch.manual_seed(0)
    save_checkpoint(root / "vq.pt", VQModel(vq_cfg).state_dict(), vq_cfg.to_dict(), kind="llamagen-vq")
    gpt = _gpt(trained)
    save_checkpoint(root / "gpt.pt", gpt.state_dict(), gpt.cfg.to_dict(), kind="llamagen-gpt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenize"].update(image_size=16, augment="flip", batch_size=8, chunk_rows=8)
    params["reflogp"].update(views="all", batch_size=8, part_rows=16, dropout=0.1)
    params["train"].update(epochs=0.5, batch_size=8, micro_batch_size=4, save_every=0, dropout=0.1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["tokenize", "--images", root / "images", "--vq", root / "vq.pt", "--out", root / "tokens.zarr"],
                 ["reflogp", "--tokens", root / "tokens.zarr", "--ref", root / "gpt.pt", "--out", root / "cache.parquet"]):
        result = CliRunner().invoke(cli.main, ["--params", str(root / "params.yaml"), *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


def _train(world, cache, out, monkeypatch, capsys, *sets: str) -> tuple[int, str]:
    argv = ["--params", world / "params.yaml", *[a for s in sets for a in ("--set", s)], "train", "--tokens",
            world / "tokens.zarr", "--cache", cache, "--init", world / "gpt.pt", "--out", out]
    return invoke(argv, monkeypatch, capsys)


def _corrupt(world, tmp_path, edit) -> tuple:
    """A copy of the cache with `edit(columns)` applied, its metadata (provenance) kept."""
    table = pq.read_table(world / "cache.parquet")
    columns = {name: table.column(name).to_numpy().copy() for name in table.column_names}
    edit(columns)
    provenance = read_cache_provenance(world / "cache.parquet")
    path = tmp_path / "corrupt.parquet"
    write_ref_cache(path, columns, {k: v for k, v in provenance.items() if k not in ("format", "format_version")})
    return path, columns


def test_the_cache_records_its_dropout(world):
    provenance = read_cache_provenance(world / "cache.parquet")
    assert provenance["dropout"] == 0.1 and provenance["drop_path"] == 0.0 and provenance["mask_rule"].startswith("keyed")
    assert ReferenceNoise.of_cache(provenance) == ReferenceNoise(seed=0, dropout=0.1, drop_path=0.0)
    assert ReferenceNoise.of_cache({"seed": 2}) == ReferenceNoise(seed=2)  # an older cache: eval mode


def test_a_clean_cache_with_dropout_passes_the_step0_check(world, tmp_path, monkeypatch, capsys):
    code, err = _train(world, world / "cache.parquet", tmp_path / "train", monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "train" / "policy.pt").exists()


def _shift_negatives(columns):
    # another valid class: neither the label nor the old negative (3 classes)
    columns["neg_label"] = (3 - columns["label"] - columns["neg_label"]).astype(np.int32)


def _swap_pos_neg(columns):
    columns["ref_logp_pos"], columns["ref_logp_neg"] = columns["ref_logp_neg"].copy(), columns["ref_logp_pos"].copy()


def _permute_rows(columns):
    order = np.random.default_rng(0).permutation(len(columns["row"]))
    for name in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        columns[name] = columns[name][order]


@pytest.mark.parametrize("edit, column", [(_shift_negatives, "ref_logp_neg"), (_swap_pos_neg, "ref_logp_pos"),
                                          (_permute_rows, "ref_logp_pos")], ids=["neg-label-shifted", "pos-neg-swapped",
                                                                                "rows-permuted"])
def test_a_self_contradicting_cache_stops_train_naming_cache_column_and_rows(world, tmp_path, monkeypatch, capsys, edit,
                                                                              column):
    cache, _ = _corrupt(world, tmp_path, edit)
    code, err = _train(world, cache, tmp_path / "train", monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("cca-pipe: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "corrupt.parquet" in lines[0] and f"column {column}" in lines[0], err
    assert "cache rows" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "train").exists() and not (tmp_path / "train.partial").exists()  # no trace


def test_train_refuses_a_cache_of_other_dropout_unless_told(world, tmp_path, monkeypatch, capsys):
    code, err = _train(world, world / "cache.parquet", tmp_path / "a", monkeypatch, capsys, "train.dropout=0.0")
    assert code == 2 and "reflogp.dropout = 0.1" in err and "train.dropout = 0.0" in err and "train.reference_noise" in err, err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    # told: the step-0 check replays the cache's own rates (0.1) although the policy trains with 0
    code, err = _train(world, world / "cache.parquet", tmp_path / "b", monkeypatch, capsys, "train.dropout=0.0",
                       "train.reference_noise=any")
    assert code == 0, err


def test_train_prints_its_step_count_and_max_steps_caps_it(world, tmp_path, monkeypatch, capsys, caplog):
    """issue 23 item 4: 0.5 epochs of 48 rows in batches of 8 are 3 steps; train.max_steps 2 caps them, and the
    resolved count is printed before training."""
    import json
    import logging

    with caplog.at_level(logging.INFO, logger="stages.train"):
        code, err = _train(world, world / "cache.parquet", tmp_path / "t", monkeypatch, capsys, "train.max_steps=2")
    assert code == 0, err
    assert "training 2 steps: 0.5 epochs x 48 cache rows / batch_size 8, capped at train.max_steps = 2" in caplog.text
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["steps"] == 2


def test_train_records_its_settings_spelled_as_params_yaml(world, tmp_path, monkeypatch, capsys):
    """metrics.json's params and the policy's train_params are settings.yaml's train section: keys as params.yaml
    spells them (`lambda`, not the field name `lam`), one helper (stages.cli.params.as_params) for all three."""
    import json

    code, err = _train(world, world / "cache.parquet", tmp_path / "t", monkeypatch, capsys, "train.max_steps=1",
                       "train.lambda=3.5")
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "t" / "settings.yaml").read_text())["train"]
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())["params"]
    train_params = torch.load(tmp_path / "t" / "policy.pt", map_location="cpu", weights_only=True)["train_params"]
    for recorded in (summary, train_params):
        assert "lam" not in recorded and recorded["lambda"] == 3.5
        assert recorded == settings
