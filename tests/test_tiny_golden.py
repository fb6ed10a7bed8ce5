"""reflogp, train and eval at a tiny scale reproduce values recorded before the refactors of issues 12-14
(tests/golden/tiny_pipeline.json, recorded on 2026-12-01 from commit 6d518ed with `python
tests/test_tiny_golden.py --record`).

One deliberate change since: eval's samples (sample_sha256, eval) were re-recorded (`--record-eval`) when
sampling moved to one random stream per sample, seeded by (seed, sample index) (pipeline.sampling
.generate_images), so that any split of a set over batches or torchrun processes draws the same images;
before, one generator per set was consumed batch after batch. The cache and the training values are still
those of commit 6d518ed.

Integers (sample codes, row order) must match exactly; floats to 1e-9 relative (CPU runs are
deterministic on one machine; another CPU's kernels may round the last bits differently).
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
    save_checkpoint(root / "gpt.pt", GPTModel(gpt_cfg).state_dict(), gpt_cfg.to_dict(), family="llamagen-gpt")
    save_checkpoint(root / "vq.pt", VQModel(vq_cfg).state_dict(), vq_cfg.to_dict(), family="llamagen-vq")
    save_classifier(root / "clf.pt", ImageClassifier(ClassifierConfig(num_classes=3)).eval())
    write_reference_images(root / "ref", rng)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["reflogp"].update(seed=0, views="all", batch_size=8, part_rows=16)
    params["train"].update(beta=0.5, epochs=2, batch_size=8, micro_batch_size=4, lr=1e-3, uncond_ratio=0.25, save_every=0)
    params["eval"].update(samples_per_class=4, seeds=[0, 1], cfg_scales=[1.0], batch_size=6, grid_per_class=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_pipeline(root: Path) -> dict:
    """reflogp -> train -> eval through the CLI; returns what is compared."""
    from click.testing import CliRunner

    from stages.cli import main

    def cli(*args):
        result = CliRunner().invoke(main, ["--params", str(root / "params.yaml"), *map(str, args)], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    cli("reflogp", "--tokens", root / "tokens.zarr", "--ref", root / "gpt.pt", "--out", root / "cache.parquet")
    cli("train", "--tokens", root / "tokens.zarr", "--cache", root / "cache.parquet", "--init", root / "gpt.pt",
        "--out", root / "train")
    cli("eval", "--vq", root / "vq.pt", "--base", root / "gpt.pt", "--policy", root / "train/policy.pt",
        "--reference", root / "ref", "--classifier", root / "clf.pt", "--out", root / "eval")

    import pyarrow.parquet as pq

    cache = pq.read_table(root / "cache.parquet").to_pydict()
    policy = torch.load(root / "train/policy.pt", weights_only=True)["model"]
    log = [json.loads(line) for line in (root / "train/log.jsonl").read_text().splitlines()]
    metrics = json.loads((root / "eval/metrics.json").read_text())
    samples = {}
    for path in sorted((root / "eval/samples").glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            samples[path.stem] = hashlib.sha256(f["arr_0"].tobytes()).hexdigest()
    return {
        "cache": {k: [float(x) for x in v] if k.startswith("ref_logp") else [int(x) for x in v] for k, v in cache.items()},
        "train_loss": [r["loss"] for r in log],
        "train_rewards_pos": [r["rewards/pos"] for r in log],
        "policy_sums": {k: float(v.double().sum()) for k, v in sorted(policy.items())},
        "eval": {name: {k: m[k] for k in ("fid", "is", "precision", "recall", "class_accuracy")}
                 for name, m in metrics["methods"].items()},
        "sample_sha256": samples,
    }


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def test_tiny_pipeline_matches_the_recorded_values(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = run_pipeline(build_world(tmp_path))
    for k in ("row", "label", "neg_label", "view"):
        assert now["cache"][k] == golden["cache"][k], k
    for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null"):
        assert all(_close(a, b) for a, b in zip(now["cache"][k], golden["cache"][k], strict=True)), k
    for k in ("train_loss", "train_rewards_pos"):
        assert all(_close(a, b) for a, b in zip(now[k], golden[k], strict=True)), k
    assert now["policy_sums"].keys() == golden["policy_sums"].keys()
    assert all(_close(now["policy_sums"][k], v) for k, v in golden["policy_sums"].items())
    assert now["sample_sha256"] == golden["sample_sha256"]
    for name, m in golden["eval"].items():
        assert all(abs(now["eval"][name][k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in m.items()), (name, now["eval"][name], m)


if __name__ == "__main__" and ("--record" in sys.argv or "--record-eval" in sys.argv):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        values = run_pipeline(build_world(Path(tmp)))
    if "--record-eval" in sys.argv:  # keep the cache and train values, replace the eval ones
        values = {**json.loads(GOLDEN.read_text()), "eval": values["eval"], "sample_sha256": values["sample_sha256"]}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(f"recorded {GOLDEN}")
elif __name__ == "__main__":
    pytest.main([__file__, "-q"])
