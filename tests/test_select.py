"""`cca-pipe select` (stages/select_policy.py): a train run's policy chosen by select.rule, final or best (the lowest
FID of its numbered checkpoints, each scored by eval's own code with the scoring settings), written with a record
of which step and why; resumable after a kill between candidates; bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from worlds import invoke, write_reference_images

from pipeline.checkpoint import save_checkpoint
from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from stages import eval as eval_stage
from stages import select_policy

ROOT = Path(__file__).resolve().parents[1]
GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)
SETS = ["select.samples_per_class=4", "eval.batch_size=12"]


def run_world(root: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """A tokenizer, classifier and reference images, and a train run's folder as `cca-pipe train` leaves it
    (pipeline/formats.py): policy.pt after 6 steps (metrics.jsonl: a line per step) and numbered checkpoints,
    each policy with weights of its own (so their FIDs differ)."""
    torch.manual_seed(0)
    save_checkpoint(root / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_classifier(root / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3)).eval())
    write_reference_images(root / "ref", np.random.default_rng(0))
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    for seed, path in enumerate([*(run / "checkpoints" / f"{s:07d}.pt" for s in steps), run / "policy.pt"]):
        torch.manual_seed(10 + seed)
        save_checkpoint(path, GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"loss": 1.0}) + "\n" for _ in range(6)))
    return root


def select(root: Path, monkeypatch, capsys, *sets: str, out: str = "sel") -> tuple[int, str]:
    argv = ["--params", ROOT / "params.yaml", "--device", "cpu", *[x for s in (*SETS, *sets) for x in ("--set", s)], "select",
            "--run", root / "run", "--vq", root / "vq.pt", "--reference", root / "ref", "--classifier", root / "clf.pt",
            "--fidelity-cache", root / "fidcache", "--out", root / out]
    return invoke(argv, monkeypatch, capsys)


def test_final_hands_on_the_runs_last_policy(tmp_path, monkeypatch, capsys):
    root = run_world(tmp_path)
    code, err = select(root, monkeypatch, capsys)
    assert code == 0, err
    record = json.loads((root / "sel" / "selection.json").read_text())
    assert record["rule"] == "final" and record["selected_step"] == 6 and record["fid"] is None
    assert [c["step"] for c in record["candidates"]] == [6]
    assert (root / "sel" / "policy.pt").read_bytes() == (root / "run" / "policy.pt").read_bytes()
    assert not (root / "fidcache").exists()  # nothing was sampled or scored


def test_best_keeps_the_lowest_fid_checkpoint_as_eval_scores_it(tmp_path, monkeypatch, capsys):
    root = run_world(tmp_path)
    code, err = select(root, monkeypatch, capsys, "select.rule=best")
    assert code == 0, err
    record = json.loads((root / "sel" / "selection.json").read_text())
    assert [c["step"] for c in record["candidates"]] == [2, 4, 6]
    # each candidate's FID is eval's own on the scoring settings: 4 per class, seed 0, the policy alone
    scoring = eval_stage.EvalConfig(methods=["cca"], seeds=[0], samples_per_class=4, batch_size=12, grid_per_class=0)
    fids = {}
    for candidate in record["candidates"]:
        metrics = eval_stage.run(scoring, root / "vq.pt", None, Path(candidate["checkpoint"]), root / "ref", root / "clf.pt",
                                 root / f"eval{candidate['step']}", fidelity_cache=root / "fidcache")
        fids[candidate["step"]] = metrics["methods"]["cca"]["fid"]
        assert candidate["fid"] == pytest.approx(fids[candidate["step"]], rel=1e-9)
    assert len(set(fids.values())) == 3  # three different policies: the choice is not a tie
    best = min(fids, key=fids.get)
    assert record["selected_step"] == best and record["fid"] == pytest.approx(fids[best], rel=1e-9)
    assert "lowest FID of 3 checkpoints" in record["why"]
    chosen = root / "run" / ("policy.pt" if best == 6 else f"checkpoints/{best:07d}.pt")
    assert (root / "sel" / "policy.pt").read_bytes() == chosen.read_bytes()
    assert not (root / "sel" / "scores").exists()  # the scores live on in selection.json, the samples do not


def test_best_resumes_after_a_kill_between_candidates(tmp_path, monkeypatch, capsys, caplog):
    root = run_world(tmp_path)
    real_eval, calls = select_policy.evaluate, []

    def killed_at_the_second(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(select_policy, "evaluate", killed_at_the_second)
    code, _ = select(root, monkeypatch, capsys, "select.rule=best")  # the CLI's exit on an interrupt
    assert code != 0
    assert not (root / "sel").exists() and (root / "sel.partial" / "scores" / "0000002" / "metrics.json").is_file()
    caplog.set_level("INFO")
    calls.clear()
    monkeypatch.setattr(select_policy, "evaluate", lambda *a, **k: (calls.append(a[3]), real_eval(*a, **k))[1])
    code, err = select(root, monkeypatch, capsys, "select.rule=best")
    assert code == 0, err
    assert [p.name for p in calls] == ["0000004.pt", "policy.pt"]  # step 2's score was reused
    assert any("step 2: scored already" in r.message for r in caplog.records)
    again = json.loads((root / "sel" / "selection.json").read_text())
    code, err = select(root, monkeypatch, capsys, "select.rule=best", out="fresh")
    assert code == 0, err
    assert json.loads((root / "fresh" / "selection.json").read_text()) == again  # the resumed selection is the uninterrupted one


def test_bad_input_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    root = run_world(tmp_path, steps=())
    code, err = select(root, monkeypatch, capsys, "select.rule=best")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "train.save_every" in errors[0] and "Traceback" not in err
    (root / "run" / "policy.pt").unlink()
    code, err = select(root, monkeypatch, capsys)
    assert code != 0 and "not a finished train run" in err and "Traceback" not in err
    code, err = select(root, monkeypatch, capsys, "select.rule=latest")
    assert code != 0 and "select.rule" in err
    assert not (root / "sel").exists()
