"""Gradient reduction across processes, done by hand.

CA-AT is non-linear in (g_c, g_a), so the *global* gradients must be formed before combining:
every rank reduces both gradients (and the logged scalars) in one collective over a flat buffer,
then runs the same combiner on the same numbers. The model is never wrapped in DDP: the attack's
input-only gradients and ``torch.autograd.grad`` would bypass or confuse its reducer.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn


def _flatten(groups: list[list[Tensor]]) -> Tensor:
    return torch.cat([t.reshape(-1) for group in groups for t in group])


def _unflatten(flat: Tensor, like: list[list[Tensor]]) -> list[list[Tensor]]:
    out, offset = [], 0
    for group in like:
        restored = []
        for t in group:
            restored.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        out.append(restored)
    return out


def make_reducer(accelerator: Accelerator):
    """``reduce(g_c, g_a, scalars) -> (g_c, g_a, scalars)``, all averaged over processes."""
    if accelerator.num_processes == 1:
        return lambda g_c, g_a, scalars: (g_c, g_a, scalars)

    def reduce(g_c: list[Tensor], g_a: list[Tensor], scalars: Tensor):
        groups = [g_c, g_a, [scalars.to(g_c[0].dtype)]]
        flat = accelerator.reduce(_flatten(groups), reduction="mean")
        g_c, g_a, (scalars_out,) = _unflatten(flat, groups)
        return g_c, g_a, scalars_out

    return reduce


@torch.no_grad()
def broadcast_parameters(model: nn.Module, accelerator: Accelerator) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
