"""Stage `eval`: sample, decode and score the base model (without and with CFG) and the CCA policy.

    cca-pipe eval --vq data/vq/vq.pt --base data/ar/gpt.pt --policy data/train/policy.pt \
                  --reference data/images/test --classifier data/classifier/classifier.pt --out data/eval
Methods: `base` (no guidance), `cfg_<s>` (base with guidance l_c + s (l_c - l_u); LlamaGen's
cfg-scale = 1 + s), `cca` (the policy, no guidance), `cca_cfg_<s>` (the policy with guidance: CCA+CFG,
paper Fig. 5-6; its training kept the unconditional rows). Each is sampled with every seed in eval.seeds and
scored with torch-fidelity (FID, IS, precision, recall) against the held-out reference images, plus
class accuracy (the classifier's agreement with the intended label) and sampling throughput.
Writes metrics.json (mean and std over seeds; `sampled`: each method's model, cfg_scale and lam as numbers),
results.md, grids/<method>.png, samples/<method>_seed<k>.npz (ADM-evaluator layout: arr_0 uint8 NHWC images,
arr_1 intended labels, rows in a seeded random order: sample_order). Every rank samples its share of each unit;
the main process alone scores (Scorer), the rows in the file's order: `cca-pipe score` of the file gives its numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, check_ranges, setting
from pipeline.device import OutOfMemory, is_out_of_memory
from pipeline.distributed import World
from pipeline.evaluation import NPZ_ORDER, Scorer, Unit, format_results, gather_samples, open_scorer, scorer_weights
from pipeline.families import FamilyContract, Model, ModelSource, Tokenizer, load_model, load_tokenizer
from pipeline.live import LIVE_DIR, LiveLog
from pipeline.outputs import StageDir, write_json, write_text
from pipeline.progress import SampleCounter, StepCounter, progress
from pipeline.report import GRID_CLASSES
from pipeline.sampling import generate_images

from .cli.params import save_settings

log = logging.getLogger(__name__)

METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall", "class_accuracy", "images_per_s")  # sfid: Inception only
METHODS = ("base", "cfg", "cca", "cca_cfg")
DEFAULT_METHODS = ("base", "cfg", "cca")  # cca_cfg on request: the CCA+CFG experiment


@dataclass
class EvalConfig:
    samples_per_class: int = setting(100, ge=1)
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], nonempty=True, unique=True, ge=0)
    # base (no guidance), cfg (base at each cfg_scales), cca (the policy), cca_cfg (the policy at each cfg_scales);
    # `--methods` overrides it
    methods: list[str] = setting(default_factory=lambda: list(DEFAULT_METHODS), nonempty=True, unique=True, choices=METHODS)
    cfg_scales: list[float] = setting(default_factory=lambda: [1.0], unique=True, gt=0.0)  # s > 0 (s = 0 is `base`)
    # a lambda-conditioned policy (train.lambda_conditioning) is sampled at each of these: methods cca_lam<lambda>
    lambdas: list[float] = setting(default_factory=list, unique=True, gt=0.0)
    temperature: float = setting(1.0, gt=0.0)
    top_k: int = setting(0, ge=0)
    top_p: float = setting(1.0, ge=0.0, le=1.0)  # 1.0 (LlamaGen) or 0.0 (VAR): off
    # guidance t per step: "constant" s, or "linear" s * si/(S-1) (VAR's, CFGv2; VAR only)
    cfg_schedule: str = setting("constant", choices=("constant", "linear"))
    batch_size: int = setting(500, ge=1)
    grid_per_class: int = setting(8, ge=0)
    grid_classes: int = setting(GRID_CLASSES, ge=1)  # rows of grids/<method>.png: every class up to this, else evenly spaced
    num_classes: int = setting(0, ge=0)  # 0: every class of the model
    image_size: int = setting(0, ge=0)  # 0: the checkpoint's own; with a named gpt model, its resolution (256 or 384)
    resize_to: int = setting(0, ge=0)  # resize samples before scoring/export (LlamaGen: 384 -> 256); 0: keep
    feature_extractor: str = setting("classifier", choices=("classifier", "inception-v3-compat"))  # inception needs inception_weights
    inception_weights: str = ""  # path of weights-inception-2015-12-05-6726825d.pth (or .safetensors)

    def __post_init__(self) -> None:
        check_ranges(self, "eval")
        # here, not in the eval stage: every stage builds this config first, so tokenize already refuses it
        for guided in ("cfg", "cca_cfg"):
            if guided in self.methods and not self.cfg_scales:
                raise ConfigError(f"eval.methods includes {guided} but eval.cfg_scales is empty: list the guidance scales to "
                                  f"evaluate (e.g. eval.cfg_scales: [1.0], or --cfg-scale 1.0), or drop {guided} from "
                                  "eval.methods (or --methods)")
        if self.lambdas and "cca_cfg" in self.methods:
            raise ConfigError("eval.lambdas samples a lambda-conditioned policy, which is evaluated without guidance: "
                              "drop cca_cfg from eval.methods (or --methods), or empty eval.lambdas")

    def sampling_settings(self) -> dict:
        """The settings that determine a unit's samples and scores (its resume key): not which methods are
        evaluated (adding one reuses the units of the others) nor which classes its grid shows."""
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "grid_classes")}






















def plan_units(settings: EvalConfig) -> list[Unit]:
    """Every (method, scale, seed) of eval.methods, seed-major (the first seed's units write the grids)."""
    methods = settings.methods
    per_seed = ([("base", "base", 0.0, None)] if "base" in methods else []) \
        + ([(f"cfg_{s:g}", "base", s, None) for s in settings.cfg_scales] if "cfg" in methods else []) \
        + ([("cca", "cca", 0.0, None)] if "cca" in methods and not settings.lambdas else []) \
        + ([(f"cca_lam{lam:g}", "cca", 0.0, lam) for lam in settings.lambdas] if "cca" in methods else []) \
        + ([(f"cca_cfg_{s:g}", "cca", s, None) for s in settings.cfg_scales] if "cca_cfg" in methods else [])
    return [Unit(name, model, scale, seed, lam) for seed in settings.seeds for name, model, scale, lam in per_seed]


# ---------------------------------------------------------------------------------------------- every rank: sampling


@dataclass
class EvalModels:
    """What every rank samples with: the tokenizer, the models the units sample ("base", "cca"), on this
    rank's device, and the labels of each unit's set in sampling order (eval.samples_per_class of each class,
    class by class; the file's order is shuffled when it is written: sample_order)."""

    family: FamilyContract
    vq: Tokenizer
    by_role: dict[str, Model]
    labels: torch.Tensor


def on_device(model: torch.nn.Module, device: torch.device, role: str) -> torch.nn.Module:
    """The model on `device` in eval mode, or one clear error if it does not fit there: sampling is not
    sharded (one token at a time with KV caches; FSDP is train's and reflogp's strategy)."""
    try:
        return model.to(device).eval()
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        gigabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        raise OutOfMemory(f"{role} ({gigabytes:.1f} GB of weights) does not fit on {device} beside what is already there: eval "
                          "holds each model whole on every GPU (sampling is not sharded; train.strategy / reflogp.strategy "
                          "fsdp are for training and scoring). Evaluate one model at a time (--methods cca, then "
                          "--methods base,cfg) or use GPUs with more memory") from e


def check_eval_classes(settings: EvalConfig, classes: int, role: str, path: Path | None) -> None:
    """eval.num_classes must be classes the model knows; also `cca-pipe check`'s, from the file's shapes."""
    if settings.num_classes > classes:
        raise ValueError(f"eval.num_classes = {settings.num_classes} but {role} {path} has {classes} classes: "
                         f"set eval.num_classes to at most {classes} (0: every class of the model)")


def check_models_fit(models: dict, roles: dict[str, tuple[str, Path | None]], vq, vq_path: Path, settings: EvalConfig) -> None:
    """Before any sampling: every model's codes must be ones the tokenizer decodes, and eval.num_classes
    classes the model knows (else an IndexError after the first batch was drawn)."""
    for name, model in models.items():
        role, path = roles[name]
        if model.cfg.vocab_size > vq.cfg.codebook_size:
            raise ValueError(f"{role} {path} draws codes from a vocabulary of {model.cfg.vocab_size} but the tokenizer {vq_path} "
                             f"decodes only {vq.cfg.codebook_size}: pass the tokenizer the model was trained with (--vq)")
        check_eval_classes(settings, model.cfg.num_classes, role, path)
    counts = {name: model.cfg.num_classes for name, model in models.items()}
    if not settings.num_classes and len(set(counts.values())) > 1:  # 0 means the first model's classes: an IndexError
        (a, b) = sorted(counts, key=counts.get)[:2]
        raise ValueError(f"{roles[a][0]} {roles[a][1]} has {counts[a]} classes but {roles[b][0]} {roles[b][1]} has "
                         f"{counts[b]}: compare models of the same classes (the policy fine-tuned from the base), or set "
                         f"eval.num_classes to at most {counts[a]} to sample their first {counts[a]} classes")


def check_lambda_conditioning(policy: torch.nn.Module, policy_path: Path | None, settings: EvalConfig) -> None:
    """eval.lambdas lists the lambdas a lambda-conditioned policy is sampled at; any other policy takes none."""
    conditioned = policy.cfg.lambda_conditioning
    if conditioned != bool(settings.lambdas) or (conditioned and "cca_cfg" in settings.methods):
        raise ValueError(f"--policy {policy_path} is {'' if conditioned else 'not '}lambda-conditioned but eval.lambdas "
                         f"is {settings.lambdas}: list the lambdas to sample a lambda-conditioned policy at (and only "
                         "for one, without cca_cfg)")


def load_models(settings: EvalConfig, units: list[Unit], vq_path: Path, vq_model: str | None, paths: dict[str, Path | None],
                source: ModelSource, device: torch.device) -> EvalModels:
    """The tokenizer and the models of `units` (`paths`: "base" -> --base, "cca" -> --policy), checked to fit
    together. The tokenizer is passed on: VAR builds its input with the loaded VQVAE's quantiser (no re-read)."""
    family, vq = load_tokenizer(vq_path, vq_model)
    vq = vq.to(device).eval()
    layout = family.sampling_layout(vq, settings.image_size) if settings.image_size else None
    models = {}
    if any(u.model == "base" for u in units):
        models["base"] = on_device(load_model(paths["base"], "--base", source, layout=layout, tokenizer=vq)[1], device, "--base")
    if any(u.model == "cca" for u in units):
        models["cca"] = on_device(load_model(paths["cca"], "--policy", source.for_own_checkpoint(), tokenizer=vq)[1], device,
                                  "--policy")
        check_lambda_conditioning(models["cca"], paths["cca"], settings)
    check_models_fit(models, {"base": ("--base", paths["base"]), "cca": ("--policy", paths["cca"])}, vq, vq_path, settings)
    num_classes = settings.num_classes or next(iter(models.values())).cfg.num_classes
    return EvalModels(family, vq, models, torch.arange(num_classes).repeat_interleave(settings.samples_per_class))


def sample_unit(unit: Unit, models: EvalModels, settings: EvalConfig, work: Path, world: World) -> tuple[np.ndarray, float] | None:
    """Draw the unit's samples, this rank its share (sample i from its own stream: the set is the same for
    any number of processes); on the main process -> (all images uint8 in sample order, images/s)."""
    labels = models.labels
    mine = world.share(list(range(len(labels))))
    started = time.perf_counter()
    counter = SampleCounter(len(labels), world.size, desc=f"{unit.name} seed {unit.seed}")
    steps = StepCounter(models.family.step_unit, desc="batch")
    try:
        images, _ = generate_images(
            models.family, models.by_role[unit.model], models.vq, labels[mine], seed=unit.seed,
            batch_size=settings.batch_size, indices=mine, on_batch=counter, on_step=steps, resize_to=settings.resize_to,
            cfg_scale=unit.scale,
            lam=unit.lam, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, cfg_schedule=settings.cfg_schedule,
        )
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory sampling or decoding {unit.name} on {world.device} with eval.batch_size = {settings.batch_size} "
                          f"({'2 x ' if unit.scale else ''}{settings.batch_size} sequences with KV caches, then {settings.batch_size} images "
                          f"decoded at once): lower eval.batch_size, e.g. to {max(1, settings.batch_size // 2)}; `cca-pipe plan "
                          "--stage eval` gives the memory of each part (the images drawn are kept on the host)") from e
    finally:
        steps.close()
        counter.close()
    seconds = max(world.gather(time.perf_counter() - started))
    full = gather_samples(images, len(labels), work / "samples" / f".{unit.stem}", world)
    return None if full is None else (full, len(labels) / seconds)




def evaluate_units(units: list[Unit], models: EvalModels, settings: EvalConfig, scorer: Scorer | None, work: Path,
                   world: World) -> dict[str, list[dict]]:
    """Every unit in turn, on every rank: the main process (`scorer`) says whether it was evaluated already,
    else every rank draws its share and the main process scores the set. -> each method's scores per seed (on
    the main process; empty on the others)."""
    per_seed: dict[str, list[dict]] = {}
    # each point's scores as it is scored, keyed <method>/seed<seed>/<metric> (docs/imagenet.md, "Watching a run")
    live = LiveLog(work / LIVE_DIR, enabled=scorer is not None)
    for unit in progress(units, desc="eval", unit="unit"):
        scores = world.broadcast(scorer.finished(unit) if scorer else None)
        if scores is not None:
            log.info("seed %d %-8s already evaluated, reusing it", unit.seed, unit.name)
        else:
            drawn = sample_unit(unit, models, settings, work, world)
            scores = scorer.score(unit, *drawn) if scorer else None
        if scorer:
            per_seed.setdefault(unit.name, []).append(scores)
            live.log_summary({f"{unit.name}/seed{unit.seed}/{k}": v for k, v in scores.items()})
    live.close()
    return per_seed


# ------------------------------------------------------------------------------------- main process only: scoring














def summarise(per_seed: dict[str, list[dict]], units: list[Unit], seeds: list[int], samples_per_method: int,
              reference: str) -> dict:
    """Mean and std over seeds per method, what each method sampled (its model, guidance scale and lambda:
    numbers, not parsed back from its name), and CCA's FID relative to the base model's and the best CFG's."""
    summary = {
        name: {
            **{k: float(np.mean([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
            **{f"{k}_std": float(np.std([r[k] for r in runs])) for k in METRIC_KEYS if k in runs[0]},
        }
        for name, runs in per_seed.items()
    }
    sampled = {u.name: {"model": u.model, "cfg_scale": u.scale, "lam": u.lam} for u in units}
    cfg_names = [n for n in summary if n.startswith("cfg_")]
    best_cfg = min(cfg_names, key=lambda n: summary[n]["fid"]) if cfg_names else None
    checks = {}
    if "cca" in summary and "base" in summary:
        checks["cca_fid_over_base_fid"] = summary["cca"]["fid"] / summary["base"]["fid"]
    if "cca" in summary and best_cfg:
        checks["best_cfg"] = best_cfg
        checks["cca_fid_over_best_cfg_fid"] = summary["cca"]["fid"] / summary[best_cfg]["fid"]
    return {"methods": summary, "sampled": sampled, "checks": checks, "seeds": list(seeds),
            "samples_per_method": samples_per_method, "fid_reference": reference, "per_seed": per_seed,
            "npz_order": {"order": NPZ_ORDER, "permutation_seed": "the set's eval seed (pipeline/evaluation.py sample_order)",
                          "sample_index": "each npz's array: row i is sample sample_index[i] of the sampling order"}}


# ------------------------------------------------------------------------------------------------------------ the stage


def run(settings: EvalConfig, vq_path: Path, base_path: Path | None, policy_path: Path | None, reference: Path,
        classifier_path: Path | None, out: Path, source: ModelSource = ModelSource(), vq_model: str | None = None,
        fidelity_cache: Path | None = None, world: World | None = None) -> dict | None:
    """Evaluate eval.methods: base (no guidance), cfg (base at each eval.cfg_scales), cca (the policy), cca_cfg.
    Either family: with VAR, `vq_path` is the VQVAE (it decodes, and its quantiser builds VAR's input).
    `source`: how to read the base model (--gpt-model, --depth). `out` must be absent, empty or an eval
    directory of ours; it is built in `<out>.partial`. Under torchrun (`world`) every rank samples its share
    of each unit; the main process alone scores and writes, and returns the metrics (the others None)."""
    world = world or World()
    units = plan_units(settings)
    weights = scorer_weights(settings, classifier_path)
    with world.main_only(StageDir(out, "eval")) as claim:
        paths = {"base": base_path, "cca": policy_path}
        models = load_models(settings, units, vq_path, vq_model, paths, source, world.device)
        inputs = {"vq": vq_path, **{role: paths[role] for role in models.by_role}, "reference": reference}
        scorer = open_scorer(settings, claim, models, inputs, weights, classifier_path, fidelity_cache, world.device) \
            if world.main else None
        world.barrier()  # the others write their shards into the partial the main process prepared
        per_seed = evaluate_units(units, models, settings, scorer, claim.partial, world)
        if scorer is None:
            return None
        metrics = summarise(per_seed, units, settings.seeds, len(models.labels), scorer.ref.describe())
        write_json(claim.partial / "metrics.json", metrics)
        write_text(claim.partial / "results.md", format_results(metrics))
        save_settings(claim.partial, "eval", settings)
        claim.commit()
    return metrics




