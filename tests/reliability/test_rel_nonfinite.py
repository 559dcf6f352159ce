"""Non-finite values never reach the weights: the step is skipped, counted and logged, weights,
optimiser moments, the schedule and the EMA stay as they were; too many in a row stop the run
with one line."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from reliability_lib import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    FAST_SETS,
    adapter_tensors,
    assert_one_line_error,
    one_torch_thread,
    run_cli,
    train_args,
)
from torch.utils.data import Dataset

from caat_peft.config import load_config
from caat_peft.gradients import make_combiner
from caat_peft.models import build_classifier
from caat_peft.objectives import build_objective
from caat_peft.training import train
from caat_peft.training import trainer as trainer_module
from caat_peft.training.step import MicroBatch, training_step
from caat_peft.training.telemetry import read_metrics
from caat_peft.training.trainer import GlobalBatchSampler

from conftest import TINY_RECIPE


class Poisoned(Dataset):
    """``base`` with some images replaced by a non-finite value (NaN or ±Inf) in one pixel."""

    def __init__(self, base: Dataset, bad: dict[int, float]) -> None:
        self.base, self.bad = base, bad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        if index in self.bad:
            x = x.clone()
            x[0, 0, 0] = self.bad[index]
        return x, y


def poison_training_set(monkeypatch, choose_bad) -> None:
    """Make ``train()`` see a training set where ``choose_bad(n)`` -> {index: value}."""
    real_build_splits = trainer_module.build_splits

    def build_splits(data_cfg, preprocessing):
        splits = real_build_splits(data_cfg, preprocessing)
        splits.train = Poisoned(splits.train, choose_bad(len(splits.train)))
        return splits

    monkeypatch.setattr(trainer_module, "build_splits", build_splits)


def same_state(a, b) -> bool:
    """Deep equality of optimiser state dicts (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_nan_and_inf_images_in_a_real_run_skip_exactly_their_steps(tmp_path, monkeypatch):
    """Three poisoned images (NaN, +Inf, -Inf) in three different optimiser steps, with gradient
    accumulation (two micro-batches a step), EMA and a cosine schedule: exactly those steps are
    skipped, counted in metrics.jsonl and final.json, and touch nothing; the run finishes even
    with max_nonfinite_steps=2 because the skips are never consecutive."""
    overrides = [
        *FAST_SETS,
        "train.grad_accum_steps=2",
        "train.ema_decay=0.9",
        "train.schedule=cosine",
        "train.max_nonfinite_steps=2",
    ]
    cfg = load_config(TINY_RECIPE, overrides)
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    poisoned_steps = {1: float("nan"), 3: float("inf"), 6: float("-inf")}
    expected_bad: dict[int, float] = {}

    def choose_bad(n: int) -> dict[int, float]:
        sampler = GlobalBatchSampler(n, micro, 0, 1, cfg.train.seed)
        sampler.set_epoch(1)
        micro_batches = list(sampler)
        for step, value in poisoned_steps.items():  # the 2nd micro-batch of the step
            expected_bad[micro_batches[2 * (step - 1) + 1][0]] = value
        return dict(expected_bad)

    poison_training_set(monkeypatch, choose_bad)
    real_step, checked = trainer_module.training_step, []

    def observed_step(model, params, objective, combiner, optimizer, *args, **kwargs):
        before = [p.detach().clone() for p in params]
        opt_before = copy.deepcopy(optimizer.state_dict())
        result = real_step(model, params, objective, combiner, optimizer, *args, **kwargs)
        if result.skipped:
            assert all(torch.equal(b, p) for b, p in zip(before, params))
            assert same_state(opt_before, optimizer.state_dict())
            checked.append(True)
        return result

    monkeypatch.setattr(trainer_module, "training_step", observed_step)
    result = train(cfg, tmp_path / "run", progress=False)

    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "step"]
    assert {r["step"] for r in rows if r["skipped"]} == set(poisoned_steps)
    assert len(checked) == len(poisoned_steps)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["skipped_steps"] == result.final["skipped_steps"] == len(poisoned_steps)
    assert final["steps"] == len(rows)
    lr = {r["step"]: r["lr"] for r in rows}
    for step in (3, 6):  # the schedule does not advance on a skipped step
        assert lr[step] == lr[step - 1]
    weights = adapter_tensors(tmp_path / "run")  # EMA weights: they skipped the steps too
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def _tiny_model():
    cfg = load_config(TINY_RECIPE)
    torch.manual_seed(0)
    model = build_classifier(cfg.model, cfg.peft, 5)
    return cfg, model, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "kind,clean_only", [("caat", False), ("vanilla", False), ("vanilla", True)]
)
def test_inf_gradient_with_a_finite_loss_leaves_weights_and_adam_moments(kind, clean_only):
    """The loss is finite but one gradient entry is Inf (a hook stands in for an overflow):
    after a good step has filled AdamW's moments, the bad step changes nothing."""
    cfg, model, params = _tiny_model()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    objective = build_objective("pgd-ce", cfg.attack)
    combiner = make_combiner(kind, lam=0.5, gamma=0.8)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))

    def step():
        return training_step(
            model,
            params,
            objective,
            combiner,
            optimizer,
            [MicroBatch(x, y)],
            reduce=lambda g_c, g_a, s: (g_c, g_a, s),
            clean_only=clean_only,
        )

    assert not step().skipped
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(optimizer.state_dict())
    handle = params[-1].register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        result = step()
    finally:
        handle.remove()
    assert result.skipped and not result.stats["finite"]
    assert math.isfinite(result.stats["loss_clean"])  # only the gradient is bad
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert same_state(state_before, optimizer.state_dict())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def test_a_diverged_run_stops_with_one_line_and_keeps_its_checkpoints(tmp_path, monkeypatch):
    """Every image after the first steps is NaN: the run stops after max_nonfinite_steps
    consecutive skips, with one line, no final.json or adapter, and the checkpoint taken
    before the trouble intact."""
    poison_training_set(monkeypatch, lambda n: dict.fromkeys(range(n), float("nan")))
    real_step = trainer_module.training_step
    calls = {"n": 0}

    def step_healthy_at_first(model, params, objective, combiner, optimizer, batches, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # the first two steps see clean copies of their images
            batches = [
                MicroBatch(torch.nan_to_num(b.x, nan=0.5), b.y, b.init_delta) for b in batches
            ]
        return real_step(model, params, objective, combiner, optimizer, batches, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", step_healthy_at_first)
    out = tmp_path / "run"
    overrides = [*FAST_SETS, "train.max_nonfinite_steps=3", "train.save_every=2"]
    code, _, err = run_cli(train_args(out, *overrides))
    assert_one_line_error(code, err, "3 consecutive steps", "non-finite")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "step"]
    assert [r["skipped"] for r in rows][:4] == [False, False, True, True]
    assert not (out / "final.json").exists() and not (out / "adapter").exists()
    assert (out / "checkpoints" / "step-2" / "state.pt").is_file()


def test_the_divergence_message_names_the_limit_key(tmp_path, monkeypatch):
    poison_training_set(monkeypatch, lambda n: dict.fromkeys(range(n), float("nan")))
    code, _, err = run_cli(train_args(tmp_path / "run", *FAST_SETS, "train.max_nonfinite_steps=2"))
    assert_one_line_error(code, err, "train.max_nonfinite_steps")


def test_the_step_that_stops_the_run_is_logged(tmp_path, monkeypatch):
    poison_training_set(monkeypatch, lambda n: dict.fromkeys(range(n), float("nan")))
    out = tmp_path / "run"
    code, _, _ = run_cli(train_args(out, *FAST_SETS, "train.max_nonfinite_steps=2"))
    assert code == 2
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "step"]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, True), (2, True)]
