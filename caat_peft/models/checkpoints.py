"""Reading the weight files users bring, safely, and fitting them to an architecture.

Robust checkpoints come as raw state dicts (ARES ``.pth``), as RobustBench files (a
``state_dict`` container, ``module.`` / ``model.`` prefixes, ``normalize.mean/std`` buffers of
the normalisation layer), as timm hub folders (``config.json`` + ``model.safetensors``) or as
plain safetensors. Every file is read without executing pickled code (safetensors, or
``torch.load(weights_only=True)``); anything else is refused with a message naming the file.
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.errors import UserError

# Containers training scripts wrap the state dict in (first match wins), and prefixes they add.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "state_dict_ema")
KEY_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.", "base_model.model.")
NORMALIZER_PREFIX = "normalize."  # RobustBench's ImageNormalizer (mean / std buffers)
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


def resolve_weights_path(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or the weights inside a hub-style folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in HUB_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"{path}: a folder without {' or '.join(HUB_WEIGHT_FILES)} "
            "(set model.checkpoint to a weights file or a timm / Hugging Face model folder)"
        )
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (set model.checkpoint to a weights file)")
    return path


def read_hub_config(path: str | Path) -> dict[str, Any] | None:
    """``config.json`` of a timm / Hugging Face model folder (or of a weights file's folder
    when ``path`` is a folder), else None."""
    path = Path(path).expanduser()
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load a state dict from safetensors or a weights-only torch file; refuse pickled code.

    ``path`` may also be a timm / Hugging Face model folder. Containers (``state_dict``,
    ``model``, …) are unwrapped; key prefixes are left for :func:`clean_state_dict`.
    """
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "?"
        raise UserError(
            f"{path}: refused to load, the file holds more than tensors (pickled code or "
            f"objects: {first}); convert it to safetensors or a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({str(exc)[:200]})") from None
    return _unwrap_container(obj, path)


def _unwrap_container(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(obj, dict) or _is_tensor_dict(obj):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: expected a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors or len(tensors) < len(obj) / 2:
        raise UserError(
            f"{path}: expected a state dict of tensors, found keys {list(obj)[:6]} "
            "(save model.state_dict(), or convert the file)"
        )
    return tensors


def _is_tensor_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def clean_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Strip wrapper prefixes; return (weights, normaliser buffers such as ``mean`` / ``std``).

    RobustBench files hold ``normalize.mean`` / ``normalize.std`` next to ``model.<timm key>``:
    the normaliser is split off first, then a prefix is stripped while every key carries it.
    """
    normalizer: dict[str, Tensor] = {}
    changed = True
    while changed:
        changed = False
        found = {k: v for k, v in state.items() if k.startswith(NORMALIZER_PREFIX)}
        if found and len(found) < len(state):
            normalizer.update({k[len(NORMALIZER_PREFIX) :]: v for k, v in found.items()})
            state = {k: v for k, v in state.items() if k not in found}
        for prefix in KEY_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state, normalizer


def check_normalizer(
    normalizer: dict[str, Tensor], mean: Any, std: Any, source: str, explicit: bool
) -> None:
    """Refuse a checkpoint whose own normalisation layer disagrees with the preprocessing used.

    A RobustBench file records the mean / std it was trained with; feeding it other statistics
    silently costs accuracy and robustness. ``explicit`` (model.mean/std set) wins.
    """
    if explicit or "mean" not in normalizer or "std" not in normalizer:
        return
    file_mean = normalizer["mean"].flatten().double()
    file_std = normalizer["std"].flatten().double()
    want_mean = torch.tensor([float(v) for v in mean], dtype=torch.float64)
    want_std = torch.tensor([float(v) for v in std], dtype=torch.float64)
    close = (
        file_mean.shape == want_mean.shape
        and file_std.shape == want_std.shape
        and torch.allclose(file_mean, want_mean, atol=1e-4)
        and torch.allclose(file_std, want_std, atol=1e-4)
    )
    if not close:
        raise UserError(
            f"{source}: the file normalises with mean {_fmt(file_mean.tolist())} / std "
            f"{_fmt(file_std.tolist())} "
            f"but the model is set up with mean {_fmt(mean)} / std {_fmt(std)}; pick the "
            "matching model.name or set model.mean and model.std"
        )


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def apply_timm_filter(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Run the model family's own ``checkpoint_filter_fn`` (what timm does for its hub weights).

    For Swin it converts files of older timm versions (downsample at the end of a stage,
    ``head.`` instead of ``head.fc.``, stored ``relative_position_index`` / ``attn_mask``
    buffers); for ViT it resamples position embeddings to the model's grid; for ConvNeXt it
    converts the original (FAIR) layout. Files already in the current layout pass unchanged.
    """
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, model))
    except (KeyError, RuntimeError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(
            f"checkpoint does not fit {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc)[:160]}); check model.name and model.kwargs"
        ) from None


def load_weights_into(
    model: nn.Module, state: dict[str, Tensor], source: str, head: list[str] | None = None
) -> None:
    """Load ``state`` into a timm ``model``; heads of another shape stay freshly initialised.

    Anything else that does not fit ends in a UserError listing the missing / unexpected keys or
    the mismatched shapes, so that a checkpoint of the wrong architecture fails clearly.
    """
    from caat_peft.models.targets import head_names

    state, _ = clean_state_dict(state)
    state = apply_timm_filter(model, state)
    heads = head or head_names(model)

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    wrong = [k for k in mismatched if not in_head(k)]
    missing = [k for k in own if k not in state and not in_head(k) and not _is_buffer_key(k)]
    unexpected = [k for k in state if k not in own and not in_head(k) and not _is_buffer_key(k)]
    if wrong or missing or unexpected:
        shapes = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]
        )
        raise UserError(
            f"{source}: does not fit {_arch_name(model)} ({len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
            f"{len(wrong)} other shapes [{shapes}]); check model.name and model.kwargs"
        )
    state = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(state, strict=False)


def _is_buffer_key(key: str) -> bool:
    """Buffers some architectures compute at build time; files may or may not hold them."""
    return key.endswith(("relative_position_index", "attn_mask"))


def _arch_name(model: nn.Module) -> str:
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    return f"model '{arch}'" if arch else type(model).__name__
