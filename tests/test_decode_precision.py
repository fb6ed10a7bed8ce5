"""Eval decodes sampled codes to pixels at each release's precision (issue 28.2; docs/imagenet.md): LlamaGen
in float32 (LlamaGen_sample_ddp.py: the VQ model in float32, no autocast), VAR under fp16 autocast
(VAR_sample.py), both on CUDA in place of the sampler's bf16 autocast; on CPU everything stays float32.

This machine has no GPU: CUDA autocast is stood in for by CPU autocast (`torch.autocast("cuda", ...)` built
by the family runs as `torch.autocast("cpu", ...)`), which nests and disables the same way; the dtypes are
read with forward hooks on the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_imagenet_pipeline import TINY_GPT, TINY_VQ
from test_var import TINY_VAE, TINY_VAR

from pipeline.families import LLAMAGEN, VAR
from pipeline.images import to_uint8
from pipeline.models.llamagen import GPT, GPTConfig
from pipeline.models.var import VAR as VARNet
from pipeline.models.var import VARConfig, VARModel
from pipeline.sampling import generate_images
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
from pipeline.tokenizers.vq import VQConfig, VQModel

CUDA = torch.device("cuda")


@pytest.fixture
def cuda_autocast_on_cpu(monkeypatch):
    """torch.autocast("cuda", ...) runs as CPU autocast with the same arguments."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: real("cpu", **kw))
    return real


def _record_dtype(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))


def _world(family: str):
    """(the family, a tiny generator, its tokenizer, the layer whose output shows the sampler's precision)."""
    torch.manual_seed(0)
    if family == "llamagen":
        gpt = GPT(GPTConfig(**TINY_GPT)).eval()
        return LLAMAGEN, gpt, VQModel(VQConfig(**TINY_VQ)).eval(), gpt.layers[0].attention.wqkv
    vae = MSVQModel(MSVQConfig(**TINY_VAE)).eval()
    var = VARModel(VARNet(VARConfig(**TINY_VAR)), vae.quantize).eval()
    return VAR, var, vae, var.var.blocks[0].attn.proj


@pytest.mark.parametrize("family, dtype", [("llamagen", torch.float32), ("var", torch.float16)])
def test_the_decoder_runs_at_the_releases_precision(cuda_autocast_on_cpu, family, dtype):
    """Inside the stages' bf16 autocast too: LlamaGen's float32 turns it off for the decode."""
    fam, model, tokenizer, _ = _world(family)
    seen: list = []
    _record_dtype(tokenizer.decoder, seen)
    codes = torch.randint(0, 64, (2, model.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with fam.decode_precision(CUDA):
            tokenizer.decode_codes(codes)
        if dtype == torch.float32:
            with cuda_autocast_on_cpu("cpu", dtype=torch.bfloat16), fam.decode_precision(CUDA):
                tokenizer.decode_codes(codes)
    assert set(seen) == {dtype} and fam.decode_dtype == dtype


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_on_cpu_the_decode_context_adds_nothing(family):
    """CPU samples stay bitwise what they were: no autocast is entered (nor an outer one left) on CPU."""
    fam, model, tokenizer, _ = _world(family)
    codes = torch.randint(0, 64, (2, model.cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = tokenizer.decode_codes(codes)
        with fam.decode_precision(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            inside = tokenizer.decode_codes(codes)
        with torch.autocast("cpu", dtype=torch.bfloat16), fam.decode_precision(torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert torch.equal(plain, inside)


@pytest.mark.parametrize("family, dtype", [("llamagen", torch.float32), ("var", torch.float16)])
def test_generate_images_samples_under_bf16_and_decodes_at_the_releases_precision(cuda_autocast_on_cpu, monkeypatch,
                                                                                 family, dtype):
    """The sampler under the stages' bf16 autocast (pipeline.device.autocast, made to act as on CUDA), the
    decode under the family's precision: the images are exactly the codes decoded at that precision alone."""
    import pipeline.device

    monkeypatch.setattr(pipeline.device, "autocast", lambda device: cuda_autocast_on_cpu("cpu", dtype=torch.bfloat16))
    fam, model, tokenizer, layer = _world(family)

    class AsOnCuda(type(fam)):
        def decode_precision(self, device):
            return super().decode_precision(CUDA)

    sampled, decoded = [], []
    _record_dtype(layer, sampled)
    _record_dtype(tokenizer.decoder, decoded)
    images, codes = generate_images(AsOnCuda(), model, tokenizer, torch.tensor([0, 1, 2]), seed=0, batch_size=2)
    assert set(sampled) == {torch.bfloat16} and decoded == [dtype, dtype]  # two batches
    with torch.no_grad(), fam.decode_precision(CUDA):
        expected = to_uint8(torch.cat([tokenizer.decode_codes(codes[:2]), tokenizer.decode_codes(codes[2:])]).float())
    np.testing.assert_array_equal(images, expected)
