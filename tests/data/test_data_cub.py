"""CUB-200-2011 from its official layout, including every kind of bad data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from caat_peft.data.cub import load_cub_index
from caat_peft.data.fixtures import garble_file, make_cub_fixture, truncate_file
from caat_peft.data.sources import load_source
from caat_peft.data.transforms import eval_transform
from caat_peft.errors import UserError

CFG = {"input_size": (3, 24, 24), "interpolation": "bilinear", "crop_pct": 1.0}


def _load(root, **kw):
    return load_source("cub", str(root), data_config=CFG, **kw)


def _first_line_id(path: Path, image_id: int) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines) if line.split()[0] == str(image_id))


def _edit_line(path: Path, image_id: int, new_line: str | None) -> None:
    lines = path.read_text().splitlines()
    i = _first_line_id(path, image_id)
    if new_line is None:
        del lines[i]
    else:
        lines[i] = new_line
    path.write_text("\n".join(lines) + "\n")


def _assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture
def cub(tmp_path):
    return make_cub_fixture(tmp_path, n_classes=3, per_class=4)


def test_official_layout_loads_with_0_based_labels(cub):
    splits = _load(cub.parent)  # the parent of CUB_200_2011/ works too
    assert (len(splits.train), len(splits.test)) == (6, 6)
    assert splits.val is None and splits.num_classes == 3
    assert splits.class_names == ["Bird_1", "Bird_2", "Bird_3"]
    assert sorted(splits.train.labels) == [0, 0, 1, 1, 2, 2]
    assert splits.train.skipped == 0 and splits.test.skipped == 0
    # train_test_split.txt decides the split: the first two images of each class are train.
    assert all(Path(r.path).stem.split("_")[2] in ("0000", "0001") for r in splits.train.records)
    for ds in (splits.train, splits.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 24, 24) and x.dtype == torch.float32
            assert x.min() >= 0.0 and x.max() <= 1.0 and isinstance(y, int)


def test_grayscale_images_become_rgb(cub):
    gray = [p for p in sorted((cub / "images").rglob("*.jpg")) if Image.open(p).mode == "L"]
    assert gray  # the fixture really has grayscale files
    splits = _load(cub)
    ds = splits.train if any(str(gray[0]) == r.path for r in splits.train.records) else splits.test
    i = next(i for i, r in enumerate(ds.records) if r.path == str(gray[0]))
    x, _ = ds[i]
    assert x.shape[0] == 3 and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_bbox_crop_reads_the_boxes(cub):
    (cub / "bounding_boxes.txt").write_text(
        "".join(f"{i} 4.0 6.0 10.0 20.0\n" for i in range(1, 13))
    )
    index = load_cub_index(cub, bbox_crop=True)
    assert index.train[0].bbox == (4.0, 6.0, 10.0, 20.0)
    cropped = _load(cub, bbox_crop=True).test
    whole = _load(cub).test
    record = cropped.records[0]
    box = Image.open(record.path).convert("RGB").crop((4, 6, 14, 26))
    assert torch.equal(cropped[0][0], eval_transform(CFG)(box))
    assert not torch.equal(cropped[0][0], whole[0][0])


def test_box_outside_the_image_is_a_user_error(cub):
    _edit_line(cub / "bounding_boxes.txt", 1, "1 500.0 500.0 10.0 10.0")
    splits = _load(cub, bbox_crop=True)
    with pytest.raises(UserError, match="outside"):
        splits.train[0]


def test_val_split_is_carved_from_train_with_eval_transform(tmp_path):
    cub = make_cub_fixture(tmp_path, n_classes=4, per_class=10, train_per_class=6)
    splits = _load(cub, val_fraction=0.25, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 16)
    train_paths = {r.path for r in splits.train.records}
    val_paths = {r.path for r in splits.val.records}
    test_paths = {r.path for r in splits.test.records}
    assert not val_paths & train_paths and not val_paths & test_paths
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # eval transform: deterministic
    again = _load(cub, val_fraction=0.25, seed=1)
    assert [r.path for r in again.val.records] == [r.path for r in splits.val.records]


def test_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="root not found") as exc:
        _load(tmp_path / "nowhere")
    assert "data.root" in _assert_one_line(exc)
    with pytest.raises(UserError, match="needs a root"):
        load_source("cub", None, data_config=CFG)
    with pytest.raises(UserError, match="no images.txt"):
        _load(tmp_path)


def test_missing_list_file_names_it(cub):
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(UserError, match="train_test_split.txt") as exc:
        _load(cub)
    assert "re-extract" in _assert_one_line(exc)


def test_listed_file_missing_raises_or_is_skipped(cub, caplog):
    victim = sorted((cub / "images").rglob("*.jpg"))[0]
    victim.unlink()
    with pytest.raises(UserError, match="image file missing") as exc:
        _load(cub)
    message = _assert_one_line(exc)
    assert str(victim) in message and "bad_files='skip'" in message
    with caplog.at_level(logging.WARNING, logger="caat_peft.data"):
        splits = _load(cub, bad_files="skip")
    assert len(splits.train) + len(splits.test) == 11
    assert splits.train.skipped + splits.test.skipped == 1 and len(splits.skipped) == 1
    assert "skipped 1 bad entries" in caplog.text and str(victim) in caplog.text


def test_corrupt_image_is_refused_when_loading_naming_the_file(cub):
    victim = _load(cub).train.records[1].path
    garble_file(victim)
    with pytest.raises(UserError, match="cannot decode") as exc:
        _load(cub)  # every listed image is checked up front, before any run starts
    assert victim in _assert_one_line(exc)


def test_image_corrupted_after_loading_fails_at_decode_time_naming_the_file(cub):
    splits = _load(cub)
    victim = splits.train.records[1].path
    garble_file(victim)
    splits.train[0]
    with pytest.raises(UserError, match="cannot decode image") as exc:
        splits.train[1]
    assert victim in _assert_one_line(exc)


@pytest.mark.parametrize("damage", [garble_file, truncate_file])
def test_corrupt_or_truncated_images_are_skipped_up_front_when_asked(cub, damage, caplog):
    victim = _load(cub).test.records[2].path
    damage(victim)
    with caplog.at_level(logging.WARNING, logger="caat_peft.data"):
        splits = _load(cub, bad_files="skip")
    assert splits.test.skipped == 1 and len(splits.test) == 5
    assert victim not in {r.path for r in splits.test.records}
    assert splits.skipped[0].item == victim and "skipped 1" in caplog.text
    for i in range(len(splits.test)):
        splits.test[i]  # nothing left that fails


def test_truncated_image_is_refused_when_loading_without_skip(cub):
    victim = _load(cub).test.records[0].path
    truncate_file(victim)
    with pytest.raises(UserError, match="cannot decode") as exc:
        _load(cub)
    assert victim in _assert_one_line(exc)


def test_label_out_of_range_raises_or_is_skipped(cub):
    _edit_line(cub / "image_class_labels.txt", 5, "5 201")
    with pytest.raises(UserError, match="label 201") as exc:
        _load(cub)
    assert "image_class_labels.txt" in _assert_one_line(exc)
    splits = _load(cub, bad_files="skip")
    assert splits.train.skipped + splits.test.skipped == 1
    assert len(splits.train) + len(splits.test) == 11


def test_lists_whose_counts_disagree_raise_or_are_skipped(cub):
    _edit_line(cub / "image_class_labels.txt", 7, None)
    with pytest.raises(UserError, match="lists disagree") as exc:
        _load(cub)
    message = _assert_one_line(exc)
    assert "12 ids" in message and "11" in message and "id 7 missing" in message
    splits = _load(cub, bad_files="skip")
    assert len(splits.train) + len(splits.test) == 11 and len(splits.skipped) == 1


def test_missing_bounding_box_is_reported_only_when_cropping(cub):
    _edit_line(cub / "bounding_boxes.txt", 3, None)
    assert len(_load(cub).train) == 6
    with pytest.raises(UserError, match="bounding_boxes.txt"):
        _load(cub, bbox_crop=True)


def test_malformed_line_names_file_and_line(cub):
    _edit_line(cub / "train_test_split.txt", 2, "2 yes")
    with pytest.raises(UserError, match=r"train_test_split.txt line 2 is malformed"):
        _load(cub)


def test_bad_policy_is_a_user_error(cub):
    with pytest.raises(UserError, match="bad_files"):
        _load(cub, bad_files="ignore")
