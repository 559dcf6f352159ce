"""The combiners against a float64 re-statement of the authors' procedure (DESIGN.md, "Variants
kept from the reference code"): flatten both gradients, unit-normalise the *whole* vectors when
asked, then apply the threshold rule to the whole vector or to each parameter's slice. Written on
numpy arrays, independently of ``caat_peft.gradients``.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caat_peft.gradients import combine_caat, combine_vanilla, per_tensor_cosines

# One-element tensors (a head bias of a 1-output model, a LayerNorm of width 1) are where a
# float32 cosine rounds away from ±1.
SHAPES = [(3, 4), (1,), (5,), (1, 1), (2, 3)]


mp.mp.dps = 40  # the reference's own rounding stays far below the tolerances checked


def authors_rule(a: list, c: list, gamma: float) -> list:
    """The threshold rule on two flat vectors of mpmath numbers (a: adversarial, c: clean)."""
    dot = mp.fsum(x * y for x, y in zip(a, c))
    sq_a, sq_c = mp.fsum(x * x for x in a), mp.fsum(y * y for y in c)
    phi = dot / mp.sqrt(sq_a * sq_c)
    if phi >= gamma:
        return list(c)
    sin_gamma = mp.sqrt(1 - mp.mpf(gamma) ** 2)
    sin_phi = mp.sqrt(max(mp.mpf(0), 1 - phi**2))
    k = mp.sqrt(sq_a) * (gamma * sin_phi - phi * sin_gamma) / (mp.sqrt(sq_c) * sin_gamma)
    return [x + k * y for x, y in zip(a, c)]


def authors_order(g_a, g_c, gamma: float, per_tensor: bool, normalize: bool) -> np.ndarray:
    """Flatten, normalise the whole vectors (when asked), then the rule on the whole vector or
    on each tensor's slice; in 40-digit arithmetic, returned as float64."""
    a = [mp.mpf(float(x)) for t in g_a for x in t.reshape(-1).tolist()]
    c = [mp.mpf(float(x)) for t in g_c for x in t.reshape(-1).tolist()]
    if normalize:
        norm_a, norm_c = mp.sqrt(mp.fsum(x * x for x in a)), mp.sqrt(mp.fsum(y * y for y in c))
        a, c = [x / norm_a for x in a], [y / norm_c for y in c]
    if per_tensor:
        bounds = np.cumsum([0] + [t.numel() for t in g_a])
        spans = list(zip(bounds[:-1], bounds[1:]))
    else:
        spans = [(0, len(a))]
    out = [v for s, e in spans for v in authors_rule(a[s:e], c[s:e], gamma)]
    return np.array([float(v) for v in out])


def random_pair(seed: int, scale_a: float, scale_c: float, parallel: list[float], dtype):
    """Random gradient lists; tensor i of g_a is ``parallel[i] · g_c[i]`` exactly where that
    factor is non-zero (powers of two, so that φ = ±1 holds exactly in floating point)."""
    gen = torch.Generator().manual_seed(seed)
    g_c = [torch.randn(s, generator=gen, dtype=torch.float64) * scale_c for s in SHAPES]
    g_a = [torch.randn(s, generator=gen, dtype=torch.float64) * scale_a for s in SHAPES]
    g_a = [f * c if f else a for a, c, f in zip(g_a, g_c, parallel)]
    return [t.to(dtype) for t in g_a], [t.to(dtype) for t in g_c]


flat = lambda ts: torch.cat([t.reshape(-1) for t in ts]).double().numpy()  # noqa: E731


def term_scale(g_a, g_c, expected: np.ndarray, normalize: bool) -> float:
    """The size of the terms a·g_a and c·g_c that make the update: the yardstick of rounding
    (at the cone's apex the update itself is 0)."""
    a, c = flat(g_a), flat(g_c)
    if normalize:
        a, c = a / np.linalg.norm(a), c / np.linalg.norm(c)
    return float(np.abs(a).max() + np.abs(expected - a).max() + np.abs(c).max())


parallel_factors = st.lists(
    st.sampled_from([0.0, 0.0, 0.0, 2.0, 0.5, -1.0, -2.0, -0.25]),
    min_size=len(SHAPES),
    max_size=len(SHAPES),
)
pair_args = {
    "seed": st.integers(0, 2**31 - 1),
    "gamma": st.floats(-0.9, 0.99),
    "scale_a": st.floats(1e-2, 1e2),
    "scale_c": st.floats(1e-2, 1e2),
    "parallel": parallel_factors,
    "normalize": st.booleans(),
}


@settings(max_examples=150, deadline=None)
@given(**pair_args)
def test_per_tensor_rule_matches_the_authors_order_in_float64(
    seed, gamma, scale_a, scale_c, parallel, normalize
):
    g_a, g_c = random_pair(seed, scale_a, scale_c, parallel, torch.float64)
    update, _ = combine_caat(g_a, g_c, gamma, granularity="tensor", normalize=normalize)
    expected = authors_order(g_a, g_c, gamma, per_tensor=True, normalize=normalize)
    atol = 1e-10 * term_scale(g_a, g_c, expected, normalize)
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=atol)


@settings(max_examples=150, deadline=None)
@given(**pair_args)
def test_per_tensor_rule_matches_the_authors_order_in_float32(
    seed, gamma, scale_a, scale_c, parallel, normalize
):
    """float32 gradients: within 1e-6 of the float64 reference, relative to the size of the two
    terms a·g_a and c·g_c (an apex update is 0 up to the rounding of those terms)."""
    g_a, g_c = random_pair(seed, scale_a, scale_c, parallel, torch.float32)
    update, _ = combine_caat(g_a, g_c, gamma, granularity="tensor", normalize=normalize)
    expected = authors_order(g_a, g_c, gamma, per_tensor=True, normalize=normalize)
    atol = 1e-6 * term_scale(g_a, g_c, expected, normalize)
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=atol)


@settings(max_examples=100, deadline=None)
@given(**pair_args)
def test_global_rule_matches_the_authors_order(seed, gamma, scale_a, scale_c, parallel, normalize):
    g_a, g_c = random_pair(seed, scale_a, scale_c, parallel, torch.float64)
    update, _ = combine_caat(g_a, g_c, gamma, granularity="global", normalize=normalize)
    expected = authors_order(g_a, g_c, gamma, per_tensor=False, normalize=normalize)
    atol = 1e-10 * term_scale(g_a, g_c, expected, normalize)
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.3, 1.7e-3, 41.0])
def test_one_element_tensors_give_phi_of_exactly_minus_one(dtype, value):
    """A one-element pair of opposite signs has φ = −1 exactly, so the update is the cone's apex
    (zero) exactly; float32 dots used to give φ = −0.99999994 and a 3.6e-4 relative error."""
    g_c = [torch.tensor([value], dtype=dtype)]
    g_a = [torch.tensor([-3.1 * value], dtype=dtype)]  # not a power of two: a rounded multiple
    assert per_tensor_cosines(g_a, g_c) == [-1.0]
    update, stats = combine_caat(g_a, g_c, 0.8, granularity="tensor")
    assert stats["cos"] == -1.0
    assert float(update[0].abs()) <= 4 * torch.finfo(dtype).eps * abs(3.1 * value)


def test_normalize_scales_whole_gradients_not_each_tensor():
    """The authors normalise the whole vectors: a small tensor keeps its small share of the
    update (per-tensor normalisation would give a head bias the update norm of a weight)."""
    g_c = [torch.full((100,), 1.0, dtype=torch.float64), torch.tensor([1e-3], dtype=torch.float64)]
    g_a = [torch.full((100,), 2.0, dtype=torch.float64), torch.tensor([3e-3], dtype=torch.float64)]
    update, _ = combine_caat(g_a, g_c, 0.9, granularity="tensor", normalize=True)
    assert float(update[1].abs()) < 1e-3 * float(update[0].norm())


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lam=st.floats(0, 1),
    scale_a=st.floats(1e-2, 1e2),
    scale_c=st.floats(1e-2, 1e2),
    granularity=st.sampled_from(["global", "tensor"]),
)
def test_vanilla_normalize_averages_the_unit_gradients(seed, lam, scale_a, scale_c, granularity):
    """The authors' ``grad_norm`` applies to their average too; the average is linear, so the
    granularity does not change it."""
    g_a, g_c = random_pair(seed, scale_a, scale_c, [0.0] * len(SHAPES), torch.float64)
    update, stats = combine_vanilla(g_a, g_c, lam, granularity=granularity, normalize=True)
    a, c = flat(g_a), flat(g_c)
    expected = lam * a / np.linalg.norm(a) + (1 - lam) * c / np.linalg.norm(c)
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=1e-12)
    plain, _ = combine_vanilla(g_a, g_c, lam, granularity=granularity)
    np.testing.assert_allclose(flat(plain), lam * a + (1 - lam) * c, rtol=1e-12, atol=1e-12)
    assert stats["adv_share"] == lam


# Bigger tensors, so that float32 accumulation error shows: near φ = ±1 it is multiplied by
# |φ|/√(1−φ²) in the update (the combiner recomputes those entries with float64 accumulation).
NEAR_SHAPES = [(64, 64), (300,), (7, 5)]


def near_parallel_pair(seed: int, sign: float, noise: float):
    """float32 lists with g_a = sign·g_c + noise·ξ per tensor: φ within ~noise² of ±1."""
    gen = torch.Generator().manual_seed(seed)
    g_c = [torch.randn(s, generator=gen) for s in NEAR_SHAPES]
    g_a = [sign * c + noise * torch.randn(c.shape, generator=gen) for c in g_c]
    return g_a, g_c


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sign=st.sampled_from([1.0, -1.0, -3.0]),
    noise=st.sampled_from([1e-2, 1e-3, 1e-4]),
    gamma=st.sampled_from([-0.5, 0.0, 0.8, 0.99, 0.9999]),
    per_tensor=st.booleans(),
)
def test_near_parallel_float32_gradients_match_the_float64_reference(
    seed, sign, noise, gamma, per_tensor
):
    """float32 dots alone miss this by up to 7e-5 of the terms (measured with the float64
    recomputation switched off); the combiner stays within 1e-6 of the 40-digit reference."""
    g_a, g_c = near_parallel_pair(seed, sign, noise)
    granularity = "tensor" if per_tensor else "global"
    update, _ = combine_caat(g_a, g_c, gamma, granularity=granularity)
    expected = authors_order(g_a, g_c, gamma, per_tensor=per_tensor, normalize=False)
    atol = 1e-6 * term_scale(g_a, g_c, expected, normalize=False)
    np.testing.assert_allclose(flat(update), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_combine_like_their_float32_values(dtype):
    """fp16 squares overflow at ‖g‖ = 256; the products are taken in float32 (exact for both)."""
    gen = torch.Generator().manual_seed(0)
    g_c = [(10 * torch.randn(2000, generator=gen)).to(dtype)]
    g_a = [(-5 * g_c[0].float() + 10 * torch.randn(2000, generator=gen)).to(dtype)]
    update, stats = combine_caat(g_a, g_c, 0.8)
    expected, expected_stats = combine_caat([g_a[0].float()], [g_c[0].float()], 0.8)
    assert stats["finite"] and stats["projected"]
    assert stats["cos"] == pytest.approx(expected_stats["cos"], abs=1e-7)
    # the update itself is a combination in the gradients' dtype: its rounding, no more
    atol = 4 * torch.finfo(dtype).eps * float(expected[0].abs().max())
    torch.testing.assert_close(update[0].float(), expected[0], rtol=0, atol=atol)


def test_gradients_whose_float32_squares_underflow_still_project():
    """Elements of 1e-24 square to 0 in float32; the float64 recomputation sees the angle."""
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(50, generator=gen, dtype=torch.float64)
    a = -0.5 * c + torch.randn(50, generator=gen, dtype=torch.float64)
    tiny_a, tiny_c = [(1e-24 * a).float()], [(1e-24 * c).float()]
    update, stats = combine_caat(tiny_a, tiny_c, 0.8)
    expected = authors_order(tiny_a, tiny_c, 0.8, per_tensor=False, normalize=False)
    assert stats["projected"] and stats["cos"] < 0
    np.testing.assert_allclose(flat(update), expected, rtol=1e-5, atol=0)
