"""Properties of the combiners (DESIGN.md, "The method, exactly"), checked in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from caat_peft.gradients import combine_caat, combine_vanilla, conflict_stats, make_combiner

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def cos(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def grads_from_seed(seed: int, shapes=SHAPES, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]


def reference_caat(g_a: torch.Tensor, g_c: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (3) written directly on flat vectors, independent of the implementation."""
    phi = cos(g_a, g_c)
    if phi >= gamma:
        return g_c.clone()
    k = (
        g_a.norm()
        * (gamma * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - gamma**2))
        / (g_c.norm() * math.sqrt(1 - gamma**2))
    )
    return g_a + k * g_c


seeds = st.integers(0, 2**31 - 1)
gammas = st.floats(-0.95, 0.99)
scales = st.floats(1e-3, 1e3)


@settings(max_examples=200, deadline=None)
@given(seed_a=seeds, seed_c=seeds, gamma=gammas, scale_a=scales, scale_c=scales)
def test_projection_lies_on_the_cone(seed_a, seed_c, gamma, scale_a, scale_c):
    g_a = grads_from_seed(seed_a, scale=scale_a)
    g_c = grads_from_seed(seed_c, scale=scale_c)
    phi = cos(flat(g_a), flat(g_c))
    assume(phi < gamma - 1e-9 and phi > -1 + 1e-6)
    update, stats = combine_caat(g_a, g_c, gamma)
    u = flat(update)
    assert stats["projected"] is True
    assert cos(u, flat(g_c)) == pytest.approx(gamma, abs=1e-9)
    expected_norm = flat(g_a).norm() * math.sqrt(1 - phi**2) / math.sqrt(1 - gamma**2)
    assert float(u.norm()) == pytest.approx(float(expected_norm), rel=1e-9)
    k = stats["lambda_star"]  # the paper's λ*: the update is ∇(λ*·L_c + L_a) = g_a + λ*·g_c
    assert k > 0 and stats["adv_share"] == pytest.approx(1 / (1 + k), rel=1e-12)
    torch.testing.assert_close(u, flat(g_a) + k * flat(g_c))
    torch.testing.assert_close(u, reference_caat(flat(g_a), flat(g_c), gamma))


@settings(max_examples=100, deadline=None)
@given(seed_a=seeds, seed_c=seeds, gamma=gammas)
def test_no_projection_when_gradients_agree(seed_a, seed_c, gamma):
    g_a = grads_from_seed(seed_a)
    g_c = grads_from_seed(seed_c)
    phi = cos(flat(g_a), flat(g_c))
    assume(phi >= gamma)
    update, stats = combine_caat(g_a, g_c, gamma)
    assert stats["projected"] is False and stats["adv_share"] == 0.0
    assert stats["lambda_star"] is None  # the update is g_c alone: no finite λ*
    for u, c in zip(update, g_c):
        assert torch.equal(u, c)


def test_agreeing_pair_is_not_projected():
    g_c = grads_from_seed(1)
    g_a = [c + 0.05 * n for c, n in zip(g_c, grads_from_seed(2))]
    update, stats = combine_caat(g_a, g_c, 0.8)
    assert stats["cos"] > 0.8 and not stats["projected"]
    assert all(torch.equal(u, c) for u, c in zip(update, g_c))


@settings(max_examples=50, deadline=None)
@given(seed_a=seeds, seed_c=seeds)
def test_gamma_one_is_standard_training(seed_a, seed_c):
    g_a, g_c = grads_from_seed(seed_a), grads_from_seed(seed_c)
    update, stats = combine_caat(g_a, g_c, 1.0)
    assert not stats["projected"] and stats["adv_share"] == 0.0
    assert all(torch.equal(u, c) for u, c in zip(update, g_c))
    assert all(torch.isfinite(u).all() for u in update)


@settings(max_examples=100, deadline=None)
@given(seed_a=seeds, seed_c=seeds, lam=st.floats(0, 1))
def test_vanilla_is_the_weighted_average(seed_a, seed_c, lam):
    g_a, g_c = grads_from_seed(seed_a), grads_from_seed(seed_c)
    update, stats = combine_vanilla(g_a, g_c, lam)
    torch.testing.assert_close(flat(update), (1 - lam) * flat(g_c) + lam * flat(g_a))
    assert stats["adv_share"] == lam and stats["projected"] is False
    if lam > 1e-6:  # the same reading as CA-AT's: update = λ·(g_a + λ*·g_c)
        torch.testing.assert_close(
            flat(update), lam * (flat(g_a) + stats["lambda_star"] * flat(g_c))
        )
    elif lam == 0:
        assert stats["lambda_star"] is None


def test_vanilla_endpoints_are_exact():
    g_a, g_c = grads_from_seed(3), grads_from_seed(4)
    assert all(torch.equal(u, c) for u, c in zip(combine_vanilla(g_a, g_c, 0.0)[0], g_c))
    assert all(torch.equal(u, a) for u, a in zip(combine_vanilla(g_a, g_c, 1.0)[0], g_a))


@settings(max_examples=100, deadline=None)
@given(seed_a=seeds, seed_c=seeds, gamma=gammas)
def test_tensor_granularity_applies_the_rule_per_tensor(seed_a, seed_c, gamma):
    g_a, g_c = grads_from_seed(seed_a), grads_from_seed(seed_c)
    update, stats = combine_caat(g_a, g_c, gamma, granularity="tensor")
    projected = []
    for u, a, c in zip(update, g_a, g_c):
        single, single_stats = combine_caat([a], [c], gamma)
        torch.testing.assert_close(u, single[0])
        projected.append(single_stats["projected"])
        if single_stats["projected"]:
            assert cos(u.reshape(-1), c.reshape(-1)) == pytest.approx(gamma, abs=1e-9)
    assert stats["projected"] == any(projected)
    assert stats["projected_fraction"] == pytest.approx(sum(projected) / len(projected))


@settings(max_examples=100, deadline=None)
@given(seed_a=seeds, seed_c=seeds, gamma=gammas, scale_a=scales, scale_c=scales)
def test_normalize_combines_unit_gradients(seed_a, seed_c, gamma, scale_a, scale_c):
    g_a = grads_from_seed(seed_a, scale=scale_a)
    g_c = grads_from_seed(seed_c, scale=scale_c)
    na, nc = flat(g_a).norm(), flat(g_c).norm()
    update, _ = combine_caat(g_a, g_c, gamma, normalize=True)
    expected, _ = combine_caat([a / na for a in g_a], [c / nc for c in g_c], gamma)
    torch.testing.assert_close(flat(update), flat(expected))


def test_conflict_stats_match_definitions():
    g_a, g_c = grads_from_seed(5), grads_from_seed(6)
    stats = conflict_stats(g_c, g_a)
    a, c = flat(g_a), flat(g_c)
    phi = float(torch.nn.functional.cosine_similarity(a, c, dim=0))
    assert stats["cos"] == pytest.approx(phi, abs=1e-12)
    assert stats["norm_clean"] == pytest.approx(float(c.norm()))
    assert stats["norm_adv"] == pytest.approx(float(a.norm()))
    assert stats["mu"] == pytest.approx(float(c.norm() * a.norm()) * (1 - phi))
    for combine in (lambda: combine_caat(g_a, g_c, 0.5), lambda: combine_vanilla(g_a, g_c, 0.5)):
        _, s = combine()
        assert s["cos"] == pytest.approx(stats["cos"]) and s["mu"] == pytest.approx(stats["mu"])


def test_opposite_gradients_give_the_apex():
    g_c = grads_from_seed(7)
    g_a = [-2.0 * c for c in g_c]
    update, stats = combine_caat(g_a, g_c, 0.5)
    assert stats["projected"]
    # √(1 − φ²) amplifies the last-bit error of φ ≈ −1 to about 1e-8 relative
    assert float(flat(update).norm()) < 1e-6 * float(flat(g_a).norm())


def zeros():
    return [torch.zeros(s, dtype=torch.float64) for s in SHAPES]


@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("normalize", [False, True])
def test_zero_clean_gradient_follows_the_adversarial_one(granularity, normalize):
    g_a = grads_from_seed(8)
    update, stats = combine_caat(g_a, zeros(), 0.8, granularity=granularity, normalize=normalize)
    expected = g_a if not normalize else [a / flat(g_a).norm() for a in g_a]
    torch.testing.assert_close(flat(update), flat(expected))
    assert stats["adv_share"] == 1.0 and stats["lambda_star"] == 0.0 and stats["finite"]


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_zero_adversarial_gradient_keeps_the_clean_one(granularity):
    g_c = grads_from_seed(9)
    update, stats = combine_caat(zeros(), g_c, 0.8, granularity=granularity)
    torch.testing.assert_close(flat(update), flat(g_c))
    assert stats["adv_share"] == 0.0 and not stats["projected"]


@pytest.mark.parametrize("gamma", [-0.5, 0.0, 0.8, 1.0])
def test_both_zero_gives_zero_update(gamma):
    update, stats = combine_caat(zeros(), zeros(), gamma)
    assert float(flat(update).abs().max()) == 0.0
    assert stats["cos"] == 0.0 and stats["mu"] == 0.0 and stats["finite"]
    update, _ = combine_vanilla(zeros(), zeros(), 0.5)
    assert float(flat(update).abs().max()) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["adv", "clean"])
@pytest.mark.parametrize(
    "combine",
    [
        lambda a, c: combine_caat(a, c, 0.8),
        lambda a, c: combine_caat(a, c, 0.8, granularity="tensor", normalize=True),
        lambda a, c: combine_caat(a, c, 1.0),
        lambda a, c: combine_vanilla(a, c, 0.5),
        lambda a, c: combine_vanilla(a, c, 0.0),
    ],
)
def test_non_finite_gradients_give_zero_update_and_flag(bad, which, combine):
    g_a, g_c = grads_from_seed(10), grads_from_seed(11)
    (g_a if which == "adv" else g_c)[1][2] = bad
    update, stats = combine(g_a, g_c)
    assert stats["finite"] is False
    assert all(torch.isfinite(u).all() and not u.any() for u in update)


def test_inputs_are_not_modified_and_outputs_are_new_tensors():
    g_a, g_c = grads_from_seed(12), grads_from_seed(13)
    before = [t.clone() for t in g_a + g_c]
    for update, _ in (
        combine_caat(g_a, g_c, 0.9),
        combine_caat(g_a, g_c, -0.9),
        combine_vanilla(g_a, g_c, 0.0),
    ):
        update[0].add_(1.0)
    assert all(torch.equal(x, y) for x, y in zip(before, g_a + g_c))


def test_float32_inputs_keep_their_dtype():
    g_a = [g.float() for g in grads_from_seed(14)]
    g_c = [g.float() for g in grads_from_seed(15)]
    update, stats = combine_caat(g_a, g_c, 0.8)
    assert all(u.dtype == torch.float32 for u in update)
    if stats["projected"]:
        assert cos(flat(update).double(), flat(g_c).double()) == pytest.approx(0.8, abs=1e-5)


def test_bad_arguments_raise():
    g = grads_from_seed(16)
    with pytest.raises(ValueError, match="gamma"):
        combine_caat(g, g, -1.0)
    with pytest.raises(ValueError, match="gamma"):
        combine_caat(g, g, 1.5)
    with pytest.raises(ValueError, match="lam"):
        combine_vanilla(g, g, 1.5)
    with pytest.raises(ValueError, match="granularity"):
        combine_caat(g, g, 0.5, granularity="layer")
    with pytest.raises(ValueError, match="length"):
        combine_caat(g, g[:1], 0.5)
    with pytest.raises(ValueError, match="no trainable"):
        combine_caat([], [], 0.5)


def test_make_combiner_dispatches():
    g_a, g_c = grads_from_seed(17), grads_from_seed(18)
    torch.testing.assert_close(
        flat(make_combiner("caat", gamma=0.3)(g_a, g_c)[0]),
        flat(combine_caat(g_a, g_c, 0.3)[0]),
    )
    torch.testing.assert_close(
        flat(make_combiner("vanilla", lam=0.25)(g_a, g_c)[0]),
        flat(combine_vanilla(g_a, g_c, 0.25)[0]),
    )
    with pytest.raises(ValueError):
        make_combiner("pcgrad")
