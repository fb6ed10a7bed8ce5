"""eval's sample files are what the ADM evaluator expects (issue 28, point 1), and `cca-pipe score` scores any
such file as eval scores its own (point 5).

The ADM evaluator computes IS over contiguous splits of the file's rows (10 splits of 5,000 of a 50,000-sample
file), so a file written class by class scores each split on a tenth of the classes and IS collapses. eval
writes its sets in a seeded random order instead, each row's sampling index beside it (`sample_index`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from worlds import invoke, write_reference_images

from pipeline import evaluation
from pipeline.checkpoint import save_checkpoint
from pipeline.distributed import World
from pipeline.families import ModelSource
from pipeline.formats import FormatError, read_sample_batch, write_sample_batch
from pipeline.metrics import ClassifierConfig, ImageClassifier, extract_features, load_feature_extractor, save_classifier
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from stages import eval as eval_stage
from stages import score as score_stage

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=CLASSES, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


def _world(tmp_path: Path) -> None:
    """A random 10-class GPT and VQ (16x16 images), a 10-class classifier, 12 random reference images."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_checkpoint(tmp_path / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=CLASSES, feature_dim=8)).eval())
    write_reference_images(tmp_path / "ref", np.random.default_rng(0))


def _eval(tmp_path: Path, samples_per_class: int, seeds: list[int], out: str = "eval") -> dict:
    cfg = eval_stage.EvalConfig(samples_per_class=samples_per_class, seeds=seeds, methods=["base"], cfg_scales=[],
                                batch_size=100, grid_per_class=0)
    return eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", None, tmp_path / "ref", tmp_path / "clf.pt",
                          tmp_path / out, fidelity_cache=tmp_path / "fc")


def adm_inception_score(probs: np.ndarray, splits: int = 10) -> float:
    """The ADM evaluator's IS, written out: the rows in file order cut into `splits` contiguous parts (its
    split_size of 5,000 on a 50,000-row file), per part exp(mean over rows of KL(p(y|x) || p(y))) with p(y)
    the part's mean prediction, averaged over the parts (no shuffle: unlike torch-fidelity's)."""
    scores = []
    for part in np.array_split(probs, splits):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_permute_rows_in_place_is_fancy_indexing():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        for order in (np.arange(n), np.roll(np.arange(n), 1), rng.permutation(n)):
            rows = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
            expected = rows[order]
            assert np.array_equal(evaluation.permute_rows(rows, order), expected) and np.array_equal(rows, expected)


def test_the_order_is_seeded_by_the_eval_seed():
    first = evaluation.sample_order(1000, 0)
    assert np.array_equal(first, evaluation.sample_order(1000, 0))  # a rerun writes the same bytes
    assert not np.array_equal(first, evaluation.sample_order(1000, 1))  # another seed, another order
    assert np.array_equal(np.sort(first), np.arange(1000))


def test_a_sample_batch_reads_back_in_file_or_sampling_order(tmp_path):
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    labels, order = np.repeat(np.arange(3), 2), np.array([4, 0, 5, 2, 1, 3])
    write_sample_batch(tmp_path / "s.npz", images[order], labels[order], order)
    with np.load(tmp_path / "s.npz") as f:
        assert f.files[:2] == ["arr_0", "arr_1"]  # what the ADM evaluator and torch-style loaders read first
    as_written, written_labels = read_sample_batch(tmp_path / "s.npz", labels=True)
    assert np.array_equal(as_written, images[order]) and np.array_equal(written_labels, labels[order])
    sampled, sampled_labels = read_sample_batch(tmp_path / "s.npz", labels=True, sample_order=True)
    assert np.array_equal(sampled, images) and np.array_equal(sampled_labels, labels)
    write_sample_batch(tmp_path / "bad.npz", images, labels, np.array([0, 0, 1, 2, 3, 4]))
    with pytest.raises(FormatError, match=r"bad\.npz: sample_index is not a permutation of the 6 rows"):
        read_sample_batch(tmp_path / "bad.npz", sample_order=True)


def test_eval_files_score_the_adm_way_like_a_shuffled_copy(tmp_path):
    """Two seeds of 10 classes x 20 samples, scored the ADM way (10 contiguous splits of 20 rows). The models are
    untrained, so the logits are the project classifier's on the file's images plus a stand-in's recognition of
    each row's intended class (arr_1, paired with arr_0): a classifier that knows the classes, the regime of
    ImageNet's IS. The file scores as its shuffled copies do (within their spread over 200 reshuffles); the same
    rows class by class (the order eval wrote before) collapse to ~1."""
    _world(tmp_path)
    metrics = _eval(tmp_path, samples_per_class=20, seeds=[0, 1])
    assert metrics["npz_order"]["order"] == "shuffled"  # recorded beside the scores, as in every npz (sample_index)
    extractor = load_feature_extractor("classifier", tmp_path / "clf.pt", torch.device("cpu"))
    rng = np.random.default_rng(1)
    orders = []
    for seed in (0, 1):
        path = tmp_path / f"eval/samples/base_seed{seed}.npz"
        images, labels = read_sample_batch(path, labels=True)
        with np.load(path) as f:
            index = f["sample_index"]
        orders.append(index)
        # the file's rows are the sampling order's, permuted by sample_order(seed), labels paired
        assert np.array_equal(index, evaluation.sample_order(CLASSES * 20, seed))
        assert np.array_equal(labels, np.repeat(np.arange(CLASSES), 20)[index])
        logits = extract_features(extractor, images)["logits"].double().numpy() + 4.0 * np.eye(CLASSES)[labels]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        written = adm_inception_score(probs)
        shuffled = np.array([adm_inception_score(probs[rng.permutation(len(probs))]) for _ in range(200)])
        class_sorted = adm_inception_score(probs[np.argsort(labels, kind="stable")])
        print(f"seed {seed}: ADM IS of the file {written:.3f}, of 200 shuffled copies {shuffled.mean():.3f} ± "
              f"{shuffled.std():.3f}, class-sorted {class_sorted:.3f}")
        assert abs(written - shuffled.mean()) <= 3 * shuffled.std(), (written, shuffled.mean(), shuffled.std())
        assert class_sorted < 1.5 < shuffled.mean() - 10 * shuffled.std(), (class_sorted, shuffled.mean(), shuffled.std())
    assert not np.array_equal(orders[0], orders[1])


def test_eval_writes_the_samplers_images_in_the_new_order(tmp_path):
    """The order changes, the samples do not: sorted back by sample_index the file holds, byte for byte, the set
    the sampler draws (sample i from its own stream; at eval's batch size, as the decoder's arithmetic depends on it)."""
    _world(tmp_path)
    _eval(tmp_path, samples_per_class=3, seeds=[2])
    cfg = eval_stage.EvalConfig(samples_per_class=3, seeds=[2], methods=["base"], cfg_scales=[], batch_size=100)
    units = eval_stage.plan_units(cfg)
    models = eval_stage.load_models(cfg, units, tmp_path / "vq.pt", None, {"base": tmp_path / "gpt.pt", "cca": None},
                                    ModelSource(), torch.device("cpu"))
    drawn, _ = eval_stage.sample_unit(units[0], models, cfg, tmp_path, World())
    images, labels = read_sample_batch(tmp_path / "eval/samples/base_seed2.npz", labels=True, sample_order=True)
    assert np.array_equal(images, drawn) and np.array_equal(labels, models.labels.numpy())
    as_written, _ = read_sample_batch(tmp_path / "eval/samples/base_seed2.npz")
    assert not np.array_equal(as_written, drawn)  # and the file's order is another one


# ------------------------------------------------------------------------------------------ cca-pipe score


def _score(tmp_path, monkeypatch, capsys, samples: Path, reference: Path, *extra) -> tuple[int, str]:
    return invoke(["--params", ROOT / "params.yaml", "score", samples, "--reference", reference, "--classifier",
                   tmp_path / "clf.pt", "--fidelity-cache", tmp_path / "fc", *extra], monkeypatch, capsys)


def test_score_of_evals_own_npz_gives_evals_numbers(tmp_path, monkeypatch, capsys):
    _world(tmp_path)
    metrics = _eval(tmp_path, samples_per_class=4, seeds=[0, 1])
    for seed in (0, 1):
        code, err = _score(tmp_path, monkeypatch, capsys, tmp_path / f"eval/samples/base_seed{seed}.npz", tmp_path / "ref",
                           "--json", tmp_path / f"score{seed}.json")
        assert code == 0, err
        result = json.loads((tmp_path / f"score{seed}.json").read_text())
        expected = {k: v for k, v in metrics["per_seed"]["base"][seed].items() if k != "images_per_s"}
        assert set(expected) == {"fid", "is", "precision", "recall", "class_accuracy"}
        assert result["scores"] == expected  # exactly: the same code, features and order
        assert result["num_samples"] == 40 and result["feature_extractor"] == "classifier"
        assert len(list((tmp_path / "fc").glob("ref-*.npz"))) == 1  # eval's reference features, read from its cache
    printed = score_stage.format_scores(result)  # what the command prints: eval's table, one row
    assert f"| base_seed1.npz | {expected['fid']:.3f} | {expected['is']:.3f} |" in printed, printed


def _bad_samples(tmp_path: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.npz"
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    if kind == "float":
        np.savez(path, arr_0=images.astype(np.float32) / 255)
    elif kind == "nchw":
        np.savez(path, arr_0=images.transpose(0, 3, 1, 2))
    elif kind == "no_arr_0":
        np.savez(path, images=images)
    elif kind == "size":
        np.savez(path, arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    elif kind == "not_npz":
        path.write_text("not an archive\n")
    elif kind == "npy":  # np.save's one bare array, under an .npz name
        with open(path, "wb") as f:
            np.save(f, images)
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("float", r"float\.npz: arr_0 is float32, expected uint8 pixels 0-255 .* convert the images to uint8"),
    ("nchw", r"nchw\.npz: arr_0 has shape \(8, 3, 16, 16\), expected N x H x W x 3 .* channels-first .*arr_0\.transpose\(0, 2, 3, 1\)"),
    ("no_arr_0", r"no_arr_0\.npz has no arr_0 \(it holds images\): expected .* np\.savez\(path, arr_0=images\)"),
    ("size", r"size\.npz: arr_0 holds 32 x 32 images but the reference .*batch\.npz 16 x 16: resize the samples to 16 x 16"),
    ("not_npz", r"not_npz\.npz is not a readable \.npz of arrays"),
    ("npy", r"npy\.npz is not a readable \.npz of arrays \(it holds one bare array, a \.npy\).*np\.savez\(path, arr_0=images\)"),
])
def test_score_refuses_a_malformed_npz_in_one_line(tmp_path, monkeypatch, capsys, kind, message):
    _world(tmp_path)
    np.savez(tmp_path / "batch.npz", arr_0=np.random.default_rng(1).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    code, err = _score(tmp_path, monkeypatch, capsys, _bad_samples(tmp_path, kind), tmp_path / "batch.npz")
    assert code == 2 and err.count("\n") == 1 and err.startswith("cca-pipe: error: samples "), err
    assert re.search(message, err), err
