"""Autoregressive sampling for class-conditional GPTs, with a static KV cache.

Guidance follows the paper's convention: logits = l_c + s * (l_c - l_u) with s = `cfg_scale`
(s = 0: no guidance, and the unconditional half is never computed). LlamaGen's `--cfg-scale` is 1 + s.
Filtering follows LlamaGen's generate.py: logits / max(temperature, 1e-5), then top-k (0 = off) and
top-p (1.0 = off), softmax, multinomial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .images import resize_images, to_uint8
from .logprobs import token_logp
from .models.llamagen import GPT
from .tokenizers.msvq import scale_bounds


@dataclass
class Samples:
    tokens: torch.Tensor  # (B, N) sampled codes
    token_logp: torch.Tensor  # (B, N) log p(z_t | z_<t, c) of the sampled codes under the unguided
    #                           conditional model (float32): equals teacher forcing of the same tokens


def keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """-inf everywhere but the top_k largest logits of each row (0 = off); LlamaGen's and VAR's alike."""
    if top_k <= 0:
        return logits
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = keep_top_k(logits / max(temperature, 1e-5), top_k)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the CDF with the row's uniform in [0, 1) (B,). Exact like
    torch.multinomial, which instead draws an exponential per vocabulary entry (a quarter of CPU sampling
    time at 16384 codes)."""
    cdf = probs.float().cumsum(-1)  # (B, V)
    u = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def uniforms_for(labels: torch.Tensor, length: int, generator: torch.Generator | None,
                 uniforms: torch.Tensor | None) -> torch.Tensor:
    """(B, length) uniforms that drive a sampler, one per token of each sample: given, or from `generator`."""
    if uniforms is None:
        uniforms = torch.rand(labels.shape[0], length, generator=generator, device=labels.device)
    if uniforms.shape != (labels.shape[0], length):
        raise ValueError(f"uniforms of shape {tuple(uniforms.shape)}, expected {(labels.shape[0], length)}")
    return uniforms


@torch.no_grad()
def sample(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    use_cache: bool = True,
    lam: float | None = None,
    on_step=None,
) -> Samples:
    """Sample N = model.cfg.block_size codes per label. labels (B,) on the model's device. The draws use
    `uniforms` (B, N), token t of sample b from uniforms[b, t] (so a sample does not depend on its batch),
    or uniforms from `generator`. `lam`: the lambda to sample a lambda-conditioned policy at. `on_step(t, N)`
    is called after each token t = 1..N of the batch is drawn (progress within a batch: hours on a large model)."""
    cfg = model.cfg
    B, N = labels.shape[0], cfg.block_size
    guided = cfg_scale != 0.0
    if guided and not cfg.has_null_class:
        raise ValueError("CFG needs a model trained with class dropout (has_null_class=True)")
    batch_labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)]) if guided else labels
    uniforms = uniforms_for(labels, N, generator, uniforms)
    tokens = torch.zeros(B, N, dtype=torch.long, device=labels.device)
    logps = torch.zeros(B, N, dtype=torch.float32, device=labels.device)
    lams = None if lam is None else torch.full(batch_labels.shape, float(lam), device=labels.device)
    if use_cache:
        model.setup_kv_cache(batch_labels.shape[0])
    try:
        empty = tokens[:, :0].repeat(2 if guided else 1, 1)
        logits = model.logits(batch_labels, empty, start=0, lam=lams)[:, -1]  # (B or 2B, V): predicts z_0
        for t in range(N):
            cond = logits[:B]
            mixed = cond + cfg_scale * (cond - logits[B:]) if guided else cond
            probs = torch.softmax(filter_logits(mixed, temperature, top_k, top_p), dim=-1)
            nxt = draw(probs, uniforms[:, t])  # (B,)
            tokens[:, t] = nxt
            logps[:, t] = token_logp(cond[:, None], nxt[:, None])[:, 0]
            if on_step is not None:
                on_step(t + 1, N)
            if t == N - 1:
                break
            feed = nxt.repeat(2 if guided else 1)
            if use_cache:
                logits = model.logits(batch_labels, feed[:, None], start=cfg.cls_token_num + t)[:, -1]
            else:
                prefix = torch.cat([tokens[:, : t + 1]] * (2 if guided else 1))
                logits = model.logits(batch_labels, prefix, lam=lams)[:, -1]
    finally:
        model.clear_kv_cache()
    return Samples(tokens, logps)


def sample_uniforms(seed: int, indices: list[int], length: int) -> torch.Tensor:
    """(len(indices), length) uniforms for the samples of these indices in a set drawn with `seed`: each
    sample's own stream (pipeline.distributed.sample_seed), whatever batch or process draws it."""
    from .distributed import sample_seed

    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(sample_seed(seed, i))) for i in indices]) \
        if indices else torch.zeros(0, length)


def generate_images(
    family,
    model,
    decoder,
    labels: torch.Tensor,
    *,
    seed: int,
    batch_size: int,
    indices: list[int] | None = None,
    on_batch=None,
    resize_to: int = 0,
    **sampler_kwargs,
) -> tuple[np.ndarray, torch.Tensor]:
    """Sample codes for every label (in batches) and decode them: -> (images uint8 (B, H, W, 3) on the host,
    codes (B, N)). Each decoded batch is resized (`resize_to` > 0: pipeline.images.resize_images) and turned to
    uint8 as it is drawn, into one array: the host never holds the set as floats (4x the bytes).
    `family` is the model's (pipeline.families): its `sample(model, labels, uniforms=, **kwargs) -> Samples`
    draws the codes (under bf16 autocast on CUDA) and `decoder`, its tokenizer, decodes them at the release's
    precision (`family.decode_precision`). `indices`: the samples' indices in the set (default 0..B-1); sample
    i is drawn from its own stream seeded by (seed, i), so the images are the same however the set is split over batches
    or processes. `on_batch(n)` is called after each batch with its number of samples (a progress bar's
    update: a 50,000-sample set takes hours); `on_step`, passed on to the sampler, within each batch."""
    from .device import autocast

    device = next(model.parameters()).device
    indices = list(range(len(labels))) if indices is None else indices
    images, codes = None, []
    for start in range(0, len(labels), batch_size):
        part = labels[start : start + batch_size].to(device)
        uniforms = sample_uniforms(seed, indices[start : start + batch_size], model.cfg.seq_len).to(device)
        with autocast(device):
            out = family.sample(model, part, uniforms=uniforms, **sampler_kwargs)
        with torch.no_grad(), family.decode_precision(device):
            decoded = decoder.decode_codes(out.tokens).float().cpu()
        batch = to_uint8(resize_images(decoded, resize_to))
        del decoded  # not alive while the next batch decodes
        if images is None:
            images = np.empty((len(labels), *batch.shape[1:]), np.uint8)
        images[start : start + len(part)] = batch
        codes.append(out.tokens.cpu())
        if on_batch is not None:
            on_batch(len(part))
    return images, torch.cat(codes)


def filter_logits_var(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's `sample_with_top_k_top_p_`: top-k (0 = off), then top-p over the ascending sort removing the
    tokens whose cumulative probability is <= 1 - top_p, always keeping the most likely (0.0 = off)."""
    logits = keep_top_k(logits, top_k)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@torch.no_grad()
def sample_var(
    model,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 0.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    upstream_null_half: bool = False,
    lam: float | None = None,
    on_step=None,
) -> Samples:
    """Next-scale sampling for a VARModel with a KV cache per scale: -> Samples (B, L).

    Guidance l_c + t (l_c - l_u) (VAR writes (1 + t) l_c - t l_u: the same), t = cfg_scale * si / (S - 1)
    with cfg_schedule "linear" (VAR's sampler; the CCA paper's CFGv2) or t = cfg_scale ("constant").
    Without guidance the unconditional half is not computed at all; upstream_null_half=True computes it
    anyway, as VAR's `autoregressive_infer_cfg` does at cfg 0 (for the benchmark; same samples). Draws as
    `sample`'s: position p of sample b from uniforms[b, p] (B, L), or from `generator`. `on_step(k, S)` is
    called after each scale k = 1..S is drawn.
    """
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule {cfg_schedule!r}: valid are 'linear' (VAR, CFGv2) and 'constant'")
    var, quantizer, cfg = model.var, model.quantizer, model.cfg
    B, S, device = labels.shape[0], len(cfg.patch_nums), labels.device
    uniforms = uniforms_for(labels, cfg.seq_len, generator, uniforms)
    doubled = cfg_scale != 0.0 or upstream_null_half
    batch_labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)]) if doubled else labels
    tokens = torch.zeros(B, cfg.seq_len, dtype=torch.long, device=device)
    logps = torch.zeros(B, cfg.seq_len, dtype=torch.float32, device=device)
    full = cfg.patch_nums[-1]
    f_hat = torch.zeros(B, cfg.cvae, full, full, dtype=torch.float32, device=device)
    cond = var.condition(batch_labels, None if lam is None else torch.full(batch_labels.shape, float(lam), device=device))
    x = var.start_tokens(cond)
    var.set_caching(True)
    try:
        for si, (begin, end) in enumerate(scale_bounds(cfg.patch_nums)):
            logits = var.logits(x, cond, None)  # (B or 2B, pn^2, V); the cache holds every coarser scale
            cond_logits = logits[:B]
            t = cfg_scale * (si / (S - 1) if cfg_schedule == "linear" else 1.0)
            mixed = cond_logits + t * (cond_logits - logits[B:]) if cfg_scale != 0.0 else cond_logits
            probs = torch.softmax(filter_logits_var(mixed / max(temperature, 1e-5), top_k, top_p), dim=-1)
            codes = draw(probs.reshape(-1, probs.shape[-1]), uniforms[:, begin:end].reshape(-1)).view(B, end - begin)
            tokens[:, begin:end] = codes
            logps[:, begin:end] = token_logp(cond_logits, codes)
            with torch.autocast(device.type, enabled=False):  # the running f_hat stays float32, as upstream
                f_hat, nxt = quantizer.next_input(si, f_hat, codes)
            if on_step is not None:
                on_step(si + 1, S)
            if nxt is not None:
                x = var.scale_tokens(si + 1, nxt)
                if doubled:
                    x = x.repeat(2, 1, 1)
    finally:
        var.set_caching(False)
    return Samples(tokens, logps)
