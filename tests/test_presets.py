"""The released recipes (stages/cli/presets.py) as `cca-pipe config` resolves them: each preset's values, in
every pipeline folder, over params.yaml and under --set, and the warning for a checkpoint of another depth."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages.cli.dvcstage import stage_options
from stages.cli.main import STAGES, main
from stages.cli.presets import PRESETS, SECTIONS

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ presets via `cca-pipe config`


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
    from stages.cli.presets import resolve

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
    import stages.cli.params

    # YAML parsing is pure and three quarters of each command's time: parse each file once (copies handed out)
    for module, name in ((yaml, "safe_load"), (stages.cli.params, "parse_yaml")):
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


def test_a_preset_for_another_var_depth_is_flagged_with_the_fix(caplog):
    """The warning names the preset to set when the checkpoint's depth has one, and says so when none exists."""
    from types import SimpleNamespace

    from stages.cli.presets import check_model

    with caplog.at_level("WARNING", logger="stages.cli.presets"):
        check_model("var-d16", "var", SimpleNamespace(depth=20))
        check_model("var-d16", "var", SimpleNamespace(depth=2))
        check_model("var-d16", "var", SimpleNamespace(depth=16))
    first, second = (r.getMessage() for r in caplog.records)
    assert first.endswith("this checkpoint is VAR-d20: set `preset: var-d20` in params.yaml")
    assert second.endswith("no released recipe for VAR-d2: var-d16's settings are used")


def test_ddo_presets_are_the_released_var_recipe_and_ours_for_llamagen():
    """docs/ddo.md's VAR recipe (NVlabs/DDO train_ddo.sh): beta 0.02, alpha 50, 1024 real rows a step, lr 4e-6,
    AdamW (0.9, 0.95), weight decay 0.05, clip 2.0, 98 steps of 1024 (~100k real images) a round; negatives
    guidance-free, untruncated, re-encoded. The LlamaGen one is listed as ours."""
    from stages.cli.presets import OURS

    for name in ("var-d16-ddo", "var-d30-ddo"):
        train = PRESETS[name]["train"]
        assert (train["loss"], train["beta"], train["alpha"], train["batch_size"], train["lr"]) == ("ddo", 0.02, 50.0, 1024, 4e-6)
        assert (train["betas"], train["weight_decay"], train["grad_clip"], train["max_steps"]) == ([0.9, 0.95], 0.05, 2.0, 98)
        assert 98 * 1024 == 100_352  # ~100k real images a round
        assert PRESETS[name]["negatives"] == {"ratio": 1, "cfg_scale": 0.0, "temperature": 1.0, "top_k": 0, "reencode": True,
                                              "top_p": 0.0, "cfg_schedule": "linear"}
        assert name not in OURS
    assert PRESETS["var-d30-ddo"]["model"] == {"family": "var", "depth": 30}
    assert OURS == ("llamagen-L-ddo",) and PRESETS["llamagen-L-ddo"]["train"]["loss"] == "ddo"
    assert PRESETS["llamagen-L-ddo"]["model"]["family"] == "llamagen"
