"""Backbones from config: registry entries, any timm model, or ``transformers`` ViT / Swin.

``model.name`` is resolved in this order:

1. ``hf:<repo or type>``: a ``transformers`` image classifier (see :mod:`.hf`);
2. a registry entry or alias (``ares_swin_base``, ``Liu2023Comprehensive_Swin-B``…): its timm
   architecture (plus a conv stem for ConvStem models) and its own preprocessing;
3. any timm model name (``pretrained: true`` downloads timm's hub weights when online).

``model.checkpoint`` (a file, a timm / HF model folder, or a URL) is loaded safely on top; a new
``num_classes`` leaves the head freshly initialised, anything else that does not fit is a
:class:`~caat_peft.errors.UserError` listing the missing / unexpected keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from caat_peft.config import ModelConfig
from caat_peft.errors import UserError
from caat_peft.models.checkpoints import (
    check_normalizer,
    clean_state_dict,
    load_state_dict_file,
    load_weights_into,
    read_hub_config,
)
from caat_peft.models.convstem import STEMS
from caat_peft.models.download import fetch, is_url
from caat_peft.models.hf import build_hf_backbone, build_hf_config, hf_preprocessing, is_hf_name
from caat_peft.models.registry import BackboneSpec, get_spec

__all__ = [
    "build_backbone",
    "load_state_dict_file",
    "load_weights_into",
    "preprocessing_for_config",
    "preprocessing_of",
]


def _create_timm(arch: str, cfg: ModelConfig, pretrained: bool, **extra: Any) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=pretrained, **extra, **cfg.kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(
                f"model.name = {cfg.name!r} is not a timm model, a registry entry or hf:<repo> "
                "(see timm.list_models() and caat_peft.models.list_backbones())"
            ) from None
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        if "weight_init" in extra and "weight_init" in str(exc):
            if cfg.init == "auto":  # an architecture without timm's init modes keeps its own
                rest = {k: v for k, v in extra.items() if k != "weight_init"}
                return _create_timm(arch, cfg, pretrained, **rest)
            raise UserError(
                f"model.init = {cfg.init} is not supported by {arch} (use model.init: timm)"
            ) from None
        raise UserError(f"model.kwargs not accepted by {arch}: {exc}") from None


def weight_init_for(cfg: ModelConfig, loads_weights: bool) -> str | None:
    """timm's ``weight_init`` mode for ``cfg``, or None for the architecture's own default.

    timm ViT / Swin draw every Linear weight from N(0, 0.02²) whatever the width. On a narrow
    model built from config (width 32: 1/sqrt(32) ≈ 0.18) the class token then carries almost
    no input information: the head sees a near-constant feature, and a short run sits at the
    chance loss until float noise lets it escape (measured in docs/models.md). The jax mode
    (Xavier weights, zero head) scales with the width. Weights loaded from a file or the hub
    overwrite the init anyway, apart from a fresh head, which keeps timm's default.
    """
    if "weight_init" in cfg.kwargs:
        return None  # the user's own timm argument
    if cfg.init == "jax" or (cfg.init == "auto" and not loads_weights):
        return "jax"
    return None


def _timm_backbone(
    cfg: ModelConfig, spec: BackboneSpec | None, num_classes: int, loads_weights: bool
) -> nn.Module:
    """The timm model of ``cfg`` (registry architecture, conv stem) before any checkpoint."""
    arch = spec.arch if spec is not None else cfg.name
    timm_pretrained = cfg.pretrained and spec is None and not cfg.checkpoint
    extra: dict[str, Any] = {"num_classes": num_classes}
    init = weight_init_for(cfg, loads_weights or timm_pretrained)
    if init is not None:
        extra["weight_init"] = init
    model = _create_timm(arch, cfg, timm_pretrained, **extra)
    if spec is not None and spec.stem is not None:
        model = STEMS[spec.stem](model, **spec.stem_kwargs)
    return model


def checkpoint_path(cfg: ModelConfig, spec: BackboneSpec | None) -> str | None:
    """The local weights to load: the user's file / folder, a fetched URL, or None."""
    if cfg.checkpoint:
        return str(fetch(cfg.checkpoint)) if is_url(cfg.checkpoint) else cfg.checkpoint
    if spec is not None and cfg.pretrained:
        if spec.url is None:
            raise UserError(
                f"{spec.name} has no direct download; get the file from {spec.page} and set "
                "model.checkpoint to it"
            )
        return str(fetch(spec.url))
    return None


def build_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg``'s model with a ``num_classes`` head and load its checkpoint, if any."""
    if is_hf_name(cfg.name):
        if is_url(cfg.checkpoint):
            cfg = ModelConfig(**{**cfg.__dict__, "checkpoint": str(fetch(cfg.checkpoint))})
        return build_hf_backbone(cfg, num_classes)
    spec = get_spec(cfg.name)
    path = checkpoint_path(cfg, spec)
    model = _timm_backbone(cfg, spec, num_classes, loads_weights=path is not None)
    if path is not None:
        state = load_state_dict_file(path)
        _, normalizer = clean_state_dict(state)
        pre = preprocessing_of(model, cfg)
        explicit = cfg.mean is not None and cfg.std is not None
        check_normalizer(normalizer, pre["mean"], pre["std"], str(path), explicit)
        load_weights_into(model, state, str(path))
    return model


def preprocessing_for_config(cfg: ModelConfig) -> dict[str, Any]:
    """The preprocessing of ``cfg``'s model without building its weights (meta device)."""
    if is_hf_name(cfg.name):
        return hf_preprocessing(cfg, build_hf_config(cfg))
    spec = get_spec(cfg.name)
    with torch.device("meta"):
        model = _create_timm(spec.arch if spec else cfg.name, cfg, False)
    return preprocessing_of(model, cfg)


def preprocessing_of(model: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """The model's own preprocessing as a timm-style data config.

    Precedence, lowest first: the architecture's default (timm ``pretrained_cfg`` or the
    transformers processor), the registry entry, a timm hub folder's ``config.json``, then
    ``model.mean`` / ``model.std``. The input size follows the resolution the model was built at.
    """
    from timm.data import resolve_data_config

    from caat_peft.models.targets import is_transformers_model, unwrap

    model = unwrap(model)
    if is_transformers_model(model):
        pre = hf_preprocessing(cfg, model.config)
    else:
        pre = dict(resolve_data_config({}, model=model))
        spec = get_spec(cfg.name)
        if spec is not None:
            pre.update(spec.preprocessing())
        hub = _hub_pretrained_cfg(cfg)
        pre.update({k: hub[k] for k in _PRE_KEYS if k in hub})
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # built at another resolution than the checkpoint's default
            pre["input_size"] = (3, *tuple(img_size))
    pre["input_size"] = tuple(pre["input_size"])
    if cfg.mean is not None:
        pre["mean"] = tuple(cfg.mean)
    if cfg.std is not None:
        pre["std"] = tuple(cfg.std)
    pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
    return pre


_PRE_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _hub_pretrained_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """``pretrained_cfg`` of a timm hub folder given as ``model.checkpoint``, else {}."""
    if not cfg.checkpoint or is_url(cfg.checkpoint) or not Path(cfg.checkpoint).is_dir():
        return {}
    config = read_hub_config(cfg.checkpoint) or {}
    pre = config.get("pretrained_cfg", {})
    if not isinstance(pre, dict):
        return {}
    out = dict(pre)
    if "input_size" in out:
        out["input_size"] = tuple(out["input_size"])
    return out
