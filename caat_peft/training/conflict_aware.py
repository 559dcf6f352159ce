"""CA-AT in anyone's training loop: the one implementation of the method's step.

``ConflictAware`` takes the clean and adversarial losses of a batch (or the batch itself and an
objective), forms g_c = ∇θ L_clean and g_a = ∇θ L_adv over the trainable parameters only,
accumulates them *separately* over micro-batches, averages both across processes, combines them
once per optimiser step (CA-AT γ or vanilla λ) and writes the update into ``.grad``::

    ca = ConflictAware(model, gamma=0.8)          # or method="vanilla", lam=0.5
    loss_clean = F.cross_entropy(model(x), y)
    loss_adv = F.cross_entropy(model(x_adv), y)
    ca.backward(loss_clean, loss_adv)             # once per micro-batch
    stats = ca.apply()                            # φ, μ, λ*, ... ; the update is in .grad
    optimizer.step()
    optimizer.zero_grad()

``caat-peft train`` runs on this class (``training/step.py``), so a hand-written loop and the
command compute the same update.

Why the combination is done here and not by DDP: CA-AT is non-linear in (g_c, g_a), so the two
*global* gradients must exist before combining. A DDP-wrapped model has its gradient
synchronisation switched off (``require_backward_grad_sync``, what ``no_sync()`` sets) and both
gradients are all-reduced by hand; DDP's reducer is never armed, so it never waits for a
backward that ``torch.autograd.grad`` would not run. With fp16 loss scaling the losses are
scaled for the backward passes and the gradients unscaled *before* combining (the combiner
must see the true g_c and g_a); with a torch ``GradScaler`` (accelerate's too) the update is
written back scaled, so that ``scaler.step(optimizer)`` unscales it and skips steps with
overflow as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from caat_peft.config import AttackConfig, ObjectiveConfig
from caat_peft.gradients import Combiner, make_combiner, per_tensor_cosines
from caat_peft.objectives import Objective, build_objective
from caat_peft.training.distributed import Reducer, make_reducer, process_group_reducer
from caat_peft.training.fastpath import autocast_for, lora_merged


class LossScale(Protocol):
    """caat-peft's own fp16 scaler (``training.optim.LossScaler``): the scale as a float and an
    ``update(found_nonfinite)`` called once per optimiser step."""

    scale: float

    def update(self, found_nonfinite: bool) -> None: ...


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def _isfinite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grads_of(
    loss: Tensor, params: Sequence[nn.Parameter], retain_graph: bool = False
) -> list[Tensor]:
    """∇θ loss over ``params`` only (zeros for parameters the loss does not reach), float32."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [
        torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
        for g, p in zip(grads, params)
    ]


class ConflictAware:
    """The conflict-aware (or vanilla) combination of g_c and g_a as a drop-in training step.

    Args:
        model: the model being trained: plain, peft-wrapped, compiled, or DDP-wrapped (also by
            ``accelerator.prepare``). Its parameters with ``requires_grad`` are θ.
        method: ``"caat"`` (threshold ``gamma``) or ``"vanilla"`` (weight ``lam`` on g_a).
        gamma, lam, granularity, normalize: the combiner's options (docs/method.md).
        objective, attack: what :meth:`backward_batch` attacks and optimises: an objective kind
            (``"pgd-ce"``, ``"trades"``, ``"mart"``, ``"clp"``, ``"alp"``), an
            ``ObjectiveConfig``, or a built ``Objective``; the attack settings as an
            ``AttackConfig`` or a dict of its fields (default: PGD-10, L∞ ε = 8/255).
        precision: autocast used by :meth:`backward_batch` (``fp32``, ``bf16``, ``fp16``).
        accelerator: reduce across its processes and take its fp16 ``scaler``. Without one,
            an initialised ``torch.distributed`` group of more than one process is used.
        grad_scaler: a ``torch.amp.GradScaler`` (then call ``scaler.step(optimizer)`` and
            ``scaler.update()`` as usual), or caat-peft's ``LossScaler``.
        params: θ explicitly, instead of every parameter that requires a gradient.
        combiner, reduce, clean_only: lower-level overrides (``caat-peft train`` passes its
            own); ``clean_only`` skips g_a where the update is g_c anyway (λ = 0, γ = 1).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "caat",
        gamma: float = 0.8,
        lam: float = 0.5,
        granularity: str = "global",
        normalize: bool = False,
        objective: str | ObjectiveConfig | Objective = "pgd-ce",
        attack: AttackConfig | dict[str, Any] | None = None,
        precision: str = "fp32",
        accelerator: Any = None,
        grad_scaler: Any = None,
        params: Sequence[nn.Parameter] | None = None,
        combiner: Combiner | None = None,
        reduce: Reducer | None = None,
        clean_only: bool | None = None,
    ) -> None:
        self.model = model
        self.module = _unwrapped(model)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Gradients are reduced here, after both backward passes: DDP's own all-reduce
            # would average one of them at the wrong moment and wait for hooks that
            # torch.autograd.grad does not fire.
            model.require_backward_grad_sync = False
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if params is not None:
            by_id = {id(p): n for n, p in named}
            named = [(by_id.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]
            frozen = [n for n, p in named if not p.requires_grad]
            if frozen:
                raise ValueError(
                    f"params holds frozen parameters ({', '.join(frozen[:3])}): "
                    "pass only parameters with requires_grad=True"
                )
        if not named:
            raise ValueError("no trainable parameters (nothing has requires_grad=True)")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(
                f"θ spans several devices ({', '.join(sorted(map(str, devices)))}): the combiner "
                "needs every trainable parameter on one device (no device_map='auto')"
            )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.combiner = combiner or make_combiner(
            method, lam=lam, gamma=gamma, granularity=granularity, normalize=normalize
        )
        if clean_only is None:
            clean_only = (method == "vanilla" and lam == 0.0) or (method == "caat" and gamma >= 1)
        self.clean_only = clean_only
        self.objective = _objective(objective, attack)
        self.precision = precision
        if grad_scaler is None and accelerator is not None:
            grad_scaler = getattr(accelerator, "scaler", None)
        self.grad_scaler = grad_scaler
        if reduce is None:
            reduce = make_reducer(accelerator) if accelerator is not None else None
            reduce = reduce or process_group_reducer()
        self.reduce = reduce
        self._reset()

    # ----------------------------------------------------------------------------------------
    # Accumulation

    def _reset(self) -> None:
        self._g_clean: list[Tensor] | None = None
        self._g_adv: list[Tensor] | None = None
        self._metrics: dict[str, Tensor] = {}
        self._count = 0

    def _torch_scaler(self) -> bool:
        """Whether an enabled torch GradScaler takes the step (a disabled one never skips)."""
        scaler = self.grad_scaler
        return scaler is not None and hasattr(scaler, "get_scale") and scaler.is_enabled()

    def _loss_scale(self) -> float:
        """The scale the losses are multiplied by before their backward passes (1: none)."""
        scaler = self.grad_scaler
        if scaler is None:
            return 1.0
        if hasattr(scaler, "get_scale"):  # torch.amp.GradScaler
            return float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        return float(scaler.scale)

    def backward(
        self,
        loss_clean: Tensor,
        loss_adv: Tensor | None = None,
        *,
        metrics: dict[str, Tensor] | None = None,
    ) -> None:
        """Add this micro-batch's g_c and g_a to the step's sums (``loss_adv`` may be omitted
        only for standard training, ``clean_only``). Nothing is written into ``.grad`` yet.

        ``metrics`` are extra scalars to average like the losses (``acc_clean``, …).
        """
        if loss_adv is None and not self.clean_only:
            raise ValueError("loss_adv is needed: the combiner uses the adversarial gradient")
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = False  # a no_sync() exit may have reset it
        scaler = self.grad_scaler
        if self._torch_scaler():
            # A torch GradScaler makes its scale tensor on its first scale() call, and its
            # step() refuses to run without one.
            scaler.scale(loss_clean.detach())
        scale = self._loss_scale()
        if self._count == 0:
            self._scale = scale
        elif scale != self._scale:
            raise RuntimeError("the loss scale changed between micro-batches of one step")
        use_adv = loss_adv is not None and not self.clean_only
        g_c = grads_of(loss_clean * scale, self.params, retain_graph=use_adv)
        g_a = grads_of(loss_adv * scale, self.params, retain_graph=False) if use_adv else None
        values = {"loss_clean": loss_clean.detach().float()}
        if use_adv:
            values["loss_adv"] = loss_adv.detach().float()
        values.update({k: v.detach().float() for k, v in (metrics or {}).items()})
        self._add(g_c, g_a, values)

    def _add(self, g_c: list[Tensor], g_a: list[Tensor] | None, values: dict[str, Tensor]):
        if self._count == 0:
            self._g_clean, self._g_adv, self._metrics = g_c, g_a, values
        else:
            torch._foreach_add_(self._g_clean, g_c)
            if g_a is not None:
                torch._foreach_add_(self._g_adv, g_a)
            for key, value in values.items():
                self._metrics[key] = self._metrics[key] + value
        self._count += 1

    def backward_batch(self, x: Tensor, y: Tensor, *, init_delta: Tensor | None = None) -> None:
        """Attack ``x`` (θ untouched), take both losses of the objective and :meth:`backward`
        them, with clean and adversarial accuracy as metrics. ``init_delta`` is the attack's
        random start (``caat-peft train`` draws it for the whole global batch)."""
        loss_clean, loss_adv, accuracies = objective_losses(
            self.module,
            self.objective,
            x,
            y,
            init_delta=init_delta,
            clean_only=self.clean_only,
            precision=self.precision,
        )
        self.backward(loss_clean, loss_adv, metrics=accuracies)

    # ----------------------------------------------------------------------------------------
    # The step

    def apply(self, *, layer_conflict: bool = False) -> dict[str, Any]:
        """Average, reduce across processes, combine, and write the update into ``.grad``.

        Returns the statistics (``cos`` = φ, ``mu``, ``lambda_star``, ``adv_share``,
        ``norm_update``, the averaged losses and metrics, ``finite``; ``layers``: per-tensor
        cos when ``layer_conflict``). When ``finite`` is False nothing usable is written:
        ``.grad`` is None (``optimizer.step()`` then changes nothing) or, under a torch
        GradScaler, non-finite (``scaler.step`` skips the step and lowers the scale).
        """
        if self._count == 0:
            raise RuntimeError("apply() before backward(): there are no gradients to combine")
        g_c, g_a, metrics = self._averaged()
        self._reset()
        g_c, g_a, scalars = self.reduce(g_c, g_a, torch.stack(list(metrics.values())))
        metrics = dict(zip(metrics, scalars.tolist()))
        update, stats = self._combine(g_c, g_a, metrics)
        if layer_conflict and g_a:
            stats["layers"] = dict(zip(self.names, per_tensor_cosines(g_a, g_c)))
        self._after_combine(stats)
        self._write(update, stats["finite"])
        return stats

    def _averaged(self) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """The mean over micro-batches with the loss scale undone, before anything looks at
        the gradients."""
        g_c, g_a = self._g_clean, self._g_adv or []
        divisor = self._scale * self._count
        if divisor != 1.0:
            torch._foreach_mul_(g_c, 1.0 / divisor)
            if g_a:
                torch._foreach_mul_(g_a, 1.0 / divisor)
        return g_c, g_a, {k: v / self._count for k, v in self._metrics.items()}

    def _combine(self, g_c, g_a, metrics) -> tuple[list[Tensor], dict[str, Any]]:
        if self.clean_only:  # standard training: the update is g_c
            norm_clean = float(torch.stack(torch._foreach_norm(g_c)).norm())
            stats: dict[str, Any] = {**metrics, "norm_clean": norm_clean}
            stats["finite"] = all(map(_isfinite, stats.values()))
            return g_c, stats
        update, stats = self.combiner(g_a, g_c)  # vanilla λ or CA-AT γ
        # its norm shows a stalled run (L_adv ≈ 0 shrinks CA-AT's update with ‖g_a‖)
        stats["norm_update"] = float(torch.stack(torch._foreach_norm(update)).norm())
        stats.update(metrics)
        stats["finite"] = stats["finite"] and all(map(_isfinite, metrics.values()))
        return update, stats

    def _after_combine(self, stats: dict[str, Any]) -> None:
        scaler = self.grad_scaler
        if scaler is not None and not hasattr(scaler, "get_scale"):  # caat-peft's LossScaler
            scaler.update(found_nonfinite=not stats["finite"])
            stats["loss_scale"] = self._scale

    def _write(self, update: list[Tensor], finite: bool) -> None:
        torch_scaler = self._torch_scaler()
        for p, g in zip(self.params, update):
            if not finite:
                # None: the optimiser leaves p alone; NaN: a GradScaler sees the overflow
                p.grad = torch.full_like(p, float("nan")) if torch_scaler else None
            elif torch_scaler and self._scale != 1.0:
                p.grad = (g * self._scale).to(p.dtype)  # scaler.step divides it back, exactly
            else:
                p.grad = g.to(p.dtype)

    def step(
        self, loss_clean: Tensor, loss_adv: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """:meth:`backward` then :meth:`apply`: one micro-batch per optimiser step."""
        self.backward(loss_clean, loss_adv, metrics=kwargs.pop("metrics", None))
        return self.apply(**kwargs)


def _objective(
    objective: str | ObjectiveConfig | Objective, attack: AttackConfig | dict[str, Any] | None
) -> Objective:
    if isinstance(objective, Objective):
        return objective
    if isinstance(attack, dict):
        attack = AttackConfig(**attack)
    return build_objective(objective, attack or AttackConfig())


def _attack_weights(
    model: nn.Module, objective: Objective, precision: str
) -> contextlib.AbstractContextManager:
    """The fast path attacks with LoRA merged into one matrix per layer (the attack takes no
    parameter gradient); float32 attacks through peft's own layers, as the authors' code."""
    if precision == "fp32":
        return contextlib.nullcontext()
    attack_cfg = getattr(objective, "attack_cfg", None)
    in_eval_mode = bool(getattr(attack_cfg, "eval_mode", False))
    return lora_merged(model, dropout_active=not in_eval_mode)


def objective_losses(
    model: nn.Module,
    objective: Objective,
    x: Tensor,
    y: Tensor,
    *,
    init_delta: Tensor | None = None,
    clean_only: bool = False,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """(L_clean, L_adv, accuracies) of one batch: the objective's attack (θ untouched), then
    both losses; L_adv is None and nothing is attacked for standard training."""
    with autocast_for(precision, x.device, model):
        if clean_only:
            loss_clean, logits = objective.clean_loss(model, x, y)
            return loss_clean, None, {"acc_clean": _accuracy(logits, y)}
        with _attack_weights(model, objective, precision):
            x_adv = objective.attack(model, x, y, init_delta=init_delta)
        losses = objective.losses(model, x, x_adv, y)
    accuracies = {
        "acc_clean": _accuracy(losses.logits_clean, y),
        "acc_adv": _accuracy(losses.logits_adv, y),
    }
    return losses.clean, losses.adv, accuracies
