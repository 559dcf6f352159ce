"""Broken data sets through ``caat-peft train``: one line naming the file and exit code 2 under
``data.bad_files=error`` (the default), or a run that leaves the bad entries out and says how
many under ``data.bad_files=skip``. (tests/data/ tests the loaders; this is the CLI path.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from reliability_lib import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    FAST_SETS,
    assert_one_line_error,
    one_torch_thread,
    run_cli,
    train_args,
)

from caat_peft.data.fixtures import (
    garble_file,
    make_cub_fixture,
    make_dogs_fixture,
    make_folder_fixture,
    truncate_file,
)

SMALL = [*FAST_SETS, "data.image_size=16", "train.batch_size=4"]


def _cub(tmp_path: Path) -> Path:
    """A CUB tree (3 classes × 8 images, half train) and its ``CUB_200_2011`` folder."""
    return make_cub_fixture(tmp_path / "cub", n_classes=3, per_class=8, grayscale_every=0)


def _cub_image(base: Path, image_id: int) -> Path:
    rel = dict(line.split() for line in (base / "images.txt").read_text().splitlines())
    return base / "images" / rel[str(image_id)]


def _train_cub(out: Path, root: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(train_args(out, *SMALL, "data.name=cub", f"data.root={root}", *extra))


def _refused_before_the_run(code: int, err: str, out: Path, *needles: str) -> None:
    assert_one_line_error(code, err, *needles)
    assert not out.exists(), "a run directory was created for unusable data"


def test_missing_root(tmp_path):
    out, root = tmp_path / "run", tmp_path / "not-extracted-yet"
    code, _, err = _train_cub(out, root)
    _refused_before_the_run(code, err, out, str(root), "data.root")


def test_missing_list_file(tmp_path):
    base = _cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base)
    _refused_before_the_run(code, err, out, str(base / "train_test_split.txt"))


def test_missing_listed_image(tmp_path):
    base = _cub(tmp_path)
    victim = _cub_image(base, 2)
    victim.unlink()
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base)
    _refused_before_the_run(code, err, out, str(victim), "bad_files")


def test_label_out_of_range(tmp_path):
    base = _cub(tmp_path)
    labels = base / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[4] = "5 99"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base)
    _refused_before_the_run(code, err, out, "image_class_labels.txt", "label 99", "image id 5")


def test_empty_test_split(tmp_path):
    base = _cub(tmp_path)
    split = base / "train_test_split.txt"
    split.write_text("".join(f"{line.split()[0]} 1\n" for line in split.read_text().splitlines()))
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base)
    _refused_before_the_run(code, err, out, "no usable test images", str(base))


def test_dogs_without_its_lists(tmp_path):
    root = make_dogs_fixture(tmp_path / "dogs", n_classes=3, per_class=8, grayscale_every=0)
    for mat in (root / "lists").glob("*.mat"):
        mat.unlink()
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(out, *SMALL, "data.name=dogs", f"data.root={root}"))
    _refused_before_the_run(code, err, out, "train_list.mat")


def test_folder_with_an_empty_split(tmp_path):
    root = make_folder_fixture(tmp_path / "folder", n_classes=3, per_class=8, grayscale_every=0)
    for image in (root / "test").rglob("*.*"):
        image.unlink()
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(out, *SMALL, "data.name=folder", f"data.root={root}"))
    assert_one_line_error(code, err, "test")
    assert not out.exists()


@pytest.mark.parametrize("damage", [truncate_file, garble_file], ids=["truncated", "garbled"])
def test_unreadable_training_image_is_named(tmp_path, damage):
    base = _cub(tmp_path)
    victim = _cub_image(base, 1)
    damage(victim)
    code, _, err = _train_cub(tmp_path / "run", base)
    assert_one_line_error(code, err, str(victim), "bad_files")


def test_truncated_test_image_is_refused_before_the_run(tmp_path):
    base = _cub(tmp_path)
    victim = _cub_image(base, 8)  # image ids 5..8 of class 1 are its test images
    truncate_file(victim)
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base)
    _refused_before_the_run(code, err, out, str(victim))


def test_unreadable_image_with_loader_workers_is_one_line(tmp_path):
    base = _cub(tmp_path)
    victim = _cub_image(base, 1)
    truncate_file(victim)
    code, _, err = _train_cub(tmp_path / "run", base, "data.num_workers=1")
    assert_one_line_error(code, err, str(victim))


def _break_three_entries(base: Path) -> dict[str, Path]:
    """A missing train image, a truncated test image, a train label out of range."""
    missing, truncated = _cub_image(base, 1), _cub_image(base, 8)
    missing.unlink()
    truncate_file(truncated)
    labels = base / "image_class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[9] = "10 42"  # image 10: class 2, train
    labels.write_text("\n".join(lines) + "\n")
    return {"missing": missing, "truncated": truncated}


def test_skip_policy_leaves_bad_entries_out_and_counts_them(tmp_path, caplog):
    base = _cub(tmp_path)
    _break_three_entries(base)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="caat_peft.data"):
        code, _, err = _train_cub(out, base, "data.bad_files=skip", "eval.limit=null")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "skipped 3 bad entries (test: 1, train: 2)" in warnings[0]
    assert "first: image id 10" in warnings[0]  # an example, by name
    final = json.loads((out / "final.json").read_text())
    assert final["eval_n"] == 12 - 1  # the truncated test image was left out, nothing else


def test_skip_policy_counts_are_kept_in_the_run_directory(tmp_path):
    base = _cub(tmp_path)
    _break_three_entries(base)
    out = tmp_path / "run"
    code, _, err = _train_cub(out, base, "data.bad_files=skip")
    assert code == 0, err
    final = json.loads((out / "final.json").read_text())
    assert final["skipped_files"] == {"test": 1, "train": 2}
