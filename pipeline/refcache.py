"""Computing the reference log-prob cache: the frozen model runs once over every training row.

For each row the view and the negative label are fixed here (seeded), so every training run of a
sweep sees the same pairs, and the cached values are exactly what the loss needs (formats.py). A cache of
several visits draws them (and the reference's dropout masks) anew for each visit: train's epoch e reads
visit e, as the released scripts redraw them at every epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .device import OutOfMemory, autocast, is_out_of_memory
from .formats import LOGP_COLUMNS, REBUILD_CACHE, FormatError, cached_fake_columns, fake_columns
from .logprobs import sequence_logp
from .models.layers import noise_keys
from .progress import progress

log = logging.getLogger(__name__)

NEGATIVES = ("other", "roll")


def draw_pairs(labels: np.ndarray, num_views: int, num_classes: int, seed: int, views: str = "one",
               negatives: str = "other", visits: int = 1) -> dict[str, np.ndarray]:
    """The cache's rows: which token-store row and view each uses, and its negative label.

    views="one": one cache row per image with a seeded random view; views="all": one cache row per
    (image, view), so an epoch sees every augmentation once. negatives="other": uniform over the other
    classes (!= label), drawn per cache row; "roll": the released scripts' torch.roll(labels, -1), as
    closely as a cache allows: the cache rows in a seeded global permutation, each row's negative is the
    label of the next row in it; where that equals the row's own label the row is a positive twice
    (pipeline.losses; the scripts' `shuffled_c_indices == c_indices`).
    `visits`: the rows are drawn that many times, visit after visit (visit v is cache rows [v R, (v+1) R)),
    each visit with its own views ("one") and negatives, as the released scripts redraw them at every epoch
    (docs/paper.md); visit 0 is drawn from default_rng(seed), exactly the one-visit cache, visit v > 0 from
    default_rng([seed, v]).
    """
    if visits < 1:
        raise ValueError(f"visits = {visits}: a cache holds at least one visit")
    drawn = [_draw_visit(labels, num_views, num_classes, np.random.default_rng(seed if v == 0 else [seed, v]), views,
                         negatives) for v in range(visits)]
    return {k: np.concatenate([d[k] for d in drawn]) for k in drawn[0]}


def _draw_visit(labels: np.ndarray, num_views: int, num_classes: int, rng: np.random.Generator, views: str,
                negatives: str) -> dict[str, np.ndarray]:
    n, labels = len(labels), labels.astype(np.int64)
    if views == "one":
        rows = np.arange(n)
        view = rng.integers(0, num_views, size=n)
    elif views == "all":
        rows = np.repeat(np.arange(n), num_views)
        view = np.tile(np.arange(num_views), n)
    else:
        raise ValueError(f"unknown views mode {views!r}; valid: 'one', 'all'")
    row_labels = labels[rows]
    if negatives == "other":
        neg = (row_labels + rng.integers(1, num_classes, size=len(rows))) % num_classes
    elif negatives == "roll":
        order = rng.permutation(len(rows))
        neg = np.empty_like(row_labels)
        neg[order] = row_labels[np.roll(order, -1)]
    else:
        raise ValueError(f"unknown negatives rule {negatives!r}; valid: {', '.join(NEGATIVES)}")
    return {
        "row": rows.astype(np.int64),
        "label": row_labels.astype(np.int32),
        "neg_label": neg.astype(np.int32),
        "view": view.astype(np.int16),
    }


def cache_visits(provenance: dict) -> int:
    """How many visits a cache holds (reflogp.visits); caches written before visits existed hold one."""
    return int(provenance.get("visits", 1))


# How a cache with dropout drew its masks (recorded in its provenance, pipeline/formats.py)
MASK_RULE = "keyed-v1: splitmix64(seed, cache row, role pos|neg|null) per sequence, mix32 per (site, element)"


@dataclass(frozen=True)
class ReferenceNoise:
    """The reference's dropout as the cache saw it (reflogp.dropout / drop_path / seed, recorded in its
    provenance): rates 0 is eval mode; otherwise the reference ran in train mode with the masks of
    noise_keys(seed, cache row, role), one draw per cache row (pipeline.models.layers): per visit too, since
    each visit of an image is a cache row of its own."""

    seed: int = 0
    dropout: float = 0.0
    drop_path: float = 0.0

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.drop_path > 0

    @classmethod
    def of_cache(cls, provenance: dict) -> ReferenceNoise:
        """A cache's noise; caches written before these keys existed were computed in eval mode."""
        return cls(int(provenance.get("seed", 0)), float(provenance.get("dropout", 0.0)),
                   float(provenance.get("drop_path", 0.0)))


def row_keys(noise: ReferenceNoise, cache_rows: np.ndarray, device: torch.device,
             roles: tuple[str, ...] = ("pos", "neg", "null"), slot: int = 0) -> torch.Tensor | None:
    """The dropout keys of cache rows scored in `roles`, role after role (len(roles) B,); None in eval mode.
    `slot`: which of a row's fakes (noise_keys), for role "fake"."""
    if not noise.active:
        return None
    return torch.cat([noise_keys(noise.seed, cache_rows, role, slot) for role in roles]).to(device)


def fake_rows(rows: np.ndarray, num_rows: int, ratio: int) -> np.ndarray:
    """The fake (a row of a negatives store, stages/negatives.py) each cache row pairs with. Image i's fakes are
    rows [i ratio, (i + 1) ratio); cache row k is in visit k // num_rows (`num_rows`: cache rows per visit) and
    takes the image's fake (visit mod ratio), so an image's visits cycle through its fakes."""
    visit = np.arange(len(rows)) // max(1, num_rows)
    return np.asarray(rows, dtype=np.int64) * ratio + visit % ratio


def fake_slot_rows(fake_row: np.ndarray, ratio: int) -> np.ndarray:
    """(N, ratio): the store rows of all the fakes of each cache row's image, slot j being the image's fake
    (fake_row's index among them + j) mod ratio, so slot 0 is fake_row (the cache's column ref_logp_fake_j,
    pipeline/formats.py)."""
    fake_row = np.asarray(fake_row, dtype=np.int64)[:, None]
    return fake_row - fake_row % ratio + (fake_row % ratio + np.arange(ratio)) % ratio


def reference_fake_columns(model, fakes, fake_row: np.ndarray, labels: np.ndarray, cache_rows: np.ndarray,
                           batch_size: int, device: torch.device, forwards: int | None = None,
                           noise: ReferenceNoise = ReferenceNoise(), ratio: int = 1) -> dict[str, np.ndarray]:
    """A DDO cache's fake columns (formats.fake_columns(ratio)) of cache rows `cache_rows`: reference_fake_logps
    of each slot's fakes (fake_slot_rows), slot by slot."""
    slots = fake_slot_rows(fake_row, ratio)
    return {name: reference_fake_logps(model, fakes, slots[:, j], labels, cache_rows, batch_size, device, forwards, noise, j)
            for j, name in enumerate(fake_columns(ratio))}


@torch.inference_mode()
def reference_fake_logps(model, fakes, fake_row: np.ndarray, labels: np.ndarray, cache_rows: np.ndarray, batch_size: int,
                         device: torch.device, forwards: int | None = None, noise: ReferenceNoise = ReferenceNoise(),
                         slot: int = 0) -> np.ndarray:
    """log p(x_fake | c) (float64 from float32 sums) of the fakes `fakes[fake_row]` (a negatives store's
    tokens, one view) under their real rows' labels, with the "fake" masks (of `slot`) of their `cache_rows`: a
    DDO cache's fourth column (slot 0), in forwards of its own (`forwards`: as reference_logps', for FSDP)."""
    model.train(noise.active)
    n = len(fake_row)
    out = np.zeros(n, dtype=np.float64)
    starts = list(range(0, n, batch_size))
    starts += [None] * ((forwards or 0) - len(starts))
    for start in starts:
        part = slice(0, min(batch_size, n)) if start is None else slice(start, min(start + batch_size, n))
        x = torch.from_numpy(np.asarray(fakes[fake_row[part], np.zeros(part.stop - part.start, np.int64)]).astype(np.int64))
        keys = row_keys(noise, np.asarray(cache_rows)[part], device, ("fake",), slot)
        with autocast(device):
            logp = sequence_logp(model, torch.from_numpy(labels[part].astype(np.int64)).to(device), x.to(device),
                                 dropout_keys=keys)
        if start is not None:
            out[part] = logp.double().cpu().numpy()
    model.eval()
    return out


def score_rows(model, x: torch.Tensor, labels: np.ndarray, neg_labels: np.ndarray, keys: torch.Tensor | None,
               device: torch.device, null_class: int, lam: float | None = None) -> torch.Tensor:
    """(3, B) float32 log p(x|c), log p(x|c_neg), log p(x|null) of tokens x (B, L): one forward over the rows
    tiled three times, as reflogp computes the cache and train's step-0 check recomputes it. `lam`: the
    lambda to score a lambda-conditioned policy at."""
    conds = np.concatenate([labels, neg_labels, np.full(len(x), null_class)])
    lams = None if lam is None else torch.full((3 * len(x),), lam, device=device)
    with autocast(device):
        logp = sequence_logp(model, torch.from_numpy(conds.astype(np.int64)).to(device), x.repeat(3, 1), lams,
                             dropout_keys=keys)
    return logp.view(3, len(x))


@torch.inference_mode()
def reference_logps(
    model, tokens: np.ndarray, pairs: dict[str, np.ndarray], batch_size: int, device: torch.device,
    forwards: int | None = None, noise: ReferenceNoise = ReferenceNoise(), first_row: int = 0,
) -> dict[str, np.ndarray]:
    """log p(x|c), log p(x|c_neg), log p(x|null) per cache row (float64 from float32 sums).

    One forward per batch covers all three conditions (the batch is the rows tiled three times).
    `forwards`: run exactly this many forwards, the extra ones on the first batch, their results dropped:
    a sharded (FSDP) model's processes must all run each forward together, whatever their share of rows.
    `noise`: the reference's dropout (its rates must be set on `model`: set_dropout); when active the model
    runs in train mode with each row's masks keyed by (noise.seed, cache row, role), the cache row of
    pairs' row i being first_row + i, so the result does not depend on batch_size, parts or processes.
    """
    model.train(noise.active)
    n = len(pairs["row"])
    out = {k: np.zeros(n, dtype=np.float64) for k in ("ref_logp_pos", "ref_logp_neg", "ref_logp_null")}
    starts = list(range(0, n, batch_size))
    if forwards is not None:
        if forwards < len(starts):
            raise ValueError(f"{forwards} forwards cannot cover {len(starts)} batches")
        starts += [None] * (forwards - len(starts))
    for start in progress(starts, desc="reflogp", unit="batch"):
        padding = start is None
        part = slice(0, min(batch_size, n)) if padding else slice(start, min(start + batch_size, n))
        b = part.stop - part.start
        x = torch.from_numpy(np.asarray(tokens[pairs["row"][part], pairs["view"][part]]).astype(np.int64)).to(device)
        keys = row_keys(noise, first_row + np.arange(part.start, part.stop), device)
        try:
            logp = score_rows(model, x, pairs["label"][part], pairs["neg_label"][part], keys, device, model.cfg.null_class)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise OutOfMemory(f"out of memory computing {3 * b} sequences per forward: lower reflogp.batch_size "
                              f"(now {batch_size}; part_rows must stay a multiple of it)") from e
        if padding:
            continue
        logp = logp.double().cpu().numpy()
        for i, key in enumerate(out):
            out[key][part] = logp[i]
    model.eval()
    return out


class CacheMismatch(FormatError):
    """The policy at step 0 (the reference itself) does not reproduce a cache's columns."""


# Step-0 check tolerance per row: |policy - cached| <= RTOL * |cached| + ATOL nats. On the CPU (float32) the
# only difference is the batch composition's rounding of sums of L log-probs (measured under 1e-4 nats on the
# test models); CUDA under bf16 autocast may pick other matmul kernels for other batch shapes, each token's
# log-prob then moving by ~bf16's 4e-3 relative, ~0.1-1 nats over 256-680 tokens of -2000 to -4000 nats.
# The corruptions it is for move rows by whole nats (another class) to hundreds of nats (another image).
CHECK_TOLERANCE = {"cpu": (1e-6, 1e-3), "cuda": (5e-4, 0.5)}  # device type -> (RTOL, ATOL)
CHECK_ROWS = 64  # cache rows scored (3 sequences each): cheap next to one training step


def check_cache_rows(model, policy, tokens, cache: dict[str, np.ndarray], rows: np.ndarray, noise: ReferenceNoise,
                     micro_batch_size: int, device: torch.device, world, cache_name: str, fakes=None) -> None:
    """Raise CacheMismatch naming the cache, the column and the first mismatching cache rows unless `model`
    (the policy before its first update, which is the reference) reproduces the cached ref_logp_pos / neg /
    null of cache `rows` with the cache's own masks (noise). The rows go to the processes in chunks of
    micro_batch_size, round robin; every process runs as many forwards as the busiest (FSDP needs them all).
    `fakes`: a DDO cache's negatives store (tokens): its ref_logp_fake is checked too."""
    columns = (*LOGP_COLUMNS, *(cached_fake_columns(cache) if fakes is not None else ()))
    chunks = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    lam = 1.0 if policy.cfg.lambda_conditioning else None  # its new embedding is zero: any lambda is the reference
    mine = world.share(list(range(len(chunks))))
    mine += [None] * (-(-len(chunks) // world.size) - len(mine))
    bad, largest = [], 0.0
    with torch.no_grad():
        model.train(noise.active)
        for k in mine:
            chunk = chunks[0 if k is None else k]
            x = torch.from_numpy(np.asarray(tokens[cache["row"][chunk], cache["view"][chunk]]).astype(np.int64)).to(device)
            logp = score_rows(model, x, cache["label"][chunk], cache["neg_label"][chunk], row_keys(noise, chunk, device),
                              device, policy.cfg.null_class, lam).double().cpu().numpy()
            if fakes is not None:
                fake = reference_fake_columns(model, fakes, cache["fake_row"][chunk], cache["label"][chunk], chunk,
                                              len(chunk), device, noise=noise, ratio=len(columns) - len(LOGP_COLUMNS))
                model.train(noise.active)
                logp = np.concatenate([logp, np.stack(list(fake.values()))])
            if k is not None:
                bad += _mismatches(logp, cache, chunk, device, columns)
                largest = max(largest, float(np.abs(logp - np.stack([cache[c][chunk] for c in columns])).max()))
    gathered = world.gather((bad, largest))
    mismatched = sorted(m for rank_bad, _ in gathered for m in rank_bad)  # (column index, cache row)
    rtol, atol = CHECK_TOLERANCE[_device_kind(device)]
    if mismatched:
        column = columns[mismatched[0][0]]
        first = [row for col, row in mismatched if columns[col] == column][:5]
        raise CacheMismatch(
            f"reference cache {cache_name}: column {column} disagrees with the reference model (beyond {rtol:g} relative + "
            f"{atol:g} nats) at its cache rows {', '.join(map(str, first))} ({len(mismatched)} of {len(columns) * len(rows)} values "
            f"checked): the cache does not belong to these rows (relabelled, permuted or columns swapped); {REBUILD_CACHE}")
    if world.main:
        log.info("step-0 check: the policy reproduces %s on %d cache rows x %d (largest difference %.2g nats)",
                 cache_name, len(rows), len(columns), max(x for _, x in gathered))


def _device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _mismatches(logp: np.ndarray, cache: dict[str, np.ndarray], chunk: np.ndarray, device: torch.device,
                columns: tuple[str, ...] = LOGP_COLUMNS) -> list:
    rtol, atol = CHECK_TOLERANCE[_device_kind(device)]
    out = []
    for c, (got, column) in enumerate(zip(logp, columns, strict=True)):
        cached = cache[column][chunk]
        far = ~(np.abs(got - cached) <= rtol * np.abs(cached) + atol)  # NaN counts as far
        out += [(c, int(row)) for row in chunk[far]]
    return out
