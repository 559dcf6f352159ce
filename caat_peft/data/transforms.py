"""Train / eval transforms built from a model's own preprocessing (a timm-style data config).

Output is a float32 tensor C×H×W in [0, 1] and *not* normalised: the model wrapper applies the
checkpoint's mean / std, so attacks and ε live in pixel space. That is why ``mean`` and ``std`` in
the data config are deliberately ignored here, and why timm's ``create_transform`` is not used
(with ``normalize=False`` it returns uint8 tensors).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from caat_peft.errors import UserError

log = logging.getLogger("caat_peft.data")

DEFAULT_CROP_PCT = 0.875  # timm's default when a checkpoint does not say
DEFAULT_INTERPOLATION = "bicubic"

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    # timm's "random" picks bilinear or bicubic per image at train time; one fixed mode keeps
    # evaluation deterministic and costs nothing measurable in accuracy.
    "random": InterpolationMode.BILINEAR,
}


def input_size(data_config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) from the data config, validated."""
    size = data_config.get("input_size")
    if size is None:
        raise UserError(
            "data config has no 'input_size'; pass timm.data.resolve_data_config(model=...) "
            "or a dict with input_size=(3, H, W)"
        )
    try:
        c, h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise UserError(f"data config input_size={size!r} is not (C, H, W)") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise UserError(f"data config input_size={size!r}: need C in (1, 3) and H, W >= 1")
    return c, h, w


def image_mode(data_config: Mapping[str, Any]) -> str:
    """PIL mode the decoder should produce for this model: 'L' for 1 channel, else 'RGB'."""
    return "L" if input_size(data_config)[0] == 1 else "RGB"


def _interpolation(data_config: Mapping[str, Any]) -> InterpolationMode:
    name = str(data_config.get("interpolation") or DEFAULT_INTERPOLATION).lower()
    if name not in _INTERPOLATIONS:
        raise UserError(
            f"data config interpolation={name!r} is unknown; use one of {sorted(_INTERPOLATIONS)}"
        )
    return _INTERPOLATIONS[name]


def _crop_pct(data_config: Mapping[str, Any]) -> float:
    crop_pct = data_config.get("crop_pct")
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"data config crop_pct={crop_pct} must be in (0, 1]")
    return crop_pct


class ResizeCover:
    """Resize keeping the aspect ratio so that the image just covers ``size`` (H, W).

    For a non-square input size "resize the shorter side" is not enough (the crop could then be
    larger than the image); this is what timm does for such models too.
    """

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode) -> None:
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Any) -> Any:
        _, img_h, img_w = v2.functional.get_dimensions(image)
        scale = max(self.size[0] / img_h, self.size[1] / img_w)
        new_size = [max(1, round(img_h * scale)), max(1, round(img_w * scale))]
        return v2.functional.resize(image, new_size, self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"ResizeCover(size={self.size}, interpolation={self.interpolation.value})"


def _resize_then_crop(data_config: Mapping[str, Any]) -> Any:
    """The resize that precedes a crop of input_size, sized as timm does: side / crop_pct."""
    _, h, w = input_size(data_config)
    crop_pct = _crop_pct(data_config)
    interpolation = _interpolation(data_config)
    crop_mode = str(data_config.get("crop_mode") or "center")
    if crop_mode not in ("center", "squash"):
        log.warning("crop_mode %r is not supported; using 'center'", crop_mode)
        crop_mode = "center"
    scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if crop_mode == "squash":
        # Both sides to fixed lengths: the aspect ratio is given up, nothing is cropped away.
        return v2.Resize(scaled, interpolation=interpolation, antialias=True)
    if h == w:
        # Square target: resize the shorter side, keep the aspect ratio.
        return v2.Resize(scaled[0], interpolation=interpolation, antialias=True)
    return ResizeCover(scaled, interpolation)


class ToUnitFloat:
    """PIL image → float32 tensor C×H×W with values k / 255, in [0, 1].

    Done in numpy on purpose: torch's uint8→float conversion of a 224² image is big enough for
    intra-op parallelism, and with num_workers=0 on a busy 2-core machine that cost 14 ms per
    image instead of 0.2 ms (thread contention); numpy runs it single-threaded in ~0.1 ms.
    """

    def __call__(self, image: Any) -> torch.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:  # mode "L"
            array = array[:, :, None]
        if array.dtype != np.uint8:
            raise TypeError(f"expected an 8-bit image, got {array.dtype}")
        out = np.empty((array.shape[2], array.shape[0], array.shape[1]), dtype=np.float32)
        np.divide(array.transpose(2, 0, 1), np.float32(255), out=out)
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return "ToUnitFloat()"


def _to_unit_float() -> list[Any]:
    # A plain tensor (no tv_tensors subclass) so default_collate and the model see nothing odd.
    return [ToUnitFloat()]


def eval_transform(data_config: Mapping[str, Any]) -> v2.Compose:
    """Resize (side / crop_pct) → centre crop to input_size → float in [0, 1]. Deterministic."""
    _, h, w = input_size(data_config)
    return v2.Compose([_resize_then_crop(data_config), v2.CenterCrop((h, w)), *_to_unit_float()])


def train_transform(
    data_config: Mapping[str, Any],
    *,
    random_resized_crop: bool = False,
    rrc_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
) -> v2.Compose:
    """Train-time augmentation matched to the eval geometry.

    Default: resize (side / crop_pct) → random crop to input_size → horizontal flip; the objects
    stay at the scale the model is evaluated at, which matters for small fine-grained sets.
    ``random_resized_crop=True`` uses the stronger Inception-style crop (timm's default scale).
    """
    _, h, w = input_size(data_config)
    if random_resized_crop:
        geometry: list[Any] = [
            v2.RandomResizedCrop(
                (h, w), scale=rrc_scale, interpolation=_interpolation(data_config), antialias=True
            )
        ]
    else:
        geometry = [_resize_then_crop(data_config), v2.RandomCrop((h, w))]
    if hflip > 0:
        geometry.append(v2.RandomHorizontalFlip(hflip))
    return v2.Compose([*geometry, *_to_unit_float()])
