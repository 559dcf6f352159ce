"""SIGKILL a real training process at several moments; ``--resume`` ends where an uninterrupted
run ends: the same trainable parameters, bit for bit, and the same metrics rows.

Every attempt is its own process running ``caat_peft/__main__.py`` (what ``python -m caat_peft
train ...`` runs). They are forked from a multiprocessing *forkserver* that imported torch, peft
and caat_peft once, so five attempts cost seconds, not five times the ~7 s of imports. The
moments: after the first logged step (no checkpoint yet); inside a checkpoint write (the child
pauses after ``trainable.safetensors``, before ``state.pt``, so this kill is certain to land
mid-write); on sight of a new checkpoint folder; and at a random moment (seed in the message).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch
from reliability_lib import adapter_tensors, assert_same_tensors, cli_child, without_seconds
from safetensors.torch import load_file

from caat_peft.training.checkpoint import list_checkpoints
from caat_peft.training.telemetry import read_metrics

from conftest import TINY_RECIPE

SETS = [
    "train.epochs=2",
    "train.save_every=3",
    "train.keep_checkpoints=2",
    "train.ema_decay=0.9",  # EMA state and
    "train.schedule=cosine",  # scheduler state travel in the checkpoint too
    "data.val_fraction=0.2",  # and the best-so-far weights (model selection)
    "eval.limit=16",
    "eval.steps=1",
    "eval.select_steps=1",
    "train.plots=false",
]
PRELOAD = ["torch", "peft", "timm", "caat_peft.cli", "caat_peft.training", "caat_peft.data"]


def _argv(run_dir: Path, resume: bool) -> list[str]:
    argv = ["train", str(TINY_RECIPE), "--output-dir", str(run_dir), "--no-progress"]
    for item in SETS:
        argv += ["--set", item]
    return argv + (["--resume"] if resume else [])


def _stop_forkserver() -> None:
    stop = getattr(forkserver._forkserver, "_stop", None)  # private, but there since 3.8
    if stop is not None:
        stop()


@pytest.fixture
def spawn(monkeypatch, tmp_path):
    """Start ``caat-peft`` processes from a forkserver with the libraries preloaded."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the forkserver inherits this environment
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    _stop_forkserver()  # a fresh one, with this environment and preload
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    started: list[Attempt] = []

    def start(name: str, argv: list[str], pause_step: int = 0) -> Attempt:
        attempt = Attempt(ctx, tmp_path / f"{name}.log", name, argv, pause_step)
        started.append(attempt)
        return attempt

    yield start
    for attempt in started:
        attempt.kill()
    _stop_forkserver()
    ctx.set_forkserver_preload([])


class Attempt:
    def __init__(self, ctx, log: Path, name: str, argv: list[str], pause_step: int) -> None:
        self.name, self.log = name, log
        self.proc = ctx.Process(target=cli_child, args=(argv, str(log), pause_step), name=name)
        self.proc.start()

    def running(self) -> bool:
        return self.proc.is_alive()

    def output(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(timeout=30)

    def finish(self, timeout: float = 300) -> int:
        self.proc.join(timeout=timeout)
        assert not self.proc.is_alive(), f"{self.name} did not finish:\n{self.output()}"
        return self.proc.exitcode


def wait_until(predicate, attempt: Attempt, timeout: float = 180, interval: float = 0.001):
    """Poll ``predicate`` until it is truthy or the process ends; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value or not attempt.running():
            return value
        time.sleep(interval)
    pytest.fail(f"{attempt.name}: nothing happened in {timeout} s:\n{attempt.output()}")


def _checkpoint_names(run_dir: Path) -> set[str]:
    try:
        return set(os.listdir(run_dir / "checkpoints"))
    except FileNotFoundError:
        return set()


def _new_checkpoint_folder(run_dir: Path, before: set[str]) -> str | None:
    """A checkpoint folder (temporary or final) that was not there ``before``."""
    return next(iter(_checkpoint_names(run_dir) - before), None)


def check_after_kill(run_dir: Path) -> int:
    """What a kill may leave: complete ``step-N`` folders and stray ``.tmp-step-N``, nothing
    else; the newest complete checkpoint loads. Returns its step (0: none)."""
    for name in _checkpoint_names(run_dir):
        assert name.startswith(("step-", ".tmp-step-")), name
    found = list_checkpoints(run_dir)
    if not found:
        return 0
    step, newest = found[-1]
    assert {p.name for p in newest.iterdir()} == {"trainable.safetensors", "state.pt", "rng-0.pt"}
    assert load_file(str(newest / "trainable.safetensors"))
    assert torch.load(newest / "state.pt", map_location="cpu", weights_only=True)["step"] == step
    torch.load(newest / "rng-0.pt", map_location="cpu", weights_only=True)
    return step


def test_sigkill_at_several_moments_then_resume_matches_an_uninterrupted_run(tmp_path, spawn):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    run_dir, ref_dir = tmp_path / "run", tmp_path / "reference"
    reference = spawn("reference", _argv(ref_dir, resume=False))  # runs alongside the chain
    moments = []

    # 1. Killed after the first logged step, before any checkpoint exists.
    a = spawn("1-before-first-checkpoint", _argv(run_dir, resume=False))
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, a)
    a.kill()
    assert a.proc.exitcode == -signal.SIGKILL, a.output()
    assert (run_dir / "config.yaml").is_file()
    assert check_after_kill(run_dir) == 0

    # 2. Resumed (from scratch: no checkpoint yet), killed inside the write of checkpoint 6.
    a = spawn("2-inside-checkpoint-write", _argv(run_dir, resume=True), pause_step=6)
    paused = Path(str(a.log) + ".paused")
    assert wait_until(paused.exists, a), a.output()
    a.kill()
    assert a.proc.exitcode == -signal.SIGKILL, a.output()
    assert (run_dir / "checkpoints" / ".tmp-step-6" / "trainable.safetensors").is_file()
    assert not (run_dir / "checkpoints" / ".tmp-step-6" / "state.pt").exists()
    assert not (run_dir / "checkpoints" / "step-6").exists()
    assert check_after_kill(run_dir) == 3  # the half-written checkpoint does not count

    # 3. Resumed from step 3, killed the moment a new checkpoint folder shows up.
    a = spawn("3-on-sight-of-a-checkpoint", _argv(run_dir, resume=True))
    before = _checkpoint_names(run_dir)
    moments.append(wait_until(lambda: _new_checkpoint_folder(run_dir, before), a))
    a.kill()
    moments.append(check_after_kill(run_dir))

    # 4. Resumed, killed at a random moment once it makes progress (or it finishes first).
    a = spawn("4-random-moment", _argv(run_dir, resume=True))
    before = _checkpoint_names(run_dir)
    wait_until(lambda: _new_checkpoint_folder(run_dir, before), a)
    time.sleep(rng.uniform(0.0, 1.5))
    a.kill()
    moments.append(check_after_kill(run_dir))

    # 5. Resumed to the end.
    a = spawn("5-to-the-end", _argv(run_dir, resume=True))
    assert a.finish() == 0, a.output()
    assert reference.finish() == 0, reference.output()

    context = f"random seed {seed}, moments {moments}"
    assert_same_tensors(adapter_tensors(run_dir), adapter_tensors(ref_dir))
    assert_same_tensors(
        adapter_tensors(run_dir, "best_adapter"), adapter_tensors(ref_dir, "best_adapter")
    )
    rows = without_seconds(read_metrics(run_dir / "metrics.jsonl"))
    assert rows == without_seconds(read_metrics(ref_dir / "metrics.jsonl")), context
    final = json.loads((run_dir / "final.json").read_text())
    expected = json.loads((ref_dir / "final.json").read_text())
    for key in ("clean_acc", "robust_acc", "steps", "epochs", "skipped_steps", "best"):
        assert final[key] == expected[key], f"{key}: {context}"
