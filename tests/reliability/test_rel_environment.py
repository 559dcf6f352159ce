"""The machine around a run: an output location that cannot be written, a directory that already
holds another run, a disk that fills up during a checkpoint. All are found before training or
leave the finished work resumable."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
import yaml
from reliability_lib import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    FAST_SETS,
    adapter_tensors,
    assert_one_line_error,
    assert_same_tensors,
    one_torch_thread,
    run_cli,
    train_args,
)

from caat_peft.cli import main
from caat_peft.training import trainer as trainer_module
from caat_peft.training.checkpoint import list_checkpoints

CHECKPOINTED = [*FAST_SETS, "train.save_every=5", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny run with checkpoints at steps 5, 10 and 15 (19 steps in all)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("env") / "run"
        assert main(train_args(run, *CHECKPOINTED)) == 0
    finally:
        torch.set_num_threads(old)
    return run


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# Where the run goes


def test_output_dir_below_a_file(tmp_path):
    """A path no one can create (a file where a folder should be): refused before training."""
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    out = blocker / "run"
    code, _, err = run_cli(train_args(out, *FAST_SETS))
    assert_one_line_error(code, err, str(out))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes through chmod 0o500; see test_output_dir_below_a_file"
)
def test_output_dir_in_a_read_only_folder(tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        out = parent / "run"
        code, _, err = run_cli(train_args(out, *FAST_SETS))
        assert_one_line_error(code, err, str(out))
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_output_dir_that_is_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("mine")
    code, _, err = run_cli(train_args(out, *FAST_SETS))
    assert_one_line_error(code, err, str(out), "is a file")
    assert out.read_text() == "mine"


def test_a_directory_holding_another_run_is_left_alone(tmp_path, finished_run):
    """Another config into a directory that holds a run: refused without --overwrite, refused
    with --resume (naming the key that differs), and nothing of the old run changes."""
    before = _fingerprint(finished_run)
    other = [*CHECKPOINTED, "train.lr=0.01"]
    code, _, err = run_cli(train_args(finished_run, *other))
    assert_one_line_error(code, err, str(finished_run), "--resume", "--overwrite")
    code, _, err = run_cli([*train_args(finished_run, *other), "--resume"])
    assert_one_line_error(code, err, "train.lr")
    code, _, err = run_cli([*train_args(finished_run, *other), "--resume", "--overwrite"])
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert _fingerprint(finished_run) == before


def test_overwrite_replaces_the_run(tmp_path, finished_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes-from-the-old-run.txt").write_text("old")
    code, _, err = run_cli([*train_args(run, *FAST_SETS, "train.lr=0.01"), "--overwrite"])
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.01
    assert not (run / "notes-from-the-old-run.txt").exists()
    assert not (run / "checkpoints").exists()  # no stale checkpoints to resume by mistake


def test_a_folder_with_foreign_files_is_never_overwritten(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    code, _, err = run_cli([*train_args(out, *FAST_SETS), "--overwrite"])
    assert_one_line_error(code, err, str(out))
    assert (out / "chapter1.tex").read_text() == "precious"


# --------------------------------------------------------------------------------------------
# The disk fills up while a checkpoint is written


@contextlib.contextmanager
def disk_nearly_full(max_file_bytes: int = 4096):
    """No file of this process may grow past ``max_file_bytes`` (RLIMIT_FSIZE, honoured by root
    too): writes fail as on a full disk (EFBIG instead of ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _fill_disk_at_checkpoint(monkeypatch, step: int) -> None:
    real_save = trainer_module.save_checkpoint

    def save_checkpoint(run_dir, at_step, *args, **kwargs):
        if at_step != step:
            return real_save(run_dir, at_step, *args, **kwargs)
        with disk_nearly_full():
            return real_save(run_dir, at_step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_checkpoint)


def test_a_full_disk_during_a_checkpoint_loses_nothing_finished(
    tmp_path, monkeypatch, finished_run
):
    """The write of checkpoint 10 fails for lack of space: checkpoint 5 is intact, no
    ``step-10`` appears, and once there is space again ``--resume`` ends exactly where the
    uninterrupted run ends."""
    run = tmp_path / "run"
    _fill_disk_at_checkpoint(monkeypatch, step=10)
    with contextlib.suppress(Exception):  # how it reports the failure: the test below
        run_cli(train_args(run, *CHECKPOINTED))
    assert [step for step, _ in list_checkpoints(run)] == [5]
    assert not (run / "checkpoints" / "step-10").exists()
    monkeypatch.undo()
    code, _, err = run_cli([*train_args(run, *CHECKPOINTED), "--resume"])
    assert code == 0, err
    assert_same_tensors(adapter_tensors(run), adapter_tensors(finished_run))


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fill_disk_at_checkpoint(monkeypatch, step=10)
    code, _, err = run_cli(train_args(run, *CHECKPOINTED))
    assert_one_line_error(code, err, str(run / "checkpoints"))


def test_a_full_disk_is_found_before_training(tmp_path):
    """A location where nothing more can be written is refused up front (a write probe), in
    one line, leaving no run directory behind."""
    out = tmp_path / "run"
    with disk_nearly_full():
        code, _, err = run_cli(train_args(out, *FAST_SETS))
    assert_one_line_error(code, err, str(out), "cannot write")
    assert not out.exists()


def test_too_little_free_space_for_the_run_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(out, *CHECKPOINTED))
    assert_one_line_error(code, err, str(out), "1 MiB free", "needs about")
    assert not out.exists()


def test_space_estimate_grows_with_checkpoints():
    small = trainer_module.space_needed(10 << 20, keep_checkpoints=2, checkpoints=False)
    kept = trainer_module.space_needed(10 << 20, keep_checkpoints=2, checkpoints=True)
    more = trainer_module.space_needed(10 << 20, keep_checkpoints=5, checkpoints=True)
    assert trainer_module.MIN_FREE_BYTES < small < kept < more
