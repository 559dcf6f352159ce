"""Adversarial objectives: loss formulas against direct computations on hand-made logits, the
shared clean forward pass, configuration, and end-to-end training under both combiners."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caat_peft.attacks import kl_divergence, standard_normal_from_start
from caat_peft.config import AttackConfig, ConfigError, ObjectiveConfig, from_dict, load_config
from caat_peft.objectives import (
    MART_BETA,
    PAIRING_WEIGHT,
    Alp,
    Clp,
    Mart,
    Objective,
    PgdCE,
    Trades,
    build_objective,
    logit_pairing_adv_loss,
    mart_adv_loss,
    probability_pairing_adv_loss,
    trades_adv_loss,
)
from caat_peft.training import train
from caat_peft.training.step import grads_of

from conftest import OUTCOME_SEED, TINY_RECIPE, record_outcome

KINDS = ["pgd-ce", "trades", "mart", "clp", "alp"]

# Hand-made logits (float64): sample 0 is confidently right, sample 1 confidently wrong, sample 2
# uncertain, and x' moves each differently.
LOGITS_CLEAN = torch.tensor(
    [[3.0, 0.5, -1.0, 0.0], [0.0, 2.0, 1.0, -2.0], [0.1, 0.0, -0.1, 0.2]], dtype=torch.float64
)
LOGITS_ADV = torch.tensor(
    [[1.0, 1.5, -1.0, 0.5], [-1.0, 3.0, 0.0, 0.0], [0.0, 0.3, 0.2, -0.4]], dtype=torch.float64
)
Y = torch.tensor([0, 2, 3])


def probs(logits: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        rows.append([math.exp(v) / z for v in row])
    return rows


def kl_direct(p: list[float], q: list[float]) -> float:
    return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))


# --------------------------------------------------------------------------------------------
# Formulas


def test_trades_loss_is_the_batchmean_kl_of_clean_to_adversarial():
    p, q = probs(LOGITS_CLEAN), probs(LOGITS_ADV)
    expected = sum(kl_direct(pi, qi) for pi, qi in zip(p, q)) / 3
    assert trades_adv_loss(LOGITS_CLEAN, LOGITS_ADV).item() == pytest.approx(expected, rel=1e-12)
    assert trades_adv_loss(LOGITS_CLEAN, LOGITS_CLEAN).item() == pytest.approx(0, abs=1e-15)
    # KL(p ‖ q), not KL(q ‖ p): the two differ on these logits
    reverse = sum(kl_direct(qi, pi) for pi, qi in zip(p, q)) / 3
    assert abs(expected - reverse) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_mart_loss_matches_its_definition(beta):
    p, q = probs(LOGITS_CLEAN), probs(LOGITS_ADV)
    expected = 0.0
    for i, y in enumerate(Y.tolist()):
        runner_up = max(qk for k, qk in enumerate(q[i]) if k != y)
        bce = -math.log(q[i][y]) - math.log(1 - runner_up)
        expected += bce + beta * kl_direct(p[i], q[i]) * (1 - p[i][y])
    expected /= 3
    got = mart_adv_loss(LOGITS_CLEAN, LOGITS_ADV, Y, beta)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mart_bce_is_finite_where_the_runner_up_takes_all_the_mass():
    """1 − max_{k≠y} p_k rounds to 0 in float32 here; the log-sum-exp form stays exact."""
    logits = torch.tensor([[0.0, 40.0, -5.0]])
    y = torch.tensor([0])
    got = mart_adv_loss(logits, logits, y, beta=6.0)
    # −log p_0 = 40 + log(1 + e^-40 + e^-45); −log(1 − p_1) = −log((1 + e^-5)/(1 + e^40 + e^-5))
    expected = (40 + math.log1p(math.exp(-40) + math.exp(-45))) + (
        math.log1p(math.exp(40) + math.exp(-5)) - math.log1p(math.exp(-5))
    )
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-6)


def test_mart_weights_the_kl_by_the_clean_miss_probability():
    """The KL term of a sample the model already gets right with certainty vanishes."""
    certain = torch.tensor([[30.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    assert mart_adv_loss(certain, adv, y, 6.0).item() == pytest.approx(
        mart_adv_loss(certain, adv, y, 0.0).item(), rel=1e-10
    )


def test_clp_loss_is_the_mean_l2_distance_of_the_probabilities():
    p, q = probs(LOGITS_CLEAN), probs(LOGITS_ADV)
    expected = sum(math.dist(pi, qi) for pi, qi in zip(p, q)) / 3
    got = probability_pairing_adv_loss(LOGITS_CLEAN, LOGITS_ADV)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # no cross-entropy term: equal predictions cost nothing, whatever the label
    assert probability_pairing_adv_loss(LOGITS_ADV, LOGITS_ADV).item() == 0.0


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_logit_pairing_loss_matches_its_definition(weight):
    q = probs(LOGITS_ADV)
    ce = -sum(math.log(q[i][y]) for i, y in enumerate(Y.tolist())) / 3
    squares = sum(
        (a - b) ** 2
        for row_c, row_a in zip(LOGITS_CLEAN.tolist(), LOGITS_ADV.tolist())
        for a, b in zip(row_c, row_a)
    )
    expected = ce + weight * squares / (3 * 4)
    got = logit_pairing_adv_loss(LOGITS_CLEAN, LOGITS_ADV, Y, weight)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        lambda c, a: trades_adv_loss(c, a),
        lambda c, a: mart_adv_loss(c, a, Y, 6.0),
        lambda c, a: probability_pairing_adv_loss(c, a),
        lambda c, a: logit_pairing_adv_loss(c, a, Y, 0.5),
    ],
    ids=["trades", "mart", "clp", "alp"],
)
def test_losses_differentiate_through_both_logits_and_widen_bf16(fn):
    clean = LOGITS_CLEAN.clone().requires_grad_(True)
    adv = LOGITS_ADV.clone().requires_grad_(True)
    fn(clean, adv).backward()
    assert clean.grad.abs().sum() > 0 and adv.grad.abs().sum() > 0
    low = fn(LOGITS_CLEAN.bfloat16(), LOGITS_ADV.bfloat16())
    assert low.dtype == torch.float32  # autocast logits are widened before the loss
    assert low.item() == pytest.approx(fn(LOGITS_CLEAN, LOGITS_ADV).item(), rel=0.05)


def test_kl_divergence_is_zero_only_on_equal_distributions():
    assert kl_divergence(LOGITS_CLEAN, LOGITS_CLEAN + 5.0).abs().max() < 1e-12  # shift-invariant
    assert (kl_divergence(LOGITS_CLEAN, LOGITS_ADV) > 0).all()


# --------------------------------------------------------------------------------------------
# The objective interface used by the training step


class Counting(nn.Module):
    """A linear classifier on flattened pixels that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def _batch(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("kind", KINDS)
def test_losses_share_one_clean_forward_and_both_gradients_follow(kind):
    model = Counting().train()
    x, y = _batch()
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=2)
    objective = build_objective(kind, attack)
    x_adv = objective.attack(model, x, y)
    assert model.training  # mode restored
    model.calls = 0
    losses = objective.losses(model, x, x_adv, y)
    assert model.calls == 2  # one forward on x, one on x'
    params = list(model.parameters())
    g_c = grads_of(losses.clean, params, retain_graph=True)  # as the training step does
    g_a = grads_of(losses.adv, params)
    assert all(torch.isfinite(g).all() for g in g_c + g_a)
    torch.testing.assert_close(losses.clean, F.cross_entropy(model(x), y))
    expected = {
        "pgd-ce": F.cross_entropy(losses.logits_adv, y),
        "trades": trades_adv_loss(losses.logits_clean, losses.logits_adv),
        "mart": mart_adv_loss(losses.logits_clean, losses.logits_adv, y, MART_BETA),
        "clp": probability_pairing_adv_loss(losses.logits_clean, losses.logits_adv),
        "alp": logit_pairing_adv_loss(losses.logits_clean, losses.logits_adv, y, PAIRING_WEIGHT),
    }[kind]
    torch.testing.assert_close(losses.adv, expected)


def test_trades_adversarial_gradient_reaches_the_clean_branch():
    """L_adv = KL(f(x) ‖ f(x')) depends on θ through f(x) too: its gradient is not the one of
    the adversarial branch alone (it would be with a detached f(x))."""
    model = Counting()
    x, y = _batch()
    objective = Trades(AttackConfig(eps=0.1, alpha=0.05, steps=2))
    x_adv = objective.attack(model, x, y)
    losses = objective.losses(model, x, x_adv, y)
    (full,) = torch.autograd.grad(losses.adv, [model.net[1].weight], retain_graph=True)
    detached = trades_adv_loss(losses.logits_clean.detach(), losses.logits_adv)
    (adv_only,) = torch.autograd.grad(detached, [model.net[1].weight])
    assert (full - adv_only).abs().max() > 1e-6


def test_objective_classes_and_hyper_parameters():
    attack = AttackConfig()
    assert isinstance(build_objective("pgd-ce", attack), PgdCE)
    assert build_objective(ObjectiveConfig(kind="mart", beta=2.0), attack).beta == 2.0
    assert build_objective("mart", attack).beta == MART_BETA == 1.0  # the CA-AT authors' split
    alp = build_objective(ObjectiveConfig(kind="alp", pairing_weight=1.5), attack)
    assert isinstance(alp, Alp) and alp.pairing_weight == 1.5
    assert isinstance(build_objective("clp", attack), Clp)
    assert isinstance(build_objective("trades", attack), Trades)
    assert all(isinstance(build_objective(k, attack), Objective) for k in KINDS)
    assert isinstance(build_objective("mart", attack), Mart)


def test_attack_kind_selects_fgsm_and_trades_uses_its_own_attack(monkeypatch):
    from caat_peft import objectives

    called = []
    for name in ("pgd", "fgsm", "trades_attack"):
        monkeypatch.setattr(
            objectives, name, lambda *a, _n=name, **k: called.append(_n) or a[1].clone()
        )
    model = Counting()
    x, y = _batch()
    build_objective("mart", AttackConfig(kind="fgsm")).attack(model, x, y)
    build_objective("clp", AttackConfig(kind="pgd")).attack(model, x, y)
    build_objective("trades", AttackConfig(kind="pgd")).attack(model, x, y)
    assert called == ["fgsm", "pgd", "trades_attack"]


def test_fgsm_step_defaults_to_one_and_a_quarter_eps():
    model = Counting().eval()
    x, y = _batch()
    objective = build_objective("pgd-ce", AttackConfig(kind="fgsm", eps=0.1, random_start=False))
    x_adv = objective.attack(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert (x_adv - x).abs().max() > 0.09  # the 0.125 step, clipped to ε


def test_trades_start_follows_the_trainers_global_start():
    """The trainer hands a uniform start drawn for the global batch; TRADES turns it into its
    own 0.001·N(0, I) start, so equal starts give equal attacks."""
    model = Counting()
    x, y = _batch()
    attack = AttackConfig(eps=0.1, alpha=0.02, steps=3)
    objective = build_objective("trades", attack)
    start = torch.empty_like(x).uniform_(-0.1, 0.1)
    a = objective.attack(model, x, y, init_delta=start)
    b = objective.attack(model, x, y, init_delta=start.clone())
    assert torch.equal(a, b)
    c = objective.attack(model, x, y, init_delta=start.flip(0))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["mart", "clp"])
def test_mart_and_clp_start_from_small_gaussian_noise(kind):
    """The authors' MART and CLP attacks start at x + 0.001·N(0, I), not at a uniform point of
    the ball; the noise comes from the trainer's global-batch start, so equal starts give equal
    attacks."""
    model = Counting()
    x, y = _batch()
    x = x.clamp(0.1, 0.9)  # away from the box, which would cut the start
    start = torch.empty_like(x).uniform_(-0.1, 0.1)
    at_start = build_objective(kind, AttackConfig(eps=0.1, steps=0)).attack(model, x, y, start)
    expected = 0.001 * standard_normal_from_start(start, 0.1, "linf")
    torch.testing.assert_close(at_start - x, expected, atol=1e-7, rtol=0)
    objective = build_objective(kind, AttackConfig(eps=0.1, alpha=0.02, steps=3))
    a = objective.attack(model, x, y, init_delta=start)
    assert torch.equal(a, objective.attack(model, x, y, init_delta=start.clone()))
    uniform = build_objective("pgd-ce", AttackConfig(eps=0.1, steps=0)).attack(model, x, y, start)
    torch.testing.assert_close(uniform - x, start, atol=1e-7, rtol=0)  # pgd-ce: uniform


@pytest.mark.parametrize(
    "data,message",
    [
        ({"objective": {"kind": "lp"}}, "objective.kind = 'lp' is not allowed"),
        ({"attack": {"kind": "cw"}}, "attack.kind = 'cw' is not allowed"),
        ({"objective": {"kind": "trades", "beta": 6}}, "objective.beta is used by"),
        ({"objective": {"kind": "mart", "beta": -1}}, "objective.beta = -1.0 must be >= 0"),
        ({"objective": {"kind": "mart", "pairing_weight": 1}}, "pairing_weight is used by"),
        ({"objective": {"kind": "clp", "pairing_weight": 1}}, "the authors' clp has no weight"),
        ({"objective": {"kind": "alp", "pairing_weight": -1}}, "must be >= 0"),
        ({"train": {"nesterov": True}}, "train.nesterov = true needs train.optimizer = sgd"),
        (
            {"objective": {"kind": "trades"}, "attack": {"kind": "fgsm"}},
            "attack.kind = fgsm does not apply to objective.kind = trades",
        ),
        ({"attack": {"fgsm_alpha": -0.1}}, "attack.fgsm_alpha = -0.1 must be >= 0"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(data)


def test_config_accepts_every_objective_and_attack():
    for kind in KINDS:
        cfg = from_dict({"objective": {"kind": kind}})
        assert cfg.objective.kind == kind
    cfg = from_dict(
        {
            "attack": {"kind": "fgsm", "fgsm_alpha": "10/255"},
            "objective": {"kind": "mart", "beta": 3},
        }
    )
    assert cfg.attack.fgsm_alpha == pytest.approx(10 / 255) and cfg.objective.beta == 3.0


# --------------------------------------------------------------------------------------------
# End to end: every objective under both combiners, through the trainer


# Digits 0 vs 1 at 16 px (chance 0.5). A randomly initialised ViT gives the adversarial losses
# almost nothing to work with (near-constant outputs: KL ≈ 0), so the runs fine-tune, as the
# package is meant to be used, a backbone first trained on clean images (5 epochs, 1.5 s): then
# every adversarial run ends far more robust than clean training alone. (With timm's std-0.02
# init that backbone sat at chance on some kernels; model.init: auto, docs/models.md.)
COMMON = [
    "data.classes=[0,1]",
    "peft.method=full",
    "eval.limit=128",
    "eval.steps=5",
    "eval.every=0",  # PGD-5 accuracy at the end only
]


@pytest.fixture(scope="module")
def clean_backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    cfg = load_config(
        TINY_RECIPE,
        [
            *COMMON,
            "train.epochs=5",
            "train.lr=3e-3",
            "combiner.kind=vanilla",
            "combiner.lam=0",
            f"train.seed={OUTCOME_SEED}",
            "model.init=auto",  # the product's default for random weights (the recipe pins timm)
        ],
    )
    result = train(cfg, out / "run", progress=False)
    path = out / "backbone.pth"
    torch.save(result.model.net.state_dict(), path)
    record_outcome(
        "objectives-clean-backbone",
        clean_acc=result.final["clean_acc"],
        robust_acc=result.final["robust_acc"],
    )
    return path, result.final


def _mean_ratio(run_dir, key_num: str, key_den: str) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("type") == "step" and r.get(key_den)]
    return sum(r[key_num] / r[key_den] for r in steps) / max(1, len(steps))


@pytest.mark.parametrize("combiner", ["caat", "vanilla"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_objective_learns_robustness_under_both_combiners(
    tmp_path, clean_backbone, kind, combiner
):
    path, clean = clean_backbone
    cfg = load_config(
        TINY_RECIPE,
        [
            *COMMON,
            f"model.checkpoint={path}",
            f"objective.kind={kind}",
            f"combiner.kind={combiner}",
            "train.epochs=8",
            "train.lr=1e-3",
            f"train.seed={OUTCOME_SEED}",
        ],
    )
    final = train(cfg, tmp_path / "run", progress=False).final
    record_outcome(
        f"objectives-{kind}-{combiner}",
        clean_acc=final["clean_acc"],
        robust_acc=final["robust_acc"],
        backbone_robust_acc=clean["robust_acc"],
        adv_over_clean_norm=_mean_ratio(tmp_path / "run", "norm_adv", "norm_clean"),
    )
    # Thresholds from tools/stability.py: seeds 0-4 × ATEN_CPU_CAPABILITY default / avx2 /
    # avx512 × OMP_NUM_THREADS 1 / 2 (AMD EPYC, 2026-12-02, re-measured after clp became the
    # authors' loss, alp was added and mart's β became 1), 10 runs each; chance is 0.5.
    assert final["skipped_steps"] == 0
    assert clean["clean_acc"] >= 0.9  # the backbone trained: measured 0.972-1.000
    # Clean training alone reached PGD-5 0.278-0.528 (too wide for a fixed bound); adversarial
    # training beat it on the same seed by 0.157-0.565 (every objective, both combiners).
    assert final["robust_acc"] >= clean["robust_acc"] + 0.1, (final, clean["robust_acc"])
    assert final["robust_acc"] >= 0.6, final  # measured 0.657-0.861
    assert final["clean_acc"] >= 0.9, final  # measured 0.972-1.000
