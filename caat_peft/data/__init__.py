"""Data sets as pixels in [0, 1]: ``build_splits(cfg.data, preprocessing)`` is the entry point.

Sources: the bundled digits (offline demo), CUB-200-2011 and Stanford Dogs in their official
layouts, image folders, and Hugging Face hub data sets (see docs/data.md).
"""

from __future__ import annotations

from typing import Any

from caat_peft.config import DataConfig
from caat_peft.data.digits import load_digits_splits
from caat_peft.data.sources import DataSplits, load_source


def image_size_for(data_cfg: DataConfig, preprocessing: dict[str, Any]) -> int:
    """The image side: ``data.image_size`` if set, else the model's own input size."""
    if data_cfg.image_size is not None:
        return data_cfg.image_size
    return int(preprocessing["input_size"][-1])


def build_splits(data_cfg: DataConfig, preprocessing: dict[str, Any]) -> DataSplits:
    """Train / (val) / test data sets for ``data_cfg``, yielding (pixels in [0, 1], label)."""
    size = image_size_for(data_cfg, preprocessing)
    if data_cfg.name == "digits":
        return load_digits_splits(
            size,
            data_cfg.classes,
            data_cfg.test_fraction,
            val_fraction=data_cfg.val_fraction,
            val_seed=data_cfg.split_seed,
        )
    data_config = {**preprocessing, "input_size": (3, size, size)}
    return load_source(
        data_cfg.name,
        data_cfg.root,
        data_config=data_config,
        val_fraction=data_cfg.val_fraction,
        seed=data_cfg.split_seed,
        bbox_crop=data_cfg.bbox_crop,
        random_resized_crop=data_cfg.random_resized_crop,
        bad_files=data_cfg.bad_files,
        hub_id=data_cfg.hub_id,
    )


__all__ = ["DataSplits", "build_splits", "image_size_for"]
