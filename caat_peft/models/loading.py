"""Rebuild a trained classifier from its config and the artefacts a run saved."""

from __future__ import annotations

from pathlib import Path

from caat_peft.config import Config
from caat_peft.models.backbone import build_backbone, preprocessing_of
from caat_peft.models.peft_setup import load_adapter
from caat_peft.models.targets import head_names
from caat_peft.models.wrapper import PixelClassifier, seeded_init


def load_trained(cfg: Config, num_classes: int, adapter_dir: str | Path | None) -> PixelClassifier:
    """The backbone of ``cfg.model`` with the trained modules of ``adapter_dir`` attached.

    ``adapter_dir`` holds a peft adapter (``adapter_config.json``: LoRA-like methods or the
    bottleneck adapter) or the trainable tensors of a head-only / full run
    (``trainable.safetensors``); None evaluates the backbone as it is.
    """
    with seeded_init(cfg.train.seed):  # as in training: weights from no file come out the same
        backbone = build_backbone(cfg.model, num_classes)
    pre = preprocessing_of(backbone, cfg.model)
    heads = head_names(backbone)
    net = backbone if adapter_dir is None else load_adapter(backbone, adapter_dir)
    net.eval()
    return PixelClassifier(
        net, pre["mean"], pre["std"], preprocessing=pre, head=heads[0], model=cfg.model.name
    )
