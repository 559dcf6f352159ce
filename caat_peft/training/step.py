"""One optimisation step of adversarial PEFT, written as the method reads (DESIGN.md).

A step may span several micro-batches (gradient accumulation): g_c and g_a are accumulated
*separately* and the combiner runs once per optimiser step, on the averaged global gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.gradients import Combiner, per_tensor_cosines
from caat_peft.objectives import PgdCE
from caat_peft.training.distributed import Reducer
from caat_peft.training.fastpath import autocast_for
from caat_peft.training.optim import LossScaler, unscale_


@dataclass
class MicroBatch:
    x: Tensor
    y: Tensor
    init_delta: Tensor | None = None  # the attack's random start, drawn for the global batch


@dataclass
class StepResult:
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def grads_of(loss: Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False):
    """∇θ loss over the trainable parameters only (zeros for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.float() for g, p in zip(grads, params)]


def write_grads(params: Sequence[nn.Parameter], update: Sequence[Tensor]) -> None:
    for p, g in zip(params, update):
        p.grad = g.to(p.dtype)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def micro_batch_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    objective: PgdCE,
    batch: MicroBatch,
    *,
    clean_only: bool,
    precision: str = "fp32",
    loss_scale: float = 1.0,
) -> tuple[list[Tensor], list[Tensor] | None, Tensor]:
    """(g_c, g_a, logged scalars) of one micro-batch; g_a is None for standard training."""
    x, y = batch.x, batch.y
    with autocast_for(precision, x.device):
        if clean_only:
            loss_clean, logits = objective.clean_loss(model, x, y)
            losses = None
        else:
            x_adv = objective.attack(model, x, y, init_delta=batch.init_delta)  # θ untouched
            losses = objective.losses(model, x, x_adv, y)
            loss_clean, logits = losses.clean, losses.logits_clean
    # Trainable parameters only; retain the graph when L_adv shares the clean forward.
    g_c = grads_of(loss_clean * loss_scale, params, retain_graph=losses is not None)
    if losses is None:
        scalars = torch.stack([loss_clean.detach().float(), _accuracy(logits, y)])
        return g_c, None, scalars
    g_a = grads_of(losses.adv * loss_scale, params)
    scalars = torch.stack(
        [
            loss_clean.detach().float(),
            losses.adv.detach().float(),
            _accuracy(losses.logits_clean, y),
            _accuracy(losses.logits_adv, y),
        ]
    )
    return g_c, g_a, scalars


def training_step(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    objective: PgdCE,
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
    """Attack, two gradients over θ, accumulate, reduce across processes, combine, step.

    ``clean_only`` is standard training (vanilla λ = 0 or CA-AT γ = 1, where the update is g_c
    whatever g_a is): the attack and the adversarial pass are skipped as pure waste.
    """
    model.train()
    loss_scale = scaler.scale if scaler is not None else 1.0
    g_c: list[Tensor] = []
    g_a: list[Tensor] = []
    scalars = None
    for batch in micro_batches:
        mb_c, mb_a, mb_scalars = micro_batch_gradients(
            model,
            params,
            objective,
            batch,
            clean_only=clean_only,
            precision=precision,
            loss_scale=loss_scale,
        )
        if scalars is None:
            g_c, g_a, scalars = mb_c, mb_a or [], mb_scalars
        else:
            torch._foreach_add_(g_c, mb_c)
            if mb_a is not None:
                torch._foreach_add_(g_a, mb_a)
            scalars = scalars + mb_scalars
    # Mean over micro-batches and undo the loss scale, before anything looks at the gradients.
    unscale_(g_c, loss_scale * len(micro_batches))
    unscale_(g_a, loss_scale * len(micro_batches))
    scalars = scalars / len(micro_batches)

    g_c, g_a, scalars = reduce(g_c, g_a, scalars)  # across processes
    if clean_only:
        norm_clean = torch.stack(torch._foreach_norm(g_c)).norm()
        values = torch.cat([scalars, norm_clean.reshape(1)]).tolist()
        stats: dict[str, Any] = dict(zip(("loss_clean", "acc_clean", "norm_clean"), values))
        stats["finite"] = all(map(_isfinite, values))
        update = g_c
    else:
        update, stats = combiner(g_a, g_c)  # vanilla λ or CA-AT γ
        # its norm shows a stalled run (L_adv ≈ 0 shrinks CA-AT's update with ‖g_a‖)
        stats["norm_update"] = float(torch.stack(torch._foreach_norm(update)).norm())
        keys = ("loss_clean", "loss_adv", "acc_clean", "acc_adv")
        stats.update(zip(keys, scalars.tolist()))
        stats["finite"] = stats["finite"] and _isfinite(stats["loss_adv"])
        if layer_conflict and param_names is not None:
            stats["layers"] = per_tensor_cosine(g_a, g_c, param_names)
    if scaler is not None:
        scaler.update(found_nonfinite=not stats["finite"])
        stats["loss_scale"] = loss_scale
    if not stats["finite"]:
        return StepResult(stats=stats, skipped=True)  # never write NaN into weights

    write_grads(params, update)
    if grad_clip is not None:
        stats["update_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(stats=stats)


def _isfinite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def per_tensor_cosine(
    g_a: Sequence[Tensor], g_c: Sequence[Tensor], names: Sequence[str]
) -> dict[str, float]:
    """cos(g_a, g_c) of each parameter tensor: where in the network the conflict sits."""
    return dict(zip(names, per_tensor_cosines(g_a, g_c)))
