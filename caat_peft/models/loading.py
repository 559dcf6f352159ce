"""Rebuild a trained classifier from its config and the artefacts a run saved."""

from __future__ import annotations

from pathlib import Path

from caat_peft.config import Config
from caat_peft.errors import UserError
from caat_peft.models.backbone import build_backbone, preprocessing_of
from caat_peft.models.wrapper import PixelClassifier


def load_trained(cfg: Config, num_classes: int, adapter_dir: str | Path | None) -> PixelClassifier:
    """The backbone of ``cfg.model`` with the trained modules of ``adapter_dir`` attached.

    ``adapter_dir`` holds a peft adapter (``adapter_config.json``) or the trainable tensors of a
    head-only / full run (``trainable.safetensors``); None evaluates the backbone as it is.
    """
    backbone = build_backbone(cfg.model, num_classes)
    pre = preprocessing_of(backbone, cfg.model)
    head = str(backbone.pretrained_cfg.get("classifier", "head"))
    net = backbone
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        if (adapter_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            net = PeftModel.from_pretrained(backbone, str(adapter_dir))
        elif (adapter_dir / "trainable.safetensors").is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(adapter_dir / "trainable.safetensors"))
            _, unexpected = backbone.load_state_dict(tensors, strict=False)
            if unexpected:
                raise UserError(
                    f"{adapter_dir}: tensors do not fit the model ({unexpected[:5]}); "
                    "was it trained with another model.name?"
                )
        else:
            raise UserError(
                f"{adapter_dir}: no adapter_config.json or trainable.safetensors "
                "(point --adapter at a run's adapter/ folder)"
            )
    net.eval()
    return PixelClassifier(net, pre["mean"], pre["std"], preprocessing=pre, head=head)
