"""Transforms follow the model's preprocessing and yield un-normalised float pixels in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from caat_peft.data.transforms import eval_transform, image_mode, train_transform
from caat_peft.errors import UserError

CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def _photo(width: int = 57, height: int = 43, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(3, 32, 32), (3, 24, 40)])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0, 0.6])
def test_eval_matches_timm_geometry_without_normalising(size, crop_pct):
    cfg = {**CFG, "input_size": size, "crop_pct": crop_pct}
    ours = eval_transform(cfg)(_photo())
    timm_uint8 = create_transform(**{**cfg, "is_training": False, "normalize": False})(_photo())
    assert ours.dtype == torch.float32 and type(ours) is torch.Tensor
    assert ours.shape == size
    assert timm_uint8.dtype == torch.uint8  # why timm's own transform is not used as is
    assert torch.allclose(ours, timm_uint8.float() / 255, atol=1e-6)


def test_mean_and_std_are_not_applied():
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    for transform in (eval_transform(CFG), train_transform(CFG)):
        assert torch.equal(transform(white), torch.ones(3, 32, 32))
    other = {**CFG, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert torch.equal(eval_transform(other)(_photo()), eval_transform(CFG)(_photo()))


@pytest.mark.parametrize("rrc", [False, True])
def test_train_transform_is_random_float_in_unit_range(rrc):
    transform = train_transform(CFG, random_resized_crop=rrc)
    torch.manual_seed(0)
    outs = [transform(_photo()) for _ in range(6)]
    for x in outs:
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert any(not torch.equal(outs[0], x) for x in outs[1:])
    torch.manual_seed(0)
    assert torch.equal(transform(_photo()), outs[0])  # reproducible from torch's RNG


def test_train_without_rrc_keeps_eval_scale():
    # Resize → random crop keeps objects at the scale seen at eval time: with crop_pct 1 the
    # random crop of a square image is exactly the eval image, possibly mirrored.
    cfg = {**CFG, "crop_pct": 1.0}
    image = _photo(40, 40)
    expected = eval_transform(cfg)(image)
    for _ in range(4):
        x = train_transform(cfg)(image)
        assert torch.equal(x, expected) or torch.equal(x, expected.flip(-1))


def test_grayscale_model_gets_one_channel():
    cfg = {**CFG, "input_size": (1, 16, 16)}
    assert image_mode(cfg) == "L"
    assert eval_transform(cfg)(_photo().convert("L")).shape == (1, 16, 16)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"input_size": None}, "input_size"),
        ({"input_size": (3, 32)}, "input_size"),
        ({"input_size": (4, 32, 32)}, "input_size"),
        ({"interpolation": "sinc"}, "interpolation"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_bad_data_config_is_a_user_error(bad, match):
    with pytest.raises(UserError, match=match):
        eval_transform({**CFG, **bad})


def test_squash_crop_mode_keeps_whole_image():
    cfg = {**CFG, "crop_pct": 1.0, "crop_mode": "squash"}
    # Left half black, right half white: squashed, the output is still half and half.
    array = np.zeros((20, 80, 3), dtype=np.uint8)
    array[:, 40:] = 255
    x = eval_transform(cfg)(Image.fromarray(array))
    assert x[:, :, :14].max() < 0.05 and x[:, :, 18:].min() > 0.95
