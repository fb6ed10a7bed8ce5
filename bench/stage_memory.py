"""`cca-pipe plan` against the stages themselves at the ImageNet pipelines' real shapes (issue 30): each stage
run as `dvc repro` runs it (the command line of the pipeline folder's dvc.yaml stage, in a copy of
pipelines/imagenet-llamagen or imagenet-var), with stand-ins for the downloads in the released layouts
(random-weight VQ-16, GPT-B at 256 tokens, VAR's VQVAE and d16, ImageNet-like class folders of JPEGs), and
its peak RSS (the child's ru_maxrss, from os.wait4) against `cca-pipe plan --stage S --device cpu` run in
the same folder (so from the same settings).

    python bench/stage_memory.py                 # every row, writes bench/results/stage_memory.json
    python bench/stage_memory.py --rows tokenize-384

Few images (4): the plan is a per-process peak, and one batch of the real shape is the largest moment.
train runs 2 steps of 2 micro-batches of 2 rows (the second step's second micro-batch: AdamW's moments and
the accumulated gradients alive, the plan's case); eval draws one batch of eval.batch_size per method.
tokenize runs with num_workers 0 here: its loader workers are separate processes, counted by their own row
of the plan (pipeline.memplan.LOADER_WORKER_BYTES) and measured by `measure_loader_worker`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES, PER_CLASS = 2, 2  # 4 images: one batch of tokenize.batch_size 4, two micro-batches of 2 rows

# name -> (its pipeline folder, the pipeline, the folder's params.yaml changes, the measured stage); a folder's stages
# run in the pipeline's order, each once (tokenize-256's store is the one llamagen-train trains on)
ROWS = {
    "tokenize-384": ("llamagen-384", "imagenet-llamagen", {"image_size": 384}, "tokenize"),
    "tokenize-256": ("llamagen-256", "imagenet-llamagen", {"image_size": 256}, "tokenize"),
    "llamagen-train": ("llamagen-256", "imagenet-llamagen", {"image_size": 256}, "train"),
    "llamagen-eval": ("llamagen-256", "imagenet-llamagen", {"image_size": 256}, "eval"),
    "var-train": ("var", "imagenet-var", {}, "train"),
}
ORDER = ("tokenize", "reflogp", "train", "eval")
# what every row's folder sets beyond the shipped params.yaml: the micro-batch 2 and eval batch 20 (one batch
# of 2 classes x 10), a 2-step train (the second: AdamW moments alive), loader workers off (see the docstring)
SECTIONS = {
    "tokenize": {"num_workers": 0},
    "reflogp": {"batch_size": 4},
    "train": {"micro_batch_size": 2, "batch_size": 4, "epochs": 2.0, "max_steps": 2, "save_every": 1000},
    "eval": {"batch_size": 20, "samples_per_class": 10, "num_classes": CLASSES, "seeds": [0], "grid_per_class": 1},
}


def make_world(root: Path) -> Path:
    """Class folders of ImageNet-like JPEGs (500 x 375 noise) and the released checkpoints' layouts, random weights."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.models.llamagen import GPT, gpt_config
    from pipeline.models.var import VAR, var_config
    from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
    from pipeline.tokenizers.vq import VQModel, vq_config

    sys.path.insert(0, str(ROOT / "tests"))
    from test_imagenet_pipeline import save_random_inception

    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / "imagenet" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(root / "imagenet" / f"n{c:08d}" / f"{i}.JPEG")
    ckpts = root / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save({"model": VQModel(vq_config("VQ-16")).state_dict()}, ckpts / "vq_ds16_c2i.pt")
    torch.save({"model": GPT(gpt_config("GPT-B", block_size=256)).state_dict()}, ckpts / "c2i_B_256.pt")
    torch.save(MSVQModel(MSVQConfig()).state_dict(), ckpts / "vae_ch160v4096z32.pth")
    torch.save(VAR(var_config(16)).state_dict(), ckpts / "var_d16.pth")
    save_random_inception(ckpts / "inception.pth")
    (root / "done").write_text("")
    return root


def pipeline_folder(world: Path, pipeline: str, changes: dict, where: Path) -> Path:
    import yaml

    params = yaml.safe_load((ROOT / "pipelines" / pipeline / "params.yaml").read_text(encoding="utf-8"))
    ckpts = world / "checkpoints"
    params.update(data_dir=str(world / "imagenet"), eval_reference=str(world / "imagenet"), **changes)
    if pipeline == "imagenet-llamagen":
        params.update(preset="llamagen-B", vq_ckpt=str(ckpts / "vq_ds16_c2i.pt"), vq_model="VQ-16",
                      gpt_ckpt=str(ckpts / "c2i_B_256.pt"), gpt_model="GPT-B")
    else:
        params.update(vae_ckpt=str(ckpts / "vae_ch160v4096z32.pth"), var_ckpt=str(ckpts / "var_d16.pth"), depth=16)
    for section, values in SECTIONS.items():
        params[section] = {**params[section], **values}
    params["eval"]["inception_weights"] = str(ckpts / "inception.pth")
    where.mkdir(parents=True, exist_ok=True)
    (where / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (where / "dvc.yaml").write_text((ROOT / "pipelines" / pipeline / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return where


def cca_pipe() -> str:
    return str(Path(sys.executable).parent / "cca-pipe")


def run_stage(folder: Path, command: str) -> int:
    """Run the folder's dvc.yaml stage for `command` as dvc repro would; its peak RSS in bytes."""
    from stages.cli.dvcstage import stage_arguments

    _, options, arguments = stage_arguments(folder, command)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(folder / f"{command}.log", "w") as log:
        proc = subprocess.Popen([cca_pipe(), *options, command, *arguments], cwd=folder, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{command} in {folder} failed:\n{(folder / f'{command}.log').read_text()[-3000:]}")
    return usage.ru_maxrss * 1024


def planned(folder: Path, stage: str) -> tuple[int, str]:
    """`cca-pipe plan --stage S --device cpu` in the folder: (its peak on the machine in bytes, its output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([cca_pipe(), "plan", "--stage", stage, "--device", "cpu"], cwd=folder, env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    peak = re.search(r"^process peak: ([0-9.]+) GB", out.stdout, re.M)
    if peak is None:
        raise RuntimeError(f"no 'process peak' line in the plan:\n{out.stdout}")
    return int(float(peak.group(1)) * 1e9), out.stdout


def measure_rows(names: list[str], work: Path, plan: bool = True) -> list[dict]:
    world = make_world(work / "world")
    rows = []
    for name in names:
        folder_name, pipeline, changes, stage = ROWS[name]
        folder = work / folder_name
        if not (folder / "params.yaml").exists():
            pipeline_folder(world, pipeline, changes, folder)
        for command in ORDER[: ORDER.index(stage)]:
            if not (folder / f"{command}.done").exists():
                run_stage(folder, command)
                (folder / f"{command}.done").write_text("")
        start = time.time()
        measured = run_stage(folder, stage)
        (folder / f"{stage}.done").write_text("")
        row = {"row": name, "stage": stage, "measured_bytes": measured, "seconds": round(time.time() - start, 1)}
        if plan:
            row["planned_bytes"], row["plan"] = planned(folder, stage)
            row["error"] = measured / row["planned_bytes"] - 1
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cca_stage_memory"), help="stand-ins and pipeline folders")
    parser.add_argument("--measure-only", action="store_true", help="no plan")
    args = parser.parse_args()
    results = measure_rows(args.rows.split(","), args.work, not args.measure_only)
    out = ROOT / "bench" / "results" / "stage_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k != "plan"} for r in results],
                               "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPUs"}, indent=1))
