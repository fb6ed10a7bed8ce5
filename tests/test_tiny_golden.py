"""reflogp, train and eval at a tiny scale reproduce values recorded before the refactors of issues 12-14
(tests/golden/tiny_pipeline.json, recorded on 2026-12-01 from commit 6d518ed with `python
tests/test_tiny_golden.py --record`).

One deliberate change since: eval's samples (sample_sha256, eval) were re-recorded (`--record-eval`) when
sampling moved to one random stream per sample, seeded by (seed, sample index) (pipeline.sampling
.generate_images), so that any split of a set over batches or torchrun processes draws the same images;
before, one generator per set was consumed batch after batch. The cache and the training values are still
those of commit 6d518ed. On 2026-12-02 the digest of each sampled image (`sample_digests`) was added, from
a run whose whole sets still had the recorded sha256 (so they are the same images), to compare across CPUs.
On 2026-12-07 eval began writing each set in a seeded random order (issue 28: the ADM evaluator's IS takes
contiguous splits of the file): `sample_digests` stay those of 2026-12-02, in sampling order (the file's rows
sorted back by their sample_index), and every one of the 72 images was the recorded one; `sample_sha256` (of
arr_0 as written) and the metrics were re-recorded (`--record-eval`): FID moved by at most 8e-8 relative (features
summed in another order), IS by 3e-8 (12 images in 10 splits: IS ~1 in any order), the others not at all.
Also on 2026-12-07 (issue 31) `logp_version` was added by hand: 1, the pipeline.versions.LOGP_VERSION of the
code the cache was recorded with (that version is defined as the math of then); the values are unchanged.

What is compared, and how closely (the suite must pass on any CPU the README's install reaches: runs are
deterministic on one machine, but another CPU's kernels (AVX-512, AVX2, or none: try
`ATEN_CPU_CAPABILITY=default`) add and multiply in another order and round the last bits differently):
- integers the code fixes (cache rows, labels, negatives, views): exactly;
- the cached log-probs, float32 sums of 16 token log-probs of ~3.5 nats: to 1e-5 relative. One float32
  rounding is 6e-8 relative; another kernel order moves a sum by a few of them (measured 1.4e-7 between the
  recording machine and an AMD EPYC, and with ATEN_CPU_CAPABILITY=default);
- the training log and the final weights, after 12 AdamW steps that carry those differences along: to 1e-4
  absolute (1e-4 relative above 1; measured at most 3e-6 nats and 1.8e-5 relative), far below what any
  change of the loss, data order or optimiser moves them (1e-2 and more);
- samples: a sampled token is a draw from a categorical distribution, and a last-bit difference in a
  probability flips a draw that falls within it of a boundary, after which that image differs. With this
  random 32-code model, 2 of the 72 images (in 3 of the 6 sets) differed under ATEN_CPU_CAPABILITY=default, so
  each image is compared by its own digest and at least 90% of the 72 must be the recorded ones (any change
  of the sampler changes nearly all of them);
- the metrics, to 1e-3 relative (the few images that may differ move them by ~2e-5).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from worlds import write_reference_images

from pipeline.versions import LOGP_VERSION

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_pipeline.json"

GPT = dict(dim=32, n_layer=2, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ = dict(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16,
          norm_groups=8, codebook_used_size=32)


def build_world(root: Path) -> Path:
    """A store of 24 images x 2 views x 16 tokens, a random GPT (3 classes + null), VQ and classifier, 12
    reference images, and a params.yaml of small settings."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.metrics import ClassifierConfig, ImageClassifier, save_classifier
    from pipeline.models.llamagen import GPT as GPTModel
    from pipeline.models.llamagen import GPTConfig
    from pipeline.tokenizers.vq import VQConfig, VQModel
    from pipeline.tokenstore import write_token_store

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, size=(24, 2, 16), dtype=np.uint16)
    labels = np.repeat(np.arange(3), 8).astype(np.int32)
    attrs = {"tokenizer_sha256": "0" * 64, "codebook_size": 32, "image_size": 16, "grid": 4,
             "augmentations": ["center", "center_flip"], "class_names": ["a", "b", "c"]}
    write_token_store(root / "tokens.zarr", tokens, labels, attrs, chunk_rows=8)
    torch.manual_seed(0)
    gpt_cfg, vq_cfg = GPTConfig(**GPT), VQConfig(**{**VQ, "ch_mult": tuple(VQ["ch_mult"])})
    save_checkpoint(root / "gpt.pt", GPTModel(gpt_cfg).state_dict(), gpt_cfg.to_dict(), kind="llamagen-gpt")
    save_checkpoint(root / "vq.pt", VQModel(vq_cfg).state_dict(), vq_cfg.to_dict(), kind="llamagen-vq")
    save_classifier(root / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3)).eval())
    write_reference_images(root / "ref", rng)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # one visit read at both epochs (train.repeat_visits): the cache and training recorded before visits existed
    params["reflogp"].update(seed=0, views="all", batch_size=8, part_rows=16, visits=1)
    params["train"].update(beta=0.5, epochs=2, repeat_visits=True, batch_size=8, micro_batch_size=4, lr=1e-3, uncond_ratio=0.25, save_every=0)
    params["eval"].update(samples_per_class=4, seeds=[0, 1], cfg_scales=[1.0], batch_size=6, grid_per_class=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _cli(root: Path, *args) -> None:
    from click.testing import CliRunner

    from stages.cli.main import main

    result = CliRunner().invoke(main, ["--params", str(root / "params.yaml"), *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def run_reflogp(root: Path) -> dict:
    """reflogp through the CLI; returns the cache's columns as compared."""
    import pyarrow.parquet as pq

    _cli(root, "reflogp", "--tokens", root / "tokens.zarr", "--ref", root / "gpt.pt", "--out", root / "cache.parquet")
    cache = pq.read_table(root / "cache.parquet").to_pydict()
    return {k: [float(x) for x in v] if k.startswith("ref_logp") else [int(x) for x in v] for k, v in cache.items()}


def run_pipeline(root: Path) -> dict:
    """reflogp -> train -> eval through the CLI; returns what is compared."""

    from pipeline import evaluation

    def cli(*args):
        _cli(root, *args)

    cache = run_reflogp(root)
    cli("train", "--tokens", root / "tokens.zarr", "--cache", root / "cache.parquet", "--init", root / "gpt.pt",
        "--out", root / "train")
    cli("eval", "--vq", root / "vq.pt", "--base", root / "gpt.pt", "--policy", root / "train/policy.pt",
        "--reference", root / "ref", "--classifier", root / "clf.pt", "--out", root / "eval")

    policy = torch.load(root / "train/policy.pt", weights_only=True)["model"]
    log = [json.loads(line) for line in (root / "train/metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((root / "eval/metrics.json").read_text())
    samples, digests = {}, {}
    for path in sorted((root / "eval/samples").glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            samples[path.stem] = hashlib.sha256(f["arr_0"].tobytes()).hexdigest()  # as written
            seed = int(path.stem.rsplit("_seed", 1)[1])
            assert np.array_equal(f["sample_index"], evaluation.sample_order(len(f["arr_0"]), seed)), path.name
            labels, sampled = f["arr_1"][np.argsort(f["sample_index"])], f["arr_0"][np.argsort(f["sample_index"])]
            assert labels.tolist() == np.repeat(np.arange(3), 4).tolist(), path.name  # paired with their images
            digests[path.stem] = [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in sampled]
    return {
        "logp_version": LOGP_VERSION,  # what the cache was computed by: the guard below compares it
        "cache": cache,
        "train_loss": [r["loss"] for r in log],
        "train_rewards_pos": [r["rewards/pos"] for r in log],
        "policy_sums": {k: float(v.double().sum()) for k, v in sorted(policy.items())},
        "eval": {name: {k: m[k] for k in ("fid", "is", "precision", "recall", "class_accuracy")}
                 for name, m in metrics["methods"].items()},
        "sample_sha256": samples,  # of each whole set: equal on the recording machine's kind of CPU
        "sample_digests": digests,  # of each image, in sampling order: what is compared across CPUs
    }


def _worst(now: list[float], recorded: list[float], relative_to: float) -> float:
    """The largest |now - recorded| / max(relative_to, |recorded|)."""
    assert len(now) == len(recorded)
    return max(abs(a - b) / max(relative_to, abs(b)) for a, b in zip(now, recorded, strict=True))


def _cache_moved(now: dict, golden: dict) -> list[str]:
    """The cache columns that differ from the golden ones: integers exactly, log-probs beyond 1e-5 relative."""
    moved = [k for k in ("row", "label", "neg_label", "view") if now[k] != golden[k]]
    return moved + [k for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null") if _worst(now[k], golden[k], 0.0) > 1e-5]


def test_the_cached_log_probs_move_only_with_a_version_bump(tmp_path):
    """Staleness of a reference cache is decided by LOGP_VERSION (pipeline/versions.py), not by which files
    changed: this guard, with the step-0 check, is what keeps that honest. The golden cached log-probs were
    computed at the recorded logp_version; with the same version they must come out again."""
    golden = json.loads(GOLDEN.read_text())
    moved = _cache_moved(run_reflogp(build_world(tmp_path)), golden["cache"])
    assert golden["logp_version"] == LOGP_VERSION, (
        f"the goldens were recorded at LOGP_VERSION {golden['logp_version']}, now {LOGP_VERSION}: regenerate the goldens "
        "(python tests/test_tiny_golden.py --record)")
    assert not moved, (f"the log-prob math changed (cache columns {', '.join(moved)} moved from {GOLDEN.name}): bump "
                       "LOGP_VERSION and regenerate the goldens")


def test_tiny_pipeline_matches_the_recorded_values(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = run_pipeline(build_world(tmp_path))
    assert now["logp_version"] == golden["logp_version"]
    assert not _cache_moved(now["cache"], golden["cache"])
    for k in ("row", "label", "neg_label", "view"):
        assert now["cache"][k] == golden["cache"][k], k
    for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert _worst(now["cache"][k], golden["cache"][k], 0.0) <= 1e-5, k
    for k in ("train_loss", "train_rewards_pos"):
        assert _worst(now[k], golden[k], 1.0) <= 1e-4, k
    assert now["policy_sums"].keys() == golden["policy_sums"].keys()
    assert _worst([now["policy_sums"][k] for k in golden["policy_sums"]], list(golden["policy_sums"].values()), 1.0) <= 1e-4
    assert now["sample_digests"].keys() == golden["sample_digests"].keys()
    same = [a == b for name in golden["sample_digests"]
            for a, b in zip(now["sample_digests"][name], golden["sample_digests"][name], strict=True)]
    assert sum(same) >= 0.9 * len(same), f"only {sum(same)} of {len(same)} sampled images are the recorded ones"
    for name, m in golden["eval"].items():
        assert _worst([now["eval"][name][k] for k in m], list(m.values()), 1.0) <= 1e-3, (name, now["eval"][name], m)


if __name__ == "__main__" and ("--record" in sys.argv or "--record-eval" in sys.argv):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        values = run_pipeline(build_world(Path(tmp)))
    if "--record-eval" in sys.argv:  # keep the cache and train values, replace the eval ones
        values = {**json.loads(GOLDEN.read_text()), **{k: values[k] for k in ("eval", "sample_sha256", "sample_digests")}}
    values = {"logp_version": values.pop("logp_version"), **values}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(f"recorded {GOLDEN}")
elif __name__ == "__main__":
    pytest.main([__file__, "-q"])
