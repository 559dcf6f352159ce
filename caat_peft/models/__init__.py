"""Backbones, the robust-checkpoint registry, PEFT methods and their artefacts.

``build_classifier(model_cfg, peft_cfg, num_classes)`` is the entry point the trainer needs and
``build_model(name, peft=…, num_classes=…)`` the one for Python users: both build the backbone
(registry entry, timm model or ``hf:<repo>``), load the user's checkpoint safely, attach the PEFT
method and return a :class:`PixelClassifier` that takes images in [0, 1] and normalises them
itself. Importing this package registers the bottleneck adapter with peft.
"""

from caat_peft.models.adapter import (
    BottleneckAdapterConfig,
    BottleneckAdapterLayer,
    BottleneckAdapterModel,
)
from caat_peft.models.api import build_model
from caat_peft.models.backbone import (
    build_backbone,
    load_state_dict_file,
    preprocessing_for_config,
    preprocessing_of,
)
from caat_peft.models.peft_setup import (
    apply_peft,
    export_merged,
    load_adapter,
    merged_net,
    merged_state_dict,
    save_adapter,
    save_trainable,
    trainable_parameters,
    trainable_summary,
)
from caat_peft.models.registry import BackboneSpec, get_spec, list_backbones, register_backbone
from caat_peft.models.targets import PRESETS, head_names, preset_regex
from caat_peft.models.wrapper import PixelClassifier, build_classifier, seeded_init

__all__ = [
    "PRESETS",
    "BackboneSpec",
    "BottleneckAdapterConfig",
    "BottleneckAdapterLayer",
    "BottleneckAdapterModel",
    "PixelClassifier",
    "apply_peft",
    "build_backbone",
    "build_classifier",
    "build_model",
    "export_merged",
    "get_spec",
    "head_names",
    "list_backbones",
    "load_adapter",
    "load_state_dict_file",
    "merged_net",
    "merged_state_dict",
    "preprocessing_for_config",
    "preprocessing_of",
    "preset_regex",
    "register_backbone",
    "save_adapter",
    "save_trainable",
    "seeded_init",
    "trainable_parameters",
    "trainable_summary",
]
