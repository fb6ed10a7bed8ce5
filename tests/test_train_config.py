"""Issue 31.4, one train config: pipeline.alignment.AlignConfig owns the alignment settings, the train stage's
TrainConfig extends it. Every train setting reaches the run (each changed alone changes what the train stage
does), `cca-pipe config train` resolves as it did before the split, and dvc.yaml's sweep tracks the config's keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from worlds import train_stage_world

import pipeline.alignment
from pipeline.alignment import AlignConfig, StepRows
from pipeline.config import ConfigError
from pipeline.formats import TRAIN_STEP_LOG
from stages import train as train_stage
from stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "config_train.yaml"
# 16 images in 4 store chunks, a cache of 2 visits (32 rows): an epoch is 4 steps of 4 rows, 2 micro-batches each
BASE = dict(epochs=1.0, batch_size=4, micro_batch_size=2, lr=1e-3)

# field -> (the settings it needs to matter, over BASE; a value other than the one those give it). Each run is
# compared with the run of the same context without the value: what the stage did must differ.
CASES: dict[str, tuple[dict, object]] = {
    "loss": ({}, "dpo"),
    "beta": ({}, 0.25),
    "lam": ({}, 3.0),
    "alpha": ({"loss": "ddo"}, 1.0),  # DDO's fake-term weight: a DDO cache and its negatives (stage_world)
    "lr": ({}, 3e-3),
    "lr_schedule": ({}, "lin0"),
    "warmup_fraction": ({"lr_schedule": "lin0"}, 0.5),
    "warmup_start": ({"lr_schedule": "lin0", "warmup_fraction": 0.5}, 0.5),
    "end_ratio": ({"lr_schedule": "lin0"}, 0.5),
    "weight_decay": ({}, 0.5),
    "weight_decay_end": ({"weight_decay": 0.5}, 0.0),
    "betas": ({}, [0.5, 0.6]),
    "grad_clip": ({}, 1e-4),
    "loss_scale": ({}, 2.0),  # the gradient norm, logged before clipping, doubles
    "dropout": ({"reference_noise": "any"}, 0.2),  # the cache's reference saw none
    "drop_path": ({"reference_noise": "any"}, 0.2),
    "reference_noise": ({"dropout": 0.2}, "any"),  # "matched" refuses the cache
    "step0_rows": ({}, 0),  # no step-0 forwards
    "epochs": ({}, 2.0),
    "repeat_visits": ({"epochs": 3.0}, True),  # 3 epochs of a 2-visit cache: refused unless repeated
    "max_steps": ({}, 2),
    "batch_size": ({}, 8),
    "micro_batch_size": ({}, 4),  # the same gradient: seen in the forwards' batch shapes
    "uncond_ratio": ({}, 0.5),
    "seed": ({}, 1),
    "shuffle_buffer_chunks": ({}, 1),  # 4 store chunks: read one at a time instead of a uniform permutation
    "num_workers": ({}, 1),  # the rows are read by a loader process, not this one
    "strategy": ({}, "fsdp"),  # one process: seen in what the policy is distributed with
    "activation_checkpointing": ({}, True),  # each block runs again in backward
    "lambda_conditioning": ({}, {"min": 1, "max": 100}),
    "save_every": ({}, 2),  # a numbered checkpoint at step 2 of 4
    # the live metrics' mirrors: their files in <out>/live, or (package not installed) refused in one line
    "tensorboard": ({}, True),
    "wandb": ({}, True),
}


@pytest.fixture(scope="module")
def stage_world(tmp_path_factory) -> dict:
    return {**train_stage_world(tmp_path_factory.mktemp("world"), ddo=True), "traces": {}}


def _counted(forward, seen: dict):
    def counted(*args, **kwargs):
        seen["block_calls"] += 1
        return forward(*args, **kwargs)
    return counted


def _trace(world: dict, settings: dict) -> dict:
    """What the train stage did with these settings (over BASE), observed from outside its config: the refusal,
    or the step log's metrics, the trained weights, every forward of the policy (train mode, tensor shapes),
    block calls, the strategy the policy was distributed with, the steps' rows read in this process, the
    numbered checkpoints. Nothing in it is the settings themselves (settings.yaml, the checkpoints' config)."""
    key = json.dumps(settings, sort_keys=True)
    if key in world["traces"]:
        return world["traces"][key]
    seen = {"forwards": [], "block_calls": 0, "distributed_as": [], "rows_read_here": 0}
    load, distribute, getitem = train_stage.load_for_store, pipeline.alignment.distribute, StepRows.__getitem__

    def observed_load(*args, **kwargs):
        family, model = load(*args, **kwargs)
        model.register_forward_hook(lambda m, inputs, out: seen["forwards"].append(
            (m.training, [tuple(x.shape) for x in inputs if torch.is_tensor(x)])))
        for block in model.blocks():  # its forward itself: a checkpointed block's recomputation runs no hooks
            block.forward = _counted(block.forward, seen)
        return family, model

    def observed_distribute(policy, world_, strategy):
        seen["distributed_as"].append(strategy)
        return distribute(policy, world_, strategy)

    def observed_getitem(self, step):
        seen["rows_read_here"] += 1
        return getitem(self, step)

    out = world["dir"] / f"run{len(world['traces'])}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_stage, "load_for_store", observed_load)
        mp.setattr(pipeline.alignment, "distribute", observed_distribute)
        mp.setattr(StepRows, "__getitem__", observed_getitem)  # a loader process imports its own, unobserved
        try:
            ddo = settings.get("loss") == "ddo"
            train_stage.run(TrainConfig(**{**BASE, **settings}), world["tokens"], world["ddo_cache" if ddo else "cache"],
                            world["gpt"], out, negatives_path=world["negatives"] if ddo else None)
        except ConfigError as e:
            world["traces"][key] = {"refused": str(e)}
            return world["traces"][key]
    state = torch.load(out / "policy.pt", map_location="cpu", weights_only=True)["model"]
    weights = hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(state.items()))).hexdigest()
    log = [json.loads(line) for line in (out / f"{TRAIN_STEP_LOG}.jsonl").read_text().splitlines()]
    world["traces"][key] = {**seen, "log": log, "weights": weights,
                            "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*.pt")),
                            "live_mirrors": sorted(p.name for p in (out / "live").iterdir() if p.name in ("tensorboard", "wandb"))}
    return world["traces"][key]


def test_every_train_setting_has_a_case():
    """A new train setting needs a case below: a value and what it changes."""
    assert set(CASES) == {f.name for f in dataclasses.fields(TrainConfig)}


# a DataLoader process (spawned: ~9 s here) is a process the test starts: slow, as tests/conftest.py marks them
@pytest.mark.parametrize("field", [pytest.param(f, marks=pytest.mark.slow) if f == "num_workers" else f for f in CASES])
def test_every_train_setting_reaches_the_run(stage_world, field):
    """Each setting changed alone (in the context it matters in) changes what the train stage does: a setting
    that is parsed but never used (or dropped on the way to AlignmentRun) leaves the run as it was."""
    context, value = CASES[field]
    assert getattr(TrainConfig(**{**BASE, **context}), field) != value  # the case changes it
    before, after = _trace(stage_world, context), _trace(stage_world, {**context, field: value})
    assert "refused" not in after or "refused" not in before, after
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    assert changed, f"train.{field} = {value!r} changed nothing the run did"


def test_train_config_is_the_alignment_settings_and_the_stage_s_own():
    """One source of truth: the stage's config is AlignConfig's fields (defaults and ranges declared once, in
    pipeline/alignment.py) plus the recipe's own; an alignment setting is refused by AlignConfig alone."""
    align = {f.name for f in dataclasses.fields(AlignConfig)}
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    assert issubclass(TrainConfig, AlignConfig) and align < train
    assert train - align == {"save_every", "tensorboard", "wandb"}  # the recipe's checkpoint cadence, live mirrors
    assert all(dataclasses.asdict(TrainConfig())[k] == v for k, v in dataclasses.asdict(AlignConfig()).items())
    with pytest.raises(ConfigError, match=r"^train\.dropout = 1\.0: must be >= 0 and < 1$"):
        AlignConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"^train\.lambda_conditioning = "):
        AlignConfig(lambda_conditioning={"min": 5, "max": 1})


def resolved_train_settings(root: Path) -> str:
    """`cca-pipe config train`'s YAML for each shipped params.yaml x preset x loss (its per_loss values) and the
    trial profile, as stages/cli/main.py resolves it (stages.cli.params.build)."""
    from stages.cli.params import build, load_params, parse_overrides, settings_yaml
    from stages.cli.presets import PRESETS, active

    out = []
    for path in [root / "params.yaml", *sorted(root.glob("pipelines/*/params.yaml"))]:
        params = load_params(path)
        for preset in [None, *PRESETS]:
            for overrides in ([], ["train.loss=dpo"], ["train.loss=unlearning"], ["profile=trial"]):
                cfg = build(TrainConfig, params, "train", preset, parse_overrides(overrides, params, path), source=path)
                out.append(f"# {path.relative_to(root)} --preset {preset} {' '.join(overrides)}\n"
                           + settings_yaml({"train": cfg}, active(params, preset)))
    return "".join(out)


def test_config_train_resolves_every_preset_as_before_the_split():
    """tests/golden/config_train.yaml was recorded from commit 08a4ed1, before TrainConfig became AlignConfig's
    subclass (`python tests/test_train_config.py --record` with that commit's code): same keys, order and values.
    Since then (2026-12-07, issue 32) one key was added: `alpha: 50.0` after `lambda` (DDO's weight), re-recorded
    after checking that the 256 added lines were the only difference; then the 48 blocks of the DDO presets
    (var-d16-ddo, var-d30-ddo, llamagen-L-ddo) were added, the 256 blocks before them unchanged (checked), and the
    76 blocks of pipelines/ddo/params.yaml, the 304 others unchanged (checked). Then (issue 33) train.tensorboard
    and train.wandb (false) were added at the end of every block, the only lines added (checked)."""
    assert resolved_train_settings(ROOT) == GOLDEN.read_text()


def test_dvc_tracks_the_train_config_s_keys():
    """A stage that lists train params one by one tracks exactly tracked_train_params: a new setting is a field
    and a params.yaml line (and `python -m stages.cli.dvcdeps`), not a third list to remember."""
    from stages.cli.dvcdeps import DVC_FILES, lists_train_params, tracked_train_params

    listing = {}
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            stage = stage.get("do", stage)
            if lists_train_params(stage):
                train = [p for p in stage["params"] if isinstance(p, str) and p.startswith("train.")]
                listing[f"{dvc_file.relative_to(ROOT)}: {name}"] = train
                assert train == tracked_train_params(stage), (
                    f"{dvc_file.relative_to(ROOT)}: {name} lists other train params than TrainConfig's (python "
                    f"-m stages.cli.dvcdeps rewrites them): {set(train) ^ set(tracked_train_params(stage))}")
    assert list(listing) == ["dvc.yaml: sweep-train"]  # the one stage whose matrix sets train keys
    assert {"train.lambda", "train.beta", "train.save_every"}.isdisjoint(listing["dvc.yaml: sweep-train"])
    assert "train.lr" in listing["dvc.yaml: sweep-train"]


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    GOLDEN.write_text(resolved_train_settings(ROOT))
