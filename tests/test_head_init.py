"""Robust linear initialisation (train.init_head): two stages, the second from the first's head,
both recorded and resumable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from caat_peft.config import ConfigError, load_config
from caat_peft.errors import UserError
from caat_peft.training import train
from caat_peft.training import trainer as trainer_module
from caat_peft.training.telemetry import read_metrics

from conftest import TINY_RECIPE

RLI = [
    "train.init_head=robust-linear-probe",
    "train.init_head_epochs=1",
    "train.init_head_lr=0.01",
    "train.epochs=1",
    "data.classes=[0, 1]",
    "eval.limit=16",
    "eval.steps=1",
    "train.plots=false",
]


def _tensors(run_dir, folder="adapter") -> dict[str, torch.Tensor]:
    path = run_dir / folder
    name = "adapter_model.safetensors" if (path / "adapter_config.json").is_file() else None
    return load_file(str(path / (name or "trainable.safetensors")))


def _rows(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]


@pytest.mark.parametrize("method", ["lora", "vpt"])
def test_stage_two_starts_from_stage_ones_saved_head_exactly(
    tmp_path, monkeypatch, method, one_thread
):
    cfg = load_config(TINY_RECIPE, [*RLI, f"peft.method={method}"])
    real_build, built = trainer_module.build_classifier, []

    def spy(*args, **kwargs):
        model = real_build(*args, **kwargs)
        heads = {n: p.detach().clone() for n, p in model.named_parameters() if "head" in n}
        built.append((kwargs.get("head_state"), heads))
        return model

    monkeypatch.setattr(trainer_module, "build_classifier", spy)
    result = train(cfg, tmp_path / "run", progress=False)

    stage_one = tmp_path / "run" / "head_init"
    saved = load_file(str(stage_one / "adapter" / "trainable.safetensors"))
    assert sorted(saved) == ["head.bias", "head.weight"]
    (first_state, first_heads), (second_state, second_heads) = built
    assert first_state is None and second_state is not None
    assert all(torch.equal(second_state[k], saved[k]) for k in saved)
    # The head the second stage trains (LoRA: peft's trainable copy) starts as stage 1 ended.
    active = ".modules_to_save.default." if method == "lora" else "net.head."
    live = {n.rsplit(".", 1)[-1]: p for n, p in second_heads.items() if active in n}
    assert sorted(live) == ["bias", "weight"]
    assert all(torch.equal(live[k.split(".")[-1]], v) for k, v in saved.items())
    assert not torch.equal(saved["head.weight"], first_heads["net.head.weight"])  # it trained

    # Both stages are complete run directories; stage 1 is the head alone, at its own settings.
    one = yaml.safe_load((stage_one / "config.yaml").read_text())
    assert one["peft"]["method"] == "head" and one["train"]["init_head"] == "none"
    assert one["train"]["lr"] == 0.01 and one["train"]["epochs"] == 1
    assert one["attack"] == yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["attack"]
    assert (stage_one / "final.json").is_file() and result.final["steps"] > 0
    assert (
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["peft"]["method"] == method
    )


class _Crash(Exception):
    pass


# Stage 1: 2 epochs of 7 steps, checkpoints every 4; stage 2 likewise (steps 15-28 overall).
RESUMABLE = [*RLI, "train.init_head_epochs=2", "train.epochs=2", "train.save_every=4"]
RESUMABLE += ["train.schedule=cosine"]  # scheduler state travels in the checkpoints too


@pytest.mark.parametrize("where", ["stage-1", "between", "stage-2"])
def test_a_crash_in_either_stage_resumes_to_the_same_result(
    tmp_path, monkeypatch, where, one_thread
):
    cfg = load_config(TINY_RECIPE, RESUMABLE)
    reference = train(cfg, tmp_path / "reference", progress=False)

    real_step, real_build, calls = trainer_module.training_step, trainer_module.build_classifier, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == {"stage-1": 10, "stage-2": 24}.get(where):  # after checkpoint 8
            raise _Crash
        return real_step(*args, **kwargs)

    def crashing_build(*args, **kwargs):
        if where == "between" and kwargs.get("head_state") is not None:
            raise _Crash
        return real_build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", crashing_step)
    monkeypatch.setattr(trainer_module, "build_classifier", crashing_build)
    with pytest.raises(_Crash):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(trainer_module, "training_step", real_step)
    monkeypatch.setattr(trainer_module, "build_classifier", real_build)
    stage_two_started = (tmp_path / "run" / "config.yaml").is_file()
    assert stage_two_started == (where == "stage-2")

    resumed = train(cfg, tmp_path / "run", resume=True, progress=False)
    for folder in ("head_init/adapter", "adapter"):
        ref, got = _tensors(tmp_path / "reference", folder), _tensors(tmp_path / "run", folder)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), folder
    for metrics in ("head_init/metrics.jsonl", "metrics.jsonl"):
        assert _rows(tmp_path / "run" / metrics) == _rows(tmp_path / "reference" / metrics)
    for key in ("clean_acc", "robust_acc", "steps"):
        assert resumed.final[key] == reference.final[key]


def test_runs_are_not_mixed_and_changed_settings_are_refused(tmp_path, one_thread):
    cfg = load_config(TINY_RECIPE, RLI)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, run, progress=False)
    for entry in run.iterdir():  # as if stage 2 had been killed before it started
        if entry.name != "head_init":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, run, progress=False)
    other = load_config(TINY_RECIPE, [*RLI, "train.init_head_lr=0.02"])
    with pytest.raises(UserError, match="lr"):  # stage 1 was made with another lr
        train(other, run, resume=True, progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)

    replaced = train(other, run, overwrite=True, progress=False)  # both stages replaced
    one = yaml.safe_load((run / "head_init" / "config.yaml").read_text())
    assert one["train"]["lr"] == 0.02 and replaced.final["steps"] > 0
    assert json.loads((run / "final.json").read_text())["steps"] == replaced.final["steps"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.init_head=linear"], "train.init_head"),
        (["train.init_head_epochs=0"], "train.init_head_epochs"),
        (["train.init_head_lr=0"], "train.init_head_lr"),
        (["train.init_head=robust-linear-probe", "peft.train_head=false"], "peft.train_head"),
        (["peft.method=vpt", "peft.prompt_length=0"], "peft.prompt_length"),
        (["peft.method=vpt", "peft.prompt_depth=middle"], "peft.prompt_depth"),
    ],
)
def test_bad_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TINY_RECIPE, overrides)
    assert "\n" not in str(info.value)


def test_a_front_sweep_resumes_a_point_killed_in_its_first_stage(tmp_path, monkeypatch, one_thread):
    from caat_peft.front import run_front

    options = {"lambdas": [0.5], "gammas": [], "progress": False, "sanity": False}
    sets = [*RLI, "train.init_head_epochs=2", "train.save_every=4"]
    reference = run_front(TINY_RECIPE, output_dir=tmp_path / "ref", overrides=sets, **options)

    real_step, calls = trainer_module.training_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # stage 1, after its checkpoint at step 8
            raise _Crash
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", crashing_step)
    with pytest.raises(_Crash):
        run_front(TINY_RECIPE, output_dir=tmp_path / "front", overrides=sets, **options)
    monkeypatch.setattr(trainer_module, "training_step", real_step)
    other = [*sets, "train.init_head_lr=0.02"]
    with pytest.raises(UserError, match="another config.*lr"):
        run_front(TINY_RECIPE, output_dir=tmp_path / "front", overrides=other, **options)
    resumed = run_front(TINY_RECIPE, output_dir=tmp_path / "front", overrides=sets, **options)
    for got, want in zip(resumed["points"], reference["points"], strict=True):
        assert (got["clean_acc"], got["robust_acc"]) == (want["clean_acc"], want["robust_acc"])
