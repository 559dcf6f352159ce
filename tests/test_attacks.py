"""PGD in pixel space: bounds, parameter gradients untouched, agreement with torchattacks."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from caat_peft.attacks import pgd, sample_random_start


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


def test_parameter_grads_and_modes_are_untouched():
    model = small_cnn()
    model.train()
    first, last = model[0], model[-1]
    last.weight.grad = torch.full_like(last.weight, 3.0)
    x, y = batch()
    pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=3)
    assert first.weight.grad is None
    assert torch.equal(last.weight.grad, torch.full_like(last.weight, 3.0))
    assert all(m.training for m in model.modules())
    model.eval()
    pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=1, eval_mode_during_attack=False)
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
