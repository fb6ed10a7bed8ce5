"""`cca-pipe export RUN_DIR --out FOLDER`: a trained policy as a Hub-ready folder (docs/imagenet.md, "Sharing a
policy"): model.safetensors (the peer's state dict, as policy.pt holds it), config.json (the peer's own config in its
field names, Family.peer_config: LlamaGen's ModelArgs, VAR's VARHF constructor arguments) and README.md, a model card naming the base checkpoint and its
revision, the method and its settings, the data, the metrics when known and the command that reproduces the run.
Nothing is uploaded: `huggingface-cli upload` is the user's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from pipeline.checkpoint import KIND_KEY, CheckpointError, extract_state_dict, load_file
from pipeline.families import family_of_kind
from pipeline.outputs import OutputError, write_json, write_text

from .cli.params import SETTINGS_FILE, parse_yaml

POLICY = "policy.pt"
# train's end-of-run metrics under either name (a rename to metrics.json is under way; readers accept both)
TRAIN_METRICS = ("metrics.json", "summary.json")
EVAL_METRICS = "metrics.json"


def read_run(run_dir: Path) -> tuple[dict, dict, dict]:
    """(policy.pt's contents, settings.yaml, train metrics) of a train output folder; one line naming what is missing."""
    policy = run_dir / POLICY
    if not policy.is_file():
        raise FileNotFoundError(f"{policy} not found: RUN_DIR is a `cca-pipe train` output folder (policy.pt, settings.yaml)")
    obj = load_file(policy)
    if not isinstance(obj.get("config"), dict) or family_of_kind(obj.get(KIND_KEY)) is None:
        raise CheckpointError(f"{policy} is not a policy written by `cca-pipe train` (no model config or kind): export "
                              "reads train's own output folder")
    settings_file = run_dir / SETTINGS_FILE
    settings = parse_yaml(settings_file.read_text(encoding="utf-8"), str(settings_file)) if settings_file.is_file() else {}
    metrics = next((json.loads((run_dir / n).read_text(encoding="utf-8")) for n in TRAIN_METRICS if (run_dir / n).is_file()), {})
    return obj, settings or {}, metrics


def _eval_metrics(run_dir: Path, eval_dir: Path | None) -> tuple[Path | None, dict]:
    """The eval folder's metrics: the one given, else the pipelines' sibling `eval` folder if it has them."""
    folder = eval_dir if eval_dir is not None else run_dir.parent / "eval"
    path = folder / EVAL_METRICS
    if not path.is_file():
        if eval_dir is not None:
            raise FileNotFoundError(f"--eval {eval_dir}: no {EVAL_METRICS} there: pass a `cca-pipe eval` output folder")
        return None, {}
    return folder, json.loads(path.read_text(encoding="utf-8"))


def run(run_dir: Path, out: Path, eval_dir: Path | None = None) -> Path:
    from safetensors.torch import save_file

    obj, settings, train_metrics = read_run(run_dir)
    family = family_of_kind(obj[KIND_KEY])
    if obj["config"].get("lambda_conditioning"):
        raise CheckpointError(f"{run_dir / POLICY} is a lambda-conditioned policy: its lambda_embed weights have no place in "
                              f"{family.peer_class}, so no config.json could load it there; export a policy trained "
                              "without train.lambda_conditioning")
    config = family.peer_config(obj["config"])  # the peer's field names (docs/upstream.md, "Exported config")
    state = extract_state_dict(obj, run_dir / POLICY)
    eval_folder, eval_metrics = _eval_metrics(run_dir, eval_dir)
    if out.exists() and any(out.iterdir()) and not (out / "model.safetensors").is_file():
        raise OutputError(f"--out {out}: a folder holding other files: choose an empty or new folder (or an earlier export)")
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors sharing storage: each its own contiguous copy (the values are unchanged)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "cca_pipe_kind": str(obj[KIND_KEY])})
    tmp.replace(out / "model.safetensors")
    write_json(out / "config.json", config)
    write_text(out / "README.md", model_card(family, obj, settings, train_metrics, eval_folder, eval_metrics))
    if (run_dir / SETTINGS_FILE).is_file():
        shutil.copyfile(run_dir / SETTINGS_FILE, out / SETTINGS_FILE)
    return out


def _base(settings: dict, obj: dict) -> tuple[str, str]:
    """(the base checkpoint's name for the card, its revision line)."""
    hub = [h for h in settings.get("hub_inputs") or [] if isinstance(h, dict)]
    if hub:  # train reads one generator checkpoint from the Hub at most: --init
        h = hub[0]
        return f"{h['repo']}", f"`{h['file']}` of [{h['repo']}](https://huggingface.co/{h['repo']}) at commit `{h['commit']}` " \
                               f"(revision `{h['revision']}`)"
    sha = obj.get("init_sha256", "unknown")
    return "", f"a local file (sha256 `{sha}`)"


def model_card(family, obj: dict, settings: dict, train_metrics: dict, eval_folder: Path | None, eval_metrics: dict) -> str:
    base_repo, base_line = _base(settings, obj)
    front = {"library_name": "cca-pipe", "tags": ["cca", "condition-contrastive-alignment", family.name,
                                                  "class-conditional-image-generation"]}
    if base_repo:
        front["base_model"] = base_repo
    train_settings = settings.get("train") or obj.get("train_params") or {}
    preset = settings.get("preset") or obj.get("preset")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# CCA policy: {family.model_described}, fine-tuned with Condition Contrastive Alignment", "",
             "Guidance-free sampling: this policy is meant to be sampled without classifier-free guidance (paper: "
             "Condition Contrastive Alignment, Chen et al.).", "",
             "## Base checkpoint", "", f"- {base_line}", "",
             "## Method and settings", "",
             f"- method: CCA (`cca-pipe train`), {obj.get('steps', '?')} steps" + (f", recipe `{preset}`" if preset else ""),
             "- settings (params.yaml's `train` section, resolved):", "", "```yaml",
             yaml.safe_dump({"train": train_settings}, sort_keys=False).rstrip(), "```", "",
             "## Data", "",
             f"- class-conditional, {obj['config'].get('num_classes', '?')} classes; the token store and the reference "
             "cache the run read are named by their digests in the run's provenance (settings.yaml, the cache's metadata)", "",
             "## Metrics", ""]
    final = train_metrics.get("final") or {}
    if final:
        lines.append("- training, last step: " + ", ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, (int, float))))
    if eval_metrics:
        lines += [f"- evaluation (`{eval_folder.name}/{EVAL_METRICS}`):", "", "```json", json.dumps(eval_metrics.get("methods", eval_metrics),
                                                                                 indent=1)[:4000], "```"]
    if not final and not eval_metrics:
        lines.append("- none recorded")
    init = (f"hf://{settings['hub_inputs'][0]['repo']}/{settings['hub_inputs'][0]['file']}@{settings['hub_inputs'][0]['commit']}"
            if base_repo else "BASE_CHECKPOINT")
    lines += ["", "## Reproduce", "", "With the settings above as params.yaml's `train` section:", "", "```sh",
              f"cca-pipe {f'--preset {preset} ' if preset else ''}train --init {init} --tokens TOKENS --cache REF_LOGP --out data/train",
              "```", "",
              "## Files", "",
              "- `model.safetensors`: the state dict of the peer's model class, in its own key names",
              f"- `config.json`: the peer's own config, in its field names: {family.peer_class}",
              "- `settings.yaml`: the run's resolved settings", "",
              f"Loading: build {family.peer_class} from config.json and load model.safetensors into it strictly.", ""]
    return "\n".join(lines)

