"""Trainer features for real jobs: accumulation, resume, precision, selection, telemetry."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from caat_peft.config import from_dict, load_config
from caat_peft.errors import UserError
from caat_peft.gradients import make_combiner
from caat_peft.models import build_classifier
from caat_peft.objectives import build_objective
from caat_peft.training import train
from caat_peft.training import trainer as trainer_module
from caat_peft.training.step import MicroBatch, training_step
from caat_peft.training.telemetry import read_metrics

from conftest import TINY_RECIPE

FAST = ["eval.limit=32", "eval.steps=2", "eval.select_steps=2"]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b, atol=0.0):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("kind", ["caat", "vanilla"])
def test_four_micro_batches_equal_one_big_batch(kind):
    """One step: 4 micro-batches of B and one batch of 4B give the same update (fp32)."""
    cfg = load_config(TINY_RECIPE, ["peft.r=4"])
    torch.manual_seed(0)
    model_a = build_classifier(cfg.model, cfg.peft, 5)
    for module in model_a.modules():  # non-zero LoRA B so that every factor has a gradient
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    model_b = copy.deepcopy(model_a)
    objective = build_objective("pgd-ce", cfg.attack)
    combiner = make_combiner(kind, lam=0.5, gamma=0.9)
    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 5, (32,))
    start = torch.empty_like(x).uniform_(-cfg.attack.eps, cfg.attack.eps)
    identity = lambda g_c, g_a, s: (g_c, g_a, s)  # noqa: E731

    def step(model, batches):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        result = training_step(model, params, objective, combiner, opt, batches, reduce=identity)
        return params, result

    params_a, result_a = step(
        model_a, [MicroBatch(x[i : i + 8], y[i : i + 8], start[i : i + 8]) for i in range(0, 32, 8)]
    )
    params_b, result_b = step(model_b, [MicroBatch(x, y, start)])
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)
    assert result_a.stats["cos"] == pytest.approx(result_b.stats["cos"], abs=1e-5)


def test_accumulation_through_the_trainer(tmp_path):
    common = ["train.epochs=1", *FAST]
    train(load_config(TINY_RECIPE, common), tmp_path / "one", progress=False)
    train(
        load_config(TINY_RECIPE, [*common, "train.grad_accum_steps=4"]),
        tmp_path / "four",
        progress=False,
    )
    assert_same_adapter(tmp_path / "one", tmp_path / "four", atol=1e-5)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_ends_identical(tmp_path, monkeypatch):
    overrides = [
        "train.epochs=2",
        "train.save_every=7",
        "train.keep_checkpoints=2",
        "train.ema_decay=0.9",
        "train.schedule=cosine",
        "data.val_fraction=0.2",
        *FAST,
    ]
    cfg = load_config(TINY_RECIPE, overrides)
    reference = train(cfg, tmp_path / "reference", progress=False)

    real_step, calls = trainer_module.training_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:  # after the checkpoint at step 14, mid-way through epoch 2
            raise _Crash
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", crashing_step)
    with pytest.raises(_Crash):
        train(cfg, tmp_path / "run", progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-14", "step-7"]
    monkeypatch.setattr(trainer_module, "training_step", real_step)

    resumed = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert_same_adapter(tmp_path / "reference", tmp_path / "run")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "run" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "reference" / "metrics.jsonl")
    )
    for key in ("clean_acc", "robust_acc", "steps", "best"):
        assert resumed.final[key] == reference.final[key]


def test_resume_refuses_another_config(tmp_path):
    cfg = load_config(TINY_RECIPE, ["train.epochs=1", "train.save_every=5", *FAST])
    train(cfg, tmp_path / "run", progress=False)
    other = load_config(
        TINY_RECIPE, ["train.epochs=1", "train.save_every=5", "train.lr=0.1", *FAST]
    )
    with pytest.raises(UserError, match="train.lr"):
        train(other, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_end_to_end(tmp_path, precision):
    cfg = load_config(TINY_RECIPE, ["train.epochs=1", f"train.precision={precision}", *FAST])
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "step"]
    finite = [r for r in rows if not r["skipped"]]
    assert len(finite) >= len(rows) - 3  # fp16 may skip a few overflowing steps at first
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    assert 0 <= result.final["robust_acc"] <= 1


def test_model_selection_on_validation_and_best_adapter(tmp_path):
    cfg = load_config(TINY_RECIPE, ["train.epochs=2", "data.val_fraction=0.2", *FAST])
    final = train(cfg, tmp_path / "run", progress=False).final
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "epoch"]
    assert all("val_robust_acc" in r for r in epochs)
    best = final["best"]
    assert best["val_robust_acc"] == max(r["val_robust_acc"] for r in epochs)
    assert (tmp_path / "run" / "best_adapter" / "adapter_model.safetensors").is_file()
    assert {"clean_acc", "robust_acc", "epoch"} <= best.keys()


def test_early_stopping(tmp_path):
    # A learning rate too small to change anything: validation never improves after epoch 1.
    cfg = load_config(
        TINY_RECIPE,
        [
            "train.epochs=6",
            "train.lr=1e-12",
            "train.early_stop_patience=1",
            "data.val_fraction=0.2",
            *FAST,
        ],
    )
    final = train(cfg, tmp_path / "run", progress=False).final
    assert final["stopped_early"] and final["epochs"] == 2


def test_diverging_run_stops_with_a_clear_message(tmp_path):
    cfg = load_config(
        TINY_RECIPE, ["train.epochs=1", "train.lr=1e30", "train.max_nonfinite_steps=2", *FAST]
    )
    with pytest.raises(UserError, match="consecutive steps had non-finite"):
        train(cfg, tmp_path / "run", progress=False)


def test_telemetry_files(tmp_path):
    cfg = load_config(
        TINY_RECIPE,
        ["train.epochs=1", "train.layer_conflict_every=5", "train.log_with=[tensorboard]", *FAST],
    )
    train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    layers = [r for r in read_metrics(run / "metrics.jsonl") if r["type"] == "layers"]
    assert layers and all(-1 <= v <= 1 for v in layers[0]["cos"].values())
    assert any("lora_A" in name for name in layers[0]["cos"])
    assert (run / "conflict.png").stat().st_size > 1000
    assert list(run.rglob("events.out.tfevents.*"))


def test_schedules_and_optimizers():
    from caat_peft.training.optim import make_optimizer, make_scheduler

    param = torch.nn.Parameter(torch.zeros(3, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    for schedule in ("constant", "cosine", "onecycle"):
        cfg = from_dict(
            {"train": {"schedule": schedule, "warmup_epochs": 1, "epochs": 4, "lr": 1.0}}
        ).train
        opt = make_optimizer([("w", param), ("b", bias)], cfg)
        assert [g["weight_decay"] for g in opt.param_groups] == [cfg.weight_decay, 0.0]
        sched = make_scheduler(opt, cfg, total_steps=100)
        lrs = []
        for _ in range(100):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) == pytest.approx(1.0, rel=0.05)
        if schedule != "constant":
            assert lrs[-1] < 0.05 and lrs[0] < 0.5  # warmed up, then decayed
    sgd = make_optimizer([("w", param)], from_dict({"train": {"optimizer": "sgd"}}).train)
    assert isinstance(sgd, torch.optim.SGD)


def test_run_outputs_are_json(tmp_path):
    cfg = load_config(TINY_RECIPE, ["train.epochs=1", *FAST])
    train(cfg, tmp_path / "run", progress=False)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["stopped_early"] is False and final["skipped_steps"] == 0


@pytest.mark.parametrize(
    ("sets", "attribute", "value"),
    [
        (["objective.kind=mart", "objective.beta=6"], "beta", 6.0),
        (["objective.kind=alp", "objective.pairing_weight=0.25"], "pairing_weight", 0.25),
    ],
)
def test_the_trainer_trains_with_the_objectives_options(
    tmp_path, monkeypatch, sets, attribute, value
):
    """objective.beta / objective.pairing_weight reach the objective the trainer steps with
    (they were once dropped: the trainer built the objective from its name alone)."""
    cfg = load_config(TINY_RECIPE, [*FAST, *sets, "train.epochs=1", "data.classes=[0, 1]"])
    real_step, seen = trainer_module.training_step, []

    def spy(model, params, objective, *args, **kwargs):
        seen.append(objective)
        return real_step(model, params, objective, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", spy)
    train(cfg, tmp_path / "run", progress=False)
    assert seen and getattr(seen[0], attribute) == value
