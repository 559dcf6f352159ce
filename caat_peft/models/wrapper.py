"""A classifier that takes pixels in [0, 1] and applies its checkpoint's own normalisation.

Attacks and ε then live in pixel space whatever the checkpoint's mean / std are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.config import ModelConfig, PeftConfig


class PixelClassifier(nn.Module):
    """``net((x − mean) / std)`` for ``x`` in [0, 1]; ``net`` may be a peft model.

    ``transformers`` models return an output object: its ``logits`` are returned, so that every
    backbone looks the same to attacks and losses.
    """

    def __init__(
        self, net: nn.Module, mean: Sequence[float], std: Sequence[float], **info: Any
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.info = info  # preprocessing and provenance, for reports

    def forward(self, x: Tensor) -> Tensor:
        out = self.net((x - self.mean) / self.std)
        return out if isinstance(out, Tensor) else out.logits


# Initialisation draws from its own stream, derived from the run's seed: the draws that training
# makes next (augmentation, dropout, loader seeds) then never repeat the initial weights' numbers.
_INIT_STREAM = 0x5EED_1417


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Random initialisation (on the CPU, where models are built) that depends on ``seed`` alone,
    leaving the CPU RNG as it was.

    Training builds its model under this, and so does loading a trained run: weights that come
    from no file (a backbone built from config, the frozen layers of a head-only run) are then
    the same in ``caat-peft eval`` as they were in training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((seed ^ _INIT_STREAM) & 0xFFFF_FFFF_FFFF)
        yield


def build_classifier(
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    num_classes: int,
    head_state: dict[str, Tensor] | None = None,
) -> PixelClassifier:
    """Backbone + checkpoint + PEFT modules, wrapped to take pixels in [0, 1].

    ``head_state`` (a head-only run's tensors: robust linear initialisation) replaces the fresh
    head before the PEFT method wraps the backbone, so every method starts from that head.
    """
    from caat_peft.models.backbone import build_backbone, preprocessing_of
    from caat_peft.models.peft_setup import apply_peft, set_head
    from caat_peft.models.targets import head_names

    backbone = build_backbone(model_cfg, num_classes)
    pre = preprocessing_of(backbone, model_cfg)
    heads = head_names(backbone)
    if head_state is not None:
        set_head(backbone, head_state)
    net = apply_peft(backbone, peft_cfg)
    return PixelClassifier(
        net,
        pre["mean"],
        pre["std"],
        preprocessing=pre,
        head=heads[0],
        model=model_cfg.name,
        method=peft_cfg.method,
    )
