"""Each objective's (L_clean, L_adv) against a float64 re-statement of the published formulas
(the CA-AT authors' TRADES / MART / CLP losses, Kannan et al.'s logit pairing, Madry's CE), on
random logits. The re-statements are written with numpy on probabilities, the way the papers
write them, independently of the log-softmax forms the product uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from caat_peft.config import AttackConfig, ObjectiveConfig
from caat_peft.objectives import build_objective


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(softmax(z)[np.arange(len(y)), y])


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def authors_adv_loss(kind: str, zc: np.ndarray, za: np.ndarray, y: np.ndarray, **hp) -> float:
    """L_adv as the papers and the authors' code define it (without their 1e-12 / 1e-4 guards)."""
    pc, pa = softmax(zc), softmax(za)
    rows = np.arange(len(y))
    if kind == "pgd-ce":
        return float(ce(za, y).mean())
    if kind == "trades":  # KLDivLoss(log p(x'), p(x), "sum") / B
        return float(kl(pc, pa).mean())
    if kind == "mart":
        # the most likely wrong class on x' (the authors' top-2 argsort), its BCE, and the KL
        # weighted by the clean miss probability, with weight β (1 in the authors' split)
        wrong = pa.copy()
        wrong[rows, y] = -np.inf
        runner_up = wrong.argmax(axis=1)
        # 1 − p_r written as Σ_{k≠r} p_k: the same number, without the cancellation of 1 − p_r
        # when p_r rounds to 1 (2 classes, large logits)
        others = pa.copy()
        others[rows, runner_up] = 0.0
        bce = ce(za, y) - np.log(others.sum(axis=1))
        return float((bce + hp["beta"] * kl(pc, pa) * (1.0 - pc[rows, y])).mean())
    if kind == "clp":  # ‖p(x') − p(x)‖₂, batch mean, no CE
        return float(np.linalg.norm(pa - pc, axis=1).mean())
    if kind == "alp":  # CE(x') + w · mean over batch and classes of (z(x) − z(x'))²
        return float(ce(za, y).mean() + hp["weight"] * ((zc - za) ** 2).mean())
    raise AssertionError(kind)


class FixedLogits(nn.Module):
    """Returns given logits for x = 0 and x = 1 (the clean and the adversarial batch)."""

    def __init__(self, clean: torch.Tensor, adv: torch.Tensor) -> None:
        super().__init__()
        self.clean, self.adv = clean, adv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adv if bool(x.flatten()[0] > 0.5) else self.clean


logit_batches = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(2, 12), st.floats(0.1, 8.0)
)
HYPER = {"mart": {"beta": 1.0}, "alp": {"weight": 0.5}}


@settings(max_examples=150, deadline=None)
@given(batch=logit_batches, kind=st.sampled_from(["pgd-ce", "trades", "mart", "clp", "alp"]))
def test_objective_losses_equal_the_published_formulas(batch, kind):
    seed, n, classes, scale = batch
    gen = torch.Generator().manual_seed(seed)
    zc = torch.randn(n, classes, generator=gen, dtype=torch.float64) * scale
    za = torch.randn(n, classes, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, classes, (n,), generator=gen)
    objective = build_objective(ObjectiveConfig(kind=kind), AttackConfig())
    x, x_adv = torch.zeros(n, 1), torch.ones(n, 1)
    losses = objective.losses(FixedLogits(zc, za), x, x_adv, y)
    zc_np, za_np, y_np = zc.numpy(), za.numpy(), y.numpy()
    assert losses.clean.item() == pytest.approx(float(ce(zc_np, y_np).mean()), rel=1e-10)
    expected = authors_adv_loss(kind, zc_np, za_np, y_np, **HYPER.get(kind, {}))
    assert losses.adv.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(batch=logit_batches)
def test_mart_is_close_to_the_authors_code_with_its_numerical_guards(batch):
    """The authors' MART adds 1e-4 inside log(1 − p) and 1e-7 to the miss weight; the product's
    exact log-sum-exp form differs from it by those guards only."""
    seed, n, classes, scale = batch
    gen = torch.Generator().manual_seed(seed)
    zc = torch.randn(n, classes, generator=gen, dtype=torch.float64) * min(scale, 3.0)
    za = torch.randn(n, classes, generator=gen, dtype=torch.float64) * min(scale, 3.0)
    y = torch.randint(0, classes, (n,), generator=gen)
    pc, pa = softmax(zc.numpy()), softmax(za.numpy())
    rows, y_np = np.arange(n), y.numpy()
    wrong = pa.copy()
    wrong[rows, y_np] = -np.inf
    runner_up = wrong.argmax(axis=1)
    guarded = (
        ce(za.numpy(), y_np).mean()
        - np.log(1.0001 - pa[rows, runner_up] + 1e-12).mean()
        + (kl(pc, pa) * (1.0000001 - pc[rows, y_np])).sum() / n
    )
    objective = build_objective("mart", AttackConfig())
    got = objective.losses(FixedLogits(zc, za), torch.zeros(n, 1), torch.ones(n, 1), y).adv
    # log(1.0001 − p) − log(1 − p) ≤ 1e-4 / (1 − p); the 1e-7 on the weight moves the KL term
    # by 1e-7 · KL
    bound = (1.0001e-4 / (1.0 - pa[rows, runner_up])).mean() + 1e-7 * kl(pc, pa).mean() + 1e-12
    assert abs(got.item() - float(guarded)) <= bound
