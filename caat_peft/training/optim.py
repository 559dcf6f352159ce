"""Optimiser, learning-rate schedule, EMA of the trainable parameters, fp16 loss scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from caat_peft.config import TrainConfig


def make_optimizer(
    named_params: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW / SGD (optionally Nesterov); no weight decay on biases and normalisation weights (1-D tensors)."""
    decay = [p for _, p in named_params if p.ndim > 1]
    no_decay = [p for _, p in named_params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach: one kernel per operation over all tensors; torch picks it by default on CUDA
    # only, and on CPU it made the CA-AT update 1.1x faster (benchmarks/, docs/benchmarks.md).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-optimiser-step schedule: linear warm-up then constant / cosine, or one-cycle."""
    warmup = int(round(cfg.warmup_epochs / cfg.epochs * total_steps))
    if cfg.schedule == "onecycle":
        # One-cycle (Smith & Topin): warm up from lr/25 to lr, then cosine down to lr/1e4.
        # Written as a LambdaLR so that it needs no extra state to resume.
        peak = warmup if warmup else max(1, int(0.3 * total_steps))

        def onecycle(step: int) -> float:
            if step < peak:
                return 1 / 25 + (1 - 1 / 25) * step / peak
            progress = min(1.0, (step - peak) / max(1, total_steps - peak))
            return 1e-4 + (1 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, onecycle)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ParameterEMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged values (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)


class LossScaler:
    """Dynamic loss scaling for fp16: scale the losses, unscale both gradients before combining.

    torch's GradScaler unscales through the optimiser, but CA-AT must see the true g_c and g_a
    before the optimiser does; this keeps the same policy (halve on overflow, double after
    ``growth_interval`` clean steps) with the unscaling done by the caller.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_interval = growth_interval
        self._good_steps = 0

    def update(self, found_nonfinite: bool) -> None:
        if found_nonfinite:
            self.scale = max(self.scale / 2, 1.0)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self._good_steps = float(state["scale"]), int(state["good_steps"])
