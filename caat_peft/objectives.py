"""Adversarial objectives: each gives the pair (L_clean, L_adv) that the combiner weighs.

The clean loss is always cross-entropy on the clean images, L_clean = CE(f(x), y); the objective
decides how the adversarial example x' is found and what the adversarial loss is. The combiner
(vanilla λ or CA-AT γ) never depends on the objective, so an objective's L_adv carries no
clean-versus-adversarial trade-off weight of its own (see ``docs/method.md``, "Objectives").
Batch reductions are means, so the losses do not scale with the batch size.

* ``pgd-ce`` (Madry et al., 2018): L_adv = CE(f(x'), y), x' from PGD (or FGSM) on CE.
* ``trades`` (Zhang et al., 2019): L_adv = KL(f(x) ‖ f(x')), x' maximises that KL.
* ``mart`` (Wang et al., 2020): L_adv = BCE(f(x'), y) + β·KL(f(x) ‖ f(x'))·(1 − p_y(x)), with
  the CA-AT authors' β = 1 by default (Wang et al. use β = 6 on CIFAR-10).
* ``clp`` (the CA-AT authors' clean logit pairing): L_adv = (1/B) Σ_i ‖p(x'_i) − p(x_i)‖₂, the
  unsquared L2 distance between the softmax *probability* vectors, no cross-entropy term.
* ``alp`` (adversarial logit pairing, Kannan et al., 2018): L_adv = CE(f(x'), y)
  + w·MSE(z(x), z(x')) on the logits z; not in the paper, kept as the better-known variant.

``mart`` and ``clp`` attack CE from x + 0.001·N(0, I), as the authors' code does, instead of a
uniform point of the ε-ball (TRADES starts the same way); ``pgd-ce`` and ``alp`` start uniformly.

Where L_adv needs the clean logits (trades, mart, clp, alp) they come from the same forward pass as
L_clean, so the two losses share one graph: the training step takes ∇θ L_clean with
``retain_graph=True`` before ∇θ L_adv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caat_peft.attacks import (
    TRADES_START_STD,
    at_least_fp32,
    fgsm,
    kl_divergence,
    pgd,
    standard_normal_from_start,
    trades_attack,
)
from caat_peft.config import AttackConfig, ObjectiveConfig

MART_BETA = 1.0  # the CA-AT authors' MART split (Wang et al., 2020, use 6.0 on CIFAR-10)
PAIRING_WEIGHT = 0.5  # alp


@dataclass
class Losses:
    clean: Tensor
    adv: Tensor
    logits_clean: Tensor
    logits_adv: Tensor


# --------------------------------------------------------------------------------------------
# The adversarial losses, as pure functions of logits (unit-tested against direct formulas)


def trades_adv_loss(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """TRADES' robustness term: (1/B) Σ_i KL(f(x_i) ‖ f(x'_i)) ("batchmean").

    The gradient flows through both distributions, as in Zhang et al.'s formulation: the term
    pulls the clean and adversarial predictions together, not one towards a fixed target.
    """
    return kl_divergence(logits_clean, logits_adv).mean()


def mart_adv_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART (Wang et al., 2020): the boosted BCE on x' plus a KL term weighted towards the
    examples the model misclassifies (small clean probability of the true class):

        (1/B) Σ_i [ −log p_y(x'_i) − log(1 − max_{k≠y} p_k(x'_i))
                    + β · KL(f(x_i) ‖ f(x'_i)) · (1 − p_y(x_i)) ].

    log(1 − max_{k≠y} p_k) is computed as a log-sum-exp over the logits without that class, so
    it is exact where 1 − p_k rounds to zero (the reference code adds 1e-4 instead). The weight
    1 − p_y(x) is differentiated through, as in the paper's loss.
    """
    logits_clean, logits_adv = at_least_fp32(logits_clean), at_least_fp32(logits_adv)
    ce = F.cross_entropy(logits_adv, y, reduction="none")
    masked = logits_adv.detach().scatter(1, y[:, None], float("-inf"))
    runner_up = masked.argmax(dim=1, keepdim=True)  # the most likely wrong class on x'
    without = logits_adv.scatter(1, runner_up, float("-inf"))
    log_not_runner_up = torch.logsumexp(without, dim=1) - torch.logsumexp(logits_adv, dim=1)
    bce = ce - log_not_runner_up
    p_true = F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    kl = kl_divergence(logits_clean, logits_adv)
    return (bce + beta * kl * (1.0 - p_true)).mean()


def probability_pairing_adv_loss(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """The CA-AT authors' CLP term: the mean over the batch of the unsquared L2 distance between
    the clean and adversarial softmax probability vectors, (1/B) Σ_i ‖p(x'_i) − p(x_i)‖₂.

    The distance's gradient is undefined where the two vectors are equal (the norm's kink at 0);
    torch's ``vector_norm`` gives 0 there, as the authors' ``torch.norm`` does.
    """
    logits_clean, logits_adv = at_least_fp32(logits_clean), at_least_fp32(logits_adv)
    diff = F.softmax(logits_adv, dim=1) - F.softmax(logits_clean, dim=1)
    return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()


def logit_pairing_adv_loss(
    logits_clean: Tensor, logits_adv: Tensor, y: Tensor, weight: float
) -> Tensor:
    """Adversarial logit pairing (Kannan et al., 2018): CE on x' plus the squared distance
    between the clean and adversarial logits, averaged over batch and classes,

        CE(f(x'), y) + w · (1/(B·K)) Σ_i ‖z(x_i) − z(x'_i)‖².

    The mean over the K classes keeps one w meaningful across data sets with 5 or 200 classes.
    """
    logits_clean, logits_adv = at_least_fp32(logits_clean), at_least_fp32(logits_adv)
    return F.cross_entropy(logits_adv, y) + weight * F.mse_loss(logits_clean, logits_adv)


# --------------------------------------------------------------------------------------------
# Objectives: an attack and an adversarial loss


class Objective:
    """PGD-CE by default; subclasses change the adversarial loss and, for TRADES, the attack.

    The training step uses three methods: :meth:`attack` (x'; parameters untouched),
    :meth:`losses` (L_clean and L_adv sharing the clean forward pass) and :meth:`clean_loss`
    (standard training, where g_a is unused).
    """

    name = "pgd-ce"

    def __init__(self, attack: AttackConfig, objective: ObjectiveConfig | None = None) -> None:
        self.attack_cfg = attack
        self.objective_cfg = objective or ObjectiveConfig(kind=self.name)

    # Where the CE attack starts: "uniform" (a uniform point of the ε-ball, Madry et al.) or
    # "normal" (x + 0.001·N(0, I), the authors' MART and CLP code).
    start = "uniform"

    def attack(
        self, model: nn.Module, x: Tensor, y: Tensor, init_delta: Tensor | None = None
    ) -> Tensor:
        """x' maximising CE by the configured attack (``attack.kind``: pgd or fgsm)."""
        a = self.attack_cfg
        if a.random_start and self.start == "normal":
            init_delta = self._normal_start(x, init_delta)
        common = {
            "eps": a.eps,
            "norm": a.norm,
            "random_start": a.random_start,
            "eval_mode_during_attack": a.eval_mode,
            "init_delta": init_delta if a.random_start else None,
        }
        if a.kind == "fgsm":
            return fgsm(model, x, y, alpha=a.fgsm_alpha, **common)
        return pgd(model, x, y, alpha=a.alpha, steps=a.steps, **common)

    def _normal_start(self, x: Tensor, init_delta: Tensor | None) -> Tensor:
        """0.001·ξ, ξ ~ N(0, I): from the trainer's global-batch start when given (so that the
        run does not depend on the process count), else drawn."""
        a = self.attack_cfg
        if init_delta is not None:
            noise = standard_normal_from_start(init_delta.to(x), a.eps, a.norm)
        else:
            noise = torch.randn_like(x)
        return TRADES_START_STD * noise

    def adversarial_loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits_adv, y)

    def losses(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Losses:
        """L_clean = CE(f(x), y) and this objective's L_adv, from one forward pass on each of x
        and x'."""
        logits_clean = model(x)
        logits_adv = model(x_adv)
        return Losses(
            clean=F.cross_entropy(logits_clean, y),
            adv=self.adversarial_loss(logits_clean, logits_adv, y),
            logits_clean=logits_clean,
            logits_adv=logits_adv,
        )

    def clean_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The clean loss alone (standard training: the adversarial gradient is unused)."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits


class PgdCE(Objective):
    """Madry's objective: cross-entropy on examples that maximise cross-entropy."""

    name = "pgd-ce"


class Trades(Objective):
    """TRADES: L_adv = KL(f(x) ‖ f(x')) with x' from TRADES' own KL attack.

    No β: in TRADES' own loss CE + β·KL, β is the clean-versus-adversarial trade-off, which here
    is the combiner's job (vanilla: λ = β/(1+β) gives the same direction; CA-AT: γ).
    """

    name = "trades"

    def attack(
        self, model: nn.Module, x: Tensor, y: Tensor, init_delta: Tensor | None = None
    ) -> Tensor:
        """x' maximising the KL from x + 0.001·N(0, I); ``init_delta`` (the trainer's start for
        the global batch) supplies the noise, else it is drawn."""
        a = self.attack_cfg
        noise = None
        if init_delta is not None:
            noise = standard_normal_from_start(init_delta.to(x), a.eps, a.norm)
        return trades_attack(
            model,
            x,
            eps=a.eps,
            alpha=a.alpha,
            steps=a.steps,
            norm=a.norm,
            eval_mode_during_attack=a.eval_mode,
            init_noise=noise,
        )

    def adversarial_loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
        return trades_adv_loss(logits_clean, logits_adv)


class Mart(Objective):
    """MART: boosted BCE on x' plus a misclassification-weighted KL; x' from the CE attack
    started at x + 0.001·N(0, I) (the authors' code)."""

    name = "mart"
    start = "normal"

    def __init__(self, attack: AttackConfig, objective: ObjectiveConfig | None = None) -> None:
        super().__init__(attack, objective)
        beta = self.objective_cfg.beta
        self.beta = MART_BETA if beta is None else beta

    def adversarial_loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
        return mart_adv_loss(logits_clean, logits_adv, y, self.beta)


class Clp(Objective):
    """The authors' CLP: the L2 distance between clean and adversarial probabilities, no CE;
    x' from the CE attack started at x + 0.001·N(0, I)."""

    name = "clp"
    start = "normal"

    def adversarial_loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
        return probability_pairing_adv_loss(logits_clean, logits_adv)


class Alp(Objective):
    """Adversarial logit pairing: CE on x' plus the clean-to-adversarial logit distance."""

    name = "alp"

    def __init__(self, attack: AttackConfig, objective: ObjectiveConfig | None = None) -> None:
        super().__init__(attack, objective)
        weight = self.objective_cfg.pairing_weight
        self.pairing_weight = PAIRING_WEIGHT if weight is None else weight

    def adversarial_loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
        return logit_pairing_adv_loss(logits_clean, logits_adv, y, self.pairing_weight)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (PgdCE, Trades, Mart, Clp, Alp)}


def build_objective(kind: str | ObjectiveConfig, attack: AttackConfig) -> Objective:
    """The objective named by ``kind`` (a name, or the whole ``objective`` config section, which
    also carries its hyper-parameters)."""
    cfg = kind if isinstance(kind, ObjectiveConfig) else ObjectiveConfig(kind=kind)
    if cfg.kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.kind!r}")  # config validation prevents this
    return OBJECTIVES[cfg.kind](attack, cfg)
