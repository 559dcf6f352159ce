"""Tiny architectures and checkpoint writers for the tests of caat_peft.models.

Every checkpoint is generated from a randomly initialised model and saved in the layout users
bring (ARES raw, RobustBench prefixed, timm hub folder, safetensors, transformers v4 names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from caat_peft.config import ModelConfig

VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
SWIN = {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2)}
CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (96, 16, 16, 16)}
HF_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 16,
    "patch_size": 4,
}
HF_SWIN = {
    "image_size": 32,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [2, 2],
    "num_heads": [1, 2],
    "window_size": 4,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_model(arch: str, kwargs: dict, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes, **kwargs).eval()


def model_cfg(
    name: str, kwargs: dict, checkpoint: Path | str | None = None, **extra
) -> ModelConfig:
    return ModelConfig(
        name=name, kwargs=dict(kwargs), checkpoint=str(checkpoint) if checkpoint else None, **extra
    )


def old_timm_swin_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A current timm Swin state dict as timm < 0.9 / the original code stored it: downsample
    at the end of the previous stage, ``head.`` for ``head.fc.``, plus persistent buffers."""
    out = {}
    for key, value in state.items():
        key = re.sub(
            r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key
        )
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("relative_position_bias_table"):
            out[key.replace("bias_table", "index")] = torch.zeros(4, dtype=torch.long)
    return out


def robustbench_file(state: dict[str, torch.Tensor], path: Path, mean, std) -> Path:
    """A RobustBench-style file: normalize_model's keys, DataParallel prefix, a container."""
    wrapped = {"normalize.mean": torch.tensor(mean).view(1, 3, 1, 1)}
    wrapped["normalize.std"] = torch.tensor(std).view(1, 3, 1, 1)
    wrapped.update({f"model.{k}": v for k, v in state.items()})
    torch.save({"state_dict": {f"module.{k}": v for k, v in wrapped.items()}, "epoch": 3}, path)
    return path


def timm_hub_folder(model: nn.Module, folder: Path, pretrained_cfg: dict) -> Path:
    """A timm hub folder: config.json (architecture + pretrained_cfg) and model.safetensors."""
    folder.mkdir(parents=True)
    config = {
        "architecture": model.pretrained_cfg["architecture"],
        "num_classes": model.num_classes,
        "pretrained_cfg": pretrained_cfg,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    return folder


def hf_v4_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers v5 ViT keys renamed as v4 (and the hub) store them."""
    renames = [
        (r"vit\.layers\.", "vit.encoder.layer."),
        (r"attention\.q_proj", "attention.attention.query"),
        (r"attention\.k_proj", "attention.attention.key"),
        (r"attention\.v_proj", "attention.attention.value"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "intermediate.dense"),
        (r"mlp\.fc2", "output.dense"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    """A plain optimiser loop over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
