"""pipelines/ddo runs as shipped (`dvc repro` there) on a tiny version of the embedded default: the main
pipeline's tokens, pretrained model, tokenizer and classifier at test_dvc_smoke's tiny settings (the session's
tiny_upstream, tests/tiny_pipeline.py: built once, copied here), then both DDO rounds; round 2's negatives are
drawn by round 1's selected policy (select-1, select.rule final as shipped). Only the sizes in
pipelines/ddo/params.yaml are made tiny (its DDO settings stay as shipped). Slow (tests/conftest.py SLOW_MODULES):
dvc repro."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from tiny_pipeline import BIN, ROOT, _run, copy_of

from pipeline.checkpoint import file_sha256
from pipeline.formats import read_cache_provenance
from pipeline.tokenstore import open_token_store

# the sizes only: a tenth of an epoch, a small evaluation
DDO_TINY = {"train": {"epochs": 0.2, "batch_size": 32, "micro_batch_size": 16},
            "eval": {"samples_per_class": 6, "seeds": [0], "batch_size": 64, "grid_per_class": 2}}


def test_the_ddo_pipeline_runs_both_rounds_as_shipped(tiny_upstream: Path, tmp_path: Path):
    repo = copy_of(tiny_upstream, tmp_path / "repo")
    shutil.copytree(ROOT / "pipelines/ddo", repo / "pipelines/ddo", ignore=shutil.ignore_patterns("dvc.lock"))
    _run(["git", "add", "pipelines/ddo"], repo)
    _run(["git", "commit", "-qm", "pipelines/ddo"], repo)
    ddo = yaml.safe_load((repo / "pipelines/ddo/params.yaml").read_text())
    shipped = {section: dict(values) for section, values in ddo.items()}
    for section, values in DDO_TINY.items():
        ddo[section] = {**ddo.get(section, {}), **values}
    (repo / "pipelines/ddo/params.yaml").write_text(yaml.safe_dump(ddo, sort_keys=False))

    log = _run([str(BIN / "dvc"), "repro"], repo / "pipelines/ddo")  # the main pipeline's inputs are up to date

    for stage in ("check", *(f"{s}-{r}" for r in (1, 2) for s in ("negatives", "reflogp", "train", "eval", "select"))):
        assert f"Running stage '{stage}'" in log, stage
    data = repo / "data"
    assert "dvc.yaml:train'" not in log and "dvc.yaml:eval'" not in log  # the main pipeline's CCA run is not needed
    real = open_token_store(data / "tokens/train.zarr")
    selection = json.loads((data / "ddo/round1/select/selection.json").read_text())
    assert selection["rule"] == "final" and selection["selected"].endswith("round1/train/policy.pt")
    assert file_sha256(data / "ddo/round1/select/policy.pt") == file_sha256(data / "ddo/round1/train/policy.pt")
    for r, reference in ((1, data / "ar/gpt.pt"), (2, data / "ddo/round1/select/policy.pt")):
        fakes = open_token_store(data / f"ddo/round{r}/negatives.zarr")
        assert fakes.attrs["negatives"]["ref_ckpt_sha256"] == file_sha256(reference)  # round r's reference
        assert fakes.attrs["negatives"]["real_tokens_fingerprint"] == real.fingerprint
        assert fakes.tokens.shape[0] == real.tokens.shape[0]  # one fake per real image
        cache = read_cache_provenance(data / f"ddo/round{r}/ref_logp.parquet")
        assert cache["fakes_fingerprint"] == fakes.fingerprint and cache["ref_ckpt_sha256"] == file_sha256(reference)
        settings = yaml.safe_load((data / f"ddo/round{r}/train/settings.yaml").read_text())["train"]
        assert (settings["loss"], settings["alpha"], settings["beta"]) == \
            (shipped["train"]["loss"], shipped["train"]["alpha"], shipped["train"]["beta"])
        metrics = json.loads((data / f"ddo/round{r}/eval/metrics.json").read_text())
        assert set(metrics["methods"]) == {"cca"} and metrics["methods"]["cca"]["fid"] > 0
    # the negatives differ between rounds: round 2's reference is another model
    one, two = (open_token_store(data / f"ddo/round{r}/negatives.zarr") for r in (1, 2))
    assert one.fingerprint != two.fingerprint
