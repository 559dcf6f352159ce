"""Pure math on gradient lists: conflict statistics and the two gradient combiners.

Notation (paper, Sec. 3-4): θ are the trainable parameters, ``g_c = ∇θ L_clean`` the clean
gradient, ``g_a = ∇θ L_adv`` the adversarial gradient, ``φ = cos(g_a, g_c)``.

* Vanilla AT with trade-off λ ∈ [0, 1]:  ``g = (1 − λ)·g_c + λ·g_a``.
* CA-AT with threshold γ ∈ (−1, 1]:
  ``g = g_c`` if ``φ ≥ γ``, else ``g = g_a + k·g_c`` with
  ``k = ‖g_a‖ (γ·√(1−φ²) − φ·√(1−γ²)) / (‖g_c‖ · √(1−γ²))``,
  which puts ``g`` on the cone of half-angle arccos γ around ``g_c``: ``cos(g, g_c) = γ`` and
  ``‖g‖ = ‖g_a‖·√(1−φ²)/√(1−γ²)``. Its effective adversarial weight is ``λ* = 1/(1+k)``.
* Conflict metric ``μ = ‖g_c‖·‖g_a‖·(1 − cos(g_c, g_a))``.

Gradients are lists of tensors, one per trainable parameter. Reductions run per tensor (no
flattened copy of the whole gradient); all scalar decisions are made on one small float64 vector
that is read back to the host once per call, so the statistics come back as Python numbers.

Degenerate inputs (defined here, tested in ``tests/test_gradients.py``):

* ``‖g_c‖ = 0, ‖g_a‖ > 0``: there is no clean direction to build a cone around, and a step along
  ``g_a`` leaves the clean loss unchanged to first order: the update is ``g_a`` (λ* = 1).
* ``‖g_a‖ = 0``: the adversarial loss is stationary; the update is ``g_c`` (λ* = 0).
* both zero: the update is zero.
* ``φ = −1`` exactly: the formula gives the cone's apex, a zero update.
* any non-finite value in either gradient: the update is all zeros and ``stats["finite"]`` is
  False; the trainer then skips the optimiser step and counts it.
* ``γ = 1``: the update is ``g_c`` (standard training); nothing divides by √(1−γ²) = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

GradList = Sequence[Tensor]
Stats = dict[str, Any]
Combiner = Callable[[GradList, GradList], tuple[list[Tensor], Stats]]


def _check_pair(g_a: GradList, g_c: GradList) -> None:
    if len(g_a) == 0:
        raise ValueError("empty gradient list: there are no trainable parameters")
    if len(g_a) != len(g_c):
        raise ValueError(f"gradient lists differ in length: {len(g_a)} vs {len(g_c)}")
    for i, (a, c) in enumerate(zip(g_a, g_c)):
        if a.shape != c.shape:
            raise ValueError(f"gradient {i}: shapes differ, {tuple(a.shape)} vs {tuple(c.shape)}")


def _per_tensor_dots_and_norms(g_a: GradList, g_c: GradList) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor ⟨g_a, g_c⟩, ‖g_a‖, ‖g_c‖ as float64 vectors (one entry per tensor)."""
    dots = torch.stack([torch.dot(a.reshape(-1), c.reshape(-1)) for a, c in zip(g_a, g_c)])
    norm_a = torch.stack(torch._foreach_norm(list(g_a)))
    norm_c = torch.stack(torch._foreach_norm(list(g_c)))
    return dots.double(), norm_a.double(), norm_c.double()


def _global(dots: Tensor, norm_a: Tensor, norm_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce per-tensor dots and norms to the whole-gradient dot and norms (0-dim tensors)."""
    return dots.sum(), norm_a.square().sum().sqrt(), norm_c.square().sum().sqrt()


def _cosine(dot: Tensor, norm_a: Tensor, norm_c: Tensor) -> Tensor:
    """cos(g_a, g_c), defined as 0 when either vector is zero, clamped to [−1, 1]."""
    both = (norm_a > 0) & (norm_c > 0)
    denom = torch.where(both, norm_a * norm_c, torch.ones_like(norm_a))
    return torch.where(both, dot / denom, torch.zeros_like(dot)).clamp(-1.0, 1.0)


def _mu(cos: Tensor, norm_a: Tensor, norm_c: Tensor) -> Tensor:
    return norm_c * norm_a * (1.0 - cos)


def _caat_coefficients(
    cos: Tensor, norm_a: Tensor, norm_c: Tensor, gamma: float
) -> dict[str, Tensor]:
    """Coefficients (a, c) of ``update = a·g_a + c·g_c`` by the CA-AT rule, vectorised.

    Works elementwise, so the same code serves one global decision (0-dim inputs) and one
    decision per parameter tensor (1-dim inputs).
    """
    has_clean = norm_c > 0
    has_adv = norm_a > 0
    if gamma >= 1.0:  # the cone is the ray of g_c: standard training
        projected = torch.zeros_like(cos, dtype=torch.bool)
        k = torch.zeros_like(cos)
    else:
        sin_gamma = (1.0 - gamma * gamma) ** 0.5
        projected = has_clean & has_adv & (cos < gamma)
        sin_phi = (1.0 - cos.square()).clamp_min(0.0).sqrt()
        safe_norm_c = torch.where(has_clean, norm_c, torch.ones_like(norm_c))
        k_all = norm_a * (gamma * sin_phi - cos * sin_gamma) / (safe_norm_c * sin_gamma)
        k = torch.where(projected, k_all, torch.zeros_like(k_all))
    only_adv = ~has_clean & has_adv  # no clean direction: follow g_a
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    a = torch.where(projected | only_adv, one, zero)
    c = torch.where(projected, k, torch.where(has_clean, one, zero))
    lambda_eff = torch.where(projected, 1.0 / (1.0 + k), torch.where(only_adv, one, zero))
    return {"a": a, "c": c, "k": k, "projected": projected, "lambda_eff": lambda_eff}


def _linear_combination(
    g_a: GradList, g_c: GradList, a: float | list[float], c: float | list[float]
) -> list[Tensor]:
    """``a·g_a + c·g_c`` with foreach kernels; ``a``/``c`` are scalars or one per tensor."""
    out = torch._foreach_mul(list(g_c), c)
    torch._foreach_add_(out, torch._foreach_mul(list(g_a), a))
    return out


def _zeros_like(grads: GradList) -> list[Tensor]:
    return [torch.zeros_like(g) for g in grads]


def conflict_stats(g_clean: GradList, g_adv: GradList) -> Stats:
    """Conflict statistics of a gradient pair, as Python numbers.

    Returns ``cos`` (φ), ``mu`` (μ), ``norm_clean``, ``norm_adv``, ``dot`` and ``finite``.
    """
    _check_pair(g_adv, g_clean)
    dots, norm_a, norm_c = _per_tensor_dots_and_norms(g_adv, g_clean)
    dot, na, nc = _global(dots, norm_a, norm_c)
    cos = _cosine(dot, na, nc)
    finite = torch.isfinite(dot) & torch.isfinite(na) & torch.isfinite(nc)
    values = torch.stack([cos, _mu(cos, na, nc), nc, na, dot, finite.double()]).tolist()
    keys = ("cos", "mu", "norm_clean", "norm_adv", "dot")
    stats: Stats = dict(zip(keys, values[:5]))
    stats["finite"] = bool(values[5])
    return stats


def combine_vanilla(g_adv: GradList, g_clean: GradList, lam: float) -> tuple[list[Tensor], Stats]:
    """Vanilla AT: ``(1 − λ)·g_c + λ·g_a``. λ = 0 is standard training, λ = 1 Madry's AT."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    stats = conflict_stats(g_clean, g_adv)
    stats.update(projected=False, lambda_eff=float(lam))
    if not stats["finite"]:
        return _zeros_like(g_clean), stats
    if lam == 0.0:
        update = [g.clone() for g in g_clean]
    elif lam == 1.0:
        update = [g.clone() for g in g_adv]
    else:
        update = _linear_combination(g_adv, g_clean, lam, 1.0 - lam)
    return update, stats


def combine_caat(
    g_adv: GradList,
    g_clean: GradList,
    gamma: float,
    *,
    granularity: str = "global",
    normalize: bool = False,
) -> tuple[list[Tensor], Stats]:
    """Conflict-aware combination of the adversarial and clean gradients (CA-AT, Eq. 3).

    Args:
        g_adv, g_clean: one gradient tensor per trainable parameter, in the same order.
        gamma: cosine threshold γ ∈ (−1, 1]; γ = 1 is standard training.
        granularity: ``"global"`` decides once on the whole gradient (the paper);
            ``"tensor"`` applies the rule to each parameter tensor separately.
        normalize: unit-normalise both gradients (per the granularity) before combining.

    Returns:
        The update (new tensors) and stats: ``cos``, ``mu``, ``norm_clean``, ``norm_adv``
        (all of the whole gradient), ``projected`` (any projection happened), ``lambda_eff``
        (λ* = 1/(1+k), 0 without projection; mean over tensors for ``"tensor"``),
        ``projected_fraction`` and ``finite``.
    """
    if not -1.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (-1, 1], got {gamma}")
    if granularity not in ("global", "tensor"):
        raise ValueError(f"granularity must be 'global' or 'tensor', got {granularity!r}")
    _check_pair(g_adv, g_clean)

    dots, norm_a, norm_c = _per_tensor_dots_and_norms(g_adv, g_clean)
    dot, na, nc = _global(dots, norm_a, norm_c)
    cos = _cosine(dot, na, nc)
    finite = torch.isfinite(dot) & torch.isfinite(na) & torch.isfinite(nc)

    if granularity == "global":
        rule_dot, rule_na, rule_nc = dot, na, nc
    else:
        rule_dot, rule_na, rule_nc = dots, norm_a, norm_c
    rule_cos = _cosine(rule_dot, rule_na, rule_nc)
    if normalize:
        # The rule then sees unit vectors; the 1/‖·‖ factors are folded into (a, c) below.
        unit = lambda n: torch.where(n > 0, torch.ones_like(n), torch.zeros_like(n))  # noqa: E731
        coef = _caat_coefficients(rule_cos, unit(rule_na), unit(rule_nc), gamma)
        inv = lambda n: torch.where(n > 0, 1.0 / n.clamp_min(1e-300), torch.zeros_like(n))  # noqa: E731
        a, c = coef["a"] * inv(rule_na), coef["c"] * inv(rule_nc)
    else:
        coef = _caat_coefficients(rule_cos, rule_na, rule_nc, gamma)
        a, c = coef["a"], coef["c"]

    # One host read-back for every decision and statistic.
    head = torch.stack(
        [
            cos,
            _mu(cos, na, nc),
            nc,
            na,
            finite.double(),
            coef["projected"].double().max(),
            coef["projected"].double().mean(),
            coef["lambda_eff"].mean(),
        ]
    )
    values = torch.cat([head, a.reshape(-1), c.reshape(-1)]).tolist()
    n = a.numel()
    a_host, c_host = values[8 : 8 + n], values[8 + n :]
    stats: Stats = {
        "cos": values[0],
        "mu": values[1],
        "norm_clean": values[2],
        "norm_adv": values[3],
        "finite": bool(values[4]),
        "projected": bool(values[5]),
        "projected_fraction": values[6],
        "lambda_eff": values[7],
    }
    if not stats["finite"]:
        stats.update(projected=False, projected_fraction=0.0, lambda_eff=0.0)
        return _zeros_like(g_clean), stats
    if granularity == "global":
        (a_scalar,), (c_scalar,) = a_host, c_host
        if a_scalar == 0.0 and c_scalar == 1.0:  # φ ≥ γ (or γ = 1): exactly g_c
            return [g.clone() for g in g_clean], stats
        return _linear_combination(g_adv, g_clean, a_scalar, c_scalar), stats
    return _linear_combination(g_adv, g_clean, a_host, c_host), stats


def make_combiner(
    kind: str,
    *,
    lam: float = 0.5,
    gamma: float = 0.8,
    granularity: str = "global",
    normalize: bool = False,
) -> Combiner:
    """Return ``combine(g_adv, g_clean) -> (update, stats)`` for a combiner kind."""
    if kind == "vanilla":
        return lambda g_adv, g_clean: combine_vanilla(g_adv, g_clean, lam)
    if kind == "caat":
        return lambda g_adv, g_clean: combine_caat(
            g_adv, g_clean, gamma, granularity=granularity, normalize=normalize
        )
    raise ValueError(f"unknown combiner kind {kind!r} (use 'vanilla' or 'caat')")
