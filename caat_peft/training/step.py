"""One optimisation step of ``caat-peft train``, on the public :class:`ConflictAware` step.

A step may span several micro-batches (gradient accumulation): g_c and g_a are accumulated
*separately* and the combiner runs once per optimiser step, on the averaged global gradients
(``training/conflict_aware.py`` holds the method; this adds the optimiser and clipping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.gradients import Combiner
from caat_peft.objectives import Objective
from caat_peft.training.conflict_aware import ConflictAware, grads_of, objective_losses
from caat_peft.training.distributed import Reducer
from caat_peft.training.optim import LossScaler

__all__ = [
    "MicroBatch",
    "StepResult",
    "grads_of",
    "micro_batch_gradients",
    "training_step",
    "write_grads",
]


@dataclass
class MicroBatch:
    x: Tensor
    y: Tensor
    init_delta: Tensor | None = None  # the attack's random start, drawn for the global batch


@dataclass
class StepResult:
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def write_grads(params: Sequence[nn.Parameter], update: Sequence[Tensor]) -> None:
    for p, g in zip(params, update):
        p.grad = g.to(p.dtype)


def micro_batch_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    objective: Objective,
    batch: MicroBatch,
    *,
    clean_only: bool,
    precision: str = "fp32",
) -> tuple[list[Tensor], list[Tensor] | None, Tensor]:
    """(g_c, g_a, logged scalars) of one micro-batch, unaccumulated and unreduced (for the
    benchmarks' references); g_a is None for standard training."""
    loss_clean, loss_adv, accuracies = objective_losses(
        model,
        objective,
        batch.x,
        batch.y,
        init_delta=batch.init_delta,
        clean_only=clean_only,
        precision=precision,
    )
    g_c = grads_of(loss_clean, params, retain_graph=loss_adv is not None)
    g_a = None if loss_adv is None else grads_of(loss_adv, params)
    losses = [loss_clean] if loss_adv is None else [loss_clean, loss_adv]
    scalars = torch.stack([*(v.detach().float() for v in losses), *accuracies.values()])
    return g_c, g_a, scalars


def training_step(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    objective: Objective,
    combiner: Combiner,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    reduce: Reducer,
    grad_clip: float | None = None,
    clean_only: bool = False,
    precision: str = "fp32",
    scaler: LossScaler | None = None,
    param_names: Sequence[str] | None = None,
    layer_conflict: bool = False,
) -> StepResult:
    """Attack, two gradients over θ, accumulate, reduce across processes, combine, step: the
    public :class:`ConflictAware` step, then the optimiser.

    ``clean_only`` is standard training (vanilla λ = 0 or CA-AT γ = 1, where the update is g_c
    whatever g_a is): the attack and the adversarial pass are skipped as pure waste.
    """
    model.train()
    step = ConflictAware(
        model,
        objective=objective,
        precision=precision,
        grad_scaler=scaler,
        params=params,
        combiner=combiner,
        reduce=reduce,
        clean_only=clean_only,
    )
    if param_names is not None:
        step.names = list(param_names)
    for batch in micro_batches:
        step.backward_batch(batch.x, batch.y, init_delta=batch.init_delta)
    stats = step.apply(layer_conflict=layer_conflict and param_names is not None)
    if not stats["finite"]:
        return StepResult(stats=stats, skipped=True)  # never write NaN into weights
    if grad_clip is not None:
        stats["update_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(stats=stats)
