"""A token store's tokens move only with a bump of TOKEN_ENCODING_VERSION (pipeline/versions.py): the tokens of a
few fixed images, through every view mode tokenize offers and both shipped tokenizers (LlamaGen's VQ, VAR's
multi-scale VQVAE, tiny and seeded), are recorded in tests/golden/tokens.json under the version they were made at
(`python tests/test_token_golden.py --record`). What they cover is what the version covers: decoding an image file
(pipeline.images.open_rgb), its views (image_views: the ADM center crop, flips, shifts, ten crops, VAR's random
crops), the [-1, 1] scaling (pipeline.tokenizers.encode.encode_views), the encoders and the quantisers.

Compared exactly, on any CPU: a token is the nearest code, and each recorded one wins by a margin far above a float32
rounding. Measured on 2026-12-07 over all of them (every scale of VAR's): the second-nearest code's distance exceeds
the nearest's by at least 6.8e-4 relative (VQ, shift1), where another CPU's kernel order moves a distance by ~1e-7.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import image_views, open_rgb
from pipeline.tokenizers.encode import encode_views
from pipeline.tokenizers.msvq import MSVQConfig, MSVQModel
from pipeline.tokenizers.vq import VQConfig, VQModel
from pipeline.versions import TOKEN_ENCODING_VERSION

GOLDEN = Path(__file__).parent / "golden" / "tokens.json"
SIZE = 16  # pixels: 4 x 4 VQ tokens, VAR scales 1, 2, 3, 4
MODES = {"vq": ("none", "flip", "shift1", "tencrop"), "msvq": ("none", "randcrop:2")}


def tokenizers() -> dict[str, torch.nn.Module]:
    """LlamaGen's VQ (32 codes of 4 dims) and VAR's VQVAE (32 codes of 8, scales 1-4), randomly initialised from seed 0."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                          z_channels=16, norm_groups=8, codebook_used_size=32)).eval()
    msvq = MSVQModel(MSVQConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                                patch_nums=(1, 2, 3, 4))).eval()
    return {"vq": vq, "msvq": msvq}


def image_files() -> list[bytes]:
    """Three PNG files: RGB 24 x 20 (center-cropped and resized), grayscale 40 x 36 (halved first), RGBA 16 x 16."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8), "L"),
              Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")]
    files = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def tokens_now() -> dict[str, dict[str, list]]:
    """{tokenizer: {view mode: codes (images, views, L) as lists}}, as tokenize computes them."""
    files, out = image_files(), {}
    for name, tokenizer in tokenizers().items():
        out[name] = {}
        for mode in MODES[name]:
            views = np.stack([image_views(open_rgb(f"image{row}.png", data=data), SIZE, mode, row)
                              for row, data in enumerate(files)])
            out[name][mode] = encode_views(tokenizer, torch.from_numpy(views), torch.device("cpu")).tolist()
    return out


def moved(now: dict, golden: dict) -> list[str]:
    """The (tokenizer, view mode) pairs whose tokens differ from the golden ones."""
    return [f"{name} {mode}" for name in golden for mode in golden[name] if now.get(name, {}).get(mode) != golden[name][mode]]


def test_the_tokens_move_only_with_a_version_bump():
    golden = json.loads(GOLDEN.read_text())
    changed = moved(tokens_now(), golden["tokens"])
    assert golden["token_encoding_version"] == TOKEN_ENCODING_VERSION, (
        f"{GOLDEN.name} was recorded at TOKEN_ENCODING_VERSION {golden['token_encoding_version']}, now "
        f"{TOKEN_ENCODING_VERSION}: regenerate it (python tests/test_token_golden.py --record)")
    assert not changed, (f"the token encoding changed (the tokens of {', '.join(changed)} moved from {GOLDEN.name}): bump "
                         "TOKEN_ENCODING_VERSION in pipeline/versions.py and regenerate it (python tests/test_token_golden.py --record)")


def test_the_golden_covers_every_view_mode_and_each_token_layout():
    golden = json.loads(GOLDEN.read_text())["tokens"]
    assert {mode for modes in MODES.values() for mode in modes} >= {"none", "flip", "shift1", "tencrop"}
    assert np.asarray(golden["vq"]["flip"]).shape == (3, 2, 16)  # 3 images x 2 views x 4 x 4 codes
    assert np.asarray(golden["vq"]["tencrop"]).shape == (3, 10, 16)
    assert np.asarray(golden["msvq"]["randcrop:2"]).shape == (3, 2, 1 + 4 + 9 + 16)  # the scales, coarse to fine
    # not a constant: the images give different codes
    assert len({tuple(t for view in image for t in view) for image in golden["vq"]["none"]}) == 3


@pytest.mark.parametrize("change", ["resample", "encoder", "quantiser"])
def test_the_guard_sees_a_changed_encoding(change, monkeypatch):
    """Any of the computations the version covers, changed a little, moves tokens the guard names."""
    from pipeline.tokenizers import msvq, vq

    if change == "resample":  # the ADM center crop (pipeline.images.center_crop_arr) resizing with BILINEAR, not BICUBIC
        monkeypatch.setattr(Image, "BICUBIC", Image.BILINEAR)
    elif change == "encoder":  # the VQ encoder's input scaled by 1.05
        latent = vq.VQModel.encode_latent
        monkeypatch.setattr(vq.VQModel, "encode_latent", lambda self, images: latent(self, 1.05 * images))
    else:  # VAR's residual quantiser: bilinear instead of bicubic upsampling of each scale
        interpolate = msvq.F.interpolate
        monkeypatch.setattr(msvq.F, "interpolate", lambda x, size, mode, **k: interpolate(
            x, size=size, mode="bilinear" if mode == "bicubic" else mode, **k))
    changed = moved(tokens_now(), json.loads(GOLDEN.read_text())["tokens"])
    expected = {"resample": "vq none", "encoder": "vq flip", "quantiser": "msvq none"}[change]
    assert expected in changed, changed


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.write_text(json.dumps({"token_encoding_version": TOKEN_ENCODING_VERSION, "tokens": tokens_now()}) + "\n")
    print(f"recorded {GOLDEN} at TOKEN_ENCODING_VERSION {TOKEN_ENCODING_VERSION}")
elif __name__ == "__main__":
    pytest.main([__file__, "-q"])
