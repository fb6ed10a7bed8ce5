"""sFID as the ADM evaluator computes it: the first 7 channels of Inception's `mixed_6/conv` output
(torch-fidelity's Mixed_6d.branch1x1), 17 x 17 x 7 = 2023 features flattened in TF's NHWC order, and the
Frechet distance to the reference batch's mu_s/sigma_s (or to the reference images' own spatial features).

The Frechet values are closed-form (as tests/test_fid_protocol.py checks FID): to its own statistics 0, to
statistics with the mean shifted by d |d|^2. Those use a low-dimensional feature layer routed as sFID's
(a 2023-d matrix square root takes minutes on a loaded CPU); the 2023 and the layer come from a
random-weight Inception in torch-fidelity's layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import evaluation
from pipeline.formats import FormatError
from pipeline.metrics import (
    SFID_FEATURES,
    ClassifierConfig,
    FeatureExtractor,
    ImageClassifier,
    extract_features,
    fidelity_scores,
    load_feature_extractor,
    save_classifier,
)
from stages import eval as eval_stage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inception(random_inception) -> FeatureExtractor:
    return load_feature_extractor("inception-v3-compat", random_inception, CPU)


def test_the_sfid_features_are_the_first_7_channels_of_mixed_6d_branch1x1_in_nhwc_order(inception):
    """TF's mixed_6 is the port's 7th inception block, Mixed_6d; its `conv` the 1x1 branch: (B, 192, 17, 17).
    Feature (h * 17 + w) * 7 + c of an image is channel c at (h, w): TF's NHWC reshape, not torch's NCHW."""
    assert inception.layers["sfid"] == SFID_FEATURES
    hooked = [name for name, m in inception.module.named_modules() if m._forward_hooks]
    assert hooked == ["inception.Mixed_6d.branch1x1"]
    seen = []
    handle = dict(inception.module.named_modules())["inception.Mixed_6d.branch1x1"].register_forward_hook(
        lambda module, inputs, output: seen.append(output.clone()))
    try:
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        feats = extract_features(inception, images)
    finally:
        handle.remove()
    (mixed_6_conv,) = seen
    assert mixed_6_conv.shape == (2, 192, 17, 17)
    spatial = feats[SFID_FEATURES]
    assert spatial.shape == (2, 2023) and spatial.dtype == torch.float32
    i = torch.arange(2023)
    h, w, c = i // (17 * 7), i // 7 % 17, i % 7
    assert torch.equal(spatial, mixed_6_conv[:, c, h, w])
    assert not torch.equal(spatial, mixed_6_conv[:, :7].reshape(2, -1))  # the NCHW flattening differs (a real check)
    assert feats["2048"].shape == (2, 2048)  # FID's features still come with them


def test_the_random_inception_stand_in_tells_images_apart(inception):
    """The stand-in for the real weights file gives unit-scale features that differ between images (with
    PyTorch's default init they were ~1e-8 and the same for every image: every FID 0)."""
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(inception, images)["2048"]
    assert feats.abs().mean() > 0.01 and feats.std(0).mean() > 0.01 * feats.abs().mean()


def _routed_extractor(tmp_path) -> FeatureExtractor:
    """The classifier's module with its 16-d features also routed as the sFID layer: cheap closed-form Frechet
    values through the same code path as Inception's 2023-d features."""
    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3, feature_dim=16)).eval())
    clf = load_feature_extractor("classifier", tmp_path / "clf.pt", CPU)
    assert "sfid" not in clf.layers  # the digit classifier has no sFID layer
    return FeatureExtractor(clf.module, {**clf.layers, "sfid": "features"}, "routed", clf.weights_sha256)


def _stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    x = features.double().numpy()
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}


def test_sfid_to_own_statistics_is_zero_and_a_shift_gives_its_square(tmp_path):
    extractor = _routed_extractor(tmp_path)
    feats = extract_features(extractor, np.random.default_rng(0).integers(0, 256, (96, 16, 16, 3), dtype=np.uint8))
    stats = _stats(feats["features"])
    trace = float(np.trace(stats["sigma"]))
    assert trace > 0 and np.linalg.eigvalsh(stats["sigma"]).min() > 1e-6 * trace  # full rank: not 0 = 0 by degeneracy
    d = np.linspace(-1.0, 1.0, 16) * 4 * np.sqrt(trace / 16)
    shifted = {"mu": stats["mu"] + d, "sigma": stats["sigma"]}
    own = fidelity_scores(extractor, feats, feats, stats, stats)
    assert abs(own["sfid"]) < 1e-6 * trace and abs(own["fid"]) < 1e-6 * trace
    # mu_s/sigma_s go to sFID only, mu/sigma to FID only
    s_only = fidelity_scores(extractor, feats, feats, stats, shifted)
    assert s_only["sfid"] == pytest.approx(float(d @ d), rel=1e-6) and abs(s_only["fid"]) < 1e-6 * trace
    f_only = fidelity_scores(extractor, feats, feats, shifted, stats)
    assert f_only["fid"] == pytest.approx(float(d @ d), rel=1e-6) and abs(f_only["sfid"]) < 1e-6 * trace
    # no mu_s/sigma_s: sFID to the reference features' own statistics (here the same features: ~0)
    assert abs(fidelity_scores(extractor, feats, feats, shifted)["sfid"]) < 1e-4 * trace


def test_sfid_statistics_of_the_wrong_dimension_are_refused(tmp_path):
    """e.g. FID's 2048-d mu/sigma passed as mu_s/sigma_s."""
    extractor = _routed_extractor(tmp_path)
    feats = extract_features(extractor, np.random.default_rng(1).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"reference sFID statistics have 2048 dimensions .* sFID features 16"):
        fidelity_scores(extractor, feats, feats, None, {"mu": np.zeros(2048), "sigma": np.eye(2048)})


def test_no_sfid_with_the_classifier(tmp_path):
    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3, feature_dim=8)).eval())
    clf = load_feature_extractor("classifier", tmp_path / "clf.pt", CPU)
    feats = extract_features(clf, np.random.default_rng(2).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    scores = fidelity_scores(clf, feats, feats, None, {"mu": np.zeros(2023), "sigma": np.eye(2023)})
    assert "sfid" not in scores and set(scores) == {"fid", "is", "precision", "recall"}


# ------------------------------------------------------------------------------- the eval stage's side


def _adm_batch(path, arr_0, **stats) -> None:
    np.savez(path, arr_0=arr_0, **stats)


def test_load_reference_reads_mu_s_and_sigma_s(tmp_path):
    arr_0 = np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    mu_s, sigma_s = np.arange(2023.0), np.eye(2023) * 2
    _adm_batch(tmp_path / "full.npz", arr_0, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=mu_s, sigma_s=sigma_s)
    ref = evaluation.load_reference(tmp_path / "full.npz", 16)
    assert np.array_equal(ref.sfid_stats["mu"], mu_s) and np.array_equal(ref.sfid_stats["sigma"], sigma_s)
    assert ref.fid_stats["mu"].shape == (2048,) and "mu_s/sigma_s" in ref.describe()
    _adm_batch(tmp_path / "plain.npz", arr_0, mu=np.zeros(2048), sigma=np.eye(2048))
    plain = evaluation.load_reference(tmp_path / "plain.npz", 16)
    assert plain.sfid_stats is None and plain.digest() != ref.digest()  # mu_s/sigma_s are part of the eval key
    _adm_batch(tmp_path / "bad.npz", arr_0, mu_s=mu_s, sigma_s=np.eye(5))
    with pytest.raises(FormatError, match=r"bad.npz: mu_s \(2023,\) and sigma_s \(5, 5\) are not \(D,\) and \(D, D\)"):
        evaluation.load_reference(tmp_path / "bad.npz", 16)


def test_score_unit_scores_sfid_against_the_batch_mu_s_sigma_s(tmp_path):
    """The eval stage hands the batch's mu_s/sigma_s to sFID: samples scored against their own statistics with
    mu_s shifted by d give sFID |d|^2 (and FID against their own mu/sigma 0); metrics and table show it."""
    extractor = _routed_extractor(tmp_path)
    images = np.random.default_rng(4).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    labels = torch.arange(3).repeat_interleave(16)
    stats = _stats(extract_features(extractor, images)["features"])
    d = np.linspace(-1.0, 1.0, 16) * 3 * np.sqrt(float(np.trace(stats["sigma"])) / 16)
    ref = evaluation.Reference(images, stats, "batch.npz", {"mu": stats["mu"] + d, "sigma": stats["sigma"]})
    cfg = eval_stage.EvalConfig(samples_per_class=16, seeds=[0], methods=["base"], cfg_scales=[], grid_per_class=0)
    unit = evaluation.Unit("base", "base", 0.0, 0)
    (tmp_path / "work" / "samples").mkdir(parents=True)
    ref_features = extract_features(extractor, images)
    scores = evaluation.score_unit(unit, images, 1.0, cfg, labels, extractor, ref_features, ref, None, tmp_path / "work")
    assert scores["sfid"] == pytest.approx(float(d @ d), rel=1e-5) and abs(scores["fid"]) < 1e-3
    metrics = eval_stage.summarise({"base": [scores]}, [unit], [0], 48, ref.describe())
    assert metrics["methods"]["base"]["sfid"] == scores["sfid"]
    table = evaluation.format_results(metrics)
    assert "| method | FID | sFID | IS |" in table and f"{scores['sfid']:.3f}" in table


def test_a_reference_cache_written_before_sfid_is_recomputed(tmp_path):
    """Reference features cached before the sFID layer existed lack it: recomputed, not refused as foreign."""
    from pipeline.metrics import content_hash, reference_features

    torch.manual_seed(0)
    save_classifier(tmp_path / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3, feature_dim=8)).eval())
    clf = load_feature_extractor("classifier", tmp_path / "clf.pt", CPU)
    images = np.random.default_rng(5).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    cache = tmp_path / "fc" / f"ref-{content_hash(images)}-{clf.name}-{clf.weights_sha256[:16]}.npz"
    cache.parent.mkdir()
    np.savez(cache, logits=np.zeros((6, 3), np.float32))  # an older cache: one layer short
    feats = reference_features(clf, images, tmp_path / "fc")
    assert torch.equal(feats["features"], extract_features(clf, images)["features"])
    with np.load(cache) as f:
        assert set(f.files) == {"features", "logits"}  # rewritten with every layer
