"""Hugging Face ``transformers`` ViT / Swin backbones (``model.name: hf:<repo or type>``).

- ``hf:vit`` / ``hf:swin`` (a bare model type): built from ``ViTConfig(**model.kwargs)`` /
  ``SwinConfig(**model.kwargs)`` with random weights, offline; ``model.checkpoint`` may then be a
  state-dict file (either transformers v4 or v5 key names) or a ``save_pretrained`` folder.
- ``hf:<repo id or local folder>``: the config comes from the repo; with ``model.pretrained:
  true`` the weights too (a download for a hub id, unless cached).

The model's forward returns an output object; :class:`~caat_peft.models.wrapper.PixelClassifier`
takes its ``logits``. Preprocessing comes from the repo's / checkpoint folder's
``preprocessor_config.json`` when there is one, else from transformers' ``ViTImageProcessor``
defaults (mean = std = 0.5, bilinear, resize to ``image_size``): set ``model.mean`` / ``model.std``
for a checkpoint trained with other statistics.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from caat_peft.config import ModelConfig
from caat_peft.errors import UserError

PREFIX = "hf:"
CONFIG_TYPES = ("vit", "swin", "deit")  # bare types buildable from model.kwargs alone
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_hf_name(name: str) -> bool:
    return name.startswith(PREFIX)


def repo_of(cfg: ModelConfig) -> str:
    repo = cfg.name[len(PREFIX) :].strip()
    if not repo:
        raise UserError("model.name = 'hf:' names no model (use hf:vit, hf:swin or hf:<repo id>)")
    return repo


def build_hf_config(cfg: ModelConfig, num_classes: int | None = None) -> Any:
    """The ``transformers`` config of ``cfg`` (no weights), with ``num_labels`` when given."""
    import transformers

    repo = repo_of(cfg)
    extra: dict[str, Any] = dict(cfg.kwargs)
    if num_classes is not None:
        extra["num_labels"] = num_classes
    if repo.lower() in CONFIG_TYPES:
        config_cls = transformers.AutoConfig.for_model
        try:
            return config_cls(repo.lower(), **extra)
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.kwargs not accepted by {repo} config: {exc}") from None
    try:
        return transformers.AutoConfig.from_pretrained(repo, **extra)
    except OSError as exc:
        raise UserError(
            f"model.name = {cfg.name!r}: no transformers config found ({str(exc)[:120]}); "
            "offline, use a local model folder or hf:vit / hf:swin with model.kwargs"
        ) from None


def _pickled_weights(folder: Path) -> Path:
    """The pickled weights file of a transformers model folder (the folder if none is found)."""
    found = sorted(folder.glob("pytorch_model*.bin"))
    return found[0] if len(found) == 1 else folder


def build_hf_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The image classifier of ``cfg`` with a ``num_classes`` head, weights as configured."""
    import transformers

    from caat_peft.models.checkpoints import load_state_dict_file, resolve_weights_path

    config = build_hf_config(cfg, num_classes)
    auto = transformers.AutoModelForImageClassification
    repo = repo_of(cfg)
    if cfg.pretrained and repo.lower() not in CONFIG_TYPES:
        try:
            with _quiet():
                model, info = auto.from_pretrained(
                    repo, config=config, ignore_mismatched_sizes=True, output_loading_info=True
                )
        except OSError as exc:
            raise UserError(
                f"model.name = {cfg.name!r}: weights not available ({str(exc)[:120]}); "
                "download them first or set model.checkpoint to a local file"
            ) from None
        _check_loading_info(info, cfg.name)
    elif cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            source: Any = str(path)
            kwargs: dict[str, Any] = {}
        else:
            resolve_weights_path(path)
            source, kwargs = None, {"state_dict": _strip_wrappers(load_state_dict_file(path))}
        try:
            model_cls = _model_class(config)
            with _quiet():
                model, info = model_cls.from_pretrained(
                    source,
                    config=config,
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                    **kwargs,
                )
        except pickle.UnpicklingError as exc:
            # transformers loads *.bin with weights_only=True: a pickle that carries code
            # (or is no state dict) ends here, refused, before anything of it runs.
            weights = _pickled_weights(path) if source is not None else path
            raise UserError(
                f"{weights}: refused, a pickle that is not plain tensors ({str(exc)[:100]}); "
                "use a safetensors file or one saved from a state dict"
            ) from None
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"{cfg.checkpoint}: does not fit {cfg.name} ({str(exc)[:160]})"
            ) from None
        _check_loading_info(info, str(cfg.checkpoint))
    else:
        try:
            model = _model_class(config)(config)
        except (TypeError, ValueError, KeyError) as exc:
            raise UserError(f"model.name = {cfg.name!r}: cannot build it ({exc})") from None
    return model


def _model_class(config: Any) -> type:
    """The image-classification class of ``config`` (the first, where transformers lists
    several, e.g. DeiT with and without distillation head)."""
    import transformers

    try:
        model_cls = transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise UserError(
            f"transformers has no image classifier for model_type {config.model_type!r}"
        ) from None
    return model_cls[0] if isinstance(model_cls, (tuple, list)) else model_cls


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers prints a load report and a progress bar; our own check reports problems."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    from caat_peft.models.checkpoints import clean_state_dict

    cleaned, _ = clean_state_dict(state)
    return cleaned


def _check_loading_info(info: dict[str, Any], source: str) -> None:
    """Missing / unexpected keys outside the classifier end in a UserError (not a warning)."""
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("classifier")]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("classifier")]
    mismatched = [k for k, *_ in info.get("mismatched_keys", []) if not k.startswith("classifier")]
    if missing or unexpected or mismatched:
        raise UserError(
            f"{source}: does not fit the transformers model ({len(missing)} missing keys "
            f"{sorted(missing)[:5]}, {len(unexpected)} unexpected keys {sorted(unexpected)[:5]}, "
            f"{len(mismatched)} other shapes {sorted(mismatched)[:3]}); check model.name and "
            "model.kwargs"
        )


def hf_preprocessing(cfg: ModelConfig, config: Any) -> dict[str, Any]:
    """A timm-style data config for a transformers model: ``preprocessor_config.json`` of the
    repo folder or checkpoint folder when present, else ViTImageProcessor's defaults."""
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    pre: dict[str, Any] = {
        "input_size": (int(getattr(config, "num_channels", 3)), size, size),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0,
        "crop_mode": "squash",  # the processor resizes straight to (size, size)
    }
    processor = _read_processor_config(cfg)
    if processor:
        if processor.get("image_mean") is not None:
            pre["mean"] = tuple(float(v) for v in processor["image_mean"])
        if processor.get("image_std") is not None:
            pre["std"] = tuple(float(v) for v in processor["image_std"])
        if processor.get("resample") in _PIL_RESAMPLE:
            pre["interpolation"] = _PIL_RESAMPLE[processor["resample"]]
        if processor.get("crop_pct"):
            pre["crop_pct"] = float(processor["crop_pct"])
            pre["crop_mode"] = "center"
    return pre


def _read_processor_config(cfg: ModelConfig) -> dict[str, Any] | None:
    candidates = [Path(repo_of(cfg)).expanduser() / "preprocessor_config.json"]
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        candidates.append((path if path.is_dir() else path.parent) / "preprocessor_config.json")
    if cfg.pretrained and repo_of(cfg).lower() not in CONFIG_TYPES:
        hub_file = _hub_processor_file(repo_of(cfg))
        if hub_file is not None:
            candidates.append(hub_file)
    for file in candidates:
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"{file}: not readable JSON ({exc})") from None
            return data if isinstance(data, dict) else None
    return None


def _hub_processor_file(repo: str) -> Path | None:
    """The hub repo's ``preprocessor_config.json`` (from the HF cache, or downloaded), if any."""
    if Path(repo).expanduser().is_dir():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, "preprocessor_config.json"))
    except Exception:  # offline, private or absent: the defaults above apply
        return None
