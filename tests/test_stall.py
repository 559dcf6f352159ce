"""A CA-AT run whose adversarial loss is about 0 says so while it happens (telemetry.StallMonitor).

TRADES' L_adv = KL(f(x) ‖ f(x')) vanishes when x' barely differs from x; CA-AT's projected update
has norm ‖g_a‖·√(1−φ²)/√(1−γ²) and vanishes with it. A tiny ε makes that happen on any kernel.
"""

from __future__ import annotations

from caat_peft.config import load_config
from caat_peft.training import train
from caat_peft.training.telemetry import STALL_RATIO, StallMonitor

from conftest import TINY_RECIPE

QUICK = ["train.epochs=1", "eval.limit=32", "eval.steps=2", "train.plots=false"]


def test_a_vanishing_adversarial_loss_is_reported(tmp_path, capsys):
    overrides = [*QUICK, "objective.kind=trades", "attack.eps=1e-5", "attack.alpha=5e-6"]
    final = train(load_config(TINY_RECIPE, overrides), tmp_path / "run", progress=False).final
    err = capsys.readouterr().err
    assert final["stalled_steps"] == final["steps"] > 0
    assert "caat-peft: warning: epoch 1: the update was below" in err
    assert "objective trades is about 0" in err and "combiner.normalize=true" in err


def test_normalising_both_gradients_removes_the_stall(tmp_path, capsys):
    overrides = [*QUICK, "objective.kind=trades", "attack.eps=1e-5", "attack.alpha=5e-6"]
    cfg = load_config(TINY_RECIPE, [*overrides, "combiner.normalize=true"])
    final = train(cfg, tmp_path / "run", progress=False).final
    assert final["stalled_steps"] == 0
    assert "warning" not in capsys.readouterr().err


def test_a_normal_adversarial_run_is_not_reported(tmp_path, capsys):
    final = train(load_config(TINY_RECIPE, QUICK), tmp_path / "run", progress=False).final
    assert final["stalled_steps"] == 0
    assert "warning" not in capsys.readouterr().err


def test_the_monitor_warns_once_and_ignores_standard_training():
    monitor = StallMonitor()
    small = {"norm_clean": 1.0, "norm_adv": 1e-4, "norm_update": STALL_RATIO / 10}
    monitor.update({"norm_clean": 1.0})  # standard training: no g_a
    assert monitor.end_epoch(1, "trades") is None and monitor.stalled == 0
    for _ in range(3):
        monitor.update(small)
    monitor.update({**small, "norm_update": 1.0})
    message = monitor.end_epoch(2, "trades")
    assert message and "in 3 of 4 steps" in message and "median ‖g_a‖/‖g_c‖ = 0.0001" in message
    monitor.update(small)
    assert monitor.end_epoch(3, "trades") is None  # once per run
    assert monitor.stalled == 4
