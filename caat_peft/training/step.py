"""One optimisation step of adversarial PEFT, written as the method reads (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.gradients import Combiner
from caat_peft.objectives import PgdCE

Reducer = Callable[[list[Tensor], list[Tensor], Tensor], tuple[list[Tensor], list[Tensor], Tensor]]


@dataclass
class StepResult:
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def grads_of(loss: Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False):
    """∇θ loss over the trainable parameters only (zeros for parameters the loss does not use)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def write_grads(params: Sequence[nn.Parameter], update: Sequence[Tensor]) -> None:
    for p, g in zip(params, update):
        p.grad = g.to(p.dtype)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def training_step(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    objective: PgdCE,
    combiner: Combiner,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    reduce: Reducer,
    grad_clip: float | None = None,
    clean_only: bool = False,
    init_delta: Tensor | None = None,
) -> StepResult:
    """Attack, two gradients over θ, reduce across processes, combine, step.

    ``clean_only`` is standard training (vanilla λ = 0 or CA-AT γ = 1, where the update is g_c
    whatever g_a is): the attack and the adversarial pass are skipped as pure waste.
    """
    model.train()
    if clean_only:
        loss_clean, logits = objective.clean_loss(model, x, y)
        g_c = grads_of(loss_clean, params)
        logged = torch.stack([loss_clean.detach(), _accuracy(logits, y)])
        g_c, _, logged = reduce(g_c, [], logged)
        update, stats = g_c, {"loss_clean": 0.0, "acc_clean": 0.0}
        stats["loss_clean"], stats["acc_clean"] = logged.tolist()
        grad_norm = torch.stack(torch._foreach_norm(g_c)).norm()
        stats["norm_clean"] = float(grad_norm)
        if not (torch.isfinite(grad_norm) and torch.isfinite(logged[0])):
            return StepResult(stats=stats, skipped=True)
    else:
        x_adv = objective.attack(model, x, y, init_delta=init_delta)  # params untouched
        losses = objective.losses(model, x, x_adv, y)
        g_c = grads_of(losses.clean, params, retain_graph=True)  # trainable params only
        g_a = grads_of(losses.adv, params)
        logged = torch.stack(
            [
                losses.clean.detach(),
                losses.adv.detach(),
                _accuracy(losses.logits_clean, y),
                _accuracy(losses.logits_adv, y),
            ]
        )
        g_c, g_a, logged = reduce(g_c, g_a, logged)  # across processes
        update, stats = combiner(g_a, g_c)  # vanilla λ or CA-AT γ
        keys = ("loss_clean", "loss_adv", "acc_clean", "acc_adv")
        stats.update(zip(keys, logged.tolist()))
        if not stats["finite"]:
            return StepResult(stats=stats, skipped=True)  # never write NaN into weights

    write_grads(params, update)
    if grad_clip is not None:
        stats["update_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(stats=stats)
