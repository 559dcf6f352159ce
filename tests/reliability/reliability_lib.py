"""Helpers shared by the reliability tests (a plain module: this folder has no conftest.py).

``run_cli`` calls ``caat_peft.cli.main`` in this process and returns what a user would see;
``assert_one_line_error`` is the contract every user mistake must meet (exit code 2, one line
on stderr, the thing named, no traceback).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caat_peft.cli import main

from conftest import TINY_RECIPE

# A CPU run of about a second on top of the tiny recipe.
FAST_SETS = [
    "train.epochs=1",
    "eval.limit=8",
    "eval.steps=1",
    "eval.select_steps=1",
    "train.plots=false",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread while a test runs (import this fixture into a test module).

    On the project's two busy cores, two torch threads made a tiny run 15 s instead of 0.7 s
    (the threads spin against the other load); the CLI subprocess tests set OMP_NUM_THREADS=1.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sets(*items: str) -> list[str]:
    """``["--set", a, "--set", b, ...]`` for the command line."""
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def run_cli(args: Sequence[str]) -> tuple[int, str, str]:
    """``caat-peft ARGS`` in this process: (exit code, stdout, stderr).

    An exception escaping ``main`` is a traceback the user would have seen: it propagates, so the
    test fails with it.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def train_args(output_dir: Path, *overrides: str, recipe: Path = TINY_RECIPE) -> list[str]:
    return [
        "train",
        str(recipe),
        "--output-dir",
        str(output_dir),
        "--no-progress",
        *sets(*overrides),
    ]


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one ``caat-peft: error:`` line on stderr naming every needle."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("caat-peft: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def adapter_tensors(run_dir: Path, folder: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / folder / "adapter_model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# --------------------------------------------------------------------------------------------
# Real training processes without paying the imports each time


def cli_child(argv: list[str], log_path: str, pause_step: int = 0) -> None:
    """Body of a forked child: ``python -m caat_peft ARGV`` with output to ``log_path``.

    Runs ``caat_peft/__main__.py`` through ``runpy`` (what ``python -m caat_peft`` runs), in a
    process forked from a forkserver that imported the libraries once. With ``pause_step``, the
    write of checkpoint ``pause_step`` stops after ``trainable.safetensors`` (before
    ``state.pt``) and ``<log_path>.paused`` appears: a kill then lands inside the write.
    """
    import os
    import runpy
    import sys
    import time

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if pause_step:
        import caat_peft.training.checkpoint as ck

        real_save_file = ck.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save_file(tensors, filename, *args, **kwargs)
            if os.path.basename(os.path.dirname(filename)) == f".tmp-step-{pause_step}":
                open(log_path + ".paused", "w").close()  # noqa: SIM115
                time.sleep(600)  # killed here, half-way through the checkpoint

        ck.save_file = save_file
    sys.argv = ["caat-peft", *argv]
    runpy.run_module("caat_peft", run_name="__main__", alter_sys=True)
