"""Image folders (``train/`` and ``test/`` with one sub-folder per class) and HF hub data sets.

Image folders become the same file records as CUB and Dogs. Hub data sets stay in their Arrow
files (memory-mapped, so they cost no RAM and pickle cheaply into workers) and are wrapped in
:class:`HubDataset`, which decodes the stored bytes itself so that corrupt images get the same
error message and the same ``bad_files`` policy as files on disk.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from caat_peft.data.records import (
    DECODE_ERRORS,
    BadData,
    Record,
    SkippedEntry,
    SourceIndex,
    Transform,
    drop_missing_and_unreadable,
    warn_skipped,
)
from caat_peft.errors import UserError

log = logging.getLogger("caat_peft.data")

FOLDER_SOURCE = "image folder"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


def _list_images(class_dir: Path) -> tuple[list[Path], int]:
    """Image files under ``class_dir`` (recursively, sorted) and the count of other files."""
    found, others = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
            else:
                others += 1
    return found, others


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def load_folder_index(
    root: str | os.PathLike[str] | None, *, bad_files: str = "error"
) -> SourceIndex:
    """``root/train/<class>/*``, ``root/test/<class>/*`` and optionally ``root/val/<class>/*``.

    Classes are the sorted sub-folders of ``train/``; a class folder in test/ or val/ that train/
    lacks is bad data (the model could never predict it).
    """
    if root is None:
        raise UserError(
            "image folder source needs a root; set data.root to a folder with train/ and test/"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"image folder root not found: {base}; set data.root to a folder with train/ and test/"
        )
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise UserError(
                f"image folder: no {split}/ folder in {base}; put one sub-folder per class under "
                f"{base / split}"
            )
    class_names = _class_dirs(base / "train")
    if not class_names:
        raise UserError(f"image folder: {base / 'train'} has no class sub-folders; add them")
    label_of = {name: i for i, name in enumerate(class_names)}

    bad = BadData(bad_files, FOLDER_SOURCE)
    splits: dict[str, list[Record]] = {}
    for split in ("train", "test", "val"):
        split_dir = base / split
        if split == "val" and not split_dir.is_dir():
            continue
        records: list[Record] = []
        ignored = 0
        for class_dir in _class_dirs(split_dir):
            files, others = _list_images(split_dir / class_dir)
            ignored += others
            if class_dir not in label_of:
                for path in files:
                    bad.report(
                        f"class folder {split_dir / class_dir} is not in train/ (its label "
                        f"would be out of range 0..{len(class_names) - 1})",
                        f"add {base / 'train' / class_dir} or remove the folder",
                        item=str(path),
                        split=split,
                    )
                continue
            if split == "train" and not files:
                log.warning("image folder: class folder %s has no images", split_dir / class_dir)
            records.extend(Record(str(p), label_of[class_dir]) for p in files)
        if ignored:
            log.warning(
                "image folder: ignored %d files under %s without an image extension (%s)",
                ignored,
                split_dir,
                ", ".join(sorted(IMAGE_EXTENSIONS)),
            )
        records = drop_missing_and_unreadable(
            records, bad, split=split, fix_missing="check the folder"
        )
        if not records:
            raise UserError(f"image folder: no usable images under {split_dir}; add images")
        splits[split] = records
    warn_skipped(FOLDER_SOURCE, bad.entries)
    return SourceIndex(
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        class_names=class_names,
        skipped=bad.entries,
    )


# ----------------------------------------------------------------------------------------------
# Hugging Face hub


IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _decode_hub_image(value: Any, mode: str) -> Image.Image:
    """A hub cell ({'bytes', 'path'}, a path, or a PIL image) fully decoded into ``mode``."""
    if isinstance(value, Image.Image):
        return value.convert(mode)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        source: Any = io.BytesIO(data) if data is not None else path
    else:
        source = value
    if source is None:
        raise ValueError("empty image cell")
    with Image.open(source) as im:
        return im.convert(mode)


class HubDataset(Dataset):
    """A torch Dataset over rows of a ``datasets.Dataset``: item i is ``(x, y)`` like the others.

    ``indices`` selects rows without copying the Arrow table (used for the validation split and
    for skipping bad rows).
    """

    def __init__(
        self,
        table: Any,
        transform: Transform,
        *,
        image_column: str,
        label_column: str,
        indices: Sequence[int] | None = None,
        source: str = "hf",
        skipped: Sequence[SkippedEntry] = (),
        mode: str = "RGB",
    ) -> None:
        self.table = table
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.indices = list(range(len(table))) if indices is None else [int(i) for i in indices]
        self.source = source
        self.skipped_entries = list(skipped)
        self.mode = mode
        self._labels: list[int] | None = None

    @property
    def skipped(self) -> int:
        return len(self.skipped_entries)

    @property
    def labels(self) -> list[int]:
        if self._labels is None:
            column = list(self.table[self.label_column])
            self._labels = [int(column[i]) for i in self.indices]
        return self._labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row_id = self.indices[index]
        row = self.table[row_id]
        try:
            image = _decode_hub_image(row[self.image_column], self.mode)
        except DECODE_ERRORS as exc:
            raise UserError(
                f"{self.source}: cannot decode the image of row {row_id} "
                f"({type(exc).__name__}: {exc}); fix: repair the data set, or pass "
                "bad_files='skip' to check all images up front and leave unreadable ones out"
            ) from exc
        return self.transform(image), int(row[self.label_column])

    def subset(self, indices: Sequence[int], transform: Transform | None = None) -> HubDataset:
        return HubDataset(
            self.table,
            self.transform if transform is None else transform,
            image_column=self.image_column,
            label_column=self.label_column,
            indices=[self.indices[i] for i in indices],
            source=self.source,
            mode=self.mode,
        )

    def __repr__(self) -> str:
        return f"HubDataset({self.source}, n={len(self)}, skipped={self.skipped})"


def _load_hub_dict(hub_id: str, cache_dir: str | None) -> Any:
    """A DatasetDict: from a ``save_to_disk`` folder, or through ``load_dataset`` (hub id or a
    local folder ``datasets`` understands)."""
    import datasets

    path = Path(hub_id).expanduser()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    try:
        loaded = datasets.load_dataset(hub_id, cache_dir=cache_dir)
    except Exception as exc:  # hub errors come in many types (network, not found, auth, format)
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"cannot load HF data set {hub_id!r} ({type(exc).__name__}: {reason}); check the id, "
            "go online once to fill the cache (data.root is the cache folder), or set "
            "HF_DATASETS_OFFLINE=1 to use the cache only"
        ) from exc
    if not isinstance(loaded, datasets.DatasetDict):
        raise UserError(f"HF data set {hub_id!r} has no named splits; it needs train and test")
    return loaded


def _pick_column(table: Any, candidates: Sequence[str], what: str, hub_id: str) -> str:
    for name in candidates:
        if name in table.column_names:
            return name
    raise UserError(
        f"HF data set {hub_id!r} has no {what} column (looked for {', '.join(candidates)}; "
        f"has {', '.join(table.column_names)}); rename the column"
    )


def load_hub_splits(
    hub_id: str | None, cache_dir: str | os.PathLike[str] | None, *, bad_files: str = "error"
) -> tuple[dict[str, tuple[Any, list[int], list[SkippedEntry]]], list[str], str, str]:
    """Open a hub data set: {split: (table, good row ids, skipped)}, class names and columns.

    Splits: ``train`` is required; ``test`` is the test split, or ``validation`` when the data set
    has no ``test``; ``validation`` is also returned as ``val`` when ``test`` exists.
    """
    import datasets

    if not hub_id:
        raise UserError("source 'hf' needs a hub id; set data.hub_id (for example 'user/name')")
    source = f"HF data set {hub_id!r}"
    bad = BadData(bad_files, source)
    dd = _load_hub_dict(hub_id, None if cache_dir is None else str(cache_dir))
    names = list(dd.keys())
    if "train" not in dd:
        raise UserError(f"{source} has no train split (has {', '.join(names)})")
    test_name = "test" if "test" in dd else "validation" if "validation" in dd else None
    if test_name is None:
        raise UserError(f"{source} has no test or validation split (has {', '.join(names)})")
    if test_name == "validation":
        log.warning("%s has no test split; using its validation split as the test set", source)
    wanted = {"train": "train", "test": test_name}
    if test_name == "test" and "validation" in dd:
        wanted["val"] = "validation"

    train = dd["train"]
    image_col = _pick_column(train, IMAGE_COLUMNS, "image", hub_id)
    label_col = _pick_column(train, LABEL_COLUMNS, "label", hub_id)
    feature = train.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:
        class_names = [str(i) for i in range(int(max(train[label_col])) + 1)]

    out: dict[str, tuple[Any, list[int], list[SkippedEntry]]] = {}
    for split, hf_name in wanted.items():
        table = dd[hf_name].select_columns([image_col, label_col])
        if isinstance(table.features[image_col], datasets.Image):
            # Bytes in, our decoder out: same error handling as for files, and no double decode.
            table = table.cast_column(image_col, datasets.Image(decode=False))
        before = len(bad.entries)
        good = []
        for row_id, label in enumerate(table[label_col]):
            if label is None or not 0 <= int(label) < len(class_names):
                bad.report(
                    f"{hf_name} row {row_id}: label {label} is outside 0..{len(class_names) - 1}",
                    "use a split with labels",
                    item=f"{hf_name}[{row_id}]",
                    split=split,
                )
                continue
            good.append(row_id)
        if bad.skipping:
            # Opt-in up-front check, so that a bad row never reaches a training step.
            checked = []
            for row_id in good:
                try:
                    _decode_hub_image(table[row_id][image_col], "RGB")
                except DECODE_ERRORS as exc:
                    bad.report(
                        f"{hf_name} row {row_id}: cannot decode image ({exc})",
                        "repair the data set",
                        item=f"{hf_name}[{row_id}]",
                        split=split,
                    )
                    continue
                checked.append(row_id)
            good = checked
        if not good:
            raise UserError(f"{source}: no usable rows in split {hf_name}")
        out[split] = (table, good, bad.entries[before:])
    warn_skipped(source, bad.entries)
    return out, class_names, image_col, label_col
