"""The released CCA recipes as presets, resolved in one place (`resolve`).

Values from the paper (Appendix E, Table 4) and the released scripts, written out in
docs/upstream.md, "The released CCA recipes": LlamaGen_finetune.py (B, L, XL), LlamaGen_finetune_fsdp.py (XXL, 3B),
VAR_finetune.py with VAR's lr_control.py. A preset is named by the top-level `preset:` of params.yaml or by
`cca-pipe --preset NAME`; it sets every section the recipe concerns (SECTIONS, in params.yaml spelling: the
training data's views, the reference cache, train, eval's sampler) and may say which model it is meant for
(`model`), which the stages check against the checkpoint they load. DDO's presets (`var-d16-ddo`, `var-d30-ddo`
after the released script; `llamagen-L-ddo`, ours, listed in OURS) set the negatives section too.

Resolution, lowest to highest: the stage config's defaults <- the preset named in params.yaml <- the keys
written in the params.yaml section <- a `--preset` given on the command line <- the profile (`profile: trial`,
PROFILES) <- `--set` overrides. A preset
may also carry values for a loss other than CCA (`per_loss`: DPO's beta_d, Unlearning's lambda_u, paper
Table 3), which join the preset's own level when the resolved `train.loss` names that loss.
Besides the released recipes: `llamagen-L-lambda`, the paper's Table 5 policy (not in the released code).

The reference sees the recipe's dropout: the scripts run it in train mode (`ref_model.train()` with
--keep_dropout; VAR's `ref.train()` with drop path), so at step 0 log p_theta - log p_phi is zero-mean noise.
The cache reproduces that reference distribution: reflogp.dropout / drop_path equal train's, and each cache
row is scored with one seeded draw of the masks, keyed by (reflogp.seed, cache row, pos/neg/null)
(pipeline.refcache). The scripts redraw the reference's masks (and the row's random crop and rolled negative)
at every visit of a row; the cache holds reflogp.visits draws per row, by default one per train epoch
(`visits: epochs`: 1 for the released recipes, 3 for llamagen-L-lambda), and train's epoch e reads visit e,
so every preset sees the release's distribution. The policy draws its own masks, keyed by (train.seed, visit).

Deliberate departures from the scripts, documented in docs/imagenet.md ("Settings, presets and the released recipe"):
- Negatives `roll` are drawn once per cache row from a seeded global permutation, not re-rolled in each
  2-row micro-batch at every step.
"""

from __future__ import annotations

import copy
import logging

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

# LlamaGen (Table 4): lambda per size; B/L/XL trained with DDP, XXL/3B with FSDP (LlamaGen_finetune_fsdp.py)
_LLAMAGEN_LAMBDA = {"B": 1000.0, "L": 300.0, "XL": 1000.0, "XXL": 1000.0, "3B": 500.0}
_LLAMAGEN_FSDP = ("XXL", "3B")
_LLAMAGEN_CCA_CFG_BETA = {"B": 0.1, "L": 0.02, "XL": 0.1, "XXL": 0.1, "3B": 0.1}
_LLAMAGEN_TRAIN = {
    "loss": "cca", "beta": 0.02, "lr": 1e-5, "lr_schedule": "constant", "epochs": 1.0, "batch_size": 256,
    "uncond_ratio": 0.1,
    "dropout": 0.1,  # --keep_dropout: resid, ffn and token dropout 0.1, LlamaGen's pretraining values
    "drop_path": 0.0,
    "weight_decay": 0.05, "betas": [0.9, 0.95], "grad_clip": 1.0,
    # the script sums its 16 micro-batch losses (8 GPUs x 2 rows x accumulation 16 = 256) without dividing:
    # its gradient is 16x the batch mean, which clipping at 1.0 sees (AdamW itself is scale-free)
    "loss_scale": 16.0,
    "micro_batch_size": 2,  # rows per GPU per forward
}
# VAR (Table 4): lambda and the lin0 schedule's end ratio per depth; drop path 0.1 * depth / 24, none for d16
_VAR = {16: (50.0, 0.1, 0.0), 20: (50.0, 0.1, 0.1 * 20 / 24), 24: (100.0, 0.01, 0.1), 30: (1000.0, 0.01, 0.125)}
# rows per GPU per forward: VAR's per-GPU batch 256 / ac / 8 GPUs with accumulation ac = 4, 8, 8, 16
_VAR_MICRO_BATCH = {16: 8, 20: 4, 24: 4, 30: 2}
_VAR_TRAIN = {
    "loss": "cca", "beta": 0.02, "lr": 2e-5, "epochs": 1.0, "batch_size": 256, "uncond_ratio": 0.1, "dropout": 0.0,
    # lr_control.lr_wd_annealing('lin0'): warm-up over 2% from 0.005 lr, 5% flat, linear decay to end_ratio lr
    "lr_schedule": "lin0", "warmup_fraction": 0.02, "warmup_start": 0.005,
    "weight_decay": 0.05, "betas": [0.9, 0.95], "grad_clip": 2.0,
    "loss_scale": 1.0,  # VAR multiplies each of its ac micro-batch losses by 1/ac: the batch mean
}
_ROLL = {"negatives": "roll"}  # torch.roll(labels, -1), both scripts
# Table 3's baselines, chosen with `--set train.loss=dpo|unlearning` over any preset: the paper ablates DPO's
# beta_d over {0.01, 0.1, 1, 10} (reporting the best; 0.1 here, the grid's middle: sweep the rest with
# `dvc exp run -S train.beta=...`) and finds Unlearning helpful at 0.01 <= lambda_u <= 0.1 (0.1 here). Neither
# is CCA's beta or lambda, so a preset carries its own values for each loss.
_BASELINES = {"dpo": {"train": {"beta": 0.1}}, "unlearning": {"train": {"lambda": 0.1}}}
# Table 5: one LlamaGen-L policy for every lambda, sampled at the paper's test-time lambdas
_LAMBDA_CONDITIONED = {"lambda_conditioning": {"min": 1.0, "max": 8103.0},  # [e^0, e^9]
                       "epochs": 3.0}  # 3x the fixed-lambda recipe's 1 epoch
# What a recipe sets besides train, per family: the data the released command trains on (tokenize, and the
# views of codes imported from LlamaGen's extract_codes_c2i.py), the reference cache (reflogp) and eval's
# sampler as the released sampling scripts run it. Every section a recipe concerns is set here, so `--preset X`
# resolves the same keys to the same values from any folder (tests/test_presets.py), whatever its params.yaml.
_LLAMAGEN_DATA = {
    # CCA's README: --code-path .../imagenet384_train_code_c2i_flip_ten_crop/ (extract_codes_c2i.py --ten-crop)
    "tokenize": {"augment": "tencrop"},
    "import_codes": {"augment": "tencrop"},
}
_VAR_DATA = {"tokenize": {"augment": "randcrop:1"}}  # VAR's loader: resize 288, one random 256 crop, no flip
# Both families' cache: one row per image with a seeded view (the scripts' loaders give each visit of an
# image one random view; ten crops as 10 rows per image would make "1 epoch" 10 epochs of steps), rolled
# negatives, and the reference in train mode with the policy's dropout (--keep_dropout) / drop path, one draw
# per cache row. reflogp.visits (draws per row, = the recipe's train.epochs) is to be set in _llamagen and
# _var, beside the dropout, once that setting exists.
_REFLOGP = {**_ROLL, "views": "one"}
_LLAMAGEN_REFLOGP = {**_REFLOGP, "dropout": _LLAMAGEN_TRAIN["dropout"], "drop_path": _LLAMAGEN_TRAIN["drop_path"]}
# LLamaGen_sample_ddp.py as CCA's README runs it: temperature 1, top-k 0 and top-p 1.0 (off), constant
# guidance (cfg-scale 1.0 for CCA: none), 384px samples resized to 256 (--image-size-eval 256)
_LLAMAGEN_EVAL = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_schedule": "constant", "resize_to": 256}
# VAR_sample.py: top-k 900, top-p 0.96, guidance rising linearly over the scales (cfg 0 for CCA: none), no
# temperature, 256px samples kept
_VAR_EVAL = {"temperature": 1.0, "top_k": 900, "top_p": 0.96, "cfg_schedule": "linear", "resize_to": 0}


def _llamagen_model(size: str) -> dict:
    """The model a LlamaGen recipe is for: GPT-<size> at 384x384 through VQ-16, 24 x 24 = 576 tokens (the
    `model` keys besides `family` are pipeline.memplan.build_meta's description, for `cca-pipe plan`)."""
    return {"family": "llamagen", "gpt_model": f"GPT-{size}", "block_size": 576}


def _llamagen(size: str, train: dict, eval_: dict | None = None, per_loss: dict | None = None) -> dict:
    """A LlamaGen recipe: every section it sets."""
    fsdp = {"strategy": "fsdp"} if size in _LLAMAGEN_FSDP else {}
    return {"model": _llamagen_model(size), **_LLAMAGEN_DATA, "reflogp": _LLAMAGEN_REFLOGP,
            "train": {**_LLAMAGEN_TRAIN, **fsdp, **train}, "eval": {**_LLAMAGEN_EVAL, **(eval_ or {})},
            **({"per_loss": per_loss} if per_loss else {})}


def _var(depth: int) -> dict:
    """A VAR recipe (VAR_finetune.py at this depth): every section it sets."""
    lam, end, dpr = _VAR[depth]
    dpr = round(dpr, 6)
    return {"model": {"family": "var", "depth": depth}, **_VAR_DATA,
            "reflogp": {**_REFLOGP, "dropout": 0.0, "drop_path": dpr},
            "train": {**_VAR_TRAIN, "lambda": lam, "end_ratio": end, "drop_path": dpr,
                      "weight_decay_end": 0.08 if depth == 30 else 0.05,  # d30: wd annealed 0.05 -> 0.08
                      "micro_batch_size": _VAR_MICRO_BATCH[depth]},
            "eval": _VAR_EVAL, "per_loss": _BASELINES}


# DDO (docs/ddo.md, issue 32): one round of the released VAR script's recipe (NVlabs/DDO training_code/VAR,
# train_ddo.sh): beta 0.02, alpha 50, 1024 real rows (+ their 1024 fakes) per step, peak lr 4e-6 after a short
# warm-up, AdamW (0.9, 0.95), weight decay 0.05, clip 2.0, ~100k real images per round (98 steps; the release
# runs 2 rounds, each from the last round's best policy, with a fresh optimiser and new negatives). Ours, where
# the release is silent: the warm-up is lin0's over 5% of the steps from 0.005 lr and the lr then stays at its
# peak (end_ratio 1); the null-label ratio is train_ddo.sh's 0.5 (the script's default is 0.1); the reference
# runs in eval mode (no dropout / drop path); the negatives are guidance-free (cfg 0, the paper's reference; the
# script samples at VAR's cfg 1.0, a 0 -> 1 ramp) with no top-k/top-p, decoded and re-encoded as the script does.
_DDO_TRAIN = {"loss": "ddo", "beta": 0.02, "alpha": 50.0, "uncond_ratio": 0.5, "epochs": 1.0, "max_steps": 98,
              "lr_schedule": "lin0", "warmup_fraction": 0.05, "warmup_start": 0.005, "end_ratio": 1.0,
              "dropout": 0.0, "drop_path": 0.0, "weight_decay_end": None}
_DDO_NEGATIVES = {"ratio": 1, "cfg_scale": 0.0, "temperature": 1.0, "top_k": 0, "reencode": True}


def _var_ddo(depth: int) -> dict:
    """DDO's VAR recipe at this depth (the script's values are the same for d16 and d30)."""
    recipe = _var(depth)
    return {**recipe, "reflogp": {**_REFLOGP, "dropout": 0.0, "drop_path": 0.0},
            "train": {**recipe["train"], **_DDO_TRAIN, "batch_size": 1024, "lr": 4e-6},
            "negatives": {**_DDO_NEGATIVES, "top_p": 0.0, "cfg_schedule": "linear"}, "per_loss": {}}


def _llamagen_ddo(size: str) -> dict:
    """OURS, not a release (no DDO run on LlamaGen is reported): DDO's VAR recipe carried over to CCA's LlamaGen
    recipe at this size: CCA's batch (256), lr (1e-5), dropout (0.1, the reference matched) and sampler; DDO's
    beta, alpha, null-label ratio and round of ~100k real images (390 steps of 256)."""
    recipe = _llamagen(size, {})
    return {**recipe, "train": {**recipe["train"], **_DDO_TRAIN, "max_steps": 390, "dropout": _LLAMAGEN_TRAIN["dropout"]},
            "negatives": {**_DDO_NEGATIVES, "top_p": 1.0, "cfg_schedule": "constant"}}


PRESETS: dict[str, dict] = {
    **{f"llamagen-{size}": _llamagen(size, {"lambda": lam}, per_loss=_BASELINES) for size, lam in _LLAMAGEN_LAMBDA.items()},
    "llamagen-L-lambda": _llamagen("L", {"lambda": 300.0, **_LAMBDA_CONDITIONED},
                                   {"lambdas": [10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0]}),
    # CCA+CFG (Table 4): trained with the unconditional rows, sampled with guidance; lambda 1
    **{f"llamagen-{size}-cca-cfg": _llamagen(size, {"lambda": 1.0, "beta": beta}) for size, beta in _LLAMAGEN_CCA_CFG_BETA.items()},
    **{f"var-d{depth}": _var(depth) for depth in _VAR},
    "var-d16-ddo": _var_ddo(16),
    "var-d30-ddo": _var_ddo(30),
    "llamagen-L-ddo": _llamagen_ddo("L"),  # ours (see _llamagen_ddo)
}
OURS = ("llamagen-L-ddo",)  # presets that are our recipes, not a release's (docs/ddo.md)
# Profiles: `profile: trial` (params.yaml's top level, `--set profile=trial`, `dvc exp run -S profile=trial`) shrinks a
# run to a trial on a few images, over whatever preset and params.yaml say: every key that depends on the data's
# size or on the others is set together, so `cca-pipe check` passes on a 10-image folder (10 cache rows with
# `reflogp.views: one`) and each stage takes seconds to minutes. It is a layer, not a preset, so it composes
# with the model's recipe (lr, lambda, dropout, sampler: unchanged) and a trial tests the real settings.
# train: 8 rows of micro-batches of 1 (shared by 1, 2, 4 or 8 processes), 2 steps; eval: 4 samples of each of
# the model's first 2 classes (not 4 x 1000 of an ImageNet model), one seed. `full` (the default) changes nothing.
PROFILES: dict[str, dict] = {
    "full": {},
    "trial": {
        "tokenize": {"batch_size": 2, "chunk_rows": 4, "num_workers": 0},
        "import_codes": {},
        "reflogp": {"batch_size": 4, "part_rows": 8},
        "train": {"batch_size": 8, "micro_batch_size": 1, "max_steps": 2, "num_workers": 0},
        "eval": {"samples_per_class": 4, "num_classes": 2, "seeds": [0], "batch_size": 8, "grid_per_class": 2},
    },
}


def profile_of(params: dict, source: str = "params.yaml") -> str:
    """The profile params.yaml (or `--set profile=...`) names; `full` when none."""
    name = params.get("profile") or "full"
    if name not in PROFILES:
        raise ConfigError(f"{source}: profile = {name!r} is not a profile; write one of {', '.join(PROFILES)} "
                          "(trial: a few images, stages/cli/presets.py)")
    return name


# The params.yaml sections a preset may set (besides `model` and `per_loss`, which are not sections).
SECTIONS = ("tokenize", "import_codes", "reflogp", "negatives", "train", "eval")


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _preset_section(name: str, section: str, loss: str | None) -> dict:
    """A preset's values for a section, with its values for the chosen loss (`per_loss`) over them."""
    recipe = preset(name)
    return {**recipe.get(section, {}), **recipe.get("per_loss", {}).get(loss, {}).get(section, {})}


def resolve(section: str, params: dict, cli_preset: str | None = None, overrides: dict | None = None,
            source: str = "params.yaml") -> dict:
    """The section's values (params.yaml spelling) after presets and overrides; defaults are the config
    class's own and fill whatever is missing when it is built. A preset's values for a loss (DPO's beta_d,
    Unlearning's lambda_u) stand at the preset's own level once the resolved `loss` names it. `source`: the
    params file, for errors."""
    file_preset = params.get("preset") or None
    if file_preset is not None and not isinstance(file_preset, str):
        raise ConfigError(f"{source}: preset must be a name, not {file_preset!r}")
    written = params.get(section)
    if written is not None and not isinstance(written, dict):
        raise ConfigError(f"{source} section {section!r} must be a mapping of settings, not {written!r}")

    profile = profile_of(params, source)

    def layers(loss: str | None) -> dict:
        values: dict = {}
        if file_preset:
            values.update(_preset_section(file_preset, section, loss))
        values.update(written or {})
        if cli_preset:
            values.update(_preset_section(cli_preset, section, loss))
        values.update(PROFILES[profile].get(section, {}))
        values.update(overrides or {})
        return values

    loss = layers(None).get("loss")
    return layers(loss if isinstance(loss, str) else None)


def active(params: dict, cli_preset: str | None = None) -> str | None:
    return cli_preset or params.get("preset") or None


def check_model(name: str | None, family: str, model_cfg) -> None:
    """Warn when a preset meant for another model (family, VAR depth) is applied to this one."""
    if not name:
        return
    meant = PRESETS[name].get("model", {})
    if meant.get("family", family) != family:
        raise ConfigError(f"preset {name!r} is a {meant['family']} recipe but the model is {family}: choose one of "
                          f"{', '.join(n for n, p in PRESETS.items() if p.get('model', {}).get('family') == family)}")
    depth = meant.get("depth")
    if depth is not None and getattr(model_cfg, "depth", depth) != depth:
        fitting = f"var-d{model_cfg.depth}"
        fix = (f"set `preset: {fitting}` in params.yaml" if fitting in PRESETS
               else f"no released recipe for VAR-d{model_cfg.depth}: {name}'s settings are used")
        log.warning("preset %s is the recipe for VAR-d%d, but this checkpoint is VAR-d%d: %s", name, depth,
                    model_cfg.depth, fix)
