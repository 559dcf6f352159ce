"""Adversarial objectives: each gives the pair (L_clean, L_adv) that the combiner weighs.

The clean loss is always cross-entropy on the clean images; the objective decides how the
adversarial example is found and what the adversarial loss is. The combiner (vanilla or CA-AT)
never depends on the objective.

* ``pgd-ce`` (Madry et al., 2018): x_adv = PGD maximising CE; L_adv = CE(f(x_adv), y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from caat_peft.attacks import pgd
from caat_peft.config import AttackConfig


@dataclass
class Losses:
    clean: Tensor
    adv: Tensor
    logits_clean: Tensor
    logits_adv: Tensor


class PgdCE:
    """Madry's objective: cross-entropy on PGD examples that maximise cross-entropy."""

    name = "pgd-ce"

    def __init__(self, attack: AttackConfig) -> None:
        self.attack_cfg = attack

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, init_delta: Tensor | None = None):
        a = self.attack_cfg
        return pgd(
            model,
            x,
            y,
            eps=a.eps,
            alpha=a.alpha,
            steps=a.steps,
            norm=a.norm,
            random_start=a.random_start,
            eval_mode_during_attack=a.eval_mode,
            init_delta=init_delta if a.random_start else None,
        )

    def losses(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Losses:
        logits_clean = model(x)
        logits_adv = model(x_adv)
        return Losses(
            clean=F.cross_entropy(logits_clean, y),
            adv=F.cross_entropy(logits_adv, y),
            logits_clean=logits_clean,
            logits_adv=logits_adv,
        )

    def clean_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The clean loss alone (standard training: the adversarial gradient is unused)."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits


def build_objective(kind: str, attack: AttackConfig) -> PgdCE:
    if kind == "pgd-ce":
        return PgdCE(attack)
    raise ValueError(f"unknown objective {kind!r}")  # config validation prevents this
