"""FID against precomputed reference statistics, the ADM evaluator's protocol (an ADM reference batch
carries mu/sigma of the full training set; FID is the Frechet distance to those, not to its arr_0 images).

With the generated features' own statistics as the reference, FID = |mu - mu|^2 + tr(S + S - 2 (S S)^1/2)
= 0; with the mean shifted by d and the same covariance, FID = |d|^2 exactly (the trace term still cancels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from worlds import write_reference_images

from pipeline.checkpoint import save_checkpoint
from pipeline.metrics import (
    ClassifierConfig,
    ImageClassifier,
    extract_features,
    fidelity_scores,
    load_feature_extractor,
    save_classifier,
)
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.tokenizers.vq import VQConfig, VQModel
from stages import eval as eval_stage

CPU = torch.device("cpu")


def _extractor(tmp_path, feature_dim: int = 16):
    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3, feature_dim=feature_dim)).eval())
    return load_feature_extractor("classifier", tmp_path / "clf.pt", CPU)


def _stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    x = features.double().numpy()
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}


def test_fid_to_own_statistics_is_zero_and_a_shift_gives_its_square(tmp_path):
    """96 random 16x16 images, 16-d FID features (more images than dimensions: a full-rank covariance)."""
    extractor = _extractor(tmp_path)
    assert extractor.layers["fid"] == "features"
    images = np.random.default_rng(0).integers(0, 256, (96, 16, 16, 3), dtype=np.uint8)
    feats = extract_features(extractor, images)
    fid_feats = feats[extractor.layers["fid"]]
    assert fid_feats.shape == (96, 16)
    stats = _stats(fid_feats)
    trace = float(np.trace(stats["sigma"]))
    # the features vary in every direction (full rank): the checks below are not 0 = 0 by degenerate statistics
    assert trace > 0 and np.linalg.eigvalsh(stats["sigma"]).min() > 1e-6 * trace
    own = fidelity_scores(extractor, feats, feats, stats)
    assert abs(own["fid"]) < 1e-6 * trace
    # a shift a few times the features' spread (float32 rounding of the generated mean, ~1e-7 |mu|, enters
    # FID as 2 d.e: relative to |d|^2 it shrinks as |d| grows)
    d = np.linspace(-1.0, 1.0, 16) * 4 * np.sqrt(trace / 16)
    shifted = fidelity_scores(extractor, feats, feats, {"mu": stats["mu"] + d, "sigma": stats["sigma"]})
    assert shifted["fid"] == pytest.approx(float(d @ d), rel=1e-6)
    # without reference statistics FID is computed to the reference features: here the same, so ~0 too
    assert abs(fidelity_scores(extractor, feats, feats)["fid"]) < 1e-4 * trace


def test_statistics_of_the_wrong_dimension_are_refused(tmp_path):
    extractor = _extractor(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    feats = extract_features(extractor, images)
    with pytest.raises(ValueError, match=r"reference FID statistics have 2048 dimensions .* FID features 16"):
        fidelity_scores(extractor, feats, feats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})


# ------------------------------------------------------------------------------- through the eval stage

GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


def _eval_world(tmp_path):
    """VQ (16x16 images from 4x4 codes), GPT, and an 8-d-feature classifier (24 samples > 8 dimensions);
    a reference folder of 12 random images."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    save_checkpoint(tmp_path / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3, feature_dim=8)).eval())
    rng = np.random.default_rng(0)
    write_reference_images(tmp_path / "ref", rng)


def _run(tmp_path, reference, out: str) -> dict:
    cfg = eval_stage.EvalConfig(samples_per_class=8, seeds=[0], methods=["base"], cfg_scales=[], batch_size=24, grid_per_class=0)
    return eval_stage.run(cfg, tmp_path / "vq.pt", tmp_path / "gpt.pt", None, reference, tmp_path / "clf.pt", tmp_path / out,
                          fidelity_cache=tmp_path / "fc")


def test_eval_scores_fid_against_the_batch_statistics(tmp_path):
    """Run A (a plain folder reference) gives the samples; their features' statistics, mean shifted by d,
    go into an ADM-style .npz beside arr_0 images; run B scores the same samples (same seed) against it:
    with d_i = +-2 sqrt(tr(S) / 8) over the 8 dimensions, FID = |d|^2 = 8 * 4 * tr(S) / 8 = 4 tr(S)."""
    _eval_world(tmp_path)
    first = _run(tmp_path, tmp_path / "ref", "A")
    assert "features of the 12 reference images" in first["fid_reference"]
    with np.load(tmp_path / "A/samples/base_seed0.npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (24, 16, 16, 3) and samples.dtype == np.uint8
    extractor = load_feature_extractor("classifier", tmp_path / "clf.pt", CPU)
    stats = _stats(extract_features(extractor, samples)[extractor.layers["fid"]])
    trace = float(np.trace(stats["sigma"]))
    d = np.array([1, -1] * 4) * 2 * np.sqrt(trace / 8)
    arr_0 = np.random.default_rng(3).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    # an ADM batch also carries mu_s/sigma_s (sFID): the classifier has no sFID layer, so no sfid is reported
    np.savez(tmp_path / "batch.npz", arr_0=arr_0, mu=stats["mu"] + d, sigma=stats["sigma"], mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    second = _run(tmp_path, tmp_path / "batch.npz", "B")
    assert "sfid" not in second["methods"]["base"] and "sFID" not in (tmp_path / "B/results.md").read_text()
    with np.load(tmp_path / "B/samples/base_seed0.npz") as f:
        assert np.array_equal(f["arr_0"], samples)  # the same samples were scored
    assert second["methods"]["base"]["fid"] == pytest.approx(4 * trace, rel=1e-5)
    assert second["methods"]["base"]["fid"] == pytest.approx(float(d @ d), rel=1e-5)
    assert "mu/sigma" in second["fid_reference"]
    assert first["methods"]["base"]["fid"] != pytest.approx(float(d @ d), rel=1e-3)  # the folder's images give another FID


def test_eval_refuses_statistics_of_another_extractor(tmp_path):
    """Statistics of another extractor (5-d here; an ADM batch's are 2048-d Inception) with the 8-d classifier:
    a clear error, not a broadcast or a shape assertion deep in torch-fidelity."""
    _eval_world(tmp_path)
    arr_0 = np.random.default_rng(3).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "batch.npz", arr_0=arr_0, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="dimensions"):
        _run(tmp_path, tmp_path / "batch.npz", "C")


@pytest.mark.parametrize("n_generated, n_reference, dim", [(8, 100, 256), (100, 8, 256), (30, 40, 64), (2, 2, 16)])
def test_few_features_give_torch_fidelitys_frechet_distance_without_the_d_by_d_eigenproblem(n_generated, n_reference, dim):
    """Fewer samples than dimensions (a trial eval: 8 images against Inception's 2048 features; 256 here): the nuclear norm
    of X1 X2^T gives the trace term of torch-fidelity's eigenvalue route, to its rounding noise."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from pipeline.metrics import frechet_distance_of_few

    rng = np.random.default_rng(n_generated + dim)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)  # correlated features, as a network's are
    generated = torch.from_numpy((rng.standard_normal((n_generated, dim)) @ mixing).astype(np.float32))
    reference = torch.from_numpy((rng.standard_normal((n_reference, dim)) @ mixing + 0.3).astype(np.float32))
    expected = fid_statistics_to_metric(fid_features_to_statistics(generated), fid_features_to_statistics(reference),
                                        False)["frechet_inception_distance"]
    assert frechet_distance_of_few(generated.numpy(), reference.numpy()) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_of_few(generated.numpy(), generated.numpy()) == pytest.approx(0, abs=1e-9 * expected)


def test_few_features_take_the_fast_route_and_many_torch_fidelitys(monkeypatch):
    import pipeline.metrics as metrics

    extractor = metrics.FeatureExtractor(None, {}, "test", "0" * 64)
    rng = np.random.default_rng(0)
    few, many = (torch.from_numpy(rng.standard_normal((n, 4)).astype(np.float32)) for n in (4, 5))
    routes = []
    monkeypatch.setattr(metrics, "frechet_distance_of_few", lambda a, b: routes.append("few") or 1.0)
    assert metrics.frechet_distance("fid", extractor, few, few, None) == 1.0  # 4 x 4 products <= 4^2
    assert metrics.frechet_distance("fid", extractor, many, few, None) != 1.0 and routes == ["few"]  # 5 x 4 > 4^2
    stats = {"mu": few.double().numpy().mean(0), "sigma": np.cov(few.double().numpy(), rowvar=False)}
    assert metrics.frechet_distance("fid", extractor, few, few, stats) == pytest.approx(0, abs=1e-9) and routes == ["few"]
