"""Fine-tuning a policy with an alignment loss over cached reference log-probs (CCA, paper Sec. 3.2).

`policy` is any family's model (pipeline.families: LlamaGen GPT or VAR). Only the policy is resident: the
reference model's log-probs come from the `reflogp` cache, whose rows fix each image's augmentation view
and negative label. The loss function is pure (pipeline.losses), so an online reference model would feed
it the same tensors (tested). The optimiser is the released recipe's: AdamW over the family's parameter
groups, a constant or VAR's `lin0` learning rate, cosine-annealed weight decay, clipping at each step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, check_ranges, setting
from .ddo import DDOBatch, ddo_loss_for_batch, make_ddo_batch
from .device import OutOfMemory, autocast, is_out_of_memory
from .distributed import World
from .formats import cached_fake_columns
from .logprobs import sequence_logp
from .losses import LOSSES, LossOutput
from .models.layers import noise_keys, noise_rates
from .parallel import STRATEGIES, accumulating, clip_grad_norm, deal_micro_batches, distribute, full_state_dict
from .refcache import CHECK_ROWS, ReferenceNoise, check_cache_rows, fake_slot_rows
from .resume import TrainState

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "lin0")
# train.loss's choices: LOSSES over CCA's rows, and DDO (pipeline.ddo) over a DDO cache's real rows and their
# fakes (docs/ddo.md: ddo_loss is not in LOSSES, its rows are other rows)
DDO = "ddo"
LOSS_CHOICES = (*LOSSES, DDO)


@dataclass
class AlignBatch:
    """One (micro-)batch in the loss's terms; unconditional rows already carry the null label and log-prob."""

    tokens: torch.Tensor  # (B, L) the row's cached view
    labels_pos: torch.Tensor  # (B,) c, or null where uncond
    labels_neg: torch.Tensor  # (B,) c_neg, or null where uncond
    ref_logp_pos: torch.Tensor  # (B,) float64
    ref_logp_neg: torch.Tensor  # (B,) float64
    # (B,) bool: rows whose "negative" is a second positive: unconditional rows (both labels null) and rows
    # whose rolled negative label equals their own (the released scripts' rule, reflogp.negatives: roll)
    positive_twice: torch.Tensor
    lam: torch.Tensor | None = None  # (B,) each row's lambda, for a lambda-conditioned policy (paper Table 5)
    # (2B,) int64: the policy's dropout keys of the positive then the negative sequences (visit_keys)
    dropout_keys: torch.Tensor | None = None


def gather_tokens(tokens, cache: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The cached view of each cache row: (len(rows), L) uint16 from the (N, A, L) tokens (an array, or a
    lazy store's pipeline.tokenstore.LazyTokens, which reads only the chunks these rows are in)."""
    return np.asarray(tokens[cache["row"][rows], cache["view"][rows]])


def visit_keys(seed: int, visits: np.ndarray, slots: int = 1) -> torch.Tensor:
    """The policy's dropout keys (2B,) of visits (positions in the epoch order): its positive sequences'
    then its negative sequences', one independent draw per visit, as the released scripts' (whose policy
    and reference each draw their own masks); a function of the visit, not of the batch or the process.
    `slots` r: r negatives per visit (DDO's r fakes of a row), (B + B r,), visit by visit, slot by slot."""
    neg = torch.stack([noise_keys(seed, visits, "visit_neg", j) for j in range(slots)], dim=1)
    return torch.cat([noise_keys(seed, visits, "visit_pos"), neg.reshape(-1)])


def make_batch(rows: np.ndarray, tokens, cache: dict[str, np.ndarray], uncond: np.ndarray, null_class: int,
               row_tokens: np.ndarray | None = None, lam: np.ndarray | None = None,
               dropout_keys: torch.Tensor | None = None) -> AlignBatch:
    """Assemble a batch from cache rows (indices into the cache's columns); `row_tokens`: their tokens
    already gathered (by a DataLoader worker), else read from `tokens` here."""
    if row_tokens is None:
        row_tokens = gather_tokens(tokens, cache, rows)
    null = np.full(len(rows), null_class)
    return AlignBatch(
        tokens=torch.from_numpy(row_tokens.astype(np.int64)),
        labels_pos=torch.from_numpy(np.where(uncond, null, cache["label"][rows]).astype(np.int64)),
        labels_neg=torch.from_numpy(np.where(uncond, null, cache["neg_label"][rows]).astype(np.int64)),
        ref_logp_pos=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_pos"][rows])),
        ref_logp_neg=torch.from_numpy(np.where(uncond, cache["ref_logp_null"][rows], cache["ref_logp_neg"][rows])),
        positive_twice=torch.from_numpy(uncond | (cache["neg_label"][rows] == cache["label"][rows])),
        lam=None if lam is None else torch.from_numpy(lam.astype(np.float32)),
        dropout_keys=dropout_keys,
    )


def policy_logps(policy, batch: AlignBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta(x|c) and log p_theta(x|c_neg) in one forward over the concatenated batch."""
    x = batch.tokens.to(device)
    labels = torch.cat([batch.labels_pos, batch.labels_neg]).to(device)
    lam = None if batch.lam is None else torch.cat([batch.lam, batch.lam]).to(device)
    keys = None if batch.dropout_keys is None else batch.dropout_keys.to(device)
    with autocast(device):
        logp = sequence_logp(policy, labels, torch.cat([x, x]), lam, dropout_keys=keys)
    return logp.split(len(x))


@torch.no_grad()
def with_online_reference(reference, batch: AlignBatch, device: torch.device) -> AlignBatch:
    """The official CCA design, for comparison: a second, frozen model forwarded every step fills in the
    reference log-probs that the cache would otherwise provide (same function, same layout)."""
    x = batch.tokens.to(device)
    labels = torch.cat([batch.labels_pos, batch.labels_neg]).to(device)
    with autocast(device):
        ref = sequence_logp(reference, labels, torch.cat([x, x])).double()
    pos, neg = ref.split(len(x))
    return AlignBatch(batch.tokens, batch.labels_pos, batch.labels_neg, pos.cpu(), neg.cpu(), batch.positive_twice, batch.lam,
                      batch.dropout_keys)


def loss_for_batch(policy, batch: AlignBatch, loss_name: str, beta: float, lam: float, device: torch.device):
    logp_pos, logp_neg = policy_logps(policy, batch, device)
    return LOSSES[loss_name](
        logp_pos, logp_neg, batch.ref_logp_pos.to(device), batch.ref_logp_neg.to(device),
        beta=beta, lam=lam if batch.lam is None else batch.lam.to(device), positive_twice=batch.positive_twice.to(device),
    )


def lr_factor(schedule: str, step: int, total: int, warmup_fraction: float, warmup_start: float, end_ratio: float) -> float:
    """The learning rate of optimiser step `step` of `total`, as a fraction of the peak.

    "lin0" is VAR's lr_control.lr_wd_annealing: warm-up from `warmup_start` over round(warmup_fraction *
    total) steps, then with pasd = (step - warm-up) / (total - 1 - warm-up): 1 while pasd < 0.05, then
    end_ratio + (1 - end_ratio) (1 - pasd) / 0.95, which reaches end_ratio at the last step."""
    if schedule == "constant":
        return 1.0
    warmup = round(warmup_fraction * total)
    if step < warmup:
        return warmup_start + (1 - warmup_start) * step / warmup
    past = (step - warmup) / max(total - 1 - warmup, 1)
    return 1.0 if past < 0.05 else end_ratio + (1 - end_ratio) * (1 - past) / 0.95


def weight_decay_at(step: int, total: int, start: float, end: float | None) -> float:
    """VAR's weight-decay annealing: cosine from `start` to `end` over the run (end None: constant)."""
    if end is None:
        return start
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * step / max(total - 1, 1)))


def epoch_order(rng: np.random.Generator, store_rows: np.ndarray, chunk_rows: int, buffer_chunks: int) -> np.ndarray:
    """One epoch's order of the cache rows, chunk-aware: the token-store chunks the rows live in are shuffled,
    then taken `buffer_chunks` at a time, and the rows of each group shuffled among themselves, so a batch
    touches at most `buffer_chunks` chunks (and a reader caching as many decodes each once per epoch). When
    every chunk fits in one buffer this is exactly a uniform permutation of the cache rows."""
    chunk = store_rows // chunk_rows
    chunks = np.unique(chunk)
    if len(chunks) <= buffer_chunks:
        return rng.permutation(len(store_rows))
    by_chunk = np.argsort(chunk, kind="stable")
    bounds = np.searchsorted(chunk[by_chunk], chunks)
    members = np.split(by_chunk, bounds[1:])  # cache rows of each chunk
    shuffled = rng.permutation(len(chunks))
    groups = [np.concatenate([members[c] for c in shuffled[i : i + buffer_chunks]]) for i in range(0, len(chunks), buffer_chunks)]
    return np.concatenate([g[rng.permutation(len(g))] for g in groups])


class StepRows(torch.utils.data.Dataset):
    """Step k -> the tokens of the cache rows this process trains on at that step (its micro-batches
    `mine` of `micro_batch_size` rows, concatenated), uint16, for a DataLoader whose workers read the store
    while the model trains. Indexed by step, so a resumed run starts at its step."""

    def __init__(self, tokens, cache: dict[str, np.ndarray], order: np.ndarray, batch_size: int,
                 micro_batch_size: int | None = None, mine: list[int] | None = None):
        self.tokens, self.order, self.batch_size = tokens, order, batch_size
        self.micro = micro_batch_size or batch_size
        self.mine = mine if mine is not None else list(range(batch_size // self.micro))
        self.cache = {k: cache[k] for k in ("row", "view")}

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, step: int) -> torch.Tensor:
        rows = self.order[step * self.batch_size : (step + 1) * self.batch_size]
        mine = np.concatenate([rows[i * self.micro : (i + 1) * self.micro] for i in self.mine])
        return torch.from_numpy(gather_tokens(self.tokens, self.cache, mine))


def run_steps(epochs: float, n_rows: int, batch_size: int, max_steps: int | None) -> int:
    """Optimiser steps of a run: ceil(epochs x cache rows / batch_size), at most max_steps (None: no cap).
    `n_rows`: the rows of one visit (an epoch). The learning-rate and weight-decay schedules span these steps."""
    steps = max(1, math.ceil(epochs * n_rows / batch_size))
    return steps if max_steps is None else min(steps, max_steps)


def visit_rows(cache: dict[str, np.ndarray], visits: int) -> int:
    """The rows of one visit (one epoch) of a cache of `visits` visit blocks (pipeline/formats.py)."""
    n = len(cache["row"])
    if visits < 1 or n % visits:
        raise ValueError(f"a cache of {n} rows cannot hold {visits} visits of equal size")
    return n // visits


def epochs_read(epochs: float, n_rows: int, batch_size: int, max_steps: int | None) -> int:
    """The epochs a run reads rows of, each a visit of the cache: ceil(epochs), fewer under a max_steps cap.
    The last step's rows past `epochs` x n_rows (filling its batch) are not counted: they come from the
    visit after the last, i.e. visit 0 again (AlignmentRun)."""
    steps = run_steps(epochs, n_rows, batch_size, max_steps)
    return min(math.ceil(epochs), math.ceil(steps * batch_size / n_rows))


@dataclass
class AlignConfig:
    """Every alignment setting, with its default and range: the train section of params.yaml (the train stage's
    TrainConfig adds what only its recipe uses; params.yaml agrees, tested). The ImageNet recipes are presets
    (stages/cli/presets.py). Range errors name the key as `train.<key>`."""

    loss: str = setting("cca", choices=LOSS_CHOICES)
    beta: float = setting(0.5, gt=0.0)  # > 0: a negative beta would push the policy the wrong way
    lam: float = setting(10.0, key="lambda", ge=0.0)
    # DDO's weight of the fake term (loss ddo; the paper's range 0.5-50, the released VAR script 50); the loss
    # is divided by max(alpha, 1) as the script does (docs/ddo.md)
    alpha: float = setting(50.0, ge=0.0)
    lr: float = setting(1e-4, gt=0.0)
    # "constant", or VAR's "lin0": linear warm-up over warmup_fraction of the steps from warmup_start x lr,
    # 5% of the rest at lr, then linear decay to end_ratio x lr (VAR utils/lr_control.py)
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES)
    warmup_fraction: float = setting(0.02, ge=0.0, lt=1.0)
    warmup_start: float = setting(0.005, ge=0.0, le=1.0)
    end_ratio: float = setting(0.1, ge=0.0, le=1.0)
    # AdamW; decay only the family's decayed parameters (LlamaGen: dim >= 2; VAR: not its no-decay set),
    # cosine-annealed from weight_decay to weight_decay_end (None: constant), as VAR's lr_wd_annealing
    weight_decay: float = setting(0.0, ge=0.0)
    weight_decay_end: float | None = setting(None, ge=0.0)
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.95], ge=0.0, lt=1.0)
    grad_clip: float = setting(1.0, gt=0.0)
    loss_scale: float = setting(1.0, gt=0.0)  # the loss is multiplied by this before backward (see presets.py)
    # fine-tuning regularisation, active in train mode only, masks keyed by (seed, visit, pos/neg):
    # LlamaGen's resid/ffn/token dropout, drop path rising over the blocks (VAR's only regulariser)
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    drop_path: float = setting(0.0, ge=0.0, lt=1.0)
    # "matched": the cache's reference must have seen these dropout / drop_path rates (reflogp.dropout,
    # reflogp.drop_path), as the released scripts' train-mode reference; "any": accept another (e.g. an
    # eval-mode cache under a policy with dropout, whose step-0 ratios then average -D, not 0)
    reference_noise: str = setting("matched", choices=("matched", "any"))
    # cache rows the step-0 check scores (spread over the cache), a reflogp pass over them before the first step;
    # 0: no check (a warning says what is given up); the weights are the same (tests/test_integrity.py)
    step0_rows: int = setting(CHECK_ROWS, ge=0, same_result=True)
    epochs: float = setting(3.0, gt=0.0)  # epoch e reads the cache's visit e (reflogp.visits)
    # false: refuse a cache with fewer visits than the epochs this run reads; true: epoch e reads visit e mod
    # visits, so each row meets the same view, negative and reference masks again (before issue 28's fix)
    repeat_visits: bool = False
    # a cap on the optimiser steps: a run trains ceil(epochs x cache rows / batch_size) steps, at most this
    # many (smoke runs and budgets; the schedules span the capped run); null: no cap. train prints the count
    max_steps: int | None = setting(None, ge=1)
    # global batch of cache rows; each row gives one positive and one negative sequence
    batch_size: int = setting(64, ge=1, multiple_of="micro_batch_size")
    micro_batch_size: int = setting(32, ge=1)  # rows per forward; gradient accumulation makes up the batch
    uncond_ratio: float = setting(0.1, ge=0.0, lt=1.0)
    seed: int = setting(0, ge=0)
    # data order: token-store chunks are shuffled, then rows within groups of this many chunks (epoch_order);
    # a store of at most this many chunks is shuffled uniformly
    shuffle_buffer_chunks: int = setting(16, ge=1)
    num_workers: int = setting(0, ge=0, same_result=True)  # DataLoader processes reading tokens while the model trains
    # under torchrun: "ddp" keeps the whole policy and its AdamW state on every GPU (16 bytes per parameter);
    # "fsdp" shards them over the processes (models larger than a GPU: `cca-pipe plan`; pipeline/parallel.py);
    # either gives the one-process gradient (tests/test_fsdp.py, within 1e-5)
    strategy: str = setting("ddp", choices=STRATEGIES, same_result=True)
    # recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more compute;
    # the same gradients, tests/test_fsdp.py)
    activation_checkpointing: bool = setting(False, same_result=True)
    # One policy for a range of lambdas (paper Table 5): {min: 1, max: 8103} draws each row's lambda
    # log-uniformly in it and feeds it to a zero-initialised lambda embedding (train.lambda is then unused);
    # null: the usual fixed-lambda policy
    lambda_conditioning: dict[str, float] | None = None

    def __post_init__(self) -> None:
        check_ranges(self, "train")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas = {self.betas}: AdamW takes two betas, e.g. [0.9, 0.95]")
        if self.lambda_conditioning is not None:
            lc = self.lambda_conditioning
            if set(lc) != {"min", "max"} or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lc.values()) \
                    or not 0 < lc["min"] < lc["max"]:
                raise ConfigError(f"train.lambda_conditioning = {lc!r}: write {{min: 1, max: 8103}} (0 < min < max), or null")

    @property
    def lambda_range(self) -> tuple[float, float] | None:
        lc = self.lambda_conditioning
        return None if lc is None else (float(lc["min"]), float(lc["max"]))


def check_reference_noise(cfg: AlignConfig, cache_noise: ReferenceNoise, cache_name: str) -> None:
    """train.reference_noise "matched": the cache's reference dropout is the policy's (one line otherwise)."""
    cached, ours = (cache_noise.dropout, cache_noise.drop_path), (cfg.dropout, cfg.drop_path)
    if cfg.reference_noise == "matched" and cached != ours:
        raise ConfigError(
            f"{cache_name} was computed with reflogp.dropout = {cached[0]}, reflogp.drop_path = {cached[1]}, but "
            f"train.dropout = {ours[0]}, train.drop_path = {ours[1]}: the step-0 log-ratios would not average 0. "
            f"Rebuild the cache with the train rates, or set train.reference_noise: any to train against it anyway")


def check_visits(cfg: AlignConfig, visits: int, rows: int, cache_name: str) -> None:
    """Each epoch reads a visit of its own (one line otherwise), unless train.repeat_visits."""
    needed = epochs_read(cfg.epochs, rows, cfg.batch_size, cfg.max_steps)
    if visits < needed and not cfg.repeat_visits:
        raise ConfigError(
            f"{cache_name} holds {visits} visit(s) of each row but train.epochs = {cfg.epochs:g} reads {needed}: rebuild it with "
            f"reflogp.visits: epochs (or >= {needed}), or set train.repeat_visits: true to read its draws again at every epoch")


STEP0_STREAM = 0x5EED0  # the step-0 check's own random stream: drawing its rows leaves the data order as it was


def step0_rows(num_rows: int, seed: int, count: int = CHECK_ROWS) -> np.ndarray:
    """The cache rows the step-0 check scores: one drawn (seeded) in each of `count` equal spans of the
    cache, so damage to any span of num_rows / count consecutive rows is seen wherever it lies (the first
    rows of the epoch order come from a few chunks: damage elsewhere went unseen). Single rows are the
    content digest's to catch (pipeline.formats.verify_cache_content)."""
    count = min(count, num_rows)
    edges = np.linspace(0, num_rows, count + 1).astype(np.int64)  # spans of >= 1 row
    offsets = np.random.default_rng([seed, STEP0_STREAM]).random(count) * (edges[1:] - edges[:-1])
    return edges[:-1] + offsets.astype(np.int64)


@dataclass
class MicroBatchRows:
    """One micro-batch's per-row results (detached, on CPU): what every process sends the main process, which
    logs the step's metrics over all its rows (step_metrics)."""

    index: int  # the micro-batch's place in its step: rows are concatenated in this order, whichever process ran it
    per_row: torch.Tensor  # (B,) the loss of each row
    ratio_pos: torch.Tensor  # (B,) log p_theta(x|c) - log p_ref(x|c)
    ratio_neg: torch.Tensor  # (B,) log p_theta(x|c_neg) - log p_ref(x|c_neg)
    logp_pos: torch.Tensor  # (B,) log p_theta(x|c)
    positive_twice: torch.Tensor  # (B,) bool: AlignBatch.positive_twice

    @classmethod
    def of(cls, index: int, out: LossOutput, positive_twice: torch.Tensor) -> MicroBatchRows:
        """`positive_twice`: the batch's AlignBatch.positive_twice (DDO: its null-label rows, DDOBatch.uncond)."""
        return cls(index, out.per_row.cpu(), out.ratio_pos.cpu(), out.ratio_neg.cpu(), out.logp_pos.cpu(), positive_twice)


def step_metrics(parts: list[MicroBatchRows], grad_norm: float, lr: float) -> dict[str, float]:
    """The step's metrics over all its rows, from its micro-batches (any order), with its lr and gradient norm."""
    parts = sorted(parts, key=lambda part: part.index)

    def rows(name: str) -> torch.Tensor:
        return torch.cat([getattr(part, name) for part in parts])

    per_row = rows("per_row")
    merged = LossOutput(loss=per_row.mean(), per_row=per_row, ratio_pos=rows("ratio_pos"), ratio_neg=rows("ratio_neg"),
                        logp_pos=rows("logp_pos"))
    return {**merged.metrics(rows("positive_twice")), "lr": lr, "grad_norm": grad_norm}


class AlignmentRun:
    """A fine-tuning run of `policy` for cfg.epochs passes over the cache rows, in the pieces a recipe loops over
    (torchtune-style): set up (here), resume, the step-0 check, one optimiser step, a checkpoint, finish.
    The train stage's recipe (stages/train.py) owns the loop:

        run = AlignmentRun(policy, tokens, cache, cfg, device, world, family.param_groups, visits)
        if not run.resume(train_state):
            run.check_cache(cache_noise, cache_name)
        for step, step_tokens in run.batches():
            metrics = run.step(step, step_tokens)  # the main process's; None on the others
            ...  # log, progress, every save_every steps: run.state_dict() and run.checkpoint(step + 1, train_state)
        policy = run.finish()

    Setup applies the settings the policy carries (cfg.dropout / drop_path rates, the lambda embedding of
    cfg.lambda_conditioning, activation checkpointing), draws the data order, distributes the policy and builds
    AdamW over `param_groups(policy, weight_decay)`, the family's rule for which parameters are decayed
    (pipeline.families: `Family.param_groups`), called after the policy is distributed since FSDP replaces its
    parameters by shards in place.
    Row order and unconditional rows are drawn from a numpy generator seeded with cfg.seed; dropout and
    drop-path masks are keyed by (cfg.seed, the row's position in the epoch order, pos/neg): visit_keys,
    the same whatever the micro-batch size, process count or strategy, so a run is reproducible on CPU.
    A run resumed from a train state holding a point for its settings (pipeline.resume.TrainState) continues
    exactly where it stopped, with any number of processes and either strategy: same data order,
    unconditional rows and dropout masks, same optimiser moments, hence the same final weights.
    `visits`: the cache's visit blocks (reflogp.visits, pipeline/formats.py): epoch e reads the rows of visit
    e mod visits (check_visits refuses fewer visits than epochs unless train.repeat_visits), so with one visit
    every epoch reads the same draws.
    A non-finite loss or gradient raises FloatingPointError naming the step, before the update is applied.

    Under torchrun (`world` of N processes) the global batch and its sequence are the same as with one
    process; its micro-batches are dealt out round robin (pipeline.parallel.deal_micro_batches).
    cfg.strategy "ddp": each process accumulates its own (no_sync) and the last backward averages the
    gradients; "fsdp": each micro-batch's gradients are reduce-scattered into the shards (pipeline.parallel).
    Either way the loss is weighted so the result is the one-process gradient; the main process gets each
    step's metrics over all rows (gathered)."""

    def __init__(self, policy, tokens, cache: dict[str, np.ndarray], cfg: AlignConfig, device: torch.device,
                 world: World | None, param_groups: Callable[[torch.nn.Module, float], list[dict]], visits: int = 1,
                 fakes=None):
        world = world or World(device=device)
        self.mine = deal_micro_batches(cfg.batch_size, cfg.micro_batch_size, world)  # this process's micro-batches
        if cfg.loss not in LOSS_CHOICES:
            raise ValueError(f"unknown loss {cfg.loss!r}; known: {sorted(LOSS_CHOICES)}")
        if cfg.loss == DDO and (fakes is None or "ref_logp_fake" not in cache):
            raise ValueError("train.loss ddo reads a DDO cache (reflogp --negatives) and its negatives store (--negatives)")
        if cfg.loss == DDO and cfg.lambda_conditioning is not None:
            raise ConfigError("train.lambda_conditioning is CCA's (a lambda per row): set it to null with train.loss ddo")
        self.fakes = fakes  # DDO: the negatives store's tokens (N r, 1, L), fake row cache["fake_row"] per cache row
        # DDO: r, each cache row's fakes (all its image's, docs/ddo.md); CCA: one negative per row
        self.fakes_per_row = len(cached_fake_columns(cache)) if cfg.loss == DDO else 1
        if cfg.uncond_ratio > 0 and not policy.cfg.has_null_class:
            raise ValueError("train.uncond_ratio > 0 needs a model with a null class (trained with class dropout); set it to 0")
        policy.set_dropout(cfg.dropout, cfg.drop_path)
        if cfg.lambda_conditioning is not None:
            policy.enable_lambda_conditioning(seed=cfg.seed)
        self.policy, self.tokens, self.cache, self.cfg, self.device, self.world = policy, tokens, cache, cfg, device, world
        self.rng = np.random.default_rng(cfg.seed)
        self.rows_per_visit = n = visit_rows(cache, visits)
        self.total_steps = run_steps(cfg.epochs, n, cfg.batch_size, cfg.max_steps)
        chunk_rows = getattr(tokens, "chunk_rows", len(tokens))
        # epoch e: a permutation of visit e's rows (each visit holds the same store rows, so the draws of the
        # order are the one-visit cache's)
        self.order = np.concatenate([
            (e % visits) * n + epoch_order(self.rng, cache["row"][(e % visits) * n : (e % visits + 1) * n], chunk_rows,
                                           cfg.shuffle_buffer_chunks)
            for e in range(math.ceil(cfg.epochs) + 1)])
        policy.set_activation_checkpointing(cfg.activation_checkpointing)
        policy.train()
        self.model = distribute(policy, world, cfg.strategy)  # FSDP shards `policy` in place: groups are built after it
        groups = param_groups(policy, cfg.weight_decay)
        for group in groups:
            group["base_weight_decay"] = group["weight_decay"]  # nonzero: decayed, on weight_decay_at's schedule
        # in the model's order (the clipping norm sums over them: another order rounds differently)
        self.trainable = [p for p in policy.parameters() if p.requires_grad]  # VAR: not its frozen quantiser
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        self.first_step = 0

    def resume(self, train_state: TrainState | None) -> bool:
        """Continue from the train state's point, if it holds one for these settings (whether it did); a resumed
        run skips the step-0 check, the policy being no longer the reference."""
        saved = train_state.restore(self.policy, self.opt) if train_state is not None else None
        if saved is None:
            return False
        self.rng.bit_generator.state = saved["rng"]
        self.first_step = int(saved["step"])
        return True

    def check_cache(self, cache_noise: ReferenceNoise, cache_name: str) -> None:
        """The step-0 check: the policy, still the reference, reproduces the cache (pipeline.refcache), on
        cfg.step0_rows rows; its cost is logged (a reflogp pass over them: 8 min 45 s of a 15-minute VAR trial on
        CPU, issue 30), and 0 turns it off with a warning of what is given up."""
        cfg = self.cfg
        if cfg.step0_rows == 0:
            if self.world.main:
                log.warning("step-0 check off (train.step0_rows = 0): a cache that does not belong to these tokens or this "
                            "reference (relabelled, permuted, columns swapped, other masks) trains without an error; only "
                            "its content digest (edits after it was written) is still checked")
            return
        rows = step0_rows(len(self.cache["row"]), cfg.seed, cfg.step0_rows)
        started = time.perf_counter()
        with noise_rates(self.policy, cache_noise.dropout, cache_noise.drop_path, "reflogp"):
            check_cache_rows(self.model, self.policy, self.tokens, self.cache, rows, cache_noise, cfg.micro_batch_size,
                             self.device, self.world, cache_name, self.fakes if cfg.loss == DDO else None)
        self.policy.train()
        if self.world.main:
            log.info("step-0 check: %d rows scored in %.1f s (a reflogp pass: 3 sequences per row); train.step0_rows "
                     "sets it (0: off)", len(rows), time.perf_counter() - started)

    def loader(self) -> torch.utils.data.DataLoader:
        """This process's tokens of each remaining step, read by cfg.num_workers processes ahead of the model."""
        cfg = self.cfg
        return torch.utils.data.DataLoader(
            StepRows(self.tokens, self.cache, self.order, cfg.batch_size, cfg.micro_batch_size, self.mine), batch_size=None,
            sampler=range(self.first_step, self.total_steps),
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            multiprocessing_context="spawn" if cfg.num_workers else None)  # zarr's threads make fork unsafe

    def batches(self):
        """(step, this process's tokens of the step's micro-batches) for every remaining step, read ahead by the loader."""
        for step, step_tokens in zip(range(self.first_step, self.total_steps), self.loader(), strict=True):
            yield step, step_tokens.numpy()

    def step(self, step: int, step_tokens: np.ndarray) -> dict[str, float] | None:
        """One optimiser step over this process's micro-batches (their tokens `step_tokens`, from batches()); every
        process takes part. Returns the step's metrics over all its rows (step_metrics) to the main process, None
        to the others."""
        cfg = self.cfg
        rows = self.order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        uncond = self.rng.random(len(rows)) < cfg.uncond_ratio
        lams = None if cfg.lambda_range is None else np.exp(self.rng.uniform(*np.log(cfg.lambda_range), size=len(rows)))
        lr = self._schedule(step)
        self.opt.zero_grad(set_to_none=True)
        parts = [self._micro_batch(step, j, rows, uncond, lams, step_tokens) for j in range(len(self.mine))]
        grad_norm = clip_grad_norm(self.trainable, cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {step}; lower train.lr or train.beta")
        self.opt.step()
        every = [part for rank_parts in self.world.gather(parts) for part in rank_parts]
        return step_metrics(every, grad_norm.item(), lr) if self.world.main else None

    def _schedule(self, step: int) -> float:
        """Set the step's learning rate and weight decay (decayed groups only) in the optimiser; returns the lr."""
        cfg = self.cfg
        lr = cfg.lr * lr_factor(cfg.lr_schedule, step, self.total_steps, cfg.warmup_fraction, cfg.warmup_start, cfg.end_ratio)
        decay = weight_decay_at(step, self.total_steps, cfg.weight_decay, cfg.weight_decay_end)
        for group in self.opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = decay if group["base_weight_decay"] else 0.0
        return lr

    def _micro_batch(self, step: int, j: int, rows: np.ndarray, uncond: np.ndarray, lams: np.ndarray | None,
                     step_tokens: np.ndarray) -> MicroBatchRows:
        """Forward and backward of this process's j-th micro-batch of the step (micro-batch self.mine[j] of `rows`)."""
        cfg, m, i = self.cfg, self.cfg.micro_batch_size, self.mine[j]
        part = slice(i * m, (i + 1) * m)
        keys = visit_keys(cfg.seed, step * cfg.batch_size + np.arange(part.start, part.stop), self.fakes_per_row)
        if cfg.loss == DDO:  # the real rows and their fakes; a visit's keys: real "visit_pos", fake "visit_neg"
            batch = self._ddo_batch(rows[part], uncond[part], step_tokens[j * m : (j + 1) * m], keys)
        else:
            batch = make_batch(rows[part], self.tokens, self.cache, uncond[part], self.policy.cfg.null_class,
                               step_tokens[j * m : (j + 1) * m], None if lams is None else lams[part], keys)
        per_row = 1 + self.fakes_per_row  # CCA: positive and negative; DDO: the real row and its fakes
        with _out_of_memory_hint(step, cfg, per_row), accumulating(self.model, last=j == len(self.mine) - 1):
            if cfg.loss == DDO:
                out = ddo_loss_for_batch(self.model, batch, cfg.beta, cfg.alpha, self.device)
            else:
                out = loss_for_batch(self.model, batch, cfg.loss, cfg.beta, cfg.lam, self.device)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"non-finite loss at step {step}; lower train.lr or train.beta")
            # the batch mean over all processes' rows: DDP's (FSDP's) average over N processes, times N
            (out.loss * (cfg.loss_scale * (part.stop - part.start) / len(rows) * self.world.size)).backward()
        return MicroBatchRows.of(i, out, batch.uncond if cfg.loss == DDO else batch.positive_twice)

    def _ddo_batch(self, rows: np.ndarray, uncond: np.ndarray, real_tokens: np.ndarray, keys: torch.Tensor) -> DDOBatch:
        """A DDO micro-batch of cache rows `rows` (real tokens read ahead by the loader, the r fakes of each read
        here)."""
        fake_row = fake_slot_rows(self.cache["fake_row"][rows], self.fakes_per_row).reshape(-1)
        fake = np.asarray(self.fakes[fake_row, np.zeros(len(fake_row), np.int64)]).reshape(len(rows), self.fakes_per_row, -1)
        return make_ddo_batch(rows, torch.from_numpy(real_tokens.astype(np.int64)), torch.from_numpy(fake.astype(np.int64)),
                              self.cache, uncond, self.policy.cfg.null_class, keys)

    def state_dict(self) -> dict | None:
        """The policy's full state dict (gathered from its shards under FSDP: every process takes part), to the
        main process; None to the others."""
        full = full_state_dict(self.policy)
        return full if self.world.main else None

    def checkpoint(self, step: int, train_state: TrainState) -> None:
        """Save this process's share of the resume point of `step` (steps done): policy, optimiser moments, the
        data-order generator."""
        train_state.save(step, self.policy, self.opt, self.rng.bit_generator.state)

    def finish(self) -> torch.nn.Module:
        """The trained policy, in eval mode (under FSDP, sharded: state_dict() gathers its weights)."""
        self.policy.eval()
        return self.policy


@contextlib.contextmanager
def _out_of_memory_hint(step: int, cfg: AlignConfig, sequences_per_row: int = 2):
    """An out-of-memory error in a micro-batch's forward or backward, re-raised saying which setting to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        m = cfg.micro_batch_size
        raise OutOfMemory(
            f"out of memory at step {step} with train.micro_batch_size = {m} rows per forward "
            f"(up to {sequences_per_row * m} sequences): lower train.micro_batch_size, e.g. to {max(1, m // 2)}; "
            f"the global train.batch_size ({cfg.batch_size}) is kept by gradient accumulation") from e
