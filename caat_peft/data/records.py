"""Image records and the torch Dataset every file-based source ends in.

The index of a data set (which file, which label, which box) is built once, cheaply, from the
official lists; images are decoded lazily in ``__getitem__`` so that DataLoader workers share the
decoding work. A record is three plain fields, so the dataset pickles into worker processes for
almost nothing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import Dataset

from caat_peft.errors import UserError

log = logging.getLogger("caat_peft.data")

BAD_FILE_POLICIES = ("error", "skip")

# What PIL raises on unreadable, truncated or hostile files. UnidentifiedImageError is an OSError.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Record:
    """One image: absolute path, 0-based label, optional box (x, y, w, h) in pixels."""

    path: str
    label: int
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class SkippedEntry:
    """An entry left out under ``bad_files='skip'``; kept so that nothing disappears silently."""

    split: str  # "train", "test", "val" or "?" when the entry never got a split
    item: str  # file path or list entry
    reason: str


@dataclass
class SourceIndex:
    """What a source parser returns: records per split, class names, and what it skipped."""

    train: list[Record]
    test: list[Record]
    class_names: list[str]
    val: list[Record] | None = None
    skipped: list[SkippedEntry] = field(default_factory=list)


class BadData:
    """Applies the ``bad_files`` policy in one place: raise a UserError, or record and go on."""

    def __init__(self, policy: str, source: str) -> None:
        check_policy(policy)
        self.policy = policy
        self.source = source
        self.entries: list[SkippedEntry] = []

    @property
    def skipping(self) -> bool:
        return self.policy == "skip"

    def report(self, problem: str, fix: str, *, item: str, split: str = "?") -> None:
        """Raise (policy 'error') or remember the entry (policy 'skip')."""
        if self.policy == "error":
            raise UserError(
                f"{self.source}: {problem}; fix: {fix}, or pass bad_files='skip' to leave such "
                "entries out"
            )
        self.entries.append(SkippedEntry(split=split, item=item, reason=problem))


def check_policy(policy: str) -> None:
    if policy not in BAD_FILE_POLICIES:
        raise UserError(f"bad_files={policy!r} is not a policy; use one of {BAD_FILE_POLICIES}")


def _crop_box(size: tuple[int, int], bbox: tuple[float, float, float, float]) -> tuple[int, ...]:
    # Outward rounding keeps the whole annotated object; clamping tolerates boxes that touch the
    # border by a pixel, which the official CUB boxes sometimes do.
    x, y, w, h = bbox
    width, height = size
    left, top = max(0, math.floor(x)), max(0, math.floor(y))
    right, bottom = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return left, top, right, bottom


def open_image(
    path: str, bbox: tuple[float, float, float, float] | None = None, mode: str = "RGB"
) -> Image.Image:
    """Decode fully (so truncation raises here, not later) into ``mode``; crop to ``bbox``."""
    with Image.open(path) as im:
        # convert() forces a full decode; grayscale, CMYK and palette images all become RGB.
        image = im.convert(mode)
    if bbox is not None:
        box = _crop_box(image.size, bbox)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise UserError(
                f"bounding box {bbox} of {path} lies outside the {image.size[0]}x{image.size[1]} "
                "image; fix bounding_boxes.txt or turn bbox_crop off"
            )
        image = image.crop(box)
    return image


def check_image(path: str) -> str | None:
    """Return why ``path`` cannot be decoded, or None. Cheap enough to run over a whole data set.

    ``Image.verify()`` alone misses truncated JPEGs (it checks structure, not the entropy-coded
    data), so the file is also decoded; JPEG draft mode decodes at 1/8 scale, which still reads
    every byte of the stream and so still detects truncation.
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def find_unreadable(paths: Sequence[str], *, desc: str = "checking images") -> dict[str, str]:
    """Check many images in threads (PIL releases the GIL while decoding); path -> reason."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(check_image, paths, chunksize=16),
                total=len(paths),
                desc=desc,
                disable=None if len(paths) > 500 else True,
                leave=False,
            )
        )
    return {p: r for p, r in zip(paths, results) if r is not None}


def drop_missing_and_unreadable(
    records: list[Record], bad: BadData, *, split: str, fix_missing: str
) -> list[Record]:
    """Existence and decode checks of every listed image, before any run starts.

    Both run under either policy: an undecodable image found lazily would stop a run after its
    directory exists (a truncated *test* image only after a whole epoch of training).
    """
    kept = []
    for rec in records:
        if os.path.isfile(rec.path):
            kept.append(rec)
        else:
            bad.report(f"image file missing: {rec.path}", fix_missing, item=rec.path, split=split)
    if kept:
        unreadable = find_unreadable([r.path for r in kept], desc=f"{bad.source} {split}")
        for rec in kept:
            if rec.path in unreadable:
                bad.report(
                    f"cannot decode {rec.path} ({unreadable[rec.path]})",
                    "replace the file",
                    item=rec.path,
                    split=split,
                )
        kept = [r for r in kept if r.path not in unreadable]
    return kept


def warn_skipped(source: str, skipped: Iterable[SkippedEntry]) -> None:
    """One warning line per source that skipped something, with the first example."""
    skipped = list(skipped)
    if not skipped:
        return
    by_split: dict[str, int] = {}
    for entry in skipped:
        by_split[entry.split] = by_split.get(entry.split, 0) + 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(by_split.items()))
    first = skipped[0]
    log.warning(
        "%s: skipped %d bad entries (%s) under bad_files='skip'; first: %s (%s)",
        source,
        len(skipped),
        counts,
        first.item,
        first.reason,
    )


class RecordDataset(Dataset):
    """A torch Dataset over records: item i is ``(x, y)``, x float32 C×H×W in [0, 1], y an int.

    ``skipped`` counts the entries of this split left out under ``bad_files='skip'``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Transform,
        *,
        source: str,
        bbox_crop: bool = False,
        skipped: Sequence[SkippedEntry] = (),
        mode: str = "RGB",
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.source = source
        self.bbox_crop = bbox_crop
        self.skipped_entries = list(skipped)
        self.mode = mode

    @property
    def skipped(self) -> int:
        return len(self.skipped_entries)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rec = self.records[index]
        try:
            image = open_image(rec.path, rec.bbox if self.bbox_crop else None, self.mode)
        except DECODE_ERRORS as exc:
            # Corrupt files are found here, lazily, unless bad_files='skip' checked them up front.
            raise UserError(
                f"{self.source}: cannot decode image {rec.path} ({type(exc).__name__}: {exc}); "
                "fix: replace the file, or pass bad_files='skip' to check all images up front "
                "and leave unreadable ones out"
            ) from exc
        return self.transform(image), rec.label

    def subset(self, indices: Sequence[int], transform: Transform | None = None) -> RecordDataset:
        """Same records restricted to ``indices``, optionally with another transform (for val)."""
        return RecordDataset(
            [self.records[i] for i in indices],
            self.transform if transform is None else transform,
            source=self.source,
            bbox_crop=self.bbox_crop,
            mode=self.mode,
        )

    def __repr__(self) -> str:
        return f"RecordDataset({self.source}, n={len(self)}, skipped={self.skipped})"
