"""Gradient reduction across processes, done by hand.

CA-AT is non-linear in (g_c, g_a), so the *global* gradients must be formed before combining:
every rank averages both gradients (and the logged scalars) with all-reduces over flat buffers,
then runs the same combiner on the same numbers. ``caat-peft train`` never wraps the model in
DDP (the attack's input-only gradients and ``torch.autograd.grad`` would bypass or confuse its
reducer), and ``ConflictAware`` switches a DDP-wrapped model's own synchronisation off. The
collectives go through accelerate when there is an Accelerator, else through the initialised
``torch.distributed`` group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import Tensor, nn

Reducer = Callable[[list[Tensor], list[Tensor], Tensor], tuple[list[Tensor], list[Tensor], Tensor]]

# PEFT-sized θ fit one buffer; full fine-tuning of a ViT-L would need GBs more, so reduce in
# buckets of at most this many elements (64 MiB in fp32).
BUCKET_ELEMENTS = 1 << 24


def _buckets(tensors: list[Tensor], limit: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if groups[-1] and size + t.numel() > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.numel()
    return groups


def all_reduce_mean(
    tensors: list[Tensor], accelerator: Accelerator | None, limit: int = BUCKET_ELEMENTS
) -> list[Tensor]:
    """Average ``tensors`` over processes, one collective per bucket of flat tensors (through
    ``accelerator``, or the initialised ``torch.distributed`` group when it is None)."""
    out: list[Tensor] = list(tensors)
    for bucket in _buckets(tensors, limit):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        flat = _mean_over_processes(flat, accelerator)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def _mean_over_processes(flat: Tensor, accelerator: Accelerator | None) -> Tensor:
    if accelerator is not None:
        return accelerator.reduce(flat, reduction="mean")
    import torch.distributed as dist

    dist.all_reduce(flat)
    return flat / dist.get_world_size()


def _identity(g_c: list[Tensor], g_a: list[Tensor], scalars: Tensor):
    return g_c, g_a, scalars


def _reducer(accelerator: Accelerator | None) -> Reducer:
    def reduce(g_c: list[Tensor], g_a: list[Tensor], scalars: Tensor):
        dtype = g_c[0].dtype
        reduced = all_reduce_mean([*g_c, *g_a, scalars.to(dtype)], accelerator)
        n_c, n_a = len(g_c), len(g_a)
        return reduced[:n_c], reduced[n_c : n_c + n_a], reduced[-1]

    return reduce


def make_reducer(accelerator: Accelerator) -> Reducer:
    """``reduce(g_c, g_a, scalars) -> (g_c, g_a, scalars)``, all averaged over processes."""
    return _identity if accelerator.num_processes == 1 else _reducer(accelerator)


def process_group_reducer() -> Reducer:
    """The same over the initialised ``torch.distributed`` group (a plain ``torchrun`` loop
    without accelerate); the identity in a single process."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return _reducer(None) if several else _identity


@torch.no_grad()
def broadcast_parameters(model: nn.Module, accelerator: Accelerator) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
