"""Training attacks in pixel space: bounds, parameter gradients and modes untouched, agreement
with torchattacks (PGD, PGDL2, FFGSM, TPGD) and with a hand-written TRADES L2 loop."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from caat_peft.attacks import (
    fgsm,
    kl_divergence,
    pgd,
    sample_random_start,
    standard_normal_from_start,
    trades_attack,
)


def small_cnn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 5),
    ).to(dtype)


def batch(dtype=torch.float32, n=16):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 12, 12, generator=gen, dtype=dtype), torch.randint(
        0, 5, (n,), generator=gen
    )


# Float64 agreement with torchattacks. L∞ iterates agree to rounding; for L2 the guard constants
# against a zero gradient norm differ (1e-12 here, 1e-10 there), which shows at about 1e-9.
TOLERANCE = {"linf": 1e-9, "l2": 1e-7}

EPS = 8 / 255


def every_attack(model, x, y, **kw):
    """One call of each training attack, for the properties they must all have."""
    return {
        "pgd-linf": lambda: pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=3, **kw),
        "pgd-l2": lambda: pgd(model, x, y, eps=0.5, alpha=0.1, steps=3, norm="l2", **kw),
        "pgd-targeted": lambda: pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=2, targeted=True),
        "fgsm": lambda: fgsm(model, x, y, eps=EPS, **kw),
        "fgsm-l2": lambda: fgsm(model, x, y, eps=0.5, norm="l2", **kw),
        "trades": lambda: trades_attack(model, x, eps=EPS, alpha=2 / 255, steps=3, **kw),
        "trades-l2": lambda: trades_attack(model, x, eps=0.5, alpha=0.1, steps=3, norm="l2", **kw),
    }


ATTACKS = list(every_attack(None, None, None))


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_stays_in_the_ball_and_in_pixel_range(norm, eps):
    model = small_cnn()
    x, y = batch()
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 3, steps=7, norm=norm)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert not x_adv.requires_grad


@pytest.mark.parametrize("name", ATTACKS)
def test_parameter_grads_and_modes_are_untouched(name):
    model = small_cnn()
    model.train()
    model[2].eval()  # a mixed-mode model: each module gets its own mode back
    first, last = model[0], model[-1]
    last.weight.grad = torch.full_like(last.weight, 3.0)
    x, y = batch()
    x_adv = every_attack(model, x, y)[name]()
    assert first.weight.grad is None and first.bias.grad is None
    assert torch.equal(last.weight.grad, torch.full_like(last.weight, 3.0))
    assert last.bias.grad is None
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True, True]
    assert all(p.requires_grad for p in model.parameters())
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert not torch.equal(x_adv, x)  # the attack did move


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_stays_in_the_ball_and_in_pixel_range(name):
    model = small_cnn().eval()
    x, y = batch()
    x_adv = every_attack(model, x, y)[name]()
    eps = 0.5 if name.endswith("l2") else EPS
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if name.endswith("l2") else delta.abs().max(1).values
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_eval_mode_can_be_left_to_the_caller():
    model = small_cnn().eval()
    x, y = batch()
    pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=1, eval_mode_during_attack=False)
    trades_attack(model, x, eps=8 / 255, alpha=2 / 255, steps=1, eval_mode_during_attack=False)
    assert not any(m.training for m in model.modules())


def test_eps_zero_and_zero_steps():
    model = small_cnn()
    x, y = batch()
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=0.1, steps=5), x)
    x0 = pgd(model, x, y, eps=0.1, alpha=0.1, steps=0, random_start=False)
    assert torch.equal(x0, x)


@pytest.mark.parametrize(
    "norm,eps,alpha,reference",
    [
        ("linf", 8 / 255, 2 / 255, torchattacks.PGD),
        ("l2", 0.5, 0.1, torchattacks.PGDL2),
    ],
)
def test_matches_torchattacks_in_float64(norm, eps, alpha, reference):
    """Without random start both implementations are deterministic: same iterates."""
    model = small_cnn(torch.float64).eval()
    x, y = batch(torch.float64)
    ours = pgd(model, x, y, eps=eps, alpha=alpha, steps=10, norm=norm, random_start=False)
    attack = reference(model, eps=eps, alpha=alpha, steps=10, random_start=False)
    theirs = attack(x, y)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE[norm], rtol=0)


def torchattacks_style_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The random start torchattacks draws (same RNG calls, in the same order)."""
    if norm == "linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    delta = torch.empty_like(x).normal_()
    n = delta.view(x.size(0), -1).norm(p=2, dim=1).view(x.size(0), 1, 1, 1)
    r = torch.zeros_like(n).uniform_(0, 1)
    return delta * r / n * eps


@pytest.mark.parametrize(
    "norm,eps,alpha,reference",
    [
        ("linf", 8 / 255, 2 / 255, torchattacks.PGD),
        ("l2", 0.5, 0.1, torchattacks.PGDL2),
    ],
)
def test_matches_torchattacks_with_the_same_random_start(norm, eps, alpha, reference):
    model = small_cnn(torch.float64).eval()
    x, y = batch(torch.float64)
    torch.manual_seed(123)
    theirs = reference(model, eps=eps, alpha=alpha, steps=10, random_start=True)(x, y)
    torch.manual_seed(123)
    start = torchattacks_style_start(x, eps, norm)
    ours = pgd(model, x, y, eps=eps, alpha=alpha, steps=10, norm=norm, init_delta=start)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE[norm], rtol=0)


def test_robust_accuracy_agrees_with_torchattacks_on_a_trained_model():
    torch.manual_seed(0)
    model = small_cnn()
    x, y = batch(n=64)
    model[2].p = 0.0  # memorise the random labels: a fit that small perturbations can break
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.6
    for eps in (4 / 255, 8 / 255):
        ours = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10)
        theirs = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10)(x, y)
        acc_ours = (model(ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(theirs).argmax(1) == y).float().mean().item()
        assert abs(acc_ours - acc_theirs) <= 3 / 64  # different random starts: a few samples
    assert acc_ours < 0.5  # at 8/255 the memorised fit breaks


def test_targeted_moves_towards_the_target():
    model = small_cnn().eval()
    x, _ = batch()
    target = torch.zeros(len(x), dtype=torch.long)
    loss = nn.CrossEntropyLoss()
    x_adv = pgd(model, x, target, eps=0.3, alpha=0.05, steps=20, targeted=True)
    with torch.no_grad():
        assert loss(model(x_adv), target) < loss(model(x), target)


def test_random_start_is_reproducible_and_in_the_ball():
    a = sample_random_start((4, 3, 5, 5), 0.1, "l2", generator=torch.Generator().manual_seed(0))
    b = sample_random_start((4, 3, 5, 5), 0.1, "l2", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a.flatten(1).norm(dim=1) <= 0.1 + 1e-7).all()
    c = sample_random_start((4, 3, 5, 5), 0.1, "linf", generator=torch.Generator().manual_seed(0))
    assert c.abs().max() <= 0.1


def test_bad_arguments():
    model = small_cnn()
    x, y = batch()
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, norm="l1")
    with pytest.raises(ValueError):
        pgd(model, x, y, eps=-0.1, alpha=0.1, steps=1)


# --------------------------------------------------------------------------------------------
# FGSM with random start (Wong et al., 2020) against torchattacks' FFGSM


def test_fgsm_matches_torchattacks_ffgsm_in_float64():
    """FFGSM draws its start as ``randn_like(x).uniform_(-ε, ε)``: the same RNG calls give the
    same start, and then one step of α = 1.25·ε (FFGSM's default 10/255 at ε = 8/255)."""
    model = small_cnn(torch.float64).eval()
    x, y = batch(torch.float64)
    torch.manual_seed(7)
    theirs = torchattacks.FFGSM(model, eps=EPS, alpha=10 / 255)(x, y)
    torch.manual_seed(7)
    start = torch.randn_like(x).uniform_(-EPS, EPS)
    ours = fgsm(model, x, y, eps=EPS, init_delta=start)  # alpha=None: 1.25·ε
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE["linf"], rtol=0)


def test_fgsm_without_random_start_is_goodfellows_fgsm():
    model = small_cnn(torch.float64).eval()
    x, y = batch(torch.float64)
    theirs = torchattacks.FGSM(model, eps=EPS)(x, y)
    ours = fgsm(model, x, y, eps=EPS, random_start=False)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE["linf"], rtol=0)


def test_targeted_fgsm_moves_towards_the_target():
    model = small_cnn().eval()
    x, _ = batch()
    target = torch.zeros(len(x), dtype=torch.long)
    x_adv = fgsm(model, x, target, eps=0.3, targeted=True, random_start=False)
    with torch.no_grad():
        loss = nn.functional.cross_entropy
        assert loss(model(x_adv), target) < loss(model(x), target)


# --------------------------------------------------------------------------------------------
# TRADES' inner maximisation


def test_trades_attack_matches_torchattacks_tpgd_in_float64():
    """TPGD is TRADES' L∞ attack with the same semantics: f(x) in eval mode without gradient,
    start clamp(x + 0.001·ξ, 0, 1), ascent on the summed KL(f(x) ‖ f(x_adv)) by sign steps,
    projection onto the ball and the pixel range. TPGD draws ξ after its clean forward pass,
    which uses no randomness in eval mode, so the same seed gives the same ξ."""
    model = small_cnn(torch.float64).eval()
    x, y = batch(torch.float64)
    torch.manual_seed(11)
    theirs = torchattacks.TPGD(model, eps=EPS, alpha=2 / 255, steps=10)(x)
    torch.manual_seed(11)
    noise = torch.randn_like(x)
    ours = trades_attack(model, x, eps=EPS, alpha=2 / 255, steps=10, init_noise=noise)
    torch.testing.assert_close(ours, theirs, atol=TOLERANCE["linf"], rtol=0)


def test_trades_attack_l2_matches_a_hand_written_loop():
    """TPGD has no L2 version: check against the update written out by hand (normalised
    gradient step, projection onto the L2 ball, clamp to [0, 1])."""
    model = small_cnn(torch.float64).eval()
    x, _ = batch(torch.float64)
    eps, alpha = 0.5, 0.1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    ours = trades_attack(model, x, eps=eps, alpha=alpha, steps=5, norm="l2", init_noise=noise)

    p_clean = torch.softmax(model(x), dim=1).detach()
    x_adv = (x + 0.001 * noise).clamp(0, 1)
    for _ in range(5):
        x_adv = x_adv.detach().requires_grad_(True)
        log_q = torch.log_softmax(model(x_adv), dim=1)
        kl = (p_clean * (p_clean.log() - log_q)).sum()
        (grad,) = torch.autograd.grad(kl, x_adv)
        norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = x_adv.detach() + alpha * grad / norm - x
        size = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / size, max=1.0)
        x_adv = (x + delta).clamp(0, 1)
    # The KL's input gradient is small (about 1e-4 per sample in norm), so the 1e-12 guard added
    # to the norms shows at about 1e-8: a tolerance of 1e-7, as for PGD-L2.
    torch.testing.assert_close(ours, x_adv.detach(), atol=TOLERANCE["l2"], rtol=0)


def test_trades_attack_increases_the_kl():
    model = small_cnn().eval()
    x, _ = batch()
    x_adv = trades_attack(model, x, eps=EPS, alpha=2 / 255, steps=5)
    x_noise = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        kl_adv = kl_divergence(model(x), model(x_adv)).mean()
        assert kl_adv > 10 * kl_divergence(model(x), model(x_noise)).mean()


def test_kl_divergence_per_sample():
    p = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0, 0.0], [3.0, -2.0, 0.0]], dtype=torch.float64)
    pp, qq = torch.softmax(p, 1), torch.softmax(q, 1)
    expected = (pp * (pp / qq).log()).sum(1)
    torch.testing.assert_close(kl_divergence(p, q), expected)
    assert kl_divergence(p, p).abs().max() < 1e-12


def test_trainer_start_becomes_standard_normal_noise():
    """The trainer's uniform start, mapped by erfinv, is N(0, 1) per pixel (L∞) and a random
    direction of norm √d (L2), deterministically."""
    gen = torch.Generator().manual_seed(0)
    start = sample_random_start((64, 3, 16, 16), EPS, "linf", generator=gen)
    xi = standard_normal_from_start(start, EPS, "linf")
    assert torch.isfinite(xi).all()
    assert abs(xi.mean().item()) < 0.02 and abs(xi.std().item() - 1) < 0.02
    assert abs((xi.abs() < 1).float().mean().item() - 0.6827) < 0.01  # the 1-σ mass of N(0, 1)
    start = sample_random_start((8, 3, 16, 16), 0.5, "l2", generator=gen)
    xi = standard_normal_from_start(start, 0.5, "l2")
    torch.testing.assert_close(xi.flatten(1).norm(dim=1), torch.full((8,), (3 * 16 * 16) ** 0.5))
    assert torch.equal(standard_normal_from_start(start, 0.0, "l2"), torch.zeros_like(start))
