"""Data sets as pixels in [0, 1]: ``build_splits(cfg.data, preprocessing)`` is the entry point."""

from __future__ import annotations

from typing import Any

from caat_peft.config import DataConfig
from caat_peft.data.digits import DigitsSplits, load_digits_splits


def image_size_for(data_cfg: DataConfig, preprocessing: dict[str, Any]) -> int:
    """The image side: ``data.image_size`` if set, else the model's own input size."""
    if data_cfg.image_size is not None:
        return data_cfg.image_size
    return int(preprocessing["input_size"][-1])


def build_splits(data_cfg: DataConfig, preprocessing: dict[str, Any]) -> DigitsSplits:
    """Train / (val) / test data sets for ``data_cfg``, yielding (pixels in [0, 1], label)."""
    size = image_size_for(data_cfg, preprocessing)
    if data_cfg.name == "digits":
        return load_digits_splits(size, data_cfg.classes, data_cfg.test_fraction)
    raise ValueError(f"unknown data set {data_cfg.name!r}")  # config validation prevents this


__all__ = ["build_splits", "image_size_for"]
