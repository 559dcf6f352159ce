"""The command line: bad input ends in one line and exit code 2, with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from caat_peft.cli import main

from conftest import ROOT, TINY_RECIPE


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["combiner.lam=1.5"], "combiner.lam = 1.5 must be in [0, 1]"),
        (["combiner.gamma=-1"], "combiner.gamma = -1.0 must be in (-1, 1]"),
        (["combiner.gamma=2"], "combiner.gamma = 2.0 must be in (-1, 1]"),
        (["attack.eps=-0.01"], "attack.eps = -0.01 must be >= 0"),
        (["attack.steps=-3"], "attack.steps = -3 must be >= 0"),
        (["model.name=no_such_net"], "model.name = 'no_such_net' is not a timm model"),
        (["model.checkpoint=/nonexistent.pth"], "checkpoint not found: /nonexistent.pth"),
        (["train.batch_size=100000"], "train.batch_size = 100000 is larger than the training set"),
        (["peft.target_modules=nothing_matches"], "peft.target_modules"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, overrides, needle):
    out = tmp_path / "run"
    args = ["train", str(TINY_RECIPE), "--output-dir", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "r")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_usage_errors_are_one_line(capsys):
    assert main(["train"]) == 2
    assert main(["frobnicate"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("caat-peft: error:") for line in lines)


def test_train_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(TINY_RECIPE), "--output-dir", str(out), "--no-progress"]
    fast = ["--set", "train.epochs=1", "--set", "eval.limit=16", "--set", "eval.steps=1"]
    assert main(base + fast) == 0
    assert "clean acc" in capsys.readouterr().out
    first = json.loads((out / "final.json").read_text())
    assert main(base + fast) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((out / "final.json").read_text()) == first  # untouched
    assert main(base + fast + ["--overwrite"]) == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["train", str(TINY_RECIPE), "--output-dir", str(foreign), "--overwrite"]) == 2
    assert (foreign / "notes.txt").read_text() == "mine"


def test_python_dash_m_entry_point(tmp_path):
    """A real process: the exit code and a clean single line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "caat_peft", "train", str(TINY_RECIPE), "--set", "combiner.lam=7"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "caat-peft: error: combiner.lam = 7.0 must be in [0, 1]"
    ]
    assert not (tmp_path / "runs").exists()
    help_proc = subprocess.run(
        [sys.executable, "-m", "caat_peft", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert help_proc.returncode == 0 and "demo" in help_proc.stdout


def test_eval_on_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["--set", "train.epochs=1", "--set", "eval.limit=16", "--set", "eval.steps=1"]
    assert main(["train", str(TINY_RECIPE), "--output-dir", str(run), "--no-progress", *fast]) == 0
    args = ["eval", str(run), "--attacks", "fgsm,pgd20", "--eps", "8/255", "--limit", "16"]
    assert main([*args, "--budget", "fast", "--no-progress"]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["n_samples"] == 16 and "fgsm" in report["accuracy"]
    assert (run / "eval" / "eval.md").read_text().count("|") > 10
    assert "wrote" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # --device: auto (the default) picks a GPU when there is one; a wrong one is one line.
    assert main([*args, "--device", "cpu", "--budget", "fast", "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*args, "--device", "tpu9", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "tpu9" in err and len(err.strip().splitlines()) == 1


def test_eval_with_model_and_adapter_flags(tmp_path, capsys):
    run = tmp_path / "run"
    fast = ["--set", "train.epochs=1", "--set", "eval.limit=16", "--set", "eval.steps=1"]
    assert main(["train", str(TINY_RECIPE), "--output-dir", str(run), "--no-progress", *fast]) == 0
    kwargs = "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}"
    args = [
        "eval",
        "--model",
        "vit_tiny_patch16_224",
        "--data",
        "digits",
        "--set",
        kwargs,
        "--set",
        "data.classes=[0,1,2,3,4]",
        "--set",
        "data.image_size=16",
        "--set",
        "peft.r=4",
        "--adapter",
        str(run / "adapter"),
        "--attacks",
        "fgsm",
        "--eps",
        "8/255",
        "--limit",
        "16",
        "--budget",
        "fast",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "ev"),
    ]
    assert main(args) == 0, capsys.readouterr().err
    ours = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ours["n_samples"] == 16
    assert main(["eval", "--model", "vit_tiny_patch16_224"]) == 2  # no --output-dir
