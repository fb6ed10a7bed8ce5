"""The paper's comparisons (stages/paper.py) from a synthetic set of runs laid out as pipelines/paper writes
them, with numbers chosen so that every claim's check has a known answer; and the paper pipeline reuses the
main pipeline's reference cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.formats import FormatError, write_ref_cache
from stages import paper
from stages.report import SweepConfig

ROOT = Path(__file__).resolve().parents[1]


def _eval(folder: Path, methods: dict[str, tuple[float, float, float]], lam: float | None = None) -> None:
    """An eval's metrics.json; `lam`: the lambda its (one) method sampled a lambda-conditioned policy at."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"seeds": [0], "methods": {
        name: {"fid": fid, "is": is_, "class_accuracy": acc} for name, (fid, is_, acc) in methods.items()},
        "sampled": {name: {"model": "cca", "cfg_scale": 0.0, "lam": lam} for name in methods}}))


def _train(folder: Path, loss: str, lam: float, logps: list[float], ratio_pos: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"params": {"loss": loss, "lambda": lam, "beta": 0.5}}))
    lines = ["step,loss,rewards/pos,rewards/neg,logps/pos"] + [f"{i},0.5,{ratio_pos},0.0,{v}" for i, v in enumerate(logps)]
    (folder / "log.csv").write_text("\n".join(lines) + "\n")


def test_the_paper_tables_and_checks(tmp_path: Path):
    data = tmp_path / "data"
    # Table 5's fixed policies: lambda 1 from the main sweep, 30 trained by pipelines/paper (fixed_lambdas); its
    # lambda 1 is the sweep's, read once
    sweep = SweepConfig(lambdas=[1], betas=[0.5], cfg_scales=[0.5, 1.0])
    cfg = paper.PaperConfig(dpo_betas=[0.25, 2.5], unlearning_lambdas=[0.01, 0.1, 1], cca_cfg_lambda=1, lambdas=[1, 10, 30],
                            fixed_lambdas=[1, 30])
    _eval(data / "eval", {"base": (12.0, 6.0, 0.6), "cfg_1": (5.5, 7.8, 0.87), "cca": (5.0, 7.9, 0.89)})
    _train(data / "train", "cca", 10.0, [-56.0, -55.0, -54.5])
    for s, fid in ((0.5, 6.5), (1.0, 5.5)):
        _eval(data / "sweep/cfg" / f"s{s}", {f"cfg_{s:g}": (fid, 7.0 + s, 0.8)})
    for folder, lam, fid, acc in (("sweep/cca/lam1-beta0.5", 1, 5.6, 0.86), ("paper/fixed/lam30", 30, 5.2, 0.9),
                                  ("paper/fixed/lam1", 1, 99.0, 0.1)):  # the sweep's lambda 1 is the one read
        _eval(data / folder / "eval", {"cca": (fid, 7.7 + lam / 100, acc)})
        _train(data / folder / "train", "cca", float(lam), [-56.0, -55.0])
    # DPO: beta 2.5 is its best point (9.0); its positives fall
    for beta, fid, logps in ((0.25, 11.0, [-56.0, -57.0]), (2.5, 9.0, [-56.0, -60.0, -75.0])):
        _train(data / f"paper/dpo/beta{beta}/train", "dpo", 10.0, logps)
        _eval(data / f"paper/dpo/beta{beta}/eval", {"cca": (fid, 6.5, 0.7)})
    # Unlearning helps at a small lambda (11.0 < base 12.0) and collapses at a large one
    for lam, fid in ((0.01, 11.5), (0.1, 11.0), (1, 30.0)):
        _train(data / f"paper/unlearning/lam{lam}/train", "unlearning", lam, [-56.0, -58.0])
        _eval(data / f"paper/unlearning/lam{lam}/eval", {"cca": (fid, 3.0, 0.3)})
    _train(data / "paper/cca_cfg/train", "cca", 1.0, [-56.0, -55.0])
    for s, fid in ((0.5, 4.6), (1.0, 5.9)):  # the best CCA+CFG point (4.6) beats CCA without guidance (5.0)
        _eval(data / "paper/cca_cfg/eval" / f"s{s}", {f"cca_cfg_{s:g}": (fid, 8.0 + s, 0.9)})
    for lam, fid, acc in ((1, 5.5, 0.85), (10, 5.4, 0.88), (30, 6.5, 0.91)):  # lambda 30: 25% worse than alone
        _eval(data / "paper/lambda/eval" / f"lam{lam}", {f"cca_lam{lam:g}": (fid, 7.5 + lam / 100, acc)}, lam=lam)

    # the reference-dropout experiment: dropout costs each row 2 or 4 nats (D = 3 ± 1); against the eval-mode
    # cache the policy's step-0 ratio is about -D, against the matched one about 0
    rows = 8
    columns = {"row": np.arange(rows), "label": np.zeros(rows, np.int32), "neg_label": np.ones(rows, np.int32),
               "view": np.zeros(rows, np.int16), "ref_logp_pos": np.full(rows, -50.0), "ref_logp_neg": np.full(rows, -55.0),
               "ref_logp_null": np.full(rows, -52.0)}
    provenance = {"tokens_fingerprint": "f" * 64, "ref_ckpt_sha256": "c" * 64, "seed": 0, "num_classes": 3, "null_class": 3,
                  "seq_len": 4}
    write_ref_cache(data / "reflogp.parquet", columns, provenance)
    (data / "paper/dropout").mkdir(parents=True)
    write_ref_cache(data / "paper/dropout/ref_logp.parquet",
                    {**columns, "ref_logp_pos": -50.0 - np.array([2.0, 4.0] * (rows // 2))}, {**provenance, "dropout": 0.1})
    for name, ratio, fid in (("eval_mode", -3.1, 5.4), ("matched", 0.05, 5.1)):
        _train(data / "paper/dropout" / name / "train", "cca", 10.0, [-56.0, -55.0], ratio_pos=ratio)
        _eval(data / "paper/dropout" / name / "eval", {"cca": (fid, 7.9, 0.9)})

    text = paper.run(data / "eval", data / "train", data / "sweep", data / "paper", data / "reflogp.parquet",
                     data / "paper/report", sweep, cfg)
    out = data / "paper/report"
    checks = json.loads((out / "checks.json").read_text())
    assert checks["table3_best"] == {"dpo": {"point": "DPO β=2.5", "fid": 9.0}, "unlearning": {"point": "Unlearning λ=0.1", "fid": 11.0}}
    assert checks["cca_fid_below_dpo_and_unlearning"] is True and checks["unlearning_best_fid_below_base"] is True
    assert checks["dpo_positive_logp_falls"] is True and checks["dpo_positive_logp_first_last"] == [-56.0, -75.0]
    assert checks["cca_cfg_best"]["fid"] == 4.6 and checks["cca_cfg_best_fid_at_most_cca_guidance_free"] is True
    assert checks["lambda_fid_over_fixed"] == {"1": 5.5 / 5.6, "10": 5.4 / 5.0, "30": 6.5 / 5.2}
    assert checks["lambda_within_15_percent"] is False  # 6.5 / 5.2 = 1.25
    assert checks["lambda_class_accuracy_rises"] is True and checks["lambda_is_rises"] is True
    assert checks["dropout"] == {"train_dropout": 0.1, "D_nats_mean": 3.0, "D_nats_std": 1.0, "rows": rows,
                                 "eval_mode": {"ratio_pos": -3.1, "ratio_neg": 0.0, "fid": 5.4},
                                 "matched": {"ratio_pos": 0.05, "ratio_neg": 0.0, "fid": 5.1}}
    dropout = (out / "dropout.md").read_text()
    assert "D = 3.00 ± 1.00 nats over 8 rows" in dropout and "| step-0 ratio pos | step-0 ratio neg | FID |" in dropout
    assert "| eval-mode reference (the cache without dropout) | -3.100 | 0.000 | 5.400 |" in dropout
    for name in ("table3.md", "table3_grid.md", "table5.md", "dropout.md", "fid_is.png", "logps_pos.png", "results.md"):
        assert (out / name).is_file(), name
    table3 = (out / "table3.md").read_text()
    assert "| DPO β=2.5 (best of its grid) | 9.000 |" in table3 and "| Unlearning λ=0.1 (best of its grid) | 11.000 |" in table3
    assert "DPO β=0.25" not in table3
    grid = (out / "table3_grid.md").read_text()
    assert all(f"| {label} |" in grid for label in ("DPO β=0.25", "DPO β=2.5", "Unlearning λ=0.01", "Unlearning λ=0.1",
                                                      "Unlearning λ=1"))
    assert "trained at λ=30 alone" in (out / "table5.md").read_text()
    assert "CCA+CFG λ=1 s=0.5" in text


def test_the_paper_pipeline_reuses_the_main_reference_cache():
    """No stage of pipelines/paper computes reference log-probs but the dropout experiment's one, whose point
    is a cache with the reference's dropout, and Table 5's, whose paper.lambda_epochs epochs read as many visits
    (reflogp.visits: epochs), and DDO's rounds over seeds (seeds-ddo-*), whose caches score their own fakes; every
    other training stage reads the main cache."""
    stages = yaml.safe_load((ROOT / "pipelines/paper/dvc.yaml").read_text())["stages"]
    trains = {name: s.get("do", s) for name, s in stages.items() if " train " in s.get("do", s)["cmd"]}
    assert set(trains) == {"dpo-train", "unlearning-train", "cca-cfg-train", "lambda-train", "dropout-train", "fixed-train",
                           "seeds-cca-train", "seeds-ddo-train-1", "seeds-ddo-train-2"}
    for name, stage in trains.items():
        if name.startswith("seeds-ddo-train-"):  # DDO: a cache of the round's reference with its fakes (docs/ddo.md)
            round_dir = f"../../data/paper/seeds/ddo/round{name[-1]}/"
            assert f"--cache {round_dir}" in stage["cmd"] and f"--negatives {round_dir}" in stage["cmd"], name
            assert "../../data/reflogp/ref_logp.parquet" not in stage["deps"], name
            continue
        if name == "dropout-train":  # against the main cache (eval mode) and against the dropout one
            caches = {item["cache"] for item in stages[name]["foreach"].values()}
            assert caches == {"../../data/reflogp/ref_logp.parquet", "../../data/paper/dropout/ref_logp.parquet"}
            assert "--cache ${item.cache}" in stage["cmd"] and "${item.cache}" in stage["deps"]
            continue
        if name == "lambda-train":
            assert "--cache ../../data/paper/lambda/ref_logp.parquet" in stage["cmd"]
            continue
        assert "../../data/reflogp/ref_logp.parquet" in stage["deps"], name
        assert "--cache ../../data/reflogp/ref_logp.parquet" in stage["cmd"], name
    reflogps = [name for name, s in stages.items() if " reflogp " in s.get("do", s)["cmd"]]
    assert reflogps == ["lambda-reflogp", "dropout-reflogp", "seeds-ddo-reflogp-1", "seeds-ddo-reflogp-2"]
    for r in (1, 2):  # DDO's rounds score the real rows with their fakes: the main cache has no fake column
        reflogp = stages[f"seeds-ddo-reflogp-{r}"]
        assert f"--negatives ../../data/paper/seeds/ddo/round{r}/" in reflogp.get("do", reflogp)["cmd"]
    assert "--set reflogp.dropout=${paper.dropout}" in stages["dropout-reflogp"]["cmd"]
    assert "--set train.epochs=${paper.lambda_epochs} reflogp" in stages["lambda-reflogp"]["cmd"]
    assert stages["lambda-reflogp"]["outs"] == ["../../data/paper/lambda/ref_logp.parquet"]


def test_a_lambda_conditioned_point_takes_its_lambda_from_what_eval_recorded(tmp_path: Path):
    """Table 5's lambda is the number eval recorded as sampled, neither parsed from the method's name nor from the
    folder's; a metrics.json without that record is refused by name."""
    _eval(tmp_path / "any", {"cca_lam0.3": (5.0, 7.0, 0.8)}, lam=1 / 3)
    point = paper._sampled_lambda(tmp_path / "any")
    assert point.kind == "lambda" and point.lam == 1 / 3 and point.metrics["fid"] == 5.0
    (tmp_path / "old").mkdir()
    (tmp_path / "old/metrics.json").write_text(json.dumps({"methods": {"cca_lam0.3": {"fid": 5.0}}}))
    with pytest.raises(FormatError, match=r"old/metrics.json .*no \['sampled'\]"):
        paper._sampled_lambda(tmp_path / "old")
