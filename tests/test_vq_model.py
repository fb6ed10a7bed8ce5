"""The VQ tokenizer: encode/decode shapes, code range, nearest-code lookup, loading the upstream layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.loaders import load_vq
from pipeline.tokenizers.vq import VQConfig, VQModel

# VQ-16's layout (5 levels, 16x downsampling) at reduced width
SMALL16 = VQConfig(codebook_size=128, codebook_embed_dim=8, ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32,
                   norm_groups=8, codebook_used_size=128)


def test_encode_decode_shapes_and_code_range():
    torch.manual_seed(0)
    vq = VQModel(SMALL16).eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    codes = vq.encode(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.long  # 64 / 16 = 4 -> 4 x 4 tokens, row-major
    assert codes.min() >= 0 and codes.max() < 128
    with torch.no_grad():
        out = vq.decode_codes(codes)
    assert out.shape == (3, 3, 64, 64) and torch.isfinite(out).all()


def test_nearest_code_of_a_codebook_vector_is_itself():
    torch.manual_seed(0)
    vq = VQModel(SMALL16)
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)
    z = book[[5, 77, 3, 100]].T.reshape(8, 2, 2)[None] * 3.0  # any positive scale: z is l2-normalised first
    assert vq.quantize.nearest(z).flatten().tolist() == [5, 77, 3, 100]


def test_upstream_layout_loads_strictly_and_decodes_identically(tmp_path):
    torch.manual_seed(0)
    source = VQModel(SMALL16).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "vq_ds16_c2i.pt")  # upstream: no config stored
    loaded = load_vq(tmp_path / "vq_ds16_c2i.pt", SMALL16).eval()
    codes = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_codes(codes), source.decode_codes(codes), rtol=0, atol=0)
