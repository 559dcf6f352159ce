"""The trainer's smaller parts, each against its definition: clipping after combining, loss-scale
unscaling, EMA, bucketed reduction, weight-decay groups."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from caat_peft.config import from_dict, load_config
from caat_peft.gradients import make_combiner
from caat_peft.models import build_classifier, trainable_parameters
from caat_peft.objectives import build_objective
from caat_peft.training.distributed import _buckets, all_reduce_mean
from caat_peft.training.optim import LossScaler, ParameterEMA, make_optimizer
from caat_peft.training.step import MicroBatch, micro_batch_gradients, training_step

from conftest import TINY_RECIPE

IDENTITY = lambda g_c, g_a, s: (g_c, g_a, s)  # noqa: E731


def _setup(seed: int = 0):
    cfg = load_config(TINY_RECIPE, ["peft.r=4"])
    torch.manual_seed(seed)
    model = build_classifier(cfg.model, cfg.peft, 5)
    for module in model.modules():  # non-zero LoRA B so that every factor has a gradient
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,))
    start = torch.empty_like(x).uniform_(-cfg.attack.eps, cfg.attack.eps)
    return cfg, model, MicroBatch(x, y, start)


def _step(model, cfg, batch, *, kind="caat", **options):
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)  # the parameters then move by exactly -update
    combiner = make_combiner(kind, lam=0.5, gamma=0.9)
    objective = build_objective("pgd-ce", cfg.attack)
    result = training_step(
        model, params, objective, combiner, opt, [batch], reduce=IDENTITY, **options
    )
    moved = [b - p.detach() for b, p in zip(before, params)]
    return result, moved


def _norm(tensors) -> float:
    return float(torch.stack([t.norm() for t in tensors]).norm())


@pytest.mark.parametrize("kind", ["caat", "vanilla"])
def test_clipping_acts_on_the_combined_update(kind):
    """``grad_clip`` rescales the combined update (not g_c or g_a before combining)."""
    cfg, model, batch = _setup()
    free, moved_free = _step(copy.deepcopy(model), cfg, batch, kind=kind)
    full_norm = _norm(moved_free)
    clip = full_norm / 4
    clipped, moved = _step(copy.deepcopy(model), cfg, batch, kind=kind, grad_clip=clip)
    assert clipped.stats["update_norm"] == pytest.approx(full_norm, rel=1e-4)
    assert _norm(moved) == pytest.approx(clip, rel=1e-4)
    for a, b in zip(moved, moved_free):  # same direction, scaled
        torch.testing.assert_close(a * 4, b, atol=1e-6, rtol=1e-4)
    assert clipped.stats["cos"] == pytest.approx(free.stats["cos"], abs=1e-6)


def test_loss_scaling_unscales_both_gradients_before_combining():
    """With a loss scale (fp16's mechanism), g_c and g_a reach the combiner unscaled: the same
    update and statistics as without one. A projection-dependent rule makes a missed unscale of
    either gradient visible."""
    cfg, model, batch = _setup()
    plain, moved_plain = _step(copy.deepcopy(model), cfg, batch)
    scaler = LossScaler(init_scale=2.0**12)
    scaled, moved_scaled = _step(copy.deepcopy(model), cfg, batch, scaler=scaler)
    assert scaled.stats["loss_scale"] == 2.0**12
    for key in ("cos", "norm_clean", "norm_adv", "adv_share"):
        assert scaled.stats[key] == pytest.approx(plain.stats[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(moved_scaled, moved_plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_loss_scaler_policy():
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    scaler.update(found_nonfinite=True)
    assert scaler.scale == 4.0
    for _ in range(3):
        scaler.update(found_nonfinite=False)
    assert scaler.scale == 8.0
    state = scaler.state_dict()
    other = LossScaler()
    other.load_state_dict(state)
    assert other.scale == 8.0


def test_a_step_whose_scaled_gradient_overflows_is_skipped_and_the_scale_halves():
    cfg, model, batch = _setup()
    # 2**128 is past float32's largest value (3.4e38): the scaled loss (ln 5 here) overflows,
    # whatever size the gradients have (a zero-initialised head makes them small)
    scaler = LossScaler(init_scale=2.0**128)
    result, moved = _step(model, cfg, batch, scaler=scaler)
    assert result.skipped and scaler.scale == 2.0**127
    assert all(float(m.abs().max()) == 0.0 for m in moved)


@given(decay=st.floats(0.0, 0.999), steps=st.integers(1, 6), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_ema_is_the_exponential_average(decay, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=gen)) for _ in range(2)]
    ema = ParameterEMA(params, decay)
    expected = [p.detach().clone() for p in params]
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, params)]
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e, atol=1e-5, rtol=1e-5)
    live = [p.detach().clone() for p in params]
    ema.swap()  # evaluation and saving see the average
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-5, rtol=1e-5)
    ema.swap()
    for p, v in zip(params, live):
        assert torch.equal(p.detach(), v)


class _FakeAccelerator:
    """Two 'processes' whose gradients differ by a known offset: reduce(mean) of rank 0's flat
    buffer is buffer + 0.5 (rank 1 holds buffer + 1). Counts the collectives."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def reduce(self, flat: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        self.calls.append(flat.numel())
        return (flat + (flat + 1.0)) / 2


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    limit=st.integers(1, 100),
)
@settings(max_examples=60, deadline=None)
def test_bucketed_reduction_covers_every_tensor_once_in_bounded_buckets(sizes, limit):
    tensors = [torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(sizes)]
    buckets = _buckets(tensors, limit)
    assert [i for b in buckets for i in b] == list(range(len(tensors)))
    for b in buckets:  # a bucket exceeds the limit only when it is one big tensor
        assert sum(sizes[i] for i in b) <= limit or len(b) == 1
    fake = _FakeAccelerator()
    reduced = all_reduce_mean(tensors, fake, limit=limit)
    assert len(fake.calls) == len(buckets)  # one collective per bucket
    for t, r in zip(tensors, reduced):
        assert r.shape == t.shape
        torch.testing.assert_close(r, t + 0.5)


def test_no_weight_decay_on_norms_and_biases():
    cfg = from_dict({"train": {"weight_decay": 0.05}})
    tiny = load_config(TINY_RECIPE, ["peft.method=full"])
    model = build_classifier(tiny.model, tiny.peft, 5)
    named = trainable_parameters(model)
    opt = make_optimizer(named, cfg.train)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in named}
    norms = [n for n, p in named if ".norm" in n or "norm." in n]
    assert norms and not any(id(p) in decay for n, p in named if n in norms)
    assert not any(names[i].endswith("bias") for i in decay)
    assert any(names[i].endswith("qkv.weight") for i in decay)
    assert all(g.get("foreach") for g in opt.param_groups)


def test_sgd_with_nesterov_momentum_is_torchs():
    """train.optimizer = sgd with nesterov: torch's SGD(momentum, nesterov), the same steps."""
    cfg = from_dict({"train": {"optimizer": "sgd", "nesterov": True, "lr": 0.1, "weight_decay": 0}})
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = torch.nn.Parameter(w.detach().clone())
    opt = make_optimizer([("w", w)], cfg.train)
    expected = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=True)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    for _ in range(3):
        for p, o in ((w, opt), (ref, expected)):
            o.zero_grad()
            (p**2).sum().backward()
            o.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=0)


def test_micro_batch_gradients_are_over_trainable_parameters_only():
    cfg, model, batch = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    objective = build_objective("pgd-ce", cfg.attack)
    g_c, g_a, _ = micro_batch_gradients(model, params, objective, batch, clean_only=False)
    assert len(g_c) == len(g_a) == len(params)
    assert all(p.grad is None for p in [*params, *frozen])  # autograd.grad, nothing accumulated


def test_run_state_round_trips_through_its_state_dict():
    from caat_peft.training.trainer import RunState

    state = RunState(normalized=True)
    state.step, state.epoch, state.step_in_epoch, state.skipped = 17, 3, 2, 1
    state.best = {"epoch": 2, "val_robust_acc": 0.5, "weights": [torch.ones(2)]}
    state.epochs_since_best = 1
    state.stall.update({"norm_clean": 1.0, "norm_update": 0.0, "norm_adv": 0.0})
    saved = state.state_dict()
    assert "weights" not in saved["best"] and saved["stalled"] == 1

    restored = RunState(normalized=True)
    restored.load_state_dict(saved)
    assert (restored.step, restored.epoch, restored.step_in_epoch, restored.skipped) == (
        17,
        3,
        2,
        1,
    )
    assert restored.best["val_robust_acc"] == 0.5 and restored.epochs_since_best == 1
    assert torch.equal(restored.best["weights"][0], torch.ones(2))
    assert restored.stall.stalled == 1 and restored.stall.normalized
