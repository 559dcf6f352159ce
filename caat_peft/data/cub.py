"""CUB-200-2011 from the folder that ``CUB_200_2011.tgz`` extracts to.

Layout (all ids 1-based, one ``<id> <value...>`` per line)::

    CUB_200_2011/
      images.txt              <image_id> <class_dir>/<file>.jpg
      image_class_labels.txt  <image_id> <class_id>
      train_test_split.txt    <image_id> <1 = train | 0 = test>
      classes.txt             <class_id> <class_dir>      (e.g. "1 001.Black_footed_Albatross")
      bounding_boxes.txt      <image_id> <x> <y> <w> <h>  (only read for bbox_crop)
      images/<class_dir>/<file>.jpg

Official numbers: 11,788 images, 200 classes, 5,994 train / 5,794 test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from caat_peft.data.records import (
    BadData,
    Record,
    SourceIndex,
    drop_missing_and_unreadable,
    warn_skipped,
)
from caat_peft.errors import UserError

SOURCE = "CUB-200-2011"
OFFICIAL_COUNTS = {"train": 5994, "test": 5794, "classes": 200}
_FIX_REEXTRACT = "re-extract CUB_200_2011.tgz"


def find_cub_root(root: str | os.PathLike[str] | None) -> Path:
    """Accept the extracted ``CUB_200_2011/`` folder itself or its parent."""
    if root is None:
        raise UserError(
            f"{SOURCE} needs a root; set data.root to the extracted CUB_200_2011/ folder"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{SOURCE} root not found: {path}; set data.root to the extracted CUB_200_2011/ "
            "folder (or its parent)"
        )
    for candidate in (path, path / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise UserError(
        f"{SOURCE}: no images.txt in {path} or {path / 'CUB_200_2011'}; set data.root to the "
        "extracted CUB_200_2011/ folder"
    )


def _read_table(
    path: Path, parse: Callable[[list[str]], tuple], n_fields: int, bad: BadData
) -> dict[int, tuple]:
    """Parse ``<id> <fields...>`` lines into {id: parsed}; malformed and duplicate lines are bad."""
    if not path.is_file():
        raise UserError(f"{SOURCE} list not found: {path}; {_FIX_REEXTRACT} into the data root")
    table: dict[int, tuple] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=n_fields)
            where = f"{path.name} line {lineno}"
            try:
                if len(parts) != n_fields + 1:
                    raise ValueError("wrong number of fields")
                key, value = int(parts[0]), parse(parts[1:])
            except ValueError:
                bad.report(f"{where} is malformed: {line.strip()!r}", f"fix {path}", item=where)
                continue
            if key in table:
                bad.report(f"{where} repeats id {key}", f"fix {path}", item=where)
                continue
            table[key] = value
    return table


def _check_same_ids(
    images: dict[int, tuple], other: dict[int, tuple], name: str, bad: BadData
) -> None:
    """Lists must describe the same image ids; a disagreement is reported per id."""
    missing = sorted(images.keys() - other.keys())
    extra = sorted(other.keys() - images.keys())
    if not missing and not extra:
        return
    if not bad.skipping:
        first = f"id {missing[0]} missing" if missing else f"id {extra[0]} not in images.txt"
        bad.report(
            f"lists disagree: images.txt has {len(images)} ids, {name} has {len(other)} ({first})",
            _FIX_REEXTRACT,
            item=name,
        )
    for image_id in missing:
        bad.report(
            f"id {image_id} missing from {name}", _FIX_REEXTRACT, item=f"image id {image_id}"
        )
    for image_id in extra:
        bad.report(f"id {image_id} of {name} not in images.txt", _FIX_REEXTRACT, item=name)


def load_cub_index(
    root: str | os.PathLike[str] | None, *, bbox_crop: bool = False, bad_files: str = "error"
) -> SourceIndex:
    """Read the official lists into train / test records (labels 0-based) and class names."""
    base = find_cub_root(root)
    bad = BadData(bad_files, SOURCE)

    classes = _read_table(base / "classes.txt", lambda p: (p[0],), 1, bad)
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise UserError(
            f"{SOURCE}: class ids in {base / 'classes.txt'} are not 1..{len(classes)}; "
            f"{_FIX_REEXTRACT}"
        )
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    class_names = [classes[i][0].split(".", 1)[-1] for i in range(1, len(classes) + 1)]

    images = _read_table(base / "images.txt", lambda p: (p[0],), 1, bad)
    labels = _read_table(base / "image_class_labels.txt", lambda p: (int(p[0]),), 1, bad)
    is_train = _read_table(base / "train_test_split.txt", lambda p: (int(p[0]),), 1, bad)
    tables = {"image_class_labels.txt": labels, "train_test_split.txt": is_train}
    boxes: dict[int, tuple] = {}
    if bbox_crop:
        boxes = _read_table(
            base / "bounding_boxes.txt", lambda p: tuple(float(v) for v in p), 4, bad
        )
        tables["bounding_boxes.txt"] = boxes
    for name, table in tables.items():
        _check_same_ids(images, table, name, bad)

    records: dict[str, list[Record]] = {"train": [], "test": []}
    for image_id in sorted(images):
        if any(image_id not in t for t in tables.values()):
            continue  # already reported by _check_same_ids
        rel = images[image_id][0]
        (label,) = labels[image_id]
        (flag,) = is_train[image_id]
        item = f"image id {image_id} ({rel})"
        if flag not in (0, 1):
            bad.report(
                f"train_test_split.txt: flag {flag} of image id {image_id} is not 0 or 1",
                "fix train_test_split.txt",
                item=item,
            )
            continue
        split = "train" if flag == 1 else "test"
        if not 1 <= label <= len(class_names):
            bad.report(
                f"image_class_labels.txt: label {label} of image id {image_id} is outside "
                f"1..{len(class_names)} (classes.txt)",
                "fix image_class_labels.txt",
                item=item,
                split=split,
            )
            continue
        bbox = None
        if bbox_crop:
            bbox = boxes[image_id]
            if bbox[2] <= 0 or bbox[3] <= 0:
                bad.report(
                    f"bounding_boxes.txt: box {bbox} of image id {image_id} is empty",
                    "fix bounding_boxes.txt or turn bbox_crop off",
                    item=item,
                    split=split,
                )
                continue
        records[split].append(Record(str(base / "images" / rel), label - 1, bbox))

    for split in ("train", "test"):
        records[split] = drop_missing_and_unreadable(
            records[split], bad, split=split, fix_missing=f"{_FIX_REEXTRACT} (images/ folder)"
        )
        if not records[split]:
            raise UserError(f"{SOURCE}: no usable {split} images under {base}; {_FIX_REEXTRACT}")
    warn_skipped(SOURCE, bad.entries)
    return SourceIndex(
        train=records["train"],
        test=records["test"],
        class_names=class_names,
        skipped=bad.entries,
    )
