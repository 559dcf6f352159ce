"""Training-time attacks in pixel space [0, 1], with gradients taken w.r.t. the input only.

The model is expected to take pixels and normalise inside (see ``caat_peft.models``), so ε and the
step size are pixel-space quantities. ``torch.autograd.grad`` is asked for the input gradient
only: autograd then skips every weight-gradient kernel, and no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

_TINY = 1e-12  # guards per-sample L2 normalisation of an all-zero gradient


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore each module's own mode afterwards."""
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _per_sample_l2(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def sample_random_start(
    shape: tuple[int, ...],
    eps: float,
    norm: str,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A random perturbation in the ε-ball: uniform in the cube (L∞); for L2 a uniformly random
    direction scaled by a uniform radius in [0, ε]."""
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return (2 * noise - 1) * eps
    direction = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    radius = torch.rand((shape[0],), generator=generator, device=device, dtype=dtype)
    radius = radius.view(-1, *([1] * (len(shape) - 1)))
    return direction / (_per_sample_l2(direction) + _TINY) * radius * eps


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / (_per_sample_l2(delta) + _TINY)).clamp(max=1.0)
    return delta * scale


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    eval_mode_during_attack: bool = True,
    generator: torch.Generator | None = None,
    init_delta: Tensor | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al., 2018) in pixel space.

    Args:
        model: maps pixels in [0, 1] to logits.
        x, y: clean images in [0, 1] and their labels (or target labels when ``targeted``).
        eps: radius of the threat model (L∞ or L2 ball around ``x``).
        alpha: step size; L∞ steps along sign(∇), L2 along ∇/‖∇‖ per sample.
        steps: number of gradient steps; 0 returns ``x`` (or the random start).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniform point of the ball (L∞) or a random point (L2).
        loss_fn: ``loss_fn(logits, y)`` to maximise; defaults to summed cross-entropy, so each
            sample's gradient does not depend on the batch size.
        targeted: minimise the loss towards ``y`` instead of maximising it.
        eval_mode_during_attack: run the model in eval mode (restored afterwards).
        generator: RNG for the random start.
        init_delta: a given starting perturbation (projected into the ball), used instead of
            drawing one; the trainer slices it from a start drawn for the global batch so that
            the run does not depend on the number of processes.

    Returns:
        Detached adversarial images in [0, 1], within ε of ``x``.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError("eps, alpha and steps must be >= 0")
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    x = x.detach()
    if eps == 0:
        return x.clone()
    if init_delta is not None:
        delta = _project(init_delta.to(x), eps, norm)
    elif random_start:
        delta = sample_random_start(
            x.shape, eps, norm, generator=generator, device=x.device, dtype=x.dtype
        )
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    sign = -1.0 if targeted else 1.0
    with eval_mode(model, eval_mode_during_attack), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = grad.sign() if norm == "linf" else grad / (_per_sample_l2(grad) + _TINY)
                delta = _project(delta + sign * alpha * step, eps, norm)
                delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()
