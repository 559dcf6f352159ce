"""Stanford Dogs from ``images.tar`` and ``lists.tar`` as extracted.

Layout::

    <root>/Images/<synset>-<breed>/<synset>_<n>.jpg     e.g. n02085620-Chihuahua/n02085620_5927.jpg
    <root>/train_list.mat, <root>/test_list.mat          (or under <root>/lists/)

Each .mat holds ``file_list`` (paths relative to Images/), ``annotation_list`` and ``labels``
(1..120). MATLAB cell arrays load through scipy as an (N, 1) object array whose cells are
1-element string arrays, hence the unwrapping below. Official numbers: 12,000 train / 8,580 test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from caat_peft.data.records import (
    BadData,
    Record,
    SourceIndex,
    drop_missing_and_unreadable,
    warn_skipped,
)
from caat_peft.errors import UserError

SOURCE = "Stanford Dogs"
OFFICIAL_COUNTS = {"train": 12000, "test": 8580, "classes": 120}
_FIX_LISTS = "re-extract lists.tar from the Stanford Dogs site into the data root"
_FIX_IMAGES = "re-extract images.tar into the data root"


def _cell_string(cell: Any) -> str:
    """Unwrap one MATLAB cell (str, or arrays of arrays of one str) into a str."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            raise ValueError(f"expected one string per cell, got shape {cell.shape}")
        cell = cell.reshape(-1)[0]
    if isinstance(cell, bytes):
        return cell.decode("utf-8")
    if not isinstance(cell, str):
        raise ValueError(f"expected a string, got {type(cell).__name__}")
    return cell


def _mat_strings(value: Any) -> list[str]:
    arr = np.asarray(value)
    if arr.dtype.kind == "U":  # a char matrix, one row per string, or squeezed cells
        return [str(s).rstrip() for s in arr.reshape(-1)]
    return [_cell_string(c) for c in arr.reshape(-1)]


def find_dogs_lists(root: Path) -> Path:
    """The folder holding train_list.mat / test_list.mat: the root itself or root/lists."""
    for candidate in (root, root / "lists"):
        if (candidate / "train_list.mat").is_file() and (candidate / "test_list.mat").is_file():
            return candidate
    raise UserError(
        f"{SOURCE}: train_list.mat and test_list.mat not found in {root} or {root / 'lists'}; "
        f"{_FIX_LISTS}"
    )


def read_dogs_list(path: Path) -> tuple[list[str], list[int]]:
    """(file_list, labels) from one official .mat; lengths must agree (no way to re-pair them)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for unreadable .mat files
        raise UserError(f"{SOURCE}: cannot read {path} ({exc}); {_FIX_LISTS}") from exc
    for key in ("file_list", "labels"):
        if key not in mat:
            raise UserError(f"{SOURCE}: {path} has no '{key}' entry; {_FIX_LISTS}")
    try:
        files = _mat_strings(mat["file_list"])
    except ValueError as exc:
        raise UserError(
            f"{SOURCE}: {path} file_list is not a list of strings ({exc}); {_FIX_LISTS}"
        ) from exc
    raw_labels = np.asarray(mat["labels"]).reshape(-1)
    if raw_labels.dtype.kind not in "iuf" or (
        raw_labels.dtype.kind == "f" and not np.all(np.isfinite(raw_labels))
    ):
        raise UserError(f"{SOURCE}: {path} labels are not numbers; {_FIX_LISTS}")
    if raw_labels.dtype.kind == "f" and np.any(raw_labels != np.round(raw_labels)):
        raise UserError(f"{SOURCE}: {path} labels are not whole numbers; {_FIX_LISTS}")
    labels = [int(v) for v in raw_labels]
    counts = {"file_list": len(files), "labels": len(labels)}
    if "annotation_list" in mat:
        counts["annotation_list"] = int(np.asarray(mat["annotation_list"]).size)
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{k} has {v}" for k, v in counts.items())
        raise UserError(f"{SOURCE}: {path} lists disagree ({detail}); {_FIX_LISTS}")
    return files, labels


def load_dogs_index(
    root: str | os.PathLike[str] | None, *, bbox_crop: bool = False, bad_files: str = "error"
) -> SourceIndex:
    """Read Images/ and the two .mat lists into train / test records (labels 0-based)."""
    if bbox_crop:
        raise UserError(
            f"bbox_crop is not implemented for {SOURCE} (only for cub); turn bbox_crop off"
        )
    if root is None:
        raise UserError(
            f"{SOURCE} needs a root; set data.root to the folder holding Images/ and the lists"
        )
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"{SOURCE} root not found: {base}; set data.root to the folder holding Images/ "
            "and train_list.mat / test_list.mat"
        )
    images = base / "Images"
    if not images.is_dir():
        raise UserError(f"{SOURCE}: no Images/ folder in {base}; {_FIX_IMAGES}")
    lists = find_dogs_lists(base)
    # Labels 1..K follow the sorted class folders; the folder name is "<synset>-<breed>".
    class_dirs = sorted(
        d.name for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not class_dirs:
        raise UserError(f"{SOURCE}: {images} has no class folders; {_FIX_IMAGES}")
    class_names = [d.split("-", 1)[-1] for d in class_dirs]

    bad = BadData(bad_files, SOURCE)
    records: dict[str, list[Record]] = {}
    for split in ("train", "test"):
        mat_path = lists / f"{split}_list.mat"
        files, labels = read_dogs_list(mat_path)
        kept = []
        for i, (rel, label) in enumerate(zip(files, labels)):
            if not 1 <= label <= len(class_dirs):
                bad.report(
                    f"{mat_path.name} entry {i + 1} ({rel}): label {label} is outside "
                    f"1..{len(class_dirs)} (class folders in Images/)",
                    _FIX_LISTS,
                    item=rel,
                    split=split,
                )
                continue
            kept.append(Record(str(images / rel), label - 1))
        records[split] = drop_missing_and_unreadable(
            kept, bad, split=split, fix_missing=_FIX_IMAGES
        )
        if not records[split]:
            raise UserError(f"{SOURCE}: no usable {split} images under {images}; {_FIX_IMAGES}")
    warn_skipped(SOURCE, bad.entries)
    return SourceIndex(
        train=records["train"], test=records["test"], class_names=class_names, skipped=bad.entries
    )
