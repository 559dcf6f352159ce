"""Files from strangers: weights load through safetensors or ``torch.load(weights_only=True)``
only, so a pickle that would run code never does, and a refusal is one line naming the file;
an adapter config that is not what caat-peft wrote is refused, not half-applied."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from reliability_lib import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    FAST_SETS,
    assert_one_line_error,
    one_torch_thread,
    run_cli,
    train_args,
)

from caat_peft.cli import main
from caat_peft.config import load_config

from conftest import ROOT, TINY_RECIPE

RESUMABLE = [*FAST_SETS, "train.save_every=5", "train.keep_checkpoints=3"]


class RunsCode:
    """Unpickles into ``os.mkdir(marker)``: proof that loading executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def save_evil(path: Path, marker: Path, wrap=lambda payload: {"state_dict": {"w": payload}}):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(RunsCode(marker)), path)


def test_the_payload_is_live(tmp_path):
    """Without weights_only the file does run code: the tests below would notice."""
    marker = tmp_path / "ran"
    save_evil(tmp_path / "evil.pth", marker)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.is_dir()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run with resumable checkpoints (step-5, step-10, step-15)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("trusted") / "run"
        assert main(train_args(run, *RESUMABLE)) == 0
    finally:
        torch.set_num_threads(old)
    return run


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def _eval_args(run: Path, adapter: Path, tmp_path: Path) -> list[str]:
    return [
        "eval",
        str(run),
        "--adapter",
        str(adapter),
        "--attacks",
        "fgsm",
        "--eps",
        "8/255",
        "--limit",
        "8",
        "--budget",
        "fast",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "eval"),
    ]


# --------------------------------------------------------------------------------------------
# Every way a file reaches torch.load: (arguments, the file the refusal must name)


def _model_checkpoint_pth(tmp_path, marker, trained_run):
    path = tmp_path / "evil.pth"
    save_evil(path, marker)
    return train_args(tmp_path / "out", *FAST_SETS, f"model.checkpoint={path}"), path


def _model_checkpoint_bare_object(tmp_path, marker, trained_run):
    path = tmp_path / "evil.pt"
    save_evil(path, marker, wrap=lambda payload: payload)
    return train_args(tmp_path / "out", *FAST_SETS, f"model.checkpoint={path}"), path


def _timm_hub_folder_bin(tmp_path, marker, trained_run):
    folder = tmp_path / "hub-model"
    save_evil(folder / "pytorch_model.bin", marker)
    args = train_args(tmp_path / "out", *FAST_SETS, f"model.checkpoint={folder}")
    return args, folder / "pytorch_model.bin"


def _transformers_folder_bin(tmp_path, marker, trained_run):
    import transformers

    folder = tmp_path / "hf-model"
    sizes = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.ViTConfig(image_size=16, patch_size=4, intermediate_size=64, **sizes)
    config.save_pretrained(folder)
    save_evil(folder / "pytorch_model.bin", marker, wrap=lambda p: {"vit.embeddings.cls_token": p})
    overrides = ["model.name=hf:vit", "model.kwargs={}", f"model.checkpoint={folder}"]
    return train_args(tmp_path / "out", *FAST_SETS, *overrides), folder / "pytorch_model.bin"


def _resume_state(tmp_path, marker, trained_run):
    run = _copy_run(trained_run, tmp_path)
    path = run / "checkpoints" / "step-15" / "state.pt"
    save_evil(path, marker)
    return [*train_args(run, *RESUMABLE), "--resume"], path


def _resume_rng(tmp_path, marker, trained_run):
    run = _copy_run(trained_run, tmp_path)
    path = run / "checkpoints" / "step-15" / "rng-0.pt"
    save_evil(path, marker)
    return [*train_args(run, *RESUMABLE), "--resume"], path


def _adapter_bin(tmp_path, marker, trained_run):
    run = _copy_run(trained_run, tmp_path)
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    save_evil(adapter / "adapter_model.bin", marker)
    return _eval_args(run, adapter, tmp_path), adapter / "adapter_model.bin"


ENTRY_POINTS = [
    pytest.param(_model_checkpoint_pth, id="model.checkpoint-pth"),
    pytest.param(_model_checkpoint_bare_object, id="model.checkpoint-bare-object"),
    pytest.param(_timm_hub_folder_bin, id="model.checkpoint-timm-folder-bin"),
    pytest.param(_transformers_folder_bin, id="model.checkpoint-transformers-folder-bin"),
    pytest.param(_resume_state, id="resume-state.pt"),
    pytest.param(_resume_rng, id="resume-rng.pt"),
    pytest.param(_adapter_bin, id="eval-adapter-bin"),
]


@pytest.mark.parametrize(
    "entry", [p.values[0] for p in ENTRY_POINTS], ids=[p.id for p in ENTRY_POINTS]
)
def test_no_entry_point_runs_pickled_code(tmp_path, trained_run, entry):
    marker = tmp_path / "code-ran"
    args, _ = entry(tmp_path, marker, trained_run)
    with contextlib.suppress(Exception):  # a traceback is judged below; here the marker counts
        run_cli(args)
    assert not marker.exists(), "loading a file executed pickled code"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_pickle_is_refused_in_one_line_naming_the_file(tmp_path, trained_run, entry):
    marker = tmp_path / "code-ran"
    args, path = entry(tmp_path, marker, trained_run)
    code, _, err = run_cli(args)
    assert_one_line_error(code, err, str(path))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # a refused model.checkpoint makes no run directory


# --------------------------------------------------------------------------------------------
# Adapter folders that caat-peft did not write


def _tampered_adapter(trained_run: Path, tmp_path: Path, change) -> tuple[Path, Path]:
    run = _copy_run(trained_run, tmp_path)
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    change(adapter)
    return run, adapter


def _edit_config(**changes):
    def change(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return change


def _write(name: str, text: str):
    def change(adapter: Path) -> None:
        (adapter / name).write_text(text)

    return change


def _truncate_weights(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    "change,needles",
    [
        pytest.param(_write("adapter_config.json", "{not json"), ["adapter"], id="not-json"),
        pytest.param(_edit_config(peft_type="NOT_A_METHOD"), ["adapter"], id="unknown-peft-type"),
        pytest.param(_edit_config(r=16), ["adapter"], id="rank-does-not-match-weights"),
        pytest.param(
            _edit_config(evil_field="anything"),
            ["evil_field", "adapter_config.json"],
            id="unknown-field",
            marks=pytest.mark.filterwarnings("ignore:Unexpected keyword arguments"),
        ),
        pytest.param(
            _truncate_weights,
            ["adapter_model.safetensors"],
            id="truncated-weights",
        ),
    ],
)
def test_tampered_adapter_is_refused_in_one_line(tmp_path, trained_run, change, needles):
    run, adapter = _tampered_adapter(trained_run, tmp_path, change)
    code, _, err = run_cli(_eval_args(run, adapter, tmp_path))
    assert_one_line_error(code, err, str(adapter), *needles)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_corrupt_resume_checkpoint_is_one_line(tmp_path, trained_run):
    run = _copy_run(trained_run, tmp_path)
    weights = run / "checkpoints" / "step-15" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    code, _, err = run_cli([*train_args(run, *RESUMABLE), "--resume"])
    assert_one_line_error(code, err, str(weights))


# --------------------------------------------------------------------------------------------
# A guard on the source: every loader stays safe


def test_the_package_only_loads_weights_safely():
    """No ``pickle.load``, no unsafe YAML, no remote code, and every ``torch.load`` call says
    ``weights_only=True`` (read from the source, so that a new loader cannot slip in)."""
    offenders = []
    for path in sorted((ROOT / "caat_peft").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[match.start() : end]:
                offenders.append(f"{path.name}: {text[match.start() : end]}")
        for pattern in (
            r"pickle\.loads?\(",
            r"yaml\.(load|unsafe_load|full_load)\(",
            r"trust_remote_code\s*=\s*True",
        ):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


def test_a_saved_run_config_is_plain_yaml(trained_run):
    """config.yaml of a run holds plain values only: safe_load reads it back to the config."""
    text = (trained_run / "config.yaml").read_text()
    assert "!!" not in text
    assert yaml.safe_load(text)
    assert load_config(trained_run / "config.yaml") == load_config(TINY_RECIPE, RESUMABLE)
