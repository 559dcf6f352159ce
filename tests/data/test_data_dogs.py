"""Stanford Dogs from Images/ and the official .mat lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from caat_peft.data.dogs import read_dogs_list
from caat_peft.data.fixtures import garble_file, make_dogs_fixture, write_dogs_list
from caat_peft.data.sources import load_source
from caat_peft.errors import UserError

CFG = {"input_size": (3, 20, 20), "interpolation": "bicubic", "crop_pct": 0.875}


def _load(root, **kw):
    return load_source("dogs", str(root), data_config=CFG, **kw)


@pytest.mark.parametrize("lists_subdir", [True, False])
def test_official_layout_loads(tmp_path, lists_subdir):
    root = make_dogs_fixture(tmp_path, n_classes=3, per_class=5, lists_subdir=lists_subdir)
    splits = _load(root)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (6, 9, 3)
    assert splits.class_names == ["Breed_1", "Shih-Tzu", "Breed_3"]  # split at the first "-"
    assert sorted(splits.train.labels) == [0, 0, 1, 1, 2, 2]
    for r in splits.test.records:  # label and folder agree (labels follow the sorted folders)
        assert splits.class_names[r.label] in r.path
    assert Image.open(splits.test.records[0].path).mode == "L"  # grayscale in, RGB out
    for ds in (splits.train, splits.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 20, 20) and x.dtype == torch.float32 and isinstance(y, int)


def test_mat_files_have_the_official_nesting(tmp_path):
    root = make_dogs_fixture(tmp_path)
    mat = loadmat(str(root / "lists" / "train_list.mat"))
    cells = mat["file_list"]
    assert cells.dtype == object and cells.shape == (6, 1)
    assert isinstance(cells[0, 0], np.ndarray) and cells[0, 0].shape == (1,)
    assert mat["labels"].shape == (6, 1) and mat["annotation_list"].shape == (6, 1)
    files, labels = read_dogs_list(root / "lists" / "train_list.mat")
    assert files[0] == "n02085620-Breed_1/n02085620_1000.jpg" and labels[:2] == [1, 1]


def test_squeezed_and_char_matrix_lists_read_the_same(tmp_path):
    files = ["a-b/x_1.jpg", "a-b/x_22.jpg"]
    savemat(tmp_path / "char.mat", {"file_list": np.array(files), "labels": [[1.0], [1.0]]})
    assert read_dogs_list(tmp_path / "char.mat") == (files, [1, 1])


def test_missing_root_lists_or_images_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="root not found"):
        _load(tmp_path / "nope")
    with pytest.raises(UserError, match="needs a root"):
        load_source("dogs", None, data_config=CFG)
    root = make_dogs_fixture(tmp_path / "d")
    (root / "lists" / "test_list.mat").unlink()
    with pytest.raises(UserError, match="test_list.mat") as exc:
        _load(root)
    assert "lists.tar" in str(exc.value) and "\n" not in str(exc.value)
    root = make_dogs_fixture(tmp_path / "e")
    (root / "Images").rename(root / "images_elsewhere")
    with pytest.raises(UserError, match="no Images/"):
        _load(root)


def test_listed_file_missing_raises_or_is_skipped(tmp_path):
    root = make_dogs_fixture(tmp_path)
    victim = sorted((root / "Images").rglob("*.jpg"))[-1]
    victim.unlink()
    with pytest.raises(UserError, match="image file missing") as exc:
        _load(root)
    assert str(victim) in str(exc.value)
    splits = _load(root, bad_files="skip")
    assert splits.test.skipped == 1 and len(splits.test) == 5


def test_corrupt_image_is_refused_when_loading_or_is_skipped(tmp_path):
    root = make_dogs_fixture(tmp_path)
    splits = _load(root)
    victim = splits.train.records[0].path
    garble_file(victim)
    with pytest.raises(UserError, match="cannot decode") as exc:
        _load(root)
    assert victim in str(exc.value)
    skipped = _load(root, bad_files="skip")
    assert skipped.train.skipped == 1 and len(skipped.train) == 5


def test_label_out_of_range_raises_or_is_skipped(tmp_path):
    root = make_dogs_fixture(tmp_path)
    files, labels = read_dogs_list(root / "lists" / "train_list.mat")
    labels[3] = 121
    write_dogs_list(root / "lists" / "train_list.mat", files, labels)
    with pytest.raises(UserError, match="label 121 is outside 1..3") as exc:
        _load(root)
    assert "train_list.mat entry 4" in str(exc.value)
    splits = _load(root, bad_files="skip")
    assert splits.train.skipped == 1 and len(splits.train) == 5


def test_lists_whose_counts_disagree_always_raise(tmp_path):
    root = make_dogs_fixture(tmp_path)
    path = root / "lists" / "test_list.mat"
    mat = loadmat(str(path))
    savemat(str(path), {"file_list": mat["file_list"], "labels": mat["labels"][:-1]})
    for policy in ("error", "skip"):  # entries cannot be re-paired, so skipping cannot help
        with pytest.raises(UserError, match="file_list has 6, labels has 5"):
            _load(root, bad_files=policy)


def test_bbox_crop_is_refused_for_dogs(tmp_path):
    with pytest.raises(UserError, match="bbox_crop"):
        _load(make_dogs_fixture(tmp_path), bbox_crop=True)
