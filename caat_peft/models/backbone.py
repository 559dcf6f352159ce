"""timm backbones built from config, and safe loading of the checkpoints users bring.

Robust checkpoints usually come as raw state dicts (``.pth``) or safetensors files. They are
loaded without executing pickled code (``torch.load(weights_only=True)``), unwrapped from the
usual containers and key prefixes, and matched against the architecture; a classification head
whose shape differs (a new ``num_classes``) is left at its fresh initialisation.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from caat_peft.config import ModelConfig
from caat_peft.errors import UserError

# Containers some training scripts wrap the state dict in, and prefixes they add to keys.
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_KEY_PREFIXES = ("module.", "model.", "backbone.")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from safetensors or a weights-only torch file; refuse pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (set model.checkpoint to a weights file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path}: refused to load, the file holds more than tensors (pickled code or "
            f"objects: {str(exc).splitlines()[0][:120]}); convert it to safetensors or a plain "
            "state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc})") from None
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return obj


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights_into(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``: heads of another shape are re-initialised, the rest must fit."""
    state = _strip_prefixes(state)
    own = model.state_dict()
    reinit = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head_prefix = str(model.pretrained_cfg.get("classifier", "head"))
    not_head = [k for k in reinit if not k.startswith(head_prefix)]
    if not_head:
        details = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in not_head
        )
        raise UserError(
            f"{source}: shapes do not match the architecture ({details[:300]}); "
            "check model.name and model.kwargs"
        )
    state = {k: v for k, v in state.items() if k not in reinit}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head_prefix)]
    if missing or unexpected:
        raise UserError(
            f"{source}: does not fit model '{model.pretrained_cfg.get('architecture')}' "
            f"(missing keys: {missing[:8]}, unexpected keys: {unexpected[:8]}); "
            "check model.name and model.kwargs"
        )


def build_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build a timm model with a ``num_classes`` head and load ``cfg.checkpoint`` if given."""
    try:
        model = timm.create_model(
            cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, **cfg.kwargs
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(
                f"model.name = {cfg.name!r} is not a timm model (see timm.list_models())"
            ) from None
        raise
    except TypeError as exc:
        raise UserError(f"model.kwargs not accepted by {cfg.name}: {exc}") from None
    if cfg.checkpoint:
        load_weights_into(model, load_state_dict_file(cfg.checkpoint), str(cfg.checkpoint))
    return model


def preprocessing_for_config(cfg: ModelConfig) -> dict[str, Any]:
    """The preprocessing of ``cfg``'s model without building its weights (meta device)."""
    with torch.device("meta"):
        try:
            model = timm.create_model(cfg.name, pretrained=False, **cfg.kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise UserError(
                    f"model.name = {cfg.name!r} is not a timm model (see timm.list_models())"
                ) from None
            raise
        except TypeError as exc:
            raise UserError(f"model.kwargs not accepted by {cfg.name}: {exc}") from None
    return preprocessing_of(model, cfg)


def preprocessing_of(model: nn.Module, cfg: ModelConfig) -> dict[str, Any]:
    """The model's own preprocessing (timm data config), with the config's overrides applied."""
    from timm.data import resolve_data_config

    pre = dict(resolve_data_config({}, model=model))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:  # a model built at another resolution than its pretrained config
        pre["input_size"] = (3, *tuple(img_size))
    if cfg.mean is not None:
        pre["mean"] = tuple(cfg.mean)
    if cfg.std is not None:
        pre["std"] = tuple(cfg.std)
    return pre
