"""`cca-pipe negatives` (DDO's fakes, docs/ddo.md) in process on a tiny LlamaGen world: fake row j is the
reference's sample j of the set seeded by negatives.seed, drawn at the label of real row j // ratio, decoded and
re-encoded (or not); the store records its provenance; a rerun is up to date; bad inputs are one line.
The 2-process and kill/resume checks start processes: tests/test_negatives_processes.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from worlds import invoke

from pipeline.checkpoint import file_sha256, save_checkpoint
from pipeline.families import load_model, load_tokenizer
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.sampling import sample, sample_uniforms
from pipeline.tokenizers.encode import encode_views
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.tokenstore import open_token_store, write_token_store

ROOT = Path(__file__).resolve().parents[1]
GPT_CFG = GPTConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=3, block_size=16, multiple_of=16)
VQ_CFG = VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
                  norm_groups=8, codebook_used_size=32)


def make_world(root: Path, rows: int = 10, **negatives) -> Path:
    """Real tokens (rows images, 2 views, 16 tokens, 3 classes) encoded, as far as the store says, by vq.pt;
    a random reference gpt.pt; params.yaml with the negatives section updated."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(root / "gpt.pt", GPT(GPT_CFG).state_dict(), GPT_CFG.to_dict(), kind="llamagen-gpt")
    save_checkpoint(root / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    rng = np.random.default_rng(0)
    attrs = {"tokenizer_sha256": file_sha256(root / "vq.pt"), "codebook_size": 32, "image_size": 16, "grid": 4,
             "augmentations": ["center", "center_flip"], "class_names": ["a", "b", "c"]}
    write_token_store(root / "real.zarr", rng.integers(0, 32, (rows, 2, 16), dtype=np.uint16),
                      rng.integers(0, 3, rows).astype(np.int32), attrs, chunk_rows=4)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["negatives"].update(batch_size=2, chunk_rows=4, **negatives)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def negatives(root: Path, monkeypatch, capsys, out: Path, *extra) -> tuple[int, str]:
    return invoke(["--params", root / "params.yaml", "--device", "cpu", *extra, "negatives", "--tokens", root / "real.zarr",
                   "--ref", root / "gpt.pt", "--vq", root / "vq.pt", "--out", out], monkeypatch, capsys)


def expected_fakes(root: Path, labels: np.ndarray, seed: int, reencode: bool) -> np.ndarray:
    """Each fake drawn alone (a batch of one) from the stream of (seed, j), by the plain sampler; decoded and
    encoded again by the tokenizer when `reencode`."""
    _, vq = load_tokenizer(root / "vq.pt")
    _, gpt = load_model(root / "gpt.pt", "--ref")
    vq, gpt = vq.eval(), gpt.eval()
    out = []
    for j, label in enumerate(labels):
        codes = sample(gpt, torch.tensor([int(label)]), uniforms=sample_uniforms(seed, [j], 16)).tokens
        if reencode:
            with torch.no_grad():
                image = ((vq.decode_codes(codes).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            codes = torch.from_numpy(encode_views(vq, image[:, None], torch.device("cpu"))[:, 0].astype(np.int64))
        out.append(codes[0].numpy())
    return np.stack(out).astype(np.uint16)


@pytest.mark.parametrize("reencode", [True, False])
def test_fake_j_is_sample_j_at_the_label_of_its_real_row(tmp_path: Path, monkeypatch, capsys, reencode: bool):
    root = make_world(tmp_path, rows=5, ratio=2, seed=3, reencode=reencode)
    code, err = negatives(root, monkeypatch, capsys, root / "fakes.zarr")
    assert code == 0, err
    real, fakes = open_token_store(root / "real.zarr"), open_token_store(root / "fakes.zarr")
    assert fakes.tokens.shape == (10, 1, 16) and fakes.attrs["augmentations"] == ["sample"]
    # ratio 2: fake rows 2i and 2i + 1 pair with real row i, drawn at its label
    assert fakes.labels.tolist() == [int(c) for c in real.labels for _ in range(2)]
    expected = expected_fakes(root, fakes.labels, seed=3, reencode=reencode)
    assert np.array_equal(fakes.tokens[0:10][:, 0], expected)
    assert len({row.tobytes() for row in expected}) > 5  # the rows are drawn, not copies of one another
    provenance = fakes.attrs["negatives"]
    assert provenance["ref_ckpt_sha256"] == file_sha256(root / "gpt.pt")
    assert provenance["real_tokens_fingerprint"] == real.fingerprint
    assert (provenance["seed"], provenance["ratio"], provenance["reencode"], provenance["real_rows"]) == (3, 2, reencode, 5)
    assert provenance["sampler"] == {"cfg_scale": 0.0, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert fakes.attrs["settings"]["seed"] == 3 and fakes.attrs["tokenizer_sha256"] == real.attrs["tokenizer_sha256"]


def test_a_rerun_is_up_to_date_and_another_seed_draws_other_fakes(tmp_path: Path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="stages.negatives")
    root = make_world(tmp_path)
    out = root / "fakes.zarr"
    assert negatives(root, monkeypatch, capsys, out)[0] == 0
    first = open_token_store(out)
    before = (out / "zarr.json").stat().st_mtime_ns
    caplog.clear()
    assert negatives(root, monkeypatch, capsys, out)[0] == 0
    assert "up to date" in caplog.text
    assert (out / "zarr.json").stat().st_mtime_ns == before
    caplog.clear()
    assert negatives(root, monkeypatch, capsys, out, "--set", "negatives.seed=1")[0] == 0
    assert "up to date" not in caplog.text and "drew 10 fakes" in caplog.text
    second = open_token_store(out)
    assert second.fingerprint != first.fingerprint and second.attrs["negatives"]["seed"] == 1
    assert not out.with_name("fakes.zarr.partial").exists()


def test_guidance_and_truncation_change_the_fakes_and_are_recorded(tmp_path: Path, monkeypatch, capsys):
    root = make_world(tmp_path)
    assert negatives(root, monkeypatch, capsys, root / "plain.zarr")[0] == 0
    assert negatives(root, monkeypatch, capsys, root / "topk.zarr", "--set", "negatives.top_k=2")[0] == 0
    plain, topk = open_token_store(root / "plain.zarr"), open_token_store(root / "topk.zarr")
    assert topk.attrs["negatives"]["sampler"]["top_k"] == 2
    assert not np.array_equal(plain.tokens[0:10], topk.tokens[0:10])


def test_another_tokenizer_than_the_real_rows_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys):
    root = make_world(tmp_path)
    torch.manual_seed(1)
    save_checkpoint(root / "vq.pt", VQModel(VQ_CFG).state_dict(), VQ_CFG.to_dict(), kind="llamagen-vq")
    code, err = negatives(root, monkeypatch, capsys, root / "fakes.zarr")
    lines = [line for line in err.splitlines() if line.startswith("cca-pipe: error")]
    assert code != 0 and len(lines) == 1 and "--vq" in lines[0] and "tokenizer_sha256" in lines[0]
    assert "Traceback" not in err
    assert not (root / "fakes.zarr").exists() and not (root / "fakes.zarr.partial").exists()


def test_progress_goes_live_beside_the_store_and_a_stopped_run_resumes_its_step_axis(tmp_path: Path, monkeypatch):
    """10 fakes in chunks of 4: steps 0, 1, 2 (rows_done 4, 8, 10) in `<out>.live`, none inside the store. A run
    stopped as chunk 2 is written; its rerun draws chunk 2 again and leaves each step once, and its store is the
    bytes of an uninterrupted run's."""
    from test_live import live_steps, tsv
    from test_negatives_processes import store_bytes

    from pipeline.live import LIVE_METRICS, LIVE_PLOTS
    from stages import negatives as negatives_stage

    root = make_world(tmp_path)
    cfg = negatives_stage.NegativesConfig(batch_size=2, chunk_rows=4)
    whole, out = root / "whole.zarr", root / "stopped.zarr"
    negatives_stage.run(cfg, root / "real.zarr", root / "gpt.pt", root / "vq.pt", whole)
    live = root / "whole.zarr.live"
    assert [(int(r["step"]), float(r["rows_done"])) for r in tsv(live / LIVE_PLOTS / "rows_done.tsv")] == [(0, 4), (1, 8), (2, 10)]
    assert live_steps(live, "throughput/rows_per_s") == live_steps(live, "eta_s") == [0, 1, 2]
    assert json.loads((live / LIVE_METRICS).read_text())["step"] == 2
    assert not [p for p in whole.rglob("*") if "live" in p.name or p.name == LIVE_METRICS]

    write = negatives_stage.TokenStoreWriter.write_chunk

    def write_then_stop(self, k, rows):
        if k == 2:
            raise KeyboardInterrupt  # as a stop between chunks
        return write(self, k, rows)

    with monkeypatch.context() as m:
        m.setattr(negatives_stage.TokenStoreWriter, "write_chunk", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            negatives_stage.run(cfg, root / "real.zarr", root / "gpt.pt", root / "vq.pt", out)
    # step 2 is logged before its chunk is written: the rerun resumes at chunk 2, drops that row and logs it again
    assert not out.exists() and live_steps(root / "stopped.zarr.live", "rows_done") == [0, 1, 2]
    negatives_stage.run(cfg, root / "real.zarr", root / "gpt.pt", root / "vq.pt", out)
    rows = tsv(root / "stopped.zarr.live" / LIVE_PLOTS / "rows_done.tsv")
    assert [(int(r["step"]), float(r["rows_done"])) for r in rows] == [(0, 4), (1, 8), (2, 10)]
    assert store_bytes(out) == store_bytes(whole)


def test_a_live_folder_that_is_not_ours_is_refused_in_one_line(tmp_path: Path, monkeypatch, capsys):
    root = make_world(tmp_path)
    (root / "fakes.zarr.live").mkdir()
    (root / "fakes.zarr.live" / "notes.txt").write_text("mine")
    code, err = negatives(root, monkeypatch, capsys, root / "fakes.zarr")
    lines = [line for line in err.splitlines() if line.startswith("cca-pipe: error")]
    assert code != 0 and len(lines) == 1 and "fakes.zarr.live" in lines[0] and "not cca-pipe's own" in lines[0]
    assert not (root / "fakes.zarr").exists() and (root / "fakes.zarr.live" / "notes.txt").read_text() == "mine"
