"""The released training recipe as settings: VAR's lr/wd annealing, the families' weight-decay groups,
dropout during fine-tuning, the presets as `cca-pipe config` resolves them, rolled negatives, and the
code digest that makes a reference cache stale."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import codefiles
from pipeline.alignment import AlignmentRun, lr_factor, make_batch, weight_decay_at
from pipeline.families import LLAMAGEN, VAR
from pipeline.formats import FormatError, read_ref_cache, write_ref_cache
from pipeline.losses import cca_loss
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR as VARNet
from pipeline.models.var import VARConfig, VARModel
from pipeline.refcache import draw_pairs, reference_logps
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
from stages.cli import STAGES, main
from stages.dvcstage import stage_options
from stages.presets import PRESETS, SECTIONS
from stages.train import TrainConfig

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
GPT_CFG = dict(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
PN = (1, 2, 3, 4)


# ------------------------------------------------------------------------------- lr and wd annealing


def test_lin0_schedule_by_hand():
    """VAR's lr_control.lr_wd_annealing('lin0') with total = 101 steps (max_it - 1 = 100), warm-up
    round(0.02 * 101) = round(2.02) = 2 steps, wp0 = 0.005, end ratio 0.01:
      step 0: 0.005 + 0.995 * 0/2 = 0.005
      step 1: 0.005 + 0.995 * 1/2 = 0.5025
      steps 2..6: pasd = (step - 2) / 98 in {0, 1/98, ..., 4/98 = 0.0408} < 0.05 -> 1.0
      step 7: pasd = 5/98 = 0.05102 >= 0.05 -> 0.01 + 0.99 * (93/98) / 0.95 = 0.998936627...
      step 51: pasd = 49/98 = 0.5 -> 0.01 + 0.99 * 0.5 / 0.95 = 0.531052631...
      step 100: pasd = 1 -> 0.01 + 0.99 * 0 / 0.95 = 0.01 exactly."""
    def f(step: int) -> float:
        return lr_factor("lin0", step, 101, 0.02, 0.005, 0.01)

    assert f(0) == pytest.approx(0.005, abs=1e-15)
    assert f(1) == pytest.approx(0.5025, abs=1e-15)
    assert [f(s) for s in range(2, 7)] == [1.0] * 5
    assert f(7) == pytest.approx(0.998936627282492, rel=1e-12)
    assert f(51) == pytest.approx(0.5310526315789474, rel=1e-12)
    assert f(100) == 0.01
    values = [f(s) for s in range(7, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # linear decay, strictly down to the end ratio


def test_constant_schedule_is_always_one():
    assert {lr_factor("constant", s, 101, 0.02, 0.005, 0.01) for s in range(101)} == {1.0}
    assert {lr_factor("constant", s, 10, 0.5, 0.0, 0.0) for s in range(10)} == {1.0}  # even with a warm-up fraction


def test_weight_decay_cosine_by_hand():
    """cur_wd = end + (start - end) (0.5 + 0.5 cos(pi step / (total - 1))): start at step 0, end at the last
    step, the mean at the midpoint (cos(pi/2) = 0); total 101, start 0.05, end 0.08 (the d30 recipe).
    Step 25: cos(pi/4) = 0.70710678 -> 0.08 - 0.03 * 0.85355339 = 0.05439340."""
    assert weight_decay_at(0, 101, 0.05, 0.08) == pytest.approx(0.05, abs=1e-15)
    assert weight_decay_at(100, 101, 0.05, 0.08) == pytest.approx(0.08, abs=1e-15)
    assert weight_decay_at(50, 101, 0.05, 0.08) == pytest.approx(0.065, abs=1e-15)
    assert weight_decay_at(25, 101, 0.05, 0.08) == pytest.approx(0.08 - 0.03 * (0.5 + 0.5 * math.sqrt(0.5)), rel=1e-12)
    assert {weight_decay_at(s, 101, 0.05, None) for s in range(101)} == {0.05}


def test_training_applies_the_lin0_lr_per_step(tmp_path):
    """4 steps, warm-up round(0.5 * 4) = 2, lr 1e-3, end ratio 0.1: logged lr per step
    step 0: 0.005e-3; step 1: (0.005 + 0.995/2) e-3 = 0.5025e-3; step 2: pasd 0/1 -> 1e-3; step 3: pasd 1 -> 0.1e-3."""
    policy, tokens, cache = _llamagen_world()
    cfg = TrainConfig(lr=1e-3, lr_schedule="lin0", warmup_fraction=0.5, warmup_start=0.005, end_ratio=0.1, epochs=4.0,
                      batch_size=len(cache["row"]), micro_batch_size=len(cache["row"]), uncond_ratio=0.0)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    logged = [run.step(*batch)["lr"] for batch in run.batches()]
    assert logged == pytest.approx([0.005e-3, 0.5025e-3, 1e-3, 0.1e-3], rel=1e-12)


# ------------------------------------------------------------------------------- parameter groups


def test_llamagen_decays_exactly_the_matrices():
    """LlamaGen's creat_optimizer: every parameter of dim >= 2 decays (embeddings, projections, output);
    the RMSNorm weights (1-d) do not."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CFG))
    decay, no_decay = LLAMAGEN.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "cls_embedding.embedding_table.weight", "tok_embeddings.weight", "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight", "output.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "norm.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _tiny_var_model() -> VARModel:
    torch.manual_seed(0)
    vae = MSVQModel(MSVQConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8,
                               patch_nums=PN)).eval()
    var = VARNet(VARConfig(depth=2, width=64, heads=2, num_classes=5, vocab_size=64, cvae=8, patch_nums=PN)).eval()
    return VARModel(var, vae.quantize).eval()


def test_var_no_decay_set():
    """VAR's train.py filter_params: no decay for 1-d parameters, names ending in bias, and names holding a
    no-decay key (pos_1LC, pos_start, lvl_embed, scale_mul, ...). Of the tiny VAR's parameters this leaves
    exactly the weight matrices below (lvl_embed.weight is 2-d but named; scale_mul_1H11 is 4-d but named)."""
    model = _tiny_var_model()
    decay, no_decay = VAR.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.var.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    block = ("attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight", "ffn.fc2.weight", "ada_lin.1.weight")
    assert decayed == {"word_embed.weight", "class_emb.weight", "head_nm.ada_lin.1.weight", "head.weight",
                       *(f"blocks.{i}.{k}" for i in range(2) for k in block)}
    kept = {names[id(p)] for p in no_decay["params"]}
    for name in ("pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.1.attn.scale_mul_1H11",
                 "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "head.bias", "word_embed.bias", "blocks.1.ada_lin.1.bias"):
        assert name in kept, name
    assert decayed | kept == set(names.values()) and not decayed & kept
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert not grouped & {id(p) for p in model.quantizer.parameters()}  # the frozen quantiser is in no group
    assert not any(p.requires_grad for p in model.quantizer.parameters())


# ------------------------------------------------------------------------------- dropout


def _llamagen_world():
    """A reference GPT, its cache over 12 rows of 16 tokens (3 classes, 'other' negatives), and a policy copy."""
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**GPT_CFG)).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, size=(12, 2, 16), dtype=np.uint16)
    labels = rng.integers(0, 3, size=12).astype(np.int32)
    pairs = draw_pairs(labels, 2, 3, seed=1, views="one")
    cache = {**pairs, **reference_logps(ref, tokens, pairs, batch_size=12, device=CPU)}
    return copy.deepcopy(ref), tokens, cache


def _losses(base: GPT, tokens, cache, dropout: float, seed: int) -> list[float]:
    policy = copy.deepcopy(base)
    cfg = TrainConfig(dropout=dropout, beta=1.0, lam=1.0, lr=1e-3, epochs=2.0, batch_size=12, micro_batch_size=6,
                      uncond_ratio=0.0, seed=seed)
    run = AlignmentRun(policy, tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)  # it sets the policy's dropout
    logged = [run.step(*batch)["loss"] for batch in run.batches()]
    assert len(logged) == 2  # 2 epochs of 12 rows, one 12-row batch each
    return logged


def test_dropout_is_live_and_seeded():
    """Each step's batch is all 12 rows, so step 0's loss depends on the seed only through dropout masks.
    Without dropout the policy equals the reference at step 0: every ratio is 0 and the loss is the
    ratio-zero value (1 + lambda) ln 2 / max(lambda, 1) = 2 ln 2 = 1.386294... (lambda 1) for any seed. With
    dropout 0.1 (live in train mode; the cache was computed in eval mode) it is not, differs between seeds
    0 and 1, and is reproduced exactly by the same seed. (lambda 1: with lambda 10 the positive and negative
    terms' shifts nearly cancel in the mean, so the first-step difference would be small.)"""
    base, tokens, cache = _llamagen_world()
    ratio_zero = 2 * math.log(2)
    plain0, plain1 = _losses(base, tokens, cache, 0.0, 0), _losses(base, tokens, cache, 0.0, 1)
    assert plain0[0] == pytest.approx(ratio_zero, rel=1e-5) and plain1[0] == pytest.approx(ratio_zero, rel=1e-5)
    drop0, drop0_again, drop1 = (_losses(base, tokens, cache, 0.1, s) for s in (0, 0, 1))
    assert drop0 == drop0_again
    assert abs(drop0[0] - drop1[0]) > 1e-3 and abs(drop0[1] - drop1[1]) > 1e-3
    assert abs(drop0[0] - ratio_zero) > 1e-3 and abs(drop1[0] - ratio_zero) > 1e-3


# ------------------------------------------------------------------------------- presets via `cca-pipe config`


def _config(params: str, *args: str):
    return CliRunner().invoke(main, ["--params", str(REPO / "pipelines" / params / "params.yaml"), *args])


def _train_section(params: str, *args: str) -> dict:
    result = _config(params, *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return yaml.safe_load(result.output)["train"]


def test_llamagen_l_recipe():
    train = _train_section("imagenet-llamagen", "config", "train", "--preset", "llamagen-L")
    assert train["lr"] == 1e-5 and train["beta"] == 0.02 and train["lambda"] == 300
    assert train["dropout"] == 0.1 and train["weight_decay"] == 0.05 and train["betas"] == [0.9, 0.95]
    assert train["grad_clip"] == 1.0 and train["batch_size"] == 256 and train["epochs"] == 1 and train["uncond_ratio"] == 0.1
    assert train["lr_schedule"] == "constant"


def test_var_recipes():
    d30 = _train_section("imagenet-var", "config", "train", "--preset", "var-d30")
    assert d30["drop_path"] == 0.125 and d30["lr_schedule"] == "lin0" and d30["end_ratio"] == 0.01
    assert d30["grad_clip"] == 2.0 and d30["lambda"] == 1000 and d30["dropout"] == 0.0
    d16 = _train_section("imagenet-var", "config", "train", "--preset", "var-d16")
    assert d16["drop_path"] == 0.0 and d16["lambda"] == 50


def _section(params: str, section: str, preset: str) -> dict:
    result = _config(params, "config", section, "--preset", preset)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return yaml.safe_load(result.output)[section]


@pytest.mark.parametrize("params, preset", [("imagenet-llamagen", p) for p in PRESETS if p.startswith("llamagen")]
                         + [("imagenet-var", p) for p in PRESETS if p.startswith("var")])
def test_every_preset_gives_the_reference_the_policys_dropout(params, preset):
    """The released scripts run the reference in train mode with the policy's dropout / drop path: every
    preset's cache (reflogp) has train's rates, so train's matched check accepts it."""
    reflogp, train = _section(params, "reflogp", preset), _section(params, "train", preset)
    assert (reflogp["dropout"], reflogp["drop_path"]) == (train["dropout"], train["drop_path"])
    assert train["reference_noise"] == "matched"
    if preset.startswith("llamagen"):
        assert reflogp["dropout"] == 0.1 and reflogp["drop_path"] == 0.0
    if preset == "var-d24":
        assert reflogp["drop_path"] == 0.1 and reflogp["dropout"] == 0.0


def test_set_wins_over_preset_and_unknown_preset_fails():
    train = _train_section("imagenet-llamagen", "--set", "train.lambda=7", "config", "train", "--preset", "llamagen-L")
    assert train["lambda"] == 7 and train["lr"] == 1e-5  # the rest of the preset still applies
    result = _config("imagenet-var", "config", "train", "--preset", "var-d99-nonesuch")
    assert result.exit_code != 0
    assert "var-d99-nonesuch" in result.output + str(result.exception)


def test_baseline_losses_take_the_presets_own_values():
    """Table 3's baselines over a recipe: `--set train.loss=dpo` resolves to a DPO beta_d from the paper's grid
    (not CCA's beta 0.02 and lambda 300), `unlearning` to a lambda_u in the paper's helpful range; values the
    user writes still win, at their usual level."""
    dpo = _train_section("imagenet-llamagen", "--set", "train.loss=dpo", "config", "train", "--preset", "llamagen-L")
    assert dpo["loss"] == "dpo" and dpo["beta"] == 0.1 and dpo["lr"] == 1e-5
    unlearning = _train_section("imagenet-var", "--set", "train.loss=unlearning", "config", "train", "--preset", "var-d24")
    assert unlearning["lambda"] == 0.1 and unlearning["beta"] == 0.02 and unlearning["lr_schedule"] == "lin0"
    cca = _train_section("imagenet-llamagen", "config", "train", "--preset", "llamagen-L")
    assert cca["beta"] == 0.02 and cca["lambda"] == 300  # CCA keeps the recipe's values
    mine = _train_section("imagenet-llamagen", "--set", "train.loss=dpo", "--set", "train.beta=1.0", "config", "train",
                          "--preset", "llamagen-L")
    assert mine["beta"] == 1.0
    from stages.presets import resolve

    written = {"preset": "llamagen-L", "train": {"beta": 10.0, "loss": "dpo"}}
    assert resolve("train", written)["beta"] == 10.0  # a value written in params.yaml is over the file's preset
    assert resolve("train", {"preset": "llamagen-L", "train": {"loss": "dpo"}})["beta"] == 0.1


def test_lambda_conditioned_recipe():
    """Table 5's policy: LlamaGen-L's recipe conditioned on lambda in [e^0, e^9], 3 epochs, sampled at the
    paper's test-time lambdas."""
    result = _config("imagenet-llamagen", "config", "eval", "--preset", "llamagen-L-lambda")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["eval"]["lambdas"] == [10, 100, 300, 1000, 3000, 10000]
    train = _train_section("imagenet-llamagen", "config", "train", "--preset", "llamagen-L-lambda")
    assert train["lambda_conditioning"] == {"min": 1.0, "max": 8103.0} and train["epochs"] == 3
    assert train["lr"] == 1e-5 and train["dropout"] == 0.1 and train["batch_size"] == 256


FOLDERS = [REPO, *sorted(p.parent for p in (REPO / "pipelines").glob("*/dvc.yaml"))]
COMMAND = {section: command for command, (_, _, section) in STAGES.items()}  # params section -> cca-pipe stage


def _stage_sets(folder: Path, command: str) -> set[str]:
    """`section.key`s the folder's dvc.yaml stage for `command` sets with its own --set: over any preset, as
    every --set is (`cca-pipe config` there shows what `dvc repro` runs)."""
    found = stage_options(folder, command)
    options = found[1] if found else []
    return {value.split("=", 1)[0] for flag, value in zip(options, options[1:]) if flag == "--set"}


def test_every_preset_sets_every_section_it_concerns():
    """The training data's views, the reference cache, train and eval's sampler: a preset that left one to the
    folder's params.yaml would mean another recipe in another folder (the root's `views: all`: 10 cache rows
    per ten-crop image, 10x the release's steps for "1 epoch")."""
    for name, recipe in PRESETS.items():
        assert set(recipe) - {"model", "per_loss"} <= set(SECTIONS), name
        assert recipe["reflogp"]["views"] == "one" and recipe["reflogp"]["negatives"] == "roll", name
        assert {"augment"} <= set(recipe["tokenize"]), name
        assert {"temperature", "top_k", "top_p", "cfg_schedule", "resize_to"} <= set(recipe["eval"]), name
        if recipe["model"]["family"] == "llamagen":
            assert recipe["tokenize"]["augment"] == recipe["import_codes"]["augment"] == "tencrop", name
            assert (recipe["eval"]["top_k"], recipe["eval"]["top_p"], recipe["eval"]["resize_to"]) == (0, 1.0, 256), name
        else:
            assert recipe["tokenize"]["augment"] == "randcrop:1" and "import_codes" not in recipe, name
            assert (recipe["eval"]["top_k"], recipe["eval"]["top_p"], recipe["eval"]["cfg_schedule"]) == (900, 0.96, "linear")


def test_a_preset_resolves_the_same_in_every_folder(monkeypatch):
    """`cca-pipe config <stage> --preset X`, in process, from the repository root and from each pipeline
    folder: every key the preset sets resolves to the preset's value, whatever the folder's params.yaml writes
    (the root's `reflogp.views: all`, `tokenize.augment: shift1`, `eval.cfg_schedule`, ...). Only a key the
    folder's dvc.yaml stage sets on its own command line is over it (pipelines/paper's CCA+CFG train stage
    sets train.lambda; `config reflogp` there shows its first reflogp stage, the lambda-conditioned policy's cache,
    which sets train.epochs only), listed here so none is added unseen."""
    import stages.params

    # YAML parsing is pure and three quarters of each command's time: parse each file once (copies handed out)
    for module, name in ((yaml, "safe_load"), (stages.params, "parse_yaml")):
        monkeypatch.setattr(module, name, _memoised(getattr(module, name)))
    over_preset = set()
    runner = CliRunner()
    for folder in FOLDERS:
        monkeypatch.chdir(folder)
        for name, recipe in PRESETS.items():
            for section in SECTIONS:
                if section not in recipe:
                    continue
                result = runner.invoke(main, ["config", COMMAND[section], "--preset", name])
                assert result.exit_code == 0, f"{folder}: {name} {section}: {result.output}{result.exception!r}"
                resolved = yaml.safe_load(result.output)[section]
                stage_sets = _stage_sets(folder, COMMAND[section])
                for key, value in recipe[section].items():
                    if f"{section}.{key}" in stage_sets:
                        over_preset.add((folder.name, f"{section}.{key}"))
                    else:
                        assert resolved[key] == value, (folder.name, name, section, key)
    assert over_preset == {("paper", "train.lambda")}


def _memoised(parse):
    seen: dict = {}

    def parsed(text, *args):
        key = (text if isinstance(text, str) else text.read(), *args)
        if key not in seen:
            seen[key] = parse(*key)
        return copy.deepcopy(seen[key])

    return parsed


def test_shipped_pipelines_leave_their_presets_keys_to_the_preset():
    """One source of truth: a shipped params.yaml does not write again a value its preset sets, and each dvc
    stage whose section the preset sets depends on `preset` (so changing it reruns the stage)."""
    for folder in FOLDERS:
        params = yaml.safe_load((folder / "params.yaml").read_text()) or {}
        if not params.get("preset"):
            continue
        recipe = PRESETS[params["preset"]]
        repeated = [f"{section}.{key}" for section in SECTIONS for key, value in recipe.get(section, {}).items()
                    if (params.get(section) or {}).get(key, object()) == value]
        assert not repeated, f"{folder.name}/params.yaml repeats its preset's {repeated}"
        stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
        for name, stage in stages.items():
            command = _command_of(stage["cmd"])  # None: `cca-pipe check`, which always runs (always_changed)
            if command is not None and STAGES[command][2] in recipe:
                assert "preset" in stage.get("params", []), f"{folder.name}/dvc.yaml stage {name} lacks params: preset"


def _command_of(cmd: str) -> str | None:
    """The cca-pipe stage subcommand of a dvc.yaml stage's command line (None for `check`)."""
    return next((a for a in cmd.split()[1:] if a in STAGES), None)


# ------------------------------------------------------------------------------- negatives


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


PROV = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 0, "num_classes": 2, "null_class": 2, "seq_len": 4,
        "logp_code": {"pipeline/refcache.py": "0" * 64}}


def _columns(pairs: dict) -> dict:
    n = len(pairs["row"])
    rng = np.random.default_rng(2)
    return {**pairs, "ref_logp_pos": rng.normal(-20, 1, n), "ref_logp_neg": rng.normal(-21, 1, n), "ref_logp_null": rng.normal(-20, 1, n)}


def test_rolled_equal_negatives_are_allowed_only_for_roll(tmp_path):
    """Two classes, 40 rows: the roll gives some rows their own label back; the cache accepts them only when
    its provenance says negatives 'roll', and make_batch marks exactly those rows positive twice."""
    labels = np.arange(40, dtype=np.int32) % 2
    pairs = draw_pairs(labels, 1, 2, seed=0, negatives="roll")
    same = pairs["neg_label"] == pairs["label"]
    assert 0 < same.sum() < 40
    cols = _columns(pairs)
    write_ref_cache(tmp_path / "roll.parquet", cols, {**PROV, "negatives": "roll"})
    read, _ = read_ref_cache(tmp_path / "roll.parquet")
    assert np.array_equal(read["neg_label"], pairs["neg_label"])
    write_ref_cache(tmp_path / "other.parquet", cols, {**PROV, "negatives": "other"})
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


# ------------------------------------------------------------------------------- code digest


def test_stale_logp_code_is_refused_naming_the_file(tmp_path):
    current = LLAMAGEN.logp_code()
    assert {"pipeline/models/llamagen.py", "pipeline/refcache.py", "pipeline/logprobs.py"} <= set(current)
    old = {**current, "pipeline/models/llamagen.py": "0" * 64}
    pairs = draw_pairs(np.arange(6, dtype=np.int32) % 2, 1, 2, seed=0)
    write_ref_cache(tmp_path / "c.parquet", _columns(pairs), {**PROV, "logp_code": old})
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
    write_ref_cache(tmp_path / "c.parquet", _columns(pairs), {**PROV, "logp_code": before["llamagen"]})
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
    write_ref_cache(tmp_path / "c.parquet", _columns(pairs), {**PROV, "logp_code": before})
    with pytest.raises(FormatError, match=r"differs in \['pipeline/b.py'\]"):
        read_ref_cache(tmp_path / "c.parquet", expect={"logp_code": after})


# ------------------------------------------------------------------------------- run length


def test_max_steps_caps_the_run_and_the_schedule_spans_the_capped_run():
    """train.max_steps (issue 23 item 4): 2 epochs of 12 rows in batches of 4 are 6 steps; capped at 4, the run
    takes 4, and lin0's last step reaches end_ratio at step 4 (the schedule spans the capped run)."""
    from pipeline.alignment import run_steps

    assert run_steps(2.0, 12, 4, None) == 6 and run_steps(2.0, 12, 4, 4) == 4 and run_steps(2.0, 12, 4, 100) == 6
    base, tokens, cache = _llamagen_world()
    logged = []
    cfg = TrainConfig(lr_schedule="lin0", end_ratio=0.1, lr=1e-3, epochs=2.0, max_steps=4, batch_size=4,
                      micro_batch_size=4, uncond_ratio=0.0)
    run = AlignmentRun(copy.deepcopy(base), tokens, cache, cfg, CPU, None, LLAMAGEN.param_groups)
    logged += [run.step(*batch)["lr"] for batch in run.batches()]
    assert len(logged) == 4 and logged[-1] == pytest.approx(1e-4)


def test_a_preset_for_another_var_depth_is_flagged_with_the_fix(caplog):
    """The warning names the preset to set when the checkpoint's depth has one, and says so when none exists."""
    from types import SimpleNamespace

    from stages.presets import check_model

    with caplog.at_level("WARNING", logger="stages.presets"):
        check_model("var-d16", "var", SimpleNamespace(depth=20))
        check_model("var-d16", "var", SimpleNamespace(depth=2))
        check_model("var-d16", "var", SimpleNamespace(depth=16))
    first, second = (r.getMessage() for r in caplog.records)
    assert first.endswith("this checkpoint is VAR-d20: set `preset: var-d20` in params.yaml")
    assert second.endswith("no released recipe for VAR-d2: var-d16's settings are used")
