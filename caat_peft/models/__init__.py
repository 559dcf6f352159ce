"""Backbones, the pixel-space wrapper and PEFT set-up.

``build_classifier(cfg, num_classes)`` is the one entry point the trainer needs: it builds the
timm backbone, loads the user's checkpoint, attaches PEFT modules and returns a
:class:`PixelClassifier` that takes images in [0, 1] and normalises them itself.
"""

from caat_peft.models.backbone import (
    build_backbone,
    load_state_dict_file,
    preprocessing_for_config,
    preprocessing_of,
)
from caat_peft.models.peft_setup import apply_peft, save_trainable, trainable_parameters
from caat_peft.models.wrapper import PixelClassifier, build_classifier

__all__ = [
    "PixelClassifier",
    "apply_peft",
    "build_backbone",
    "build_classifier",
    "load_state_dict_file",
    "preprocessing_for_config",
    "preprocessing_of",
    "save_trainable",
    "trainable_parameters",
]
