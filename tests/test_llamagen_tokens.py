"""The LlamaGen pipeline tokenizes ImageNet as the released CCA command's codes were made: LlamaGen's
extract_codes_c2i.py --ten-crop --crop-range 1.1 (`*_flip_ten_crop`): ten crops of a 1.1x center crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images import center_crop_arr, image_views, view_names
from stages.cli.params import build, load_params
from stages.tokenize import TokenizeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_llamagen_pipeline_tokenizes_ten_crops_as_the_release():
    params = load_params(ROOT / "pipelines/imagenet-llamagen/params.yaml")
    cfg = build(TokenizeConfig, params, "tokenize", params.get("preset"))
    assert cfg.augment == "tencrop" and len(view_names(cfg.augment)) == 10


def test_tencrop_is_torchvision_tencrop_of_the_1_1x_adm_center_crop():
    """extract_codes_c2i.py: center_crop_arr(image, int(size * crop_range)) with crop_range 1.1, then
    transforms.TenCrop(size): 4 corners + center, then the same of the mirrored image."""
    from torchvision.transforms import TenCrop

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 211, 3), dtype=np.uint8))
    size = 64
    expected = [np.asarray(v) for v in TenCrop(size)(center_crop_arr(image, int(size * 1.1)))]  # 70 px, not 70.4
    views = image_views(image, size, "tencrop")
    assert views.shape == (10, size, size, 3)
    for got, want in zip(views, expected, strict=True):
        assert np.array_equal(got, want)
