"""``CAATTrainer``: adversarial training with CA-AT as a drop-in ``transformers.Trainer``.

Swap two names in a Hugging Face image-classification script and the model trains with
conflict-aware adversarial training (or vanilla AT)::

    args = CAATTrainingArguments(output_dir="out", attack_eps=8 / 255, caat_gamma=0.8,
                                 pixel_mean=processor.image_mean, pixel_std=processor.image_std)
    trainer = CAATTrainer(model=peft_model, args=args, train_dataset=..., eval_dataset=...)
    trainer.train()
    trainer.evaluate()          # eval_loss, eval_clean_accuracy, eval_robust_accuracy, ...

What changes against the stock Trainer (docs/hf_trainer.md has the whole story):

* ``training_step`` attacks the batch, takes L_clean and L_adv of the objective and hands both to
  :class:`caat_peft.ConflictAware`, which accumulates g_c and g_a *separately* over the
  micro-batches of gradient accumulation; on the micro-batch where the Trainer steps the
  optimiser (``accelerator.sync_gradients``) it combines them once and writes the update into
  ``.grad``. The Trainer then clips and steps as usual, so clipping acts on the combined update.
* Pixel space: the batches' ``pixel_values`` must be *unnormalised* pixels in [0, 1], so that the
  ε-ball and the clamp of the attack are where the threat model says. The image processor's
  normalisation moves into the model call (:class:`PixelLogits`, ``pixel_mean`` / ``pixel_std``):
  drop ``Normalize`` from the transforms and pass its mean and std as arguments.
* ``evaluate()`` also reports clean and PGD accuracy (``eval_clean_accuracy``,
  ``eval_robust_accuracy``, PGD with ``eval_attack_steps`` from a seeded start).
* At logging steps the window's mean of φ (``cos``), μ, λ*, ``adv_share``, both losses and
  accuracies goes to the Trainer's trackers (``report_to``) next to ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from caat_peft.attacks import NORMS, pgd
from caat_peft.config import AttackConfig
from caat_peft.objectives import OBJECTIVES
from caat_peft.training.conflict_aware import ConflictAware, objective_losses

METHODS = ("caat", "vanilla")
GRANULARITIES = ("global", "tensor")
PIXEL_KEY = "pixel_values"
# Slack on the [0, 1] check: resizing and float rounding leave pixels a hair outside.
PIXEL_SLACK = 1e-4


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class CAATTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the method, the training attack and the pixel statistics.

    Every field parses from the command line with ``HfArgumentParser`` (``--caat_gamma 0.9``).
    ε and the step sizes are in pixel units of [0, 1] images (8/255 ≈ 0.0314).
    """

    caat_method: str = field(default="caat", metadata=_help("caat (threshold γ) or vanilla (λ)"))
    caat_gamma: float = field(default=0.8, metadata=_help("CA-AT cosine threshold γ in (-1, 1]"))
    caat_lam: float = field(default=0.5, metadata=_help("vanilla AT: weight λ of g_a in [0, 1]"))
    caat_granularity: str = field(
        default="global", metadata=_help("project the whole gradient (global) or per tensor")
    )
    caat_normalize: bool = field(
        default=False, metadata=_help("unit-normalise g_c and g_a before combining")
    )
    caat_objective: str = field(
        default="pgd-ce", metadata=_help("pgd-ce | trades | mart | clp | alp")
    )
    attack_eps: float = field(default=8 / 255, metadata=_help("radius ε of the threat model"))
    attack_alpha: float = field(default=2 / 255, metadata=_help("PGD step size in training"))
    attack_steps: int = field(default=10, metadata=_help("PGD steps in training"))
    attack_norm: str = field(default="linf", metadata=_help("linf or l2"))
    attack_random_start: bool = field(
        default=True, metadata=_help("start PGD at a uniform point of the ε-ball")
    )
    eval_attack_steps: int = field(
        default=20, metadata=_help("PGD steps in evaluate(); 0 turns robust evaluation off")
    )
    eval_attack_alpha: float | None = field(
        default=None, metadata=_help("PGD step size in evaluate(); default: attack_alpha")
    )
    pixel_mean: list[float] | None = field(
        default=None, metadata=_help("per-channel mean the model expects (processor.image_mean)")
    )
    pixel_std: list[float] | None = field(
        default=None, metadata=_help("per-channel std the model expects (processor.image_std)")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for message in _argument_errors(self):
            raise ValueError(message)


def _argument_errors(a: CAATTrainingArguments) -> list[str]:
    """Every mistake in the CA-AT fields, each as a one-line message naming the field."""
    errors = []
    if a.caat_method not in METHODS:
        errors.append(f"caat_method must be one of {METHODS}, got {a.caat_method!r}")
    if not -1.0 < a.caat_gamma <= 1.0:
        errors.append(f"caat_gamma must lie in (-1, 1], got {a.caat_gamma}")
    if not 0.0 <= a.caat_lam <= 1.0:
        errors.append(f"caat_lam must lie in [0, 1], got {a.caat_lam}")
    if a.caat_granularity not in GRANULARITIES:
        errors.append(f"caat_granularity must be one of {GRANULARITIES}")
    if a.caat_objective not in OBJECTIVES:
        errors.append(f"caat_objective must be one of {tuple(OBJECTIVES)}")
    if a.attack_norm not in NORMS:
        errors.append(f"attack_norm must be one of {NORMS}, got {a.attack_norm!r}")
    if min(a.attack_eps, a.attack_alpha, a.attack_steps) < 0:
        errors.append("attack_eps, attack_alpha and attack_steps must be >= 0")
    if (a.pixel_mean is None) != (a.pixel_std is None):
        errors.append("pass both pixel_mean and pixel_std (the processor's image_mean/std)")
    elif a.pixel_std is not None:
        if len(a.pixel_mean) != len(a.pixel_std):
            errors.append("pixel_mean and pixel_std need one value per channel each")
        if any(s <= 0 for s in a.pixel_std):
            errors.append("pixel_std values must be > 0")
    return errors


class PixelLogits(nn.Module):
    """``f(x) -> logits`` for attacks: x in [0, 1] is normalised here, then fed to a
    ``transformers`` classifier as ``pixel_values`` (``extra`` are further model inputs).

    Normalising inside the call keeps the attack's ε-ball and its [0, 1] clamp in pixel space,
    where the threat model is defined; an ε on normalised inputs would be ε/std per channel.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)
        self.extra = extra or {}

    def normalise(self, x: Tensor) -> Tensor:
        """[0, 1] pixels to what the model was trained on (unchanged without mean / std)."""
        if self.mean is None:
            return x
        return (x - self.mean.to(x)) / self.std.to(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(**{PIXEL_KEY: self.normalise(x)}, **self.extra).logits


class CAATTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is CA-AT (or vanilla AT).

    Takes the stock Trainer's arguments; ``args`` must be :class:`CAATTrainingArguments`.
    Batches are dicts with ``pixel_values`` (in [0, 1]) and ``labels``; other keys are passed
    to the model unchanged. ``loss`` in the logs is the adversarial loss (the clean one for
    standard training, vanilla λ = 0 or γ = 1); both are also logged as ``loss_clean`` /
    ``loss_adv``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CAATTrainingArguments):
            raise TypeError(
                "CAATTrainer needs args=CAATTrainingArguments(...), not TrainingArguments"
            )
        self._conflict_aware: ConflictAware | None = None
        self._window: list[dict[str, Any]] = []  # apply() stats since the last training log
        self._pixels_checked: set[str] = set()  # train / eval: each has its own transforms

    # ------------------------------------------------------------------------------------
    # Training

    def conflict_aware_for(self, model: nn.Module) -> ConflictAware:
        """The ``ConflictAware`` step for the (possibly DDP-wrapped) ``model``; rebuilt when the
        Trainer re-wraps the model, which happens only between optimiser steps, where its
        buffers are empty."""
        ca = self._conflict_aware
        if ca is None or ca.model is not model:
            self._check_supported()
            a = self.args
            ca = ConflictAware(
                model,
                method=a.caat_method,
                gamma=a.caat_gamma,
                lam=a.caat_lam,
                granularity=a.caat_granularity,
                normalize=a.caat_normalize,
                objective=a.caat_objective,
                attack=self.attack_config(),
                # reduces g_c and g_a across processes by hand, takes the fp16 scaler
                accelerator=self.accelerator,
            )
            self._conflict_aware = ca
        return ca

    def _check_supported(self) -> None:
        # These engines own the backward pass (or shard θ): the two-gradient step would bypass
        # them, so refuse instead of training wrongly.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.n_gpu > 1:
            raise ValueError(
                "CAATTrainer runs on one process or DDP (torchrun); DeepSpeed, FSDP and "
                "multi-GPU DataParallel are not supported: launch one process per GPU"
            )

    def attack_config(self) -> AttackConfig:
        """The training attack as caat-peft's ``AttackConfig`` (model in eval mode meanwhile)."""
        a = self.args
        return AttackConfig(
            kind="pgd",
            norm=a.attack_norm,
            eps=a.attack_eps,
            alpha=a.attack_alpha,
            steps=a.attack_steps,
            random_start=a.attack_random_start,
        )

    def pixel_model(self, model: nn.Module, inputs: dict[str, Any]) -> PixelLogits:
        """``x -> logits`` on the unwrapped module: under DDP the attack and both gradient passes
        must bypass the wrapper's reducer (ConflictAware reduces by hand). accelerate's
        mixed-precision autocast sits on the inner module's forward, so it still applies."""
        module = self.accelerator.unwrap_model(model)
        extra = {k: v for k, v in inputs.items() if k not in (PIXEL_KEY, *self._label_keys())}
        return PixelLogits(module, self.args.pixel_mean, self.args.pixel_std, extra)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Attack, both losses, separate accumulation of g_c and g_a; the combined update goes
        into ``.grad`` on the Trainer's sync micro-batch, before it clips and steps.

        Losses are per-micro-batch means averaged over the micro-batches (what the stock
        Trainer does for models without loss kwargs); ``num_items_in_batch`` is not used.
        """
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        x, y = self._pixels_and_labels(inputs)
        ca = self.conflict_aware_for(model)
        with self.compute_loss_context_manager():
            loss_clean, loss_adv, metrics = objective_losses(
                self.pixel_model(model, inputs), ca.objective, x, y, clean_only=ca.clean_only
            )
        ca.backward(loss_clean, loss_adv, metrics=metrics)
        if self.accelerator.sync_gradients:
            stats = ca.apply()
            if self.args.logging_strategy != "no":  # else nothing would ever empty the window
                self._window.append(stats)
        loss = loss_clean if loss_adv is None else loss_adv
        # the Trainer sums the returned values over the micro-batches of one step
        # (older transformers have no current_gradient_accumulation_steps: the configured one)
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return loss.detach() / (steps or self.args.gradient_accumulation_steps)

    def _label_keys(self) -> list[str]:
        return list(self.label_names or ["labels"])

    def _pixels_and_labels(
        self, inputs: dict[str, Any], phase: str = "train"
    ) -> tuple[Tensor, Tensor]:
        label_key = self._label_keys()[0]
        if PIXEL_KEY not in inputs or label_key not in inputs:
            raise ValueError(
                f"CAATTrainer needs batches with {PIXEL_KEY!r} and {label_key!r}, "
                f"got keys {sorted(inputs)}"
            )
        x, y = inputs[PIXEL_KEY], inputs[label_key]
        if phase not in self._pixels_checked:
            _check_pixel_range(x)
            self._pixels_checked.add(phase)
        return x, y

    # ------------------------------------------------------------------------------------
    # Logging

    def log(self, logs: dict[str, float], *args: Any) -> None:
        """Training logs (those with ``loss``) get the mean CA-AT statistics of the window."""
        if "loss" in logs and self._window:
            logs = {**logs, **window_means(self._window)}
            self._window = []
        super().log(logs, *args)  # start_time exists only in newer transformers

    # ------------------------------------------------------------------------------------
    # Evaluation

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        """The stock loop, plus clean and PGD accuracy over the same data
        (``<prefix>_clean_accuracy``, ``<prefix>_robust_accuracy``)."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.args.eval_attack_steps > 0:
            output.metrics.update(self.robust_metrics(dataloader, metric_key_prefix))
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> Any:
        """The stock step on normalised pixels, so that ``eval_loss`` and ``compute_metrics``
        see the model's usual inputs."""
        if PIXEL_KEY in inputs:
            normalise = PixelLogits(model, self.args.pixel_mean, self.args.pixel_std).normalise
            inputs = {**inputs, PIXEL_KEY: normalise(inputs[PIXEL_KEY])}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def robust_metrics(self, dataloader: Any, prefix: str = "eval") -> dict[str, float]:
        """Clean and PGD-``eval_attack_steps`` accuracy over ``dataloader``, gathered over
        processes (each sample counted once). The random start (``attack_random_start``)
        comes from a generator seeded with ``args.seed``: every
        evaluation attacks from the same starts, and training's RNG streams are untouched (a
        resumed run stays on the uninterrupted one's path)."""
        a = self.args
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        model.eval()
        generator = torch.Generator(device=a.device).manual_seed(a.seed)
        alpha = a.attack_alpha if a.eval_attack_alpha is None else a.eval_attack_alpha
        clean, robust = [], []
        for batch in dataloader:
            inputs = self._prepare_inputs(batch)
            if self._label_keys()[0] not in inputs:
                return {}  # nothing to score without labels (predict on unlabelled data)
            x, y = self._pixels_and_labels(inputs, phase="eval")
            f = self.pixel_model(model, inputs)
            x_adv = pgd(
                f,
                x,
                y,
                eps=a.attack_eps,
                alpha=alpha,
                steps=a.eval_attack_steps,
                norm=a.attack_norm,
                random_start=a.attack_random_start,
                generator=generator,
            )
            with torch.no_grad():
                clean.append(self.accelerator.gather_for_metrics(_correct(f(x), y)))
                robust.append(self.accelerator.gather_for_metrics(_correct(f(x_adv), y)))
        if not clean:
            return {}
        return {
            f"{prefix}_clean_accuracy": torch.cat(clean).float().mean().item(),
            f"{prefix}_robust_accuracy": torch.cat(robust).float().mean().item(),
        }


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).long()


def _check_pixel_range(x: Tensor) -> None:
    low, high = float(x.min()), float(x.max())
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        raise ValueError(
            f"pixel_values must be unnormalised pixels in [0, 1] (got {low:.3g} to {high:.3g}): "
            "drop Normalize from the transforms and pass its mean/std as pixel_mean/pixel_std"
        )


def window_means(window: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The mean of each numeric statistic over the optimiser steps of a logging window, and
    ``skipped_steps``: how many had non-finite gradients (no update was made)."""
    sums: dict[str, list[float]] = {}
    for stats in window:
        for key, value in stats.items():
            if key == "finite" or isinstance(value, dict) or value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                sums.setdefault(key, []).append(value)
    means = {key: sum(values) / len(values) for key, values in sums.items()}
    means["skipped_steps"] = float(sum(not stats["finite"] for stats in window))
    return means


__all__ = ["CAATTrainer", "CAATTrainingArguments", "PixelLogits", "window_means"]
