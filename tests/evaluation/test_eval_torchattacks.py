"""The torchattacks 3.5.1 behaviour the suite relies on (its last release is from 2023).

If a torchattacks upgrade changes any of this, these tests say where before the numbers drift.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchattacks

from caat_peft.evaluation import AttackBudget, attack_config, make_attack

# One torch thread for the module (tests/conftest.py), before its fixtures train models.
pytestmark = pytest.mark.usefixtures("one_thread")


class Counting(nn.Module):
    """A small random linear classifier that counts its forward calls."""

    def __init__(self, n_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, n_classes))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x) * 5


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _labels_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)  # every sample correct, so every sample gets attacked


def _assert_in_budget(x, adv, eps, norm):
    adv = adv.detach()  # torchattacks' APGD returns tensors that still require grad
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_honours_eps_range_and_steps(norm, eps, loss):
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    calls = {}
    for steps in (4, 9):
        model.calls = 0
        atk = torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, loss=loss, seed=0)
        adv = atk(x, y)
        _assert_in_budget(x, adv, eps, norm)
        calls[steps] = model.calls
    # one forward per step, plus a fixed overhead: `steps` is honoured (no hidden default)
    assert calls[9] - calls[4] == 5


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_apgdt_honours_eps_and_patched_target_count(norm, eps):
    """The constructor sets n_target_classes = n_classes − 1; the attribute patch must win."""
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    atk = torchattacks.APGDT(model, norm=norm, eps=eps, steps=3, n_classes=10, seed=0)
    assert atk.n_target_classes == 9  # the quirk we patch
    calls = []
    for k in (1, 2, 3):
        atk.n_target_classes = k
        model.calls = 0
        _assert_in_budget(x, atk(x, y), eps, norm)
        calls.append(model.calls)
    per_target = calls[1] - calls[0]
    assert per_target > 3 and calls[2] - calls[1] == per_target


def test_fab_targeted_honours_eps_and_targets():
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    eps = 8 / 255
    atk = torchattacks.FAB(model, eps=eps, steps=3, multi_targeted=True, n_classes=10, seed=0)
    calls = []
    for k in (1, 2):
        atk.n_target_classes = k
        model.calls = 0
        adv = atk(x, y)
        _assert_in_budget(x, adv, eps, "Linf")
        calls.append(model.calls)
    assert calls[1] > calls[0]


def test_square_honours_eps_and_query_budget():
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        model.calls = 0
        atk = torchattacks.Square(model, norm=norm, eps=eps, n_queries=50, seed=0)
        _assert_in_budget(x, atk(x, y), eps, norm)
        assert model.calls <= 50 + 5  # one forward per query plus setup


def test_square_l2_needs_at_least_5_pixels():
    """Square's L2 initialisation tiles the image in h // 5 stripes: smaller images crash."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ZeroDivisionError):
        torchattacks.Square(model, norm="L2", eps=0.5, n_queries=5)(x, _labels_of(model, x))


def test_torchattacks_autoattack_wrapper_deviates_from_the_standard():
    """Why `autoattack` is assembled by hand: the wrapper's "standard" is not the standard."""
    model = Counting(n_classes=200)
    aa = torchattacks.AutoAttack(model, norm="Linf", eps=8 / 255, version="standard", n_classes=200)
    apgd, apgdt, fab, square = aa._autoattack.attacks
    assert apgd.steps == 10 and apgdt.steps == 10 and fab.steps == 10  # protocol: 100
    assert apgdt.n_target_classes == 199 and fab.n_target_classes == 199  # protocol: 9
    assert square.n_queries == 5000
    ours = attack_config("autoattack", "linf", AttackBudget(), n_classes=200)
    by_name = {c.name: c for c in ours.components}
    assert [c.name for c in ours.components] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert by_name["apgd-ce"].kwargs["steps"] == 100
    assert by_name["apgd-t"].kwargs["steps"] == 100
    assert by_name["apgd-t"].attrs["n_target_classes"] == 9
    assert by_name["fab-t"].kwargs["steps"] == 100
    assert by_name["fab-t"].attrs["n_target_classes"] == 9
    assert by_name["square"].kwargs["n_queries"] == 5000
    assert by_name["square"].kwargs["resc_schedule"] is False  # as the reference implementation
    built = make_attack(by_name["apgd-t"], model, 8 / 255, seed=0)
    assert built.n_target_classes == 9 and built.steps == 100


def test_apgd_reseeds_the_global_rng():
    """APGD/FAB/Square call torch.manual_seed(seed): the suite must fork the RNG around them."""
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    torch.manual_seed(123)
    torchattacks.APGD(model, eps=8 / 255, steps=2, seed=7)(x, y)
    after_attack = torch.rand(1)
    torch.manual_seed(7)
    torch.rand(x.shape)  # the attack's own first draw
    assert torch.equal(after_attack, torch.rand(1))  # the caller's stream was replaced


def test_apgd_output_still_requires_grad():
    model = Counting()
    x, _ = _batch()
    adv = torchattacks.APGD(model, eps=8 / 255, steps=2, seed=0)(x, _labels_of(model, x))
    assert adv.requires_grad  # the suite detaches before scoring


def test_pgdl2_returns_nan_at_eps_zero():
    """ε / ‖δ‖ = 0 / 0: why the suite never calls an attack at ε = 0."""
    model = Counting()
    x, _ = _batch()
    adv = torchattacks.PGDL2(model, eps=0.0, alpha=0.0, steps=2)(x, _labels_of(model, x))
    assert torch.isnan(adv).any()
    ours = make_attack(attack_config("pgd-l2", "l2", AttackBudget(), 10), model, 0.0)
    assert torch.equal(ours(x, _labels_of(model, x)), x)


def test_fab_accumulates_parameter_gradients():
    """FAB calls .backward(): without frozen parameters it writes into param.grad."""
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    torchattacks.FAB(model, eps=8 / 255, steps=2, n_classes=10, seed=0)(x, y)
    assert any(p.grad is not None for p in model.parameters())


def test_dlr_losses_need_enough_classes():
    """APGD-DLR indexes the 3rd largest logit, APGD-T the 4th: too few classes crash."""
    model = Counting(n_classes=2)
    x, _ = _batch()
    y = _labels_of(model, x)
    with pytest.raises(IndexError):
        torchattacks.APGD(model, eps=8 / 255, steps=2, loss="dlr")(x, y)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square"])
def test_single_sample_batches_work(name):
    """Late AutoAttack stages often see a single surviving sample."""
    model = Counting()
    x, _ = _batch(1)
    y = _labels_of(model, x)
    budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=10, n_targets=2)
    atk = make_attack(attack_config(name, "linf", budget, 10), model, 8 / 255, seed=0)
    adv = atk(x, y)
    assert adv.shape == x.shape
    _assert_in_budget(x, adv, 8 / 255, "Linf")


def test_pgd_and_mifgsm_stay_in_budget_with_eps_scaled_step():
    model = Counting()
    x, _ = _batch()
    y = _labels_of(model, x)
    budget = AttackBudget()
    for name, norm, eps in (
        ("pgd20", "linf", 8 / 255),
        ("mifgsm", "linf", 16 / 255),
        ("fgsm", "linf", 8 / 255),
        ("pgd-l2", "l2", 0.5),
        ("fgm-l2", "l2", 0.5),
    ):
        atk = make_attack(attack_config(name, norm, budget, 10), model, eps)
        _assert_in_budget(x, atk(x, y), eps, "Linf" if norm == "linf" else "L2")
    pgd = make_attack(attack_config("pgd20", "linf", budget, 10), model, 8 / 255)
    assert pgd.alpha == pytest.approx(2 / 255) and pgd.steps == 20
