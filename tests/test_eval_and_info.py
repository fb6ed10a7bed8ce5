"""eval resumes by (method, seed) unit and shows its progress; `cca-pipe info` describes stores, caches, checkpoints and
eval outputs (sample files, eval folders)."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from click.testing import CliRunner
from worlds import write_reference_images

from pipeline import evaluation
from pipeline.checkpoint import save_checkpoint
from pipeline.formats import write_ref_cache
from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import write_token_store
from stages import eval as eval_stage
from stages.cli.main import main

GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


def _world(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_checkpoint(tmp_path / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3)).eval())
    rng = np.random.default_rng(0)
    write_reference_images(tmp_path / "ref", rng)


def _eval(tmp_path, caplog=None):
    cfg = eval_stage.EvalConfig(samples_per_class=4, seeds=[0, 1], cfg_scales=[1.0, 1.5], batch_size=12, grid_per_class=2)
    return eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", tmp_path / "gpt.pt", tmp_path / "ref",
                          tmp_path / "clf.pt", tmp_path / "eval")


def test_eval_reuses_finished_units(tmp_path, caplog):
    _world(tmp_path)
    first = _eval(tmp_path)
    names = sorted(p.name for p in (tmp_path / "eval/samples").iterdir())
    assert names == sorted(f"{m}_seed{s}.{ext}" for m in ("base", "cfg_1", "cfg_1.5", "cca") for s in (0, 1) for ext in ("npz", "json"))
    (tmp_path / "eval/samples/cfg_1_seed1.json").unlink()  # as if killed while that unit was running
    caplog.set_level("INFO")
    second = _eval(tmp_path)
    reused = [r.message for r in caplog.records if "already evaluated" in r.message]
    assert len(reused) == 7  # 4 methods x 2 seeds, all but the removed unit
    for name in ("base", "cca"):
        assert second["per_seed"][name] == first["per_seed"][name]
    assert second["per_seed"]["cfg_1"][1]["fid"] == first["per_seed"]["cfg_1"][1]["fid"]  # recomputed identically


def test_info_describes_each_kind(tmp_path):
    _world(tmp_path)
    attrs = {"tokenizer_sha256": "ab" * 32, "codebook_size": 32, "image_size": 16, "grid": 4,
             "augmentations": ["center"], "class_names": ["a", "b", "c"]}
    fp = write_token_store(tmp_path / "t.zarr", np.zeros((5, 1, 16), np.uint16), np.arange(5).astype(np.int32) % 3, attrs)
    cols = {"row": np.arange(2), "label": np.zeros(2, np.int32), "neg_label": np.ones(2, np.int32), "view": np.zeros(2, np.int16),
            "ref_logp_pos": np.zeros(2), "ref_logp_neg": np.zeros(2), "ref_logp_null": np.zeros(2)}
    write_ref_cache(tmp_path / "c.parquet", cols, {"tokens_fingerprint": fp, "ref_ckpt_sha256": "cd" * 32, "seed": 0,
                                                   "num_classes": 3, "null_class": 3, "seq_len": 16})
    runner = CliRunner()
    store = runner.invoke(main, ["info", str(tmp_path / "t.zarr")]).output
    assert "(5, 1, 16) uint16" in store and fp in store and "complete" in store
    cache = runner.invoke(main, ["info", str(tmp_path / "c.parquet")]).output
    assert "rows    2" in cache and "cd" * 32 in cache
    ckpt = runner.invoke(main, ["info", str(tmp_path / "gpt.pt")]).output
    assert "llamagen-gpt" in ckpt and '"dim": 32' in ckpt and "tensors" in ckpt


def test_eval_reports_progress_per_batch_of_samples(tmp_path, monkeypatch):
    """A unit's samples advance a bar batch by batch (tqdm's rate and ETA), not only per finished unit, and a
    second bar token by token within each batch."""
    import pipeline.progress

    bars = []

    class FakeBar:
        def __init__(self, iterable=None, **kwargs):
            self.iterable, self.kwargs, self.updates, self.n, self.total = iterable, kwargs, [], 0, kwargs.get("total")
            self.totals = []  # at each reset
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

        def reset(self, total=None):
            self.n, self.total = 0, total
            self.totals.append(total)

        def update(self, n):
            self.updates.append(n)
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(pipeline.progress, "progress", FakeBar)
    _world(tmp_path)
    cfg = eval_stage.EvalConfig(samples_per_class=4, seeds=[0], methods=["base"], batch_size=5, grid_per_class=0)
    eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", tmp_path / "gpt.pt", tmp_path / "ref",
                   tmp_path / "clf.pt", tmp_path / "eval")
    sampling = [b for b in bars if b.kwargs.get("unit") == "img"]
    assert len(sampling) == 1 and sampling[0].kwargs["total"] == 12  # 3 classes x 4
    assert sampling[0].updates == [5, 5, 2]
    # within each batch, a bar of its tokens (16 per sample), one update per token drawn (issue 30 point 3)
    tokens = [b for b in bars if b.kwargs.get("unit") == "token"]
    assert len(tokens) == 1 and tokens[0].totals == [16, 16, 16] and tokens[0].updates == [1] * 48


def test_sample_counter_counts_every_rank_on_rank_zero(monkeypatch):
    """Under torchrun rank 0 counts its share times the world size, never past the total."""
    import pipeline.progress
    from pipeline.progress import SampleCounter

    updates = []
    monkeypatch.setattr(pipeline.progress, "progress", lambda **kw: type("Bar", (), {"update": lambda self, n: updates.append(n),
                                                                                       "close": lambda self: None})())
    counter = SampleCounter(total=10, world_size=4, desc="cca seed 0")  # rank 0's share: 3 of 10
    for drawn in (2, 1):
        counter(drawn)
    assert updates == [8, 2]


def test_slow_throughputs_keep_significant_digits():
    from pipeline.progress import significant
    from pipeline.report import results_table

    assert [significant(x) for x in (0.4, 0.0123, 4.567, 45.67, 1000.0, 12345.6)] == \
        ["0.400", "0.0123", "4.57", "45.7", "1000", "12346"]
    assert "| 0.250 |" in results_table([("cca", {"images_per_s": 0.25})])


def test_the_output_key_depends_only_on_the_models_evaluated(tmp_path):
    """An eval of the base model alone (dvc.yaml's sweep-cfg stages) is keyed the same whether or not a policy file
    exists at --policy yet: two fresh `dvc repro -f` ran sweep-cfg before or after train and keyed it differently."""
    from pipeline.outputs import read_json

    _world(tmp_path)
    cfg = eval_stage.EvalConfig(samples_per_class=2, seeds=[0], methods=["cfg"], cfg_scales=[1.0], batch_size=6, grid_per_class=0)
    keys = []
    for run in ("before", "after"):
        eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", tmp_path / "policy.pt", tmp_path / "ref", tmp_path / "clf.pt",
                       tmp_path / f"eval_{run}", fidelity_cache=tmp_path / "fidelity")
        keys.append(read_json(tmp_path / f"eval_{run}" / ".cca-pipe.json")["key"])
        (tmp_path / "policy.pt").write_bytes((tmp_path / "gpt.pt").read_bytes())  # train has written a policy meanwhile
    assert keys[0] == keys[1]


def test_two_evals_write_the_same_bytes(tmp_path):
    """Same models and settings => byte-identical ADM npz, grids and reference-feature cache (np.savez dated
    every zip entry with the time of writing: issue 21 item 5)."""
    from pipeline.checkpoint import file_sha256

    _world(tmp_path)
    cfg = eval_stage.EvalConfig(samples_per_class=2, seeds=[0], methods=["base", "cca"], cfg_scales=[1.0], batch_size=6,
                                grid_per_class=1)
    digests = []
    for run in ("a", "b"):
        eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", tmp_path / "gpt.pt", tmp_path / "ref", tmp_path / "clf.pt",
                       tmp_path / f"eval_{run}", fidelity_cache=tmp_path / f"fidelity_{run}")
        files = [*sorted((tmp_path / f"eval_{run}").glob("*/*.npz")), *sorted((tmp_path / f"eval_{run}").glob("grids/*.png")),
                 *sorted((tmp_path / f"fidelity_{run}").glob("*.npz"))]
        digests.append({p.name: file_sha256(p) for p in files})
    assert len(digests[0]) == 5  # base and cca samples, their grids, the reference features
    assert digests[0] == digests[1]


def test_metrics_record_what_each_method_sampled():
    """metrics.json carries each method's model, guidance scale and lambda as numbers (stages/paper.py reads the
    lambda there): a lambda-conditioned policy's units hold their lambda as a field, the name is a label."""
    cfg = eval_stage.EvalConfig(seeds=[0, 1], methods=["base", "cfg", "cca"], cfg_scales=[1.5], lambdas=[10.0, 0.25])
    units = eval_stage.plan_units(cfg)
    assert [(u.name, u.lam) for u in units if u.seed == 1] == [("base", None), ("cfg_1.5", None), ("cca_lam10", 10.0),
                                                               ("cca_lam0.25", 0.25)]
    per_seed = {name: [{"fid": 2.0 + i, "is": 3.0} for i in range(2)] for name in ("base", "cfg_1.5", "cca_lam10", "cca_lam0.25")}
    metrics = eval_stage.summarise(per_seed, units, cfg.seeds, 8, "ref")
    assert metrics["sampled"] == {"base": {"model": "base", "cfg_scale": 0.0, "lam": None},
                                  "cfg_1.5": {"model": "base", "cfg_scale": 1.5, "lam": None},
                                  "cca_lam10": {"model": "cca", "cfg_scale": 0.0, "lam": 10.0},
                                  "cca_lam0.25": {"model": "cca", "cfg_scale": 0.0, "lam": 0.25}}
    assert metrics["methods"]["cca_lam10"]["fid"] == 2.5 and metrics["methods"]["cca_lam10"]["fid_std"] == 0.5


def test_info_describes_an_eval_folder_and_its_sample_files(tmp_path):
    """`cca-pipe info` of eval's outputs (issue 30 point 3): a sample npz's layout, count, classes, order and the
    records of the eval that made it; the eval folder's methods, seeds and score table."""
    _world(tmp_path)
    metrics = _eval(tmp_path)  # 3 classes x 4 samples, seeds 0 and 1, base + cfg_1 + cfg_1.5 + cca
    runner = CliRunner()
    npz = runner.invoke(main, ["info", str(tmp_path / "eval/samples/cfg_1.5_seed1.npz")])
    assert npz.exit_code == 0, npz.output
    text = npz.output
    assert "arr_0              (12, 16, 16, 3) uint8" in text and "arr_1              (12,) int64" in text
    assert "sample_index       (12,) int64" in text and "samples            12\n" in text
    assert "image size         16 x 16" in text and "3 classes (0-2), 4 samples each" in text
    assert "shuffled: row i is sample sample_index[i] of the sampling order (class by class)" in text
    assert "method             cfg_1.5 (model base, cfg_scale 1.5), seed 1" in text
    assert "samples_per_class 4" in text and "temperature 1.0" in text and "cfg_schedule constant" in text
    unit = metrics["per_seed"]["cfg_1.5"][1]
    assert f"FID {unit['fid']:.3f}, IS {unit['is']:.3f}" in text and f"class acc. {unit['class_accuracy']:.3f}" in text
    base = runner.invoke(main, ["info", str(tmp_path / "eval/samples/base_seed0.npz")]).output
    assert "method             base (model base, no guidance), seed 0" in base

    folder = runner.invoke(main, ["info", str(tmp_path / "eval")])
    assert folder.exit_code == 0, folder.output
    text = folder.output
    assert "methods            base, cfg_1, cfg_1.5, cca" in text and "seeds              [0, 1]" in text
    assert "12 per method and seed, 8 sample files in samples/" in text
    assert "cca                model cca, no guidance" in text and "cfg_1.5            model base, cfg_scale 1.5" in text
    for name in ("base", "cfg_1", "cfg_1.5", "cca"):
        m = metrics["methods"][name]
        assert f"| {name} | {m['fid']:.3f} ± {m['fid_std']:.3f} | {m['is']:.3f} ± {m['is_std']:.3f} |" in text

    # copied without its hidden .cca-pipe.json: still an eval's, by its metrics.json
    shutil.copytree(tmp_path / "eval", tmp_path / "copy", ignore=shutil.ignore_patterns(".cca-pipe.json"))
    copy = runner.invoke(main, ["info", str(tmp_path / "copy")]).output
    assert copy.replace(str(tmp_path / "copy"), str(tmp_path / "eval")) == text
    (tmp_path / "eval/metrics.json").write_text("{", encoding="utf-8")  # damaged
    damaged = runner.invoke(main, ["info", str(tmp_path / "eval")])
    assert damaged.exit_code != 0 and "metrics.json cannot be read as JSON" in str(damaged.exception)
    (tmp_path / "eval/metrics.json").unlink()  # as in an eval being built (<out>.partial): the units scored so far
    partial = runner.invoke(main, ["info", str(tmp_path / "eval")]).output
    assert "INCOMPLETE" in partial and f"  {'cca_seed0.npz':<19}FID {metrics['per_seed']['cca'][0]['fid']:.3f}" in partial
    assert partial.count(".npz") == 8


def test_info_describes_a_foreign_sample_file_and_refuses_a_malformed_one(tmp_path, monkeypatch, capsys):
    """A file of another sampler (no sample_index, rows class by class) is described as class-sorted; one that
    is not an ADM batch is one line naming the file and what is expected."""
    from worlds import invoke

    images = np.zeros((6, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "sorted.npz", arr_0=images, arr_1=np.array([0, 0, 0, 1, 2, 2]))
    np.savez(tmp_path / "mixed.npz", arr_0=images, arr_1=np.array([2, 0, 1, 0, 2, 1]))
    runner = CliRunner()
    text = runner.invoke(main, ["info", str(tmp_path / "sorted.npz")]).output
    assert "samples            6\n" in text and "image size         8 x 8" in text and "sample_index       (" not in text
    assert "3 classes (0-2), 1 to 3 samples per class (fewest: class 1, most: class 0)" in text
    assert "order              class-sorted (no sample_index; labels non-decreasing)" in text
    assert "made by            unknown" in text
    assert "labels not sorted" in runner.invoke(main, ["info", str(tmp_path / "mixed.npz")]).output

    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((6, 3, 8, 8), np.uint8))
    (tmp_path / "junk.npz").write_text("not an archive", encoding="utf-8")
    np.save(tmp_path / "bare.npy", images)
    (tmp_path / "bare.npy").rename(tmp_path / "bare.npz")
    for name, expected in (("nchw", "looks channels-first"), ("junk", "is not a readable .npz of arrays"),
                           ("bare", "one bare array")):
        code, err = invoke(["info", tmp_path / f"{name}.npz"], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and f"{name}.npz" in err and expected in err, err
    (tmp_path / "folder").mkdir()
    code, err = invoke(["info", tmp_path / "folder"], monkeypatch, capsys)
    assert code == 2 and "eval output folder" in err


def test_the_score_line_has_no_accuracy_without_a_classifier(tmp_path, caplog):
    """Without a classifier eval logged `acc nan` (issue 30 point 3): it prints no accuracy; with one, its value."""
    from pipeline.metrics import load_classifier, load_feature_extractor, reference_features

    _world(tmp_path)
    settings = eval_stage.EvalConfig(samples_per_class=2, seeds=[0], methods=["base"], batch_size=6, grid_per_class=0)
    extractor = load_feature_extractor("classifier", tmp_path / "clf.pt", torch.device("cpu"))
    ref = evaluation.load_reference(tmp_path / "ref", 16)
    features = reference_features(extractor, ref.images, tmp_path / "fc")
    labels = torch.arange(3).repeat_interleave(2)
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    caplog.set_level("INFO")
    lines = {}
    for name, classifier in (("without", None), ("with", load_classifier(tmp_path / "clf.pt"))):
        (tmp_path / name / "samples").mkdir(parents=True)
        scorer = evaluation.Scorer(settings, labels, extractor, classifier, ref, features,
                                   {"vq": "a", "base": "b", "reference": "c", "extractor": "d"}, tmp_path / name, tmp_path / "none")
        caplog.clear()
        scores = scorer.score(evaluation.Unit("base", "base", 0.0, 0), images.copy(), 2.0)
        lines[name] = [r.getMessage() for r in caplog.records if "FID" in r.getMessage()]
    assert len(lines["without"]) == 1 and " acc " not in lines["without"][0]
    assert len(lines["with"]) == 1 and f"acc {scores['class_accuracy']:.3f} (2.00 images/s)" in lines["with"][0]
