"""``build_model``: one call from a checkpoint name to a trainable, pixel-space classifier."""

from __future__ import annotations

import dataclasses
from typing import Any

from caat_peft.config import ModelConfig, PeftConfig, validate
from caat_peft.errors import UserError
from caat_peft.models.wrapper import PixelClassifier, build_classifier

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_PEFT_FIELDS = {f.name for f in dataclasses.fields(PeftConfig)}


def build_model(
    name: str,
    *,
    peft: str | PeftConfig | dict[str, Any] = "adapter",
    num_classes: int,
    checkpoint: str | None = None,
    **options: Any,
) -> PixelClassifier:
    """A classifier on pixels in [0, 1]: backbone ``name`` + ``checkpoint`` + PEFT method.

    ``name`` is a registry entry (``ares_swin_base``…), a timm model or ``hf:<repo>``;
    ``peft`` a method name (``adapter``, ``lora``, ``ia3``, ``loha``, ``lokr``, ``vera``,
    ``vpt``, ``bitfit``, ``head``, ``full``), a :class:`~caat_peft.config.PeftConfig` or a dict
    of its fields.
    ``options`` are split by name: ``PeftConfig`` fields (``r``, ``reduction``, ``targets``…),
    ``ModelConfig`` fields (``pretrained``, ``mean``, ``std``…), and the rest goes to the
    architecture (``img_size``, ``embed_dim``… for timm; config fields for ``hf:vit``).

    Example::

        model = build_model("ares_swin_base", peft="adapter", num_classes=200,
                            checkpoint="ARES_Swin_base_patch4_window7_224_AT.pth")
        print(trainable_summary(model))
    """
    from caat_peft.config import Config

    if isinstance(peft, PeftConfig):
        peft_fields = dataclasses.asdict(peft)
    elif isinstance(peft, dict):
        peft_fields = dict(peft)
    else:
        peft_fields = {"method": peft}
    model_fields: dict[str, Any] = {"name": name, "checkpoint": checkpoint}
    kwargs: dict[str, Any] = dict(options.pop("kwargs", {}) or {})
    for key, value in options.items():
        if key in _PEFT_FIELDS and key not in _MODEL_FIELDS:
            peft_fields[key] = value
        elif key in _MODEL_FIELDS:
            model_fields[key] = value
        else:
            kwargs[key] = value
    unknown = set(peft_fields) - _PEFT_FIELDS
    if unknown:
        raise UserError(
            f"unknown peft settings {sorted(unknown)} (allowed: {sorted(_PEFT_FIELDS)})"
        )
    model_cfg = ModelConfig(**{**model_fields, "kwargs": kwargs})
    peft_cfg = PeftConfig(**peft_fields)
    validate(Config(model=model_cfg, peft=peft_cfg))
    if num_classes < 1:
        raise UserError(f"num_classes = {num_classes} must be >= 1")
    return build_classifier(model_cfg, peft_cfg, num_classes)
