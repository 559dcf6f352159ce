"""Pure math on gradient lists: conflict statistics and the two gradient combiners.

Notation (paper, Sec. 3-4): θ are the trainable parameters, ``g_c = ∇θ L_clean`` the clean
gradient, ``g_a = ∇θ L_adv`` the adversarial gradient, ``φ = cos(g_a, g_c)``.

* Vanilla AT with trade-off λ ∈ [0, 1]:  ``g = (1 − λ)·g_c + λ·g_a``.
* CA-AT with threshold γ ∈ (−1, 1]:
  ``g = g_c`` if ``φ ≥ γ``, else ``g = g_a + k·g_c`` with
  ``k = ‖g_a‖ (γ·√(1−φ²) − φ·√(1−γ²)) / (‖g_c‖ · √(1−γ²))``,
  which puts ``g`` on the cone of half-angle arccos γ around ``g_c``: ``cos(g, g_c) = γ`` and
  ``‖g‖ = ‖g_a‖·√(1−φ²)/√(1−γ²)``.
* Two weights are logged, named for what they are. ``lambda_star`` is the paper's λ* (Sec. 4):
  the update ``g_a + k·g_c`` read as the gradient of ``λ*·L_c + L_a``, so ``λ* = k``, the weight
  on the *clean* loss (it grows as φ falls); vanilla's ``(1−λ)·g_c + λ·g_a`` gives
  ``λ* = (1−λ)/λ``. It is undefined (``None``) where the update is g_c alone. ``adv_share`` is
  the adversarial gradient's share ``1/(1+k)`` (vanilla: λ), comparable to vanilla's λ.
* Conflict metric ``μ = ‖g_c‖·‖g_a‖·(1 − cos(g_c, g_a))``.

Gradients are lists of tensors, one per trainable parameter. Dots and norms are accumulated in
float64, tensor by tensor (no flattened copy of the whole gradient): near φ = ±1 the factor
√(1−φ²) turns the last bit of a float32 cosine into a visible error in the update (a one-element
tensor gave φ = −0.99999994 instead of −1). All scalar decisions are made on one small float64
vector that is read back to the host once per call, so the statistics come back as Python
numbers.

``normalize=True`` is the authors' order: both *whole* gradients are scaled to unit norm first,
then the rule runs (on the whole gradient, or per tensor with ``granularity="tensor"``); the same
normalisation applies to vanilla's average. Vanilla's average is linear, so it is the same per
tensor as on the whole gradient: ``granularity`` does not change it.

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

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


# Longest slice of one tensor cast to float64 at a time: bounds the extra memory of a full
# fine-tuning gradient to 2 × 8 MiB whatever its largest tensor.
_CHUNK = 1 << 20
# Where float32 products are not good enough. Near φ = ±1, √(1−φ²) multiplies the error of φ by
# |φ|/√(1−φ²) (2.1 at |φ| = 0.9, 700 at 1 − 1e-6); near the threshold the error can flip the
# CA-AT decision. Entries with |φ| above NEAR_PARALLEL or within DECISION_MARGIN of γ are
# recomputed with float64 accumulation; float32 dots of n values are off by about 1e-7·log n.
NEAR_PARALLEL = 0.9
DECISION_MARGIN = 1e-5
# Squared norms below this may have underflowed in float32 (elements below ~1e-19 square to 0).
FLOAT32_TINY = 1e-30


class _Products(NamedTuple):
    """⟨g_a, g_c⟩, ‖g_a‖², ‖g_c‖² in float64: one entry per tensor, or 0-dim for the whole
    gradient (:meth:`total`)."""

    dot: Tensor
    sq_a: Tensor
    sq_c: Tensor
    scalar: Tensor  # True where the entry is of one-element tensors: φ is then the sign of the dot

    def total(self) -> _Products:
        whole_scalar = self.scalar.all() & (self.scalar.numel() == 1)
        return _Products(self.dot.sum(), self.sq_a.sum(), self.sq_c.sum(), whole_scalar)

    @property
    def norm_a(self) -> Tensor:
        return self.sq_a.sqrt()

    @property
    def norm_c(self) -> Tensor:
        return self.sq_c.sqrt()

    def cos(self) -> Tensor:
        """cos(g_a, g_c), 0 when either vector is zero, clamped to [−1, 1]. The denominator is
        √(‖g_a‖²·‖g_c‖²), not ‖g_a‖·‖g_c‖: for exactly parallel inputs (one-element tensors,
        power-of-two multiples) √(x²) is exact in IEEE arithmetic, so φ comes out as ±1."""
        both = (self.sq_a > 0) & (self.sq_c > 0)
        denom = torch.where(both, (self.sq_a * self.sq_c).sqrt(), torch.ones_like(self.sq_a))
        cos = torch.where(both, self.dot / denom, torch.zeros_like(self.dot)).clamp(-1.0, 1.0)
        # Two non-zero numbers are parallel: exactly ±1 also for float64 inputs, whose products
        # round (a float32 product is exact in float64).
        return torch.where(self.scalar & both, torch.sign(self.dot), cos)


def _dot_and_squares(a: Tensor, c: Tensor) -> Tensor:
    """(⟨a, c⟩, ‖a‖², ‖c‖²) of two same-shape tensors, accumulated in float64 slice by slice."""
    a, c = a.reshape(-1), c.reshape(-1)
    parts = []
    for start in range(0, max(a.numel(), 1), _CHUNK):
        a64, c64 = a[start : start + _CHUNK].double(), c[start : start + _CHUNK].double()
        parts.append(torch.stack([torch.dot(a64, c64), torch.dot(a64, a64), torch.dot(c64, c64)]))
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _input_precision_table(g_a: GradList, g_c: GradList) -> Tensor:
    """One row (⟨a, c⟩, ‖a‖², ‖c‖²) per tensor, accumulated in the gradients' own dtype (fast:
    float32 dots run at twice the width of float64 ones) and returned as float64."""
    rows = []
    for a, c in zip(g_a, g_c):
        # fp16 / bf16 gradients in float32 (exact): ‖g‖² of fp16 overflows at ‖g‖ = 256
        a, c = a.reshape(-1), c.reshape(-1)
        if a.dtype in (torch.float16, torch.bfloat16):
            a, c = a.float(), c.float()
        rows.append(torch.stack([torch.dot(a, c), torch.dot(a, a), torch.dot(c, c)]))
    return torch.stack(rows).double()


def _needs_float64(dot: float, sq_a: float, sq_c: float, gamma: float | None) -> bool:
    """Whether φ from these float32-accumulated products is too close to ±1 or to γ, or the
    products under- or overflowed float32 (a zero or infinite norm would pick a degenerate
    rule that float64 does not)."""
    if not all(map(math.isfinite, (dot, sq_a, sq_c))) or min(sq_a, sq_c) < FLOAT32_TINY:
        return True  # recomputed: truly non-finite or zero gradients stay what they are
    cos = dot / math.sqrt(sq_a * sq_c)
    return abs(cos) > NEAR_PARALLEL or (gamma is not None and abs(cos - gamma) < DECISION_MARGIN)


def _product_table(
    g_a: GradList, g_c: GradList, *, per_row: bool = False, gamma: float | None = None
) -> Tensor:
    """One float64 row (⟨a, c⟩, ‖a‖², ‖c‖²) per tensor, exact where it matters.

    The products are taken in the gradients' dtype first; every row whose φ is near ±1 or near
    γ (``_needs_float64``) and every one-element tensor is then recomputed with float64
    accumulation — all rows when ``per_row`` is False (only the whole gradient's φ decides) and
    the whole gradient's φ is near. Decided on the host, after one small read-back.
    """
    table = _input_precision_table(g_a, g_c)
    if all(a.dtype == torch.float64 for a in g_a):
        return table  # already accumulated in float64
    if per_row:
        redo = [_needs_float64(*row, gamma) for row in table.tolist()]
    else:
        redo = [_needs_float64(*table.sum(0).tolist(), gamma)] * len(g_a)
    rows = [i for i, a in enumerate(g_a) if redo[i] or a.numel() == 1]
    if rows:  # one write for all of them: near φ = ±1 that is every row
        exact = torch.stack([_dot_and_squares(g_a[i], g_c[i]) for i in rows])
        table[torch.tensor(rows, device=table.device)] = exact
    return table


def _per_tensor_products(
    g_a: GradList, g_c: GradList, *, per_row: bool = False, gamma: float | None = None
) -> _Products:
    table = _product_table(g_a, g_c, per_row=per_row, gamma=gamma)
    scalar = torch.tensor([a.numel() == 1 for a in g_a], device=table.device)
    return _Products(table[:, 0], table[:, 1], table[:, 2], scalar)


def per_tensor_cosines(g_adv: GradList, g_clean: GradList) -> list[float]:
    """cos(g_a, g_c) of each parameter tensor (0 where either is zero), in float64."""
    _check_pair(g_adv, g_clean)
    return _per_tensor_products(g_adv, g_clean, per_row=True).cos().tolist()


def _mu(cos: Tensor, norm_a: Tensor, norm_c: Tensor) -> Tensor:
    return norm_c * norm_a * (1.0 - cos)


def _caat_coefficients(
    cos: Tensor, norm_a: Tensor, norm_c: Tensor, gamma: float
) -> dict[str, Tensor]:
    """Coefficients (a, c) of ``update = a·g_a + c·g_c`` by the CA-AT rule, vectorised.

    Works elementwise, so the same code serves one global decision (0-dim inputs) and one
    decision per parameter tensor (1-dim inputs). ``lambda_star`` is NaN where the update is
    g_c alone (the paper's λ* is then unbounded).
    """
    has_clean = norm_c > 0
    has_adv = norm_a > 0
    if gamma >= 1.0:  # the cone is the ray of g_c: standard training
        projected = torch.zeros_like(cos, dtype=torch.bool)
        k = torch.zeros_like(cos)
    else:
        sin_gamma = (1.0 - gamma * gamma) ** 0.5
        projected = has_clean & has_adv & (cos < gamma)
        # 1 − φ² as (1 − φ)(1 + φ): no cancellation of the 1 against φ² near φ = ±1
        sin_phi = ((1.0 - cos) * (1.0 + cos)).clamp_min(0.0).sqrt()
        safe_norm_c = torch.where(has_clean, norm_c, torch.ones_like(norm_c))
        k_all = norm_a * (gamma * sin_phi - cos * sin_gamma) / (safe_norm_c * sin_gamma)
        k = torch.where(projected, k_all, torch.zeros_like(k_all))
    only_adv = ~has_clean & has_adv  # no clean direction: follow g_a
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    a = torch.where(projected | only_adv, one, zero)
    c = torch.where(projected, k, torch.where(has_clean, one, zero))
    adv_share = torch.where(projected, 1.0 / (1.0 + k), torch.where(only_adv, one, zero))
    lambda_star = torch.where(projected | only_adv, k, torch.full_like(k, float("nan")))
    return {
        "a": a,
        "c": c,
        "projected": projected,
        "adv_share": adv_share,
        "lambda_star": lambda_star,
    }


def _linear_combination(
    g_a: GradList, g_c: GradList, a: float | list[float], c: float | list[float]
) -> list[Tensor]:
    """``a·g_a + c·g_c`` with foreach kernels; ``a``/``c`` are scalars or one per tensor."""
    out = torch._foreach_mul(list(g_c), c)
    torch._foreach_add_(out, torch._foreach_mul(list(g_a), a))
    return out


def _zeros_like(grads: GradList) -> list[Tensor]:
    return [torch.zeros_like(g) for g in grads]


def _unit_scale(norm: Tensor) -> Tensor:
    """1/‖g‖ of a whole gradient (0 for a zero gradient): ``normalize``'s factor."""
    return torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.zeros_like(norm))


def _mean_or_none(values: Tensor) -> Tensor:
    """Mean of the finite entries (NaN when there are none), as a 0-dim tensor."""
    keep = torch.isfinite(values)
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum()


def _nan_to_none(value: float) -> float | None:
    return None if value != value else value


def conflict_stats(g_clean: GradList, g_adv: GradList) -> Stats:
    """Conflict statistics of a gradient pair, as Python numbers.

    Returns ``cos`` (φ), ``mu`` (μ), ``norm_clean``, ``norm_adv``, ``dot`` and ``finite``.
    """
    _check_pair(g_adv, g_clean)
    whole = _per_tensor_products(g_adv, g_clean).total()
    cos, na, nc = whole.cos(), whole.norm_a, whole.norm_c
    finite = torch.isfinite(whole.dot) & torch.isfinite(na) & torch.isfinite(nc)
    values = torch.stack([cos, _mu(cos, na, nc), nc, na, whole.dot, finite.double()]).tolist()
    keys = ("cos", "mu", "norm_clean", "norm_adv", "dot")
    stats: Stats = dict(zip(keys, values[:5]))
    stats["finite"] = bool(values[5])
    return stats


def combine_vanilla(
    g_adv: GradList,
    g_clean: GradList,
    lam: float,
    *,
    granularity: str = "global",
    normalize: bool = False,
) -> tuple[list[Tensor], Stats]:
    """Vanilla AT: ``(1 − λ)·g_c + λ·g_a``. λ = 0 is standard training, λ = 1 Madry's AT.

    ``normalize`` averages the unit-normalised whole gradients (the authors' ``grad_norm``);
    ``granularity`` is accepted for symmetry with CA-AT and changes nothing (the average is
    linear, so per tensor it is the same update).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    _check_granularity(granularity)
    stats = conflict_stats(g_clean, g_adv)
    stats.update(
        projected=False,
        adv_share=float(lam),
        lambda_star=(1.0 - lam) / lam if lam > 0 else None,
    )
    if not stats["finite"]:
        return _zeros_like(g_clean), stats
    scale_a, scale_c = 1.0, 1.0
    if normalize:  # 1/‖g‖ of the whole gradients (0 for a zero one), from the stats' norms
        scale_a = 1.0 / stats["norm_adv"] if stats["norm_adv"] > 0 else 0.0
        scale_c = 1.0 / stats["norm_clean"] if stats["norm_clean"] > 0 else 0.0
    if lam == 0.0 and not normalize:
        update = [g.clone() for g in g_clean]
    elif lam == 1.0 and not normalize:
        update = [g.clone() for g in g_adv]
    else:
        update = _linear_combination(g_adv, g_clean, lam * scale_a, (1.0 - lam) * scale_c)
    return update, stats


def _check_granularity(granularity: str) -> None:
    if granularity not in ("global", "tensor"):
        raise ValueError(f"granularity must be 'global' or 'tensor', got {granularity!r}")


def _caat_rule(
    per_tensor: _Products, gamma: float, granularity: str, normalize: bool
) -> dict[str, Tensor]:
    """CA-AT's coefficients on the raw gradients: ``update = a·g_a + c·g_c`` (per tensor for
    ``"tensor"``), with ``normalize``'s 1/‖g‖ factors of the whole gradients folded in."""
    whole = per_tensor.total()
    rule = whole if granularity == "global" else per_tensor
    rule_cos = rule.cos()  # scaling a whole gradient changes no cosine
    scale_a = _unit_scale(whole.norm_a) if normalize else torch.ones_like(whole.dot)
    scale_c = _unit_scale(whole.norm_c) if normalize else torch.ones_like(whole.dot)
    coef = _caat_coefficients(rule_cos, rule.norm_a * scale_a, rule.norm_c * scale_c, gamma)
    coef["a"] = coef["a"] * scale_a
    coef["c"] = coef["c"] * scale_c
    return coef


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
        normalize: scale both *whole* gradients to unit norm first, then apply the rule at
            the granularity (the authors' order).

    Returns:
        The update (new tensors) and stats: ``cos``, ``mu``, ``norm_clean``, ``norm_adv``
        (all of the whole gradient), ``projected`` (any projection happened), ``lambda_star``
        (the paper's λ* = k; None without projection; mean over projected tensors for
        ``"tensor"``), ``adv_share`` (1/(1+k), 0 without projection; mean over tensors),
        ``projected_fraction`` and ``finite``.
    """
    if not -1.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (-1, 1], got {gamma}")
    _check_granularity(granularity)
    _check_pair(g_adv, g_clean)

    per_tensor = _per_tensor_products(
        g_adv, g_clean, per_row=granularity == "tensor", gamma=gamma if gamma < 1 else None
    )
    whole = per_tensor.total()
    cos, na, nc = whole.cos(), whole.norm_a, whole.norm_c
    finite = torch.isfinite(whole.dot) & torch.isfinite(na) & torch.isfinite(nc)
    coef = _caat_rule(per_tensor, gamma, granularity, normalize)
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
            coef["adv_share"].mean(),
            _mean_or_none(coef["lambda_star"]),
        ]
    )
    values = torch.cat([head, a.reshape(-1), c.reshape(-1)]).tolist()
    n, h = a.numel(), head.numel()
    a_host, c_host = values[h : h + n], values[h + n :]
    stats: Stats = {
        "cos": values[0],
        "mu": values[1],
        "norm_clean": values[2],
        "norm_adv": values[3],
        "finite": bool(values[4]),
        "projected": bool(values[5]),
        "projected_fraction": values[6],
        "adv_share": values[7],
        "lambda_star": _nan_to_none(values[8]),
    }
    if not stats["finite"]:
        stats.update(projected=False, projected_fraction=0.0, adv_share=0.0, lambda_star=None)
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
        return lambda g_adv, g_clean: combine_vanilla(
            g_adv, g_clean, lam, granularity=granularity, normalize=normalize
        )
    if kind == "caat":
        return lambda g_adv, g_clean: combine_caat(
            g_adv, g_clean, gamma, granularity=granularity, normalize=normalize
        )
    raise ValueError(f"unknown combiner kind {kind!r} (use 'vanilla' or 'caat')")
