"""cca-pipe select: the policy a train run hands on, chosen by a rule (DDO's rounds, docs/ddo.md "Rounds").

    cca-pipe select --run data/ddo/round1/train --vq data/vq/vq.pt --reference data/images/test \
        --classifier data/classifier/classifier.pt --out data/ddo/round1/select

select.rule `final`: the run's policy.pt. `best` (the release's rule: a round's best evaluation point): every
numbered checkpoint of the run (<run>/checkpoints/<step>.pt, written every train.save_every steps) and its final
policy, each sampled guidance-free and scored by eval (the eval section's sampler and scorer settings, with
select.samples_per_class per class and the one seed select.seed), the lowest FID kept. Writes <out>/policy.pt (a
copy of the selected file, which the next round reads as its reference) and <out>/selection.json: the rule, every
candidate with its step and FID, the selected step and why. The candidates are scored one after the other (one
model resident), each into an eval folder of its own under <out>.partial/scores/, which a rerun after a kill
reuses (the same settings and candidate files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import file_sha256
from pipeline.config import ConfigError, check_ranges, setting, settings_digest
from pipeline.distributed import World
from pipeline.outputs import StageDir, write_json

from .cli.params import as_params, save_settings
from .eval import EvalConfig
from .eval import run as evaluate

log = logging.getLogger(__name__)

RULES = ("final", "best")


@dataclass
class SelectConfig:
    rule: str = setting("final", choices=RULES)  # final: the run's last policy; best: its lowest-FID checkpoint
    samples_per_class: int = setting(10, ge=1)  # best: samples per class drawn from each candidate to score it
    seed: int = setting(0, ge=0)  # best: the sampling seed of every candidate's set (the same labels and streams)

    def __post_init__(self):
        check_ranges(self, "select")


def candidates(run_dir: Path, rule: str) -> list[tuple[int, Path]]:
    """(step, checkpoint) of the run's policies the rule chooses among, by step: `final` the run's policy.pt,
    `best` its numbered checkpoints too. The final policy's step is the run's step count (metrics.jsonl: a line
    per step)."""
    policy, log_file = run_dir / "policy.pt", run_dir / "metrics.jsonl"
    if not policy.is_file() or not log_file.is_file():
        raise ConfigError(f"--run {run_dir}: not a finished train run (no policy.pt or metrics.jsonl): pass the folder "
                          "`cca-pipe train --out` wrote")
    final = [(sum(1 for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()), policy)]
    if rule == "final":
        return final
    numbered = sorted((int(p.stem), p) for p in (run_dir / "checkpoints").glob("[0-9]*.pt") if p.stem.isdigit())
    if not numbered:
        raise ConfigError(f"select.rule best: {run_dir}/checkpoints holds no numbered checkpoint, so the final policy would "
                          "be the only candidate: train with train.save_every > 0 (e.g. a quarter of the run's steps), or "
                          "set select.rule: final")
    return [c for c in numbered if c[0] < final[0][0]] + final


def scoring_settings(cfg: SelectConfig, eval_cfg: EvalConfig) -> EvalConfig:
    """Eval's settings for one candidate: the policy alone (guidance-free), cfg.samples_per_class, one seed, no grids."""
    return dataclasses.replace(eval_cfg, methods=["cca"], seeds=[cfg.seed], samples_per_class=cfg.samples_per_class,
                               lambdas=[], grid_per_class=0)


def run(cfg: SelectConfig, eval_cfg: EvalConfig, run_dir: Path, out: Path, vq_path: Path | None = None,
        reference: Path | None = None, classifier_path: Path | None = None, fidelity_cache: Path | None = None,
        vq_model: str | None = None, world: World | None = None) -> dict:
    """Select the policy of the train run at `run_dir` by cfg.rule into `out` (see the module's docstring);
    `best` needs vq_path and reference (eval's --vq and --reference). Returns the selection record."""
    world = world or World()
    found = candidates(run_dir, cfg.rule)
    if cfg.rule == "best" and (vq_path is None or reference is None):
        raise ConfigError("select.rule best scores each checkpoint by eval: pass --vq and --reference")
    scoring = scoring_settings(cfg, eval_cfg)
    key = settings_digest([as_params(cfg), as_params(scoring) if cfg.rule == "best" else None,
                           [(step, file_sha256(path)) for step, path in found]])
    with StageDir(out, "select", key) as claim:
        partial = claim.open_partial()
        scored = []
        for step, path in found:
            fid = None
            if cfg.rule == "best":
                folder = partial / "scores" / f"{step:07d}"
                done = folder / "metrics.json"
                if done.is_file():
                    metrics = json.loads(done.read_text(encoding="utf-8"))
                    log.info("step %d: scored already, reusing it", step)
                else:
                    metrics = evaluate(scoring, vq_path, None, path, reference, classifier_path, folder,
                                       vq_model=vq_model, fidelity_cache=fidelity_cache, world=world)
                fid = float(metrics["methods"]["cca"]["fid"])
                log.info("step %d: FID %.3f on %d samples", step, fid, metrics["samples_per_method"])
            scored.append({"step": step, "checkpoint": str(path), "fid": fid})
        chosen = scored[-1] if cfg.rule == "final" else min(scored, key=lambda c: (c["fid"], -c["step"]))
        why = ("the run's final policy (select.rule final)" if cfg.rule == "final" else
               f"the lowest FID of {len(scored)} checkpoints, each on {cfg.samples_per_class} samples per class, seed {cfg.seed} "
               "(select.rule best; a tie goes to the later step)")
        record = {"rule": cfg.rule, "selected_step": chosen["step"], "selected": chosen["checkpoint"], "fid": chosen["fid"],
                  "why": why, "candidates": scored}
        shutil.copyfile(chosen["checkpoint"], partial / "policy.pt")
        write_json(partial / "selection.json", record)
        shutil.rmtree(partial / "scores", ignore_errors=True)  # the scores are in selection.json
        save_settings(partial, "select", cfg)
        claim.commit()
    log.info("selected step %d of %s (%s) -> %s", chosen["step"], run_dir, why, out / "policy.pt")
    return record
