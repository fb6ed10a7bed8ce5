"""Training jobs for tests/test_fsdp.py, run alone (a world of one) or under torchrun (gloo):

    python tests/fsdp_worker.py OUT JOB [JOB ...]
    torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT JOB [JOB ...]

JOB = FAMILY:STRATEGY:ACTION, FAMILY llamagen | var, STRATEGY ddp | fsdp, ACTION
  full        train the 4 steps; OUT/<family>-<strategy>-w<N>-full.pt: the gathered state dict; with fsdp also
              OUT/<family>-policy-w<N>.pt (the consolidated policy, the family's checkpoint layout) and
              OUT/<family>-logps-w<N>.pt (the sharded model's log-probs of a fixed batch)
  stop        train, saving the resume point of step 2 in OUT/state-<family>-w<N>/, and stop there
  resume=DIR  continue from OUT/DIR/ to the end; OUT/<family>-<strategy>-w<N>-resumed.pt
  ddo         train the 4 steps with train.loss ddo on a DDO cache of 2 fakes per image (negatives.ratio 2);
              OUT/<family>-<strategy>-w<N>-ddo.pt: the gathered state dict
Every process builds the same model, tokens, fakes and cache from fixed seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.alignment import AlignmentRun
from pipeline.distributed import init_world, shutdown_world
from pipeline.families import family_of_model
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR, VARConfig, VARModel
from pipeline.parallel import full_state_dict
from pipeline.refcache import draw_pairs, fake_rows, reference_fake_columns, reference_logps
from pipeline.resume import TrainState
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
from stages.train import TrainConfig

GPT_CFG = GPTConfig(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=5, block_size=16, multiple_of=16)
PN = (1, 2, 3, 4)
VAE_CFG = MSVQConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, norm_groups=8, patch_nums=PN)
VAR_CFG = VARConfig(depth=2, width=64, heads=2, num_classes=5, vocab_size=64, cvae=8, patch_nums=PN)
ROWS = 16  # 2 epochs of 16 rows in batches of 8: 4 steps; 4 micro-batches of 2 rows each (2 per process)


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llamagen":
        return GPT(GPT_CFG)
    quantizer = MSVQModel(VAE_CFG).quantize
    with torch.no_grad():  # a non-trivial codebook, so the teacher-forcing input varies
        quantizer.embedding.weight.normal_(0, 0.5)
    return VARModel(VAR(VAR_CFG), quantizer)


def data(model) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(ROWS, 1, model.cfg.seq_len), dtype=np.uint16)
    labels = (np.arange(ROWS) % 5).astype(np.int32)
    pairs = draw_pairs(labels, 1, 5, seed=0, views="all")
    return tokens, {**pairs, **reference_logps(model, tokens, pairs, batch_size=8, device=torch.device("cpu"))}


def ddo_data(model, tokens: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
    """A negatives store of 2 fakes per image (random tokens: the equivalence does not need the reference's
    samples) and the DDO cache's columns over it (stages/reflogp.py's layout)."""
    fakes = np.random.default_rng(1).integers(0, 64, size=(2 * ROWS, 1, model.cfg.seq_len), dtype=np.uint16)
    fake_row = fake_rows(cache["row"], len(cache["row"]), 2)
    columns = reference_fake_columns(model, fakes, fake_row, cache["label"], np.arange(len(fake_row)), 8,
                                     torch.device("cpu"), ratio=2)
    return fakes, {**cache, "fake_row": fake_row, **columns}


def main(out: Path, jobs: list[str]) -> None:
    world = init_world("cpu")
    for job in jobs:
        family, strategy, action = job.split(":")
        policy = build(family)
        tokens, cache = data(policy)
        fakes = None
        if action == "ddo":
            fakes, cache = ddo_data(policy, tokens, cache)
        cfg = TrainConfig(loss="ddo" if action == "ddo" else "cca", alpha=4.0,
                          beta=0.5, lam=10.0, lr=1e-3, epochs=2.0, batch_size=8, micro_batch_size=2, uncond_ratio=0.25,
                          weight_decay=0.05, strategy=strategy,
                          # dropout and drop path on: the keyed masks (train.seed, visit) must be the same in every layout
                          dropout=0.1 if family == "llamagen" else 0.0, drop_path=0.1)
        name = f"{family}-{strategy}-w{world.size}"
        state = None
        if action == "stop":
            state = TrainState(out / f"state-{family}-w{world.size}", family, world)
        elif action.startswith("resume="):
            state = TrainState(out / action.split("=", 1)[1], family, world)
            assert state.saved() is not None and state.saved()["step"] == 2, "no resume point of step 2"
        run = AlignmentRun(policy, tokens, cache, cfg, world.device, world, family_of_model(policy).param_groups, fakes=fakes)
        run.resume(state)
        for step, step_tokens in run.batches():
            run.step(step, step_tokens)  # every process, so they all stop alike
            if action == "stop" and step + 1 == 2:
                run.checkpoint(2, state)
                break
        if action == "stop":
            continue
        run.finish()
        full = full_state_dict(policy)
        if action == "full" and strategy == "fsdp":
            labels = torch.arange(4) % 5
            x = torch.from_numpy(tokens[:4, 0].astype(np.int64))
            with torch.no_grad():
                logps = policy(x, labels)  # every process: the sharded forward
            if world.main:
                family_of_model(policy).save(out / f"{family}-policy-w{world.size}.pt", policy, full)
                torch.save({"tokens": x, "labels": labels, "logps": logps}, out / f"{family}-logps-w{world.size}.pt")
        if world.main:
            torch.save(full, out / f"{name}-{action if action in ('full', 'ddo') else 'resumed'}.pt")
    shutdown_world()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
