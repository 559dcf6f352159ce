"""The entry point and the loader: one contract for every source."""

from __future__ import annotations

import pytest
import torch

from caat_peft.data.fixtures import (
    garble_file,
    make_cub_fixture,
    make_dogs_fixture,
    make_folder_fixture,
    make_hub_fixture,
)
from caat_peft.data.loader import make_loader
from caat_peft.data.sources import SOURCES, DataSplits, load_source
from caat_peft.errors import UserError

CFG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 0.875}


def _any_source(name, tmp_path, **kw) -> DataSplits:
    if name == "cub":
        return load_source("cub", str(make_cub_fixture(tmp_path)), data_config=CFG, **kw)
    if name == "dogs":
        return load_source("dogs", str(make_dogs_fixture(tmp_path)), data_config=CFG, **kw)
    if name == "folder":
        return load_source("folder", str(make_folder_fixture(tmp_path)), data_config=CFG, **kw)
    hub = make_hub_fixture(tmp_path)
    return load_source("hf", None, hub_id=str(hub), data_config=CFG, **kw)


@pytest.mark.parametrize("name", SOURCES)
def test_every_source_batches_into_unit_float_pixels_and_int_labels(name, tmp_path):
    splits = _any_source(name, tmp_path, val_fraction=0.3, seed=0)
    assert splits.val is not None and len(splits.val) >= 1
    assert len(splits.class_names) == splits.num_classes == 3
    for ds in (splits.train, splits.val, splits.test):
        x, y = next(iter(make_loader(ds, 4, shuffle=False, num_workers=0, seed=0, drop_last=False)))
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < 3


def test_train_is_augmented_and_val_test_are_not(tmp_path):
    splits = _any_source("folder", tmp_path, val_fraction=0.25)
    torch.manual_seed(0)
    train_draws = [splits.train[0][0] for _ in range(6)]
    assert any(not torch.equal(train_draws[0], x) for x in train_draws[1:])
    for ds in (splits.val, splits.test):
        assert torch.equal(ds[0][0], ds[0][0])


def test_loader_order_is_fixed_by_seed_also_with_workers(tmp_path):
    ds = _any_source("folder", tmp_path).train

    def epoch(seed, workers):
        loader = make_loader(ds, 4, shuffle=True, num_workers=workers, seed=seed, drop_last=True)
        torch.manual_seed(123)  # only matters for workers=0 (transforms use the global RNG)
        return [(x, y) for x, y in loader]

    a, b, c = epoch(5, 0), epoch(5, 0), epoch(6, 0)
    assert len(a) == 3 and all(x.shape[0] == 4 for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert any(not torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    w1, w2 = epoch(5, 2), epoch(5, 2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(w1, w2))
    assert [y.tolist() for _, y in w1] == [y.tolist() for _, y in a]  # same order as workers=0


def test_loader_settings(tmp_path):
    ds = _any_source("folder", tmp_path).test
    loader = make_loader(ds, 5, shuffle=False, num_workers=2, seed=0, drop_last=False)
    assert loader.persistent_workers and loader.pin_memory == torch.cuda.is_available()
    assert sum(len(y) for _, y in loader) == len(ds) == 12
    assert not make_loader(
        ds, 5, shuffle=False, num_workers=0, seed=0, drop_last=False
    ).persistent_workers
    with pytest.raises(UserError, match="batch_size"):
        make_loader(ds, 0, shuffle=False, num_workers=0, seed=0, drop_last=False)


def test_corrupt_image_surfaces_through_worker_processes(tmp_path):
    splits = _any_source("folder", tmp_path)
    garble_file(splits.test.records[3].path)
    loader = make_loader(splits.test, 4, shuffle=False, num_workers=2, seed=0, drop_last=False)
    with pytest.raises(UserError, match="cannot decode image") as exc:
        list(loader)
    # The traceback holds the loader's iterator in a reference cycle; when the garbage collector
    # breaks it later, torch's worker shutdown waits 2 × 5 s. Dropping it frees the workers now.
    exc.value.__traceback__ = None
    del exc, loader


def test_unknown_source_and_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown data source 'imagenet'"):
        load_source("imagenet", str(tmp_path), data_config=CFG)
    with pytest.raises(UserError, match="val_fraction"):
        load_source("cub", str(tmp_path), data_config=CFG, val_fraction=1.0)
    with pytest.raises(UserError, match="input_size"):  # before any file is read
        load_source("cub", str(tmp_path / "nowhere"), data_config={})
