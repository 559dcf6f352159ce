"""Training-time attacks in pixel space [0, 1], with gradients taken w.r.t. the input only.

The model is expected to take pixels and normalise inside (see ``caat_peft.models``), so ε and the
step size are pixel-space quantities. ``torch.autograd.grad`` is asked for the input gradient
only: autograd then skips every weight-gradient kernel, and no parameter's ``.grad`` is touched.
The model's train / eval mode is restored module by module afterwards.

* :func:`pgd`: Madry et al. (2018), L∞ or L2, uniform random start, targeted or not.
* :func:`fgsm`: one step from a uniform random start with α = 1.25·ε, the "fast adversarial
  training" attack of Wong et al. (2020) (plain FGSM without the random start).
* :func:`trades_attack`: the inner maximisation of TRADES (Zhang et al., 2019): PGD on
  KL(f(x) ‖ f(x_adv)) from x + 0.001·N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

NORMS = ("linf", "l2")
FGSM_STEP = 1.25  # Wong et al. (2020): α = 1.25·ε from a uniform random start
TRADES_START_STD = 0.001  # Zhang et al. (2019): x_adv starts at x + 0.001·N(0, I)

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


def _check(eps: float, alpha: float, steps: int, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError("eps, alpha and steps must be >= 0")


def _sum_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Summed, not averaged: each sample's input gradient then does not depend on the batch size."""
    return F.cross_entropy(logits, target, reduction="sum")


def _ascend(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    delta: Tensor,
    *,
    loss_fn: LossFn,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    sign: float,
) -> Tensor:
    """The shared PGD loop: ``steps`` normalised-gradient steps on ``delta``, each projected back
    into the ε-ball and the pixel range. ``x`` is detached; ``delta`` is a feasible start."""
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), target)
            (grad,) = torch.autograd.grad(loss, delta)  # the input gradient only
            with torch.no_grad():
                step = grad.sign() if norm == "linf" else grad / (_per_sample_l2(grad) + _TINY)
                delta = _project(delta + sign * alpha * step, eps, norm)
                delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def _feasible(x: Tensor, delta: Tensor, eps: float, norm: str) -> Tensor:
    """``delta`` projected into the ε-ball, then cut so that ``x + delta`` stays in [0, 1]."""
    delta = _project(delta.to(x), eps, norm)
    return (x + delta).clamp(0, 1) - x


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
    _check(eps, alpha, steps, norm)
    x = x.detach()
    if eps == 0:
        return x.clone()
    if init_delta is not None:
        delta = init_delta
    elif random_start:
        delta = sample_random_start(
            x.shape, eps, norm, generator=generator, device=x.device, dtype=x.dtype
        )
    else:
        delta = torch.zeros_like(x)
    delta = _feasible(x, delta, eps, norm)
    with eval_mode(model, eval_mode_during_attack):
        return _ascend(
            model,
            x,
            y,
            delta,
            loss_fn=loss_fn or _sum_cross_entropy,
            eps=eps,
            alpha=alpha,
            steps=steps,
            norm=norm,
            sign=-1.0 if targeted else 1.0,
        )


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    targeted: bool = False,
    eval_mode_during_attack: bool = True,
    generator: torch.Generator | None = None,
    init_delta: Tensor | None = None,
) -> Tensor:
    """FGSM from a random start: "fast is better than free" adversarial training (Wong et al.,
    2020), one gradient step of α = 1.25·ε (``alpha=None``) from a uniform point of the ε-ball.

    The random start is what keeps single-step training from catastrophic overfitting; without
    it (``random_start=False``) this is Goodfellow et al.'s FGSM, the step being clipped to ε.
    Under ``norm="l2"`` the step follows ∇/‖∇‖ (the fast gradient method). Arguments as
    :func:`pgd`.
    """
    step = FGSM_STEP * eps if alpha is None else alpha
    return pgd(
        model,
        x,
        y,
        eps=eps,
        alpha=step,
        steps=1,
        norm=norm,
        random_start=random_start,
        loss_fn=loss_fn,
        targeted=targeted,
        eval_mode_during_attack=eval_mode_during_attack,
        generator=generator,
        init_delta=init_delta,
    )


def at_least_fp32(t: Tensor) -> Tensor:
    """Logits from a bf16 / fp16 autocast region, widened for the loss; fp32 / fp64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Per-sample KL(p ‖ q) = Σ_k p_k (log p_k − log q_k) between the softmax distributions of
    two logit tensors, computed from log-softmax (no log of a rounded-to-zero probability)."""
    log_p = F.log_softmax(at_least_fp32(logits_p), dim=1)
    log_q = F.log_softmax(at_least_fp32(logits_q), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def standard_normal_from_start(init_delta: Tensor, eps: float, norm: str) -> Tensor:
    """Turn a start drawn by :func:`sample_random_start` into the N(0, I) noise TRADES starts from.

    The trainer draws one random start per step for the global batch (so that the run does not
    depend on the process count) with the PGD distribution. Under L∞ it is uniform on [−ε, ε]
    per pixel, and √2·erfinv(δ/ε) is then exactly standard normal. Under L2 it is a uniformly
    random direction: scaled to norm √d it is a Gaussian vector up to its radius (whose relative
    spread, 1/√(2d), is below 0.2 % for a 224-px image).
    """
    if eps <= 0:
        return torch.zeros_like(init_delta)
    if norm == "linf":
        bound = 1.0 - torch.finfo(init_delta.dtype).eps
        return math.sqrt(2.0) * torch.erfinv((init_delta / eps).clamp(-bound, bound))
    d = init_delta[0].numel()
    return init_delta / (_per_sample_l2(init_delta) + _TINY) * math.sqrt(d)


def trades_attack(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    eval_mode_during_attack: bool = True,
    generator: torch.Generator | None = None,
    init_noise: Tensor | None = None,
) -> Tensor:
    """The inner maximisation of TRADES (Zhang et al., 2019): x_adv maximises
    KL(f(x) ‖ f(x_adv)) within the ε-ball, by the same projected steps as :func:`pgd`.

    It needs no label, so it has no targeted variant. It starts at x + 0.001·ξ, ξ ~ N(0, I),
    always: at x_adv = x the KL is at its minimum, its gradient is zero up to rounding, and the
    sign of rounding noise is no ascent direction. The clean distribution f(x) is computed once,
    without gradient, in the same (eval) mode as the attack.

    Args:
        init_noise: the standard-normal ξ itself (else drawn with ``generator``); see
            :func:`standard_normal_from_start` for the trainer's global-batch start.
        Others: as :func:`pgd`.

    Returns:
        Detached adversarial images in [0, 1], within ε of ``x``.
    """
    _check(eps, alpha, steps, norm)
    x = x.detach()
    if eps == 0:
        return x.clone()
    if init_noise is None:
        init_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    delta = _feasible(x, TRADES_START_STD * init_noise, eps, norm)
    with eval_mode(model, eval_mode_during_attack):
        with torch.no_grad():
            logits_clean = model(x)

        def kl_to_clean(logits_adv: Tensor, _: Tensor | None) -> Tensor:
            return kl_divergence(logits_clean, logits_adv).sum()

        return _ascend(
            model,
            x,
            None,
            delta,
            loss_fn=kl_to_clean,
            eps=eps,
            alpha=alpha,
            steps=steps,
            norm=norm,
            sign=1.0,
        )
