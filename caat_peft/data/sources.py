"""The single entry point from a data source name to train / val / test datasets.

Whatever the source, the training code sees ``torch.utils.data.Dataset`` objects whose items are
``(x, y)``: x a float32 tensor C×H×W in [0, 1] (normalisation lives in the model), y an int.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from caat_peft.data.cub import load_cub_index
from caat_peft.data.dogs import load_dogs_index
from caat_peft.data.folder import HubDataset, load_folder_index, load_hub_splits
from caat_peft.data.records import RecordDataset, SkippedEntry, SourceIndex, check_policy
from caat_peft.data.split import stratified_split
from caat_peft.data.transforms import eval_transform, image_mode, train_transform
from caat_peft.errors import UserError

log = logging.getLogger("caat_peft.data")

SOURCES = ("cub", "dogs", "folder", "hf")


@dataclass
class DataSplits:
    """Datasets for one source. ``val`` is None when no validation set was asked for or given.

    ``skipped`` lists every entry left out under ``bad_files='skip'`` (each dataset's own
    ``skipped`` attribute counts the entries of its split).
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    class_names: list[str]
    skipped: list[SkippedEntry] = field(default_factory=list)


def _of_split(entries: list[SkippedEntry], split: str) -> list[SkippedEntry]:
    return [e for e in entries if e.split == split]


def _file_splits(
    name: str,
    index: SourceIndex,
    *,
    data_config: Mapping[str, Any],
    val_fraction: float,
    seed: int,
    bbox_crop: bool,
    random_resized_crop: bool,
) -> DataSplits:
    train_tf = train_transform(data_config, random_resized_crop=random_resized_crop)
    eval_tf = eval_transform(data_config)
    mode = image_mode(data_config)

    def make(records: list, transform: Any, split: str) -> RecordDataset:
        return RecordDataset(
            records,
            transform,
            source=name,
            bbox_crop=bbox_crop,
            skipped=_of_split(index.skipped, split),
            mode=mode,
        )

    train_records, val_records = index.train, index.val
    if val_fraction > 0:
        if val_records is not None:
            log.warning(
                "%s: val_fraction=%s, so the provided val/ split is not used", name, val_fraction
            )
        train_ids, val_ids = stratified_split([r.label for r in index.train], val_fraction, seed)
        train_records = [index.train[i] for i in train_ids]
        val_records = [index.train[i] for i in val_ids]
    return DataSplits(
        train=make(train_records, train_tf, "train"),
        val=None if val_records is None else make(val_records, eval_tf, "val"),
        test=make(index.test, eval_tf, "test"),
        num_classes=len(index.class_names),
        class_names=index.class_names,
        skipped=index.skipped,
    )


def _hub_splits(
    hub_id: str | None,
    cache_dir: str | None,
    *,
    data_config: Mapping[str, Any],
    val_fraction: float,
    seed: int,
    random_resized_crop: bool,
    bad_files: str,
) -> DataSplits:
    train_tf = train_transform(data_config, random_resized_crop=random_resized_crop)
    eval_tf = eval_transform(data_config)
    mode = image_mode(data_config)
    splits, class_names, image_col, label_col = load_hub_splits(
        hub_id, cache_dir, bad_files=bad_files
    )

    def make(split: str, transform: Any) -> HubDataset:
        table, rows, skipped = splits[split]
        return HubDataset(
            table,
            transform,
            image_column=image_col,
            label_column=label_col,
            indices=rows,
            source=f"hf:{hub_id}",
            skipped=skipped,
            mode=mode,
        )

    train = make("train", train_tf)
    val = make("val", eval_tf) if "val" in splits else None
    if val_fraction > 0:
        if val is not None:
            log.warning(
                "hf: val_fraction=%s, so the data set's validation split is not used", val_fraction
            )
        train_ids, val_ids = stratified_split(train.labels, val_fraction, seed)
        val = train.subset(val_ids, eval_tf)
        train_skipped = train.skipped_entries
        train = train.subset(train_ids)
        train.skipped_entries = train_skipped
    skipped = [e for _, _, entries in splits.values() for e in entries]
    return DataSplits(
        train=train,
        val=val,
        test=make("test", eval_tf),
        num_classes=len(class_names),
        class_names=class_names,
        skipped=skipped,
    )


def load_source(
    name: str,
    root: str | None,
    *,
    data_config: dict,
    val_fraction: float = 0.0,
    seed: int = 0,
    bbox_crop: bool = False,
    random_resized_crop: bool = False,
    bad_files: str = "error",
    hub_id: str | None = None,
) -> DataSplits:
    """Build train / val / test datasets for ``name`` in ``cub``, ``dogs``, ``folder``, ``hf``.

    ``data_config`` is the model's preprocessing (``timm.data.resolve_data_config``); train uses
    the train transform, val and test the eval transform. ``val_fraction`` > 0 carves a seeded,
    stratified validation set out of train, so that no model is ever selected on test.
    ``bad_files='skip'`` leaves out (and counts, and logs) entries that would otherwise raise
    a UserError. For ``hf``, ``hub_id`` names the data set and ``root`` is the cache folder.
    """
    if name not in SOURCES:
        raise UserError(f"unknown data source {name!r}; use one of {', '.join(SOURCES)}")
    check_policy(bad_files)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be in [0, 1)")
    # Build the transforms first: a bad data config fails before any file is read.
    train_transform(data_config, random_resized_crop=random_resized_crop)
    eval_transform(data_config)
    if bbox_crop and name != "cub":
        raise UserError(f"bbox_crop is only available for cub, not {name}; turn bbox_crop off")
    if hub_id is not None and name != "hf":
        log.warning("data source %s ignores hub_id=%r (only 'hf' uses it)", name, hub_id)

    if name == "hf":
        splits = _hub_splits(
            hub_id,
            root,
            data_config=data_config,
            val_fraction=val_fraction,
            seed=seed,
            random_resized_crop=random_resized_crop,
            bad_files=bad_files,
        )
    else:
        if name == "cub":
            index = load_cub_index(root, bbox_crop=bbox_crop, bad_files=bad_files)
        elif name == "dogs":
            index = load_dogs_index(root, bad_files=bad_files)
        else:
            index = load_folder_index(root, bad_files=bad_files)
        splits = _file_splits(
            name,
            index,
            data_config=data_config,
            val_fraction=val_fraction,
            seed=seed,
            bbox_crop=bbox_crop,
            random_resized_crop=random_resized_crop,
        )
    log.info(
        "%s: %d train / %s val / %d test images, %d classes",
        name,
        len(splits.train),
        "no" if splits.val is None else len(splits.val),
        len(splits.test),
        splits.num_classes,
    )
    return splits
