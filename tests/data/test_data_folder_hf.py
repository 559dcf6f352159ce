"""Image folders and HF data sets (local only: a save_to_disk folder, a local image folder)."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from caat_peft.data.fixtures import garble_file, make_folder_fixture, make_hub_fixture
from caat_peft.data.sources import load_source
from caat_peft.errors import UserError

CFG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 0.875}


def _folder(root, **kw):
    return load_source("folder", str(root), data_config=CFG, **kw)


def _hf(hub_id, **kw):
    return load_source("hf", None, hub_id=str(hub_id), data_config=CFG, **kw)


def _check_items(ds, n_classes):
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and 0 <= int(y) < n_classes


def test_folder_loads_jpeg_and_png(tmp_path):
    root = make_folder_fixture(tmp_path, n_classes=3, per_class=4)
    assert {p.suffix for p in root.rglob("img_*")} == {".jpg", ".png"}
    splits = _folder(root, val_fraction=0.25, seed=0)
    assert splits.class_names == ["class_0", "class_1", "class_2"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 12)
    assert sorted(splits.val.labels) == [0, 1, 2]  # stratified
    _check_items(splits.train, 3)
    _check_items(splits.test, 3)


def test_folder_val_directory_is_used_when_present(tmp_path):
    root = make_folder_fixture(tmp_path, per_class=2, splits=("train", "val", "test"))
    splits = _folder(root)
    assert len(splits.val) == 6 and all("/val/" in r.path for r in splits.val.records)


def test_folder_errors(tmp_path, caplog):
    with pytest.raises(UserError, match="root not found"):
        _folder(tmp_path / "nope")
    root = make_folder_fixture(tmp_path / "a", splits=("train",))
    with pytest.raises(UserError, match="no test/ folder"):
        _folder(root)
    root = make_folder_fixture(tmp_path / "b")
    (root / "train" / "class_2" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="caat_peft.data"):
        _folder(root)
    assert "ignored 1 files" in caplog.text


def test_folder_test_class_unknown_to_train_raises_or_is_skipped(tmp_path):
    root = make_folder_fixture(tmp_path)
    (root / "test" / "class_2").rename(root / "test" / "class_9")
    with pytest.raises(UserError, match="class_9 is not in train/"):
        _folder(root)
    splits = _folder(root, bad_files="skip")
    assert splits.test.skipped == 4 and len(splits.test) == 8


def test_folder_corrupt_image(tmp_path):
    root = make_folder_fixture(tmp_path)
    garble_file(root / "train" / "class_0" / "img_0.jpg")
    with pytest.raises(UserError, match="img_0.jpg"):
        _folder(root).train[0]
    assert _folder(root, bad_files="skip").train.skipped == 1


def test_hf_saved_dataset_dict(tmp_path):
    hub = make_hub_fixture(tmp_path, splits=("train", "validation", "test"))
    splits = _hf(hub)
    assert splits.class_names == ["class_0", "class_1", "class_2"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 12, 12)
    _check_items(splits.train, 3)
    _check_items(splits.val, 3)
    carved = _hf(hub, val_fraction=0.25)  # carving from train replaces the given validation
    assert (len(carved.train), len(carved.val)) == (9, 3)
    assert set(carved.val.indices).isdisjoint(carved.train.indices)


def test_hf_without_test_split_uses_validation_as_test(tmp_path, caplog):
    hub = make_hub_fixture(tmp_path, splits=("train", "validation"))
    with caplog.at_level(logging.WARNING, logger="caat_peft.data"):
        splits = _hf(hub)
    assert splits.val is None and len(splits.test) == 12
    assert "validation split as the test set" in caplog.text


def test_hf_local_image_folder_through_load_dataset(tmp_path):
    root = make_folder_fixture(tmp_path / "imf", per_class=2)
    splits = load_source(
        "hf", str(tmp_path / "cache"), hub_id=str(root), data_config=CFG, val_fraction=0.0
    )
    assert len(splits.train) == 6 and len(splits.test) == 6 and splits.num_classes == 3
    _check_items(splits.test, 3)


def _hub_with(tmp_path, labels, images):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    part = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    path = tmp_path / "odd"
    datasets.DatasetDict(train=part, test=part).save_to_disk(str(path))
    return path


def test_hf_label_out_of_range_and_corrupt_bytes(tmp_path):
    good = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    images = [good, good, {"bytes": b"not an image", "path": None}, good]
    hub = _hub_with(tmp_path, [0, 1, 1, -1], images)
    with pytest.raises(UserError, match="row 3: label -1 is outside 0..1"):
        _hf(hub)
    splits = _hf(hub, bad_files="skip")
    assert splits.train.skipped == 2 and len(splits.train) == 2 and len(splits.skipped) == 4
    hub2 = _hub_with(tmp_path / "b", [0, 1, 1, 0], images)
    lazy = _hf(hub2)
    with pytest.raises(UserError, match="row 2"):
        lazy.train[2]


def test_hf_errors(tmp_path):
    with pytest.raises(UserError, match="hub id"):
        load_source("hf", None, data_config=CFG)
    with pytest.raises(UserError, match="cannot load HF data set") as exc:
        _hf(tmp_path / "not-there")
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="bbox_crop"):
        _hf(tmp_path, bbox_crop=True)
