"""The shipped ImageNet pipelines with Hub ids in params.yaml (`hf://org/repo/file@<commit>`), offline: stand-in
checkpoints (tests/test_shipped_pipelines.py's) served from a local Hub cache laid out as huggingface_hub lays it
out (tests/hubcache.py) in a temporary HOME, HF_HUB_OFFLINE=1, `dvc repro` on a fresh repository of 10 images. As
shipped, the pipeline stops at its first stage, `check`, naming train.batch_size; with the trial profile (the
README's one step) it runs to the end. The provenance names the
commit; the reference cache computed by Hub id holds the same bytes as one computed from the local file.
(tests/test_shipped_pipelines.py runs the shipped settings to the end on local paths; the ten-image checks are
here so that one trial `dvc repro` per pipeline serves both.)"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from hubcache import add_file, commit_of, offline_env
from test_imagenet_pipeline import BIN, _run, init_pipeline_repo
from test_shipped_pipelines import CLASSES, make_world, shipped_params

# params key -> (the repo the stand-in plays, the file's name there)
SERVED = {
    "vq_ckpt": ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt"), "gpt_ckpt": ("ChenDRAG/CCA_LlamaGen", "c2i_tiny_64.pt"),
    "vae_ckpt": ("FoundationVision/var", "vae_tiny.pth"), "var_ckpt": ("ChenDRAG/CCA_VAR", "var_d2.pth"),
}
INCEPTION = ("someone/fid-inception", "weights-inception-2015-12-05-6726825d.pth")  # eval.inception_weights


@pytest.fixture(scope="module")
def world(tmp_path_factory, random_inception):
    return make_world(tmp_path_factory.mktemp("hubworld"), per_class=5, inception=random_inception)  # 10 images


@pytest.mark.parametrize("pipeline", ["imagenet-llamagen", "imagenet-var"])
def test_ten_images_stop_at_the_check_then_the_trial_profile_runs_offline_from_hub_ids(pipeline, world, tmp_path,
                                                                                       monkeypatch):
    """As shipped on 10 images, `dvc repro` stops at its first stage, `check`, in seconds, with one line naming
    train.batch_size, before tokenize ran; with `profile: trial` it runs to the end, each Hub file by its pinned
    commit."""
    home = tmp_path / "home"
    for key, value in {**offline_env(home), "HOME": str(home)}.items():
        monkeypatch.setenv(key, value)
    params = shipped_params(pipeline, world)
    local = {}
    for key in [k for k in SERVED if k in params]:
        repo, name = SERVED[key]
        commit = commit_of(repo, name)
        add_file(home / "hub", repo, name, params[key], commit)
        local[key] = params[key]
        params[key] = f"hf://{repo}/{name}@{commit}"
    local["inception_weights"] = params["eval"]["inception_weights"]
    add_file(home / "hub", *INCEPTION, local["inception_weights"], commit_of(*INCEPTION))
    params["eval"]["inception_weights"] = f"hf://{INCEPTION[0]}/{INCEPTION[1]}@{commit_of(*INCEPTION)}"
    folder = init_pipeline_repo(tmp_path / "repo", pipeline, params)
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=folder, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    print(f"{pipeline}: dvc repro stopped at the check after {elapsed:.1f} s")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 60, (elapsed, output[-3000:])
    named = [line for line in output.splitlines() if "train.batch_size" in line]
    assert len(named) == 1 and named[0].startswith("cca-pipe: check: stage 'train': train.batch_size = 256 is larger than "
                                                   "the 10 rows an epoch (a visit) of the reference cache will hold"), output[-3000:]
    assert "Running stage 'tokenize'" not in output and not (folder / "data/tokens.zarr").exists()
    assert not (folder / "data/tokens.zarr.partial").exists()

    params["profile"] = "trial"
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([BIN / "dvc", "repro"], folder)
    metrics = json.loads((folder / "data/eval/metrics.json").read_text())
    guided = [f"cfg_{s:g}" for s in params["eval"]["cfg_scales"]] if "cfg" in params["eval"]["methods"] else []
    assert set(metrics["methods"]) == {"base", "cca", *guided}
    assert metrics["samples_per_method"] == 4 * CLASSES  # the trial's 4 samples per class
    summary = json.loads((folder / "data/train/metrics.json").read_text())
    assert summary["steps"] == 2, summary  # the trial's max_steps
    assert "cca" in metrics["methods"] and all(np.isfinite(m["fid"]) for m in metrics["methods"].values())
    gen_key = "gpt_ckpt" if "gpt_ckpt" in params else "var_ckpt"
    repo, name = SERVED[gen_key]
    expected = {"repo": repo, "file": name, "revision": commit_of(repo, name), "commit": commit_of(repo, name)}
    # the provenance of train, eval and the reference cache names the commit each Hub file came from
    for stage in ("train", "eval"):
        assert expected in yaml.safe_load((folder / f"data/{stage}/settings.yaml").read_text())["hub_inputs"]
    inception = {"repo": INCEPTION[0], "file": INCEPTION[1], "revision": commit_of(*INCEPTION), "commit": commit_of(*INCEPTION)}
    assert inception in yaml.safe_load((folder / "data/eval/settings.yaml").read_text())["hub_inputs"]
    # the reference folder, a local path, is linked as eval's dependency too
    assert (folder / "data/checkpoints/eval_reference").readlink() == Path(params["eval_reference"]).absolute()
    hub_cache = json.loads(pq.read_schema(folder / "data/ref_logp.parquet").metadata[b"hub_inputs"])
    assert expected in hub_cache
    tok_key = "vq_ckpt" if "vq_ckpt" in params else "vae_ckpt"
    store = json.loads((folder / "data/tokens.zarr/zarr.json").read_text())["attributes"]
    assert store["hub_inputs"] == [{"repo": SERVED[tok_key][0], "file": SERVED[tok_key][1],
                                    "revision": commit_of(*SERVED[tok_key]), "commit": commit_of(*SERVED[tok_key])}]
    for key in local:  # the stages' DVC dependency: a link to the snapshot of the pinned commit
        assert (folder / "data/checkpoints" / key).resolve().read_bytes() == open(local[key], "rb").read()
        commit = commit_of(*SERVED.get(key, INCEPTION))
        assert f"/snapshots/{commit}/" in str((folder / "data/checkpoints" / key).readlink())

    # the same stage by local path: the same cache bytes (every column, the same provenance but the Hub record)
    args = ["reflogp", "--tokens", "data/tokens.zarr", "--ref", local[gen_key], "--out", tmp_path / "by_path.parquet"]
    args += ["--gpt-model", params["gpt_model"]] if gen_key == "gpt_ckpt" else \
        ["--vae", local["vae_ckpt"], "--vae-model", params["vae_model"], "--depth", str(params["depth"])]
    _run([BIN / "cca-pipe", *args], folder)
    by_hub, by_path = pq.read_table(folder / "data/ref_logp.parquet"), pq.read_table(tmp_path / "by_path.parquet")
    assert by_hub.column_names == by_path.column_names
    for column in by_hub.column_names:
        a, b = by_hub.column(column).to_numpy(), by_path.column(column).to_numpy()
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), column
    meta_hub, meta_path = dict(by_hub.schema.metadata), dict(by_path.schema.metadata)
    assert b"hub_inputs" not in meta_path and meta_hub.pop(b"hub_inputs")
    assert meta_hub == meta_path

    # the same pin reruns nothing (the check runs at every repro, always_changed, and its constant record reruns
    # nothing after it); a new revision pinned in params.yaml makes every stage reading the file stale
    again = _run([BIN / "dvc", "repro"], folder)
    assert "Running stage 'train'" not in again and "Running stage 'reflogp'" not in again, again[-3000:]
    assert "Running stage 'check'" in again and "Running stage 'tokenize'" not in again, again[-3000:]
    assert "check.txt" not in _run(["git", "status", "--porcelain", "--untracked-files=all"], folder)  # DVC ignores it
    changed = tmp_path / "changed"
    changed.write_bytes(open(local[gen_key], "rb").read() + b"\0")  # other bytes (status only hashes them)
    new = commit_of(repo, name, "v2")
    add_file(home / "hub", repo, name, changed, new, branch=None)
    params[gen_key] = f"hf://{repo}/{name}@{new}"
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([BIN / "dvc", "repro", "fetch"], folder)
    status = _run([BIN / "dvc", "status", "dvc.yaml"], folder)
    for stage in ("reflogp", "train", "eval"):
        assert f"{stage}:" in status, status


def test_an_unpinned_hub_id_and_a_cold_cache_stop_the_pipeline_in_one_line(world, tmp_path, monkeypatch):
    home = tmp_path / "home"
    for key, value in {**offline_env(home), "HOME": str(home)}.items():
        monkeypatch.setenv(key, value)
    params = shipped_params("imagenet-llamagen", world)
    params["profile"] = "trial"
    repo, name = SERVED["gpt_ckpt"]
    add_file(home / "hub", repo, name, params["gpt_ckpt"], commit_of(repo, name))
    for value, says in ((f"hf://{repo}/{name}", f"write hf://{repo}/{name}@{commit_of(repo, name)} in params.yaml"),
                        (f"hf://{repo}/c2i_XL_384.pt@{commit_of(repo, name)}", f"huggingface-cli download {repo} c2i_XL_384.pt")):
        params["gpt_ckpt"] = value
        folder = init_pipeline_repo(tmp_path / f"repo{len(value)}", "imagenet-llamagen", params)
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=folder, capture_output=True, text=True, timeout=600)
        # the unpinned id passes check and stops fetch; the file not in the cache stops check (which reads every stage's
        # inputs first): one line either way
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("cca-pipe: error:", "cca-pipe: check:"))]
        assert proc.returncode != 0 and len(errors) == 1 and says in errors[0], (proc.stdout + proc.stderr)[-3000:]
        assert "Running stage 'tokenize'" not in proc.stdout
