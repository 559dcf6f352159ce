"""Tiny data sets in the official layouts, generated on the spot (tests never download).

The images are real JPEG / PNG files, some of them grayscale (as in CUB), and the list files use
the exact formats of the originals: CUB's 1-based ``.txt`` tables and Stanford Dogs' MATLAB cell
arrays written with ``scipy.io.savemat``. Each class has its own colour and stripe pattern, so a
model can learn the fixtures, and every generator is deterministic in ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

PathLike = str | os.PathLike[str]


def _image(
    rng: np.random.Generator, label: int, size: tuple[int, int], grayscale: bool, noise: float
) -> Image.Image:
    """A smooth, class-specific picture with some noise (compresses like a photo, not like noise)."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    colour = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 29 + 160) % 256])
    stripes = np.sin(xx * (0.15 + 0.1 * (label % 5)) + yy * 0.05 + phase)[..., None]
    pixels = colour * 0.7 + 60 * stripes + rng.normal(0, noise, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image.convert("L") if grayscale else image


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=90)
    else:
        image.save(path)


def _train_count(per_class: int, train_per_class: int | None) -> int:
    n_train = max(1, per_class // 2) if train_per_class is None else train_per_class
    if not 0 < n_train < per_class:
        raise ValueError("need 0 < train_per_class < per_class so both splits get images")
    return n_train


def make_cub_fixture(
    root: PathLike,
    n_classes: int = 3,
    per_class: int = 4,
    *,
    train_per_class: int | None = None,
    image_size: tuple[int, int] = (48, 40),
    grayscale_every: int = 3,
    noise: float = 8.0,
    seed: int = 0,
) -> Path:
    """Write ``root/CUB_200_2011/`` (lists, boxes, images) and return that folder.

    Image ids run class by class; the first ``train_per_class`` images of a class (default half)
    are train. Every ``grayscale_every``-th image is saved as single-channel JPEG.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "CUB_200_2011"
    n_train = _train_count(per_class, train_per_class)
    width, height = image_size
    classes, images, labels, split, boxes = [], [], [], [], []
    image_id = 0
    for c in range(n_classes):
        class_dir = f"{c + 1:03d}.Bird_{c + 1}"
        classes.append(f"{c + 1} {class_dir}")
        for k in range(per_class):
            image_id += 1
            rel = f"{class_dir}/Bird_{c + 1}_{k:04d}_{image_id}.jpg"
            gray = grayscale_every > 0 and image_id % grayscale_every == 0
            _save(_image(rng, c, image_size, gray, noise), base / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if k < n_train else 0}")
            x, y = rng.uniform(0, width / 4), rng.uniform(0, height / 4)
            w, h = rng.uniform(width / 2, width - x), rng.uniform(height / 2, height - y)
            boxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
    for name, lines in (
        ("classes.txt", classes),
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
    ):
        (base / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


def _cells(strings: list[str]) -> np.ndarray:
    """An (N, 1) object array of 1-element string arrays: how savemat writes a MATLAB cell
    column, and what loadmat returns for the official Stanford Dogs lists."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = np.array([s])
    return cells


def write_dogs_list(path: PathLike, files: list[str], labels: list[int]) -> None:
    """One Stanford-Dogs-style ``.mat`` list (file_list, annotation_list, labels 1-based)."""
    from scipy.io import savemat

    savemat(
        str(path),
        {
            "file_list": _cells(files),
            "annotation_list": _cells([f.rsplit(".", 1)[0] for f in files]),
            "labels": np.asarray(labels, dtype=np.uint8).reshape(-1, 1),
        },
    )


def make_dogs_fixture(
    root: PathLike,
    n_classes: int = 3,
    per_class: int = 4,
    *,
    train_per_class: int | None = None,
    lists_subdir: bool = True,
    image_size: tuple[int, int] = (48, 40),
    grayscale_every: int = 3,
    noise: float = 8.0,
    seed: int = 0,
) -> Path:
    """Write ``root/Images/<synset>-<breed>/`` and the .mat lists (in ``root/lists/`` or the
    root); return ``root``. One breed name has a hyphen, as "Shih-Tzu" does in the original."""
    rng = np.random.default_rng(seed)
    base = Path(root)
    n_train = _train_count(per_class, train_per_class)
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    count = 0
    for c in range(n_classes):
        synset = f"n{2085620 + c:08d}"
        breed = "Shih-Tzu" if c == 1 else f"Breed_{c + 1}"
        for k in range(per_class):
            count += 1
            rel = f"{synset}-{breed}/{synset}_{1000 + k}.jpg"
            gray = grayscale_every > 0 and count % grayscale_every == 0
            _save(_image(rng, c, image_size, gray, noise), base / "Images" / rel)
            files, labels = lists["train" if k < n_train else "test"]
            files.append(rel)
            labels.append(c + 1)
    list_dir = base / "lists" if lists_subdir else base
    list_dir.mkdir(parents=True, exist_ok=True)
    for split, (files, labels) in lists.items():
        write_dogs_list(list_dir / f"{split}_list.mat", files, labels)
    all_files = lists["train"][0] + lists["test"][0]
    write_dogs_list(list_dir / "file_list.mat", all_files, lists["train"][1] + lists["test"][1])
    return base


def make_folder_fixture(
    root: PathLike,
    n_classes: int = 3,
    per_class: int = 4,
    *,
    splits: tuple[str, ...] = ("train", "test"),
    image_size: tuple[int, int] = (48, 40),
    grayscale_every: int = 3,
    png_every: int = 2,
    noise: float = 8.0,
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/class_<c>/img_<k>.{jpg,png}`` (``per_class`` per split); return root."""
    rng = np.random.default_rng(seed)
    base = Path(root)
    count = 0
    for split in splits:
        for c in range(n_classes):
            for k in range(per_class):
                count += 1
                ext = "png" if png_every > 0 and count % png_every == 0 else "jpg"
                gray = grayscale_every > 0 and count % grayscale_every == 0
                path = base / split / f"class_{c}" / f"img_{k}.{ext}"
                _save(_image(rng, c, image_size, gray, noise), path)
    return base


def make_hub_fixture(
    root: PathLike,
    n_classes: int = 3,
    per_class: int = 4,
    *,
    splits: tuple[str, ...] = ("train", "test"),
    image_size: tuple[int, int] = (48, 40),
    grayscale_every: int = 3,
    seed: int = 0,
) -> Path:
    """A ``datasets.DatasetDict`` with ``image`` (Image) and ``label`` (ClassLabel) columns saved
    with ``save_to_disk``; pass the returned folder as ``hub_id``."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(n_classes)]),
        }
    )
    count = 0
    parts = {}
    for split in splits:
        images, labels = [], []
        for c in range(n_classes):
            for _ in range(per_class):
                count += 1
                gray = grayscale_every > 0 and count % grayscale_every == 0
                images.append(_image(rng, c, image_size, gray, 8.0))
                labels.append(c)
        parts[split] = datasets.Dataset.from_dict(
            {"image": images, "label": labels}, features=features
        )
    path = Path(root) / "hub"
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return path


def truncate_file(path: PathLike, keep: float = 0.6) -> None:
    """Cut a file to ``keep`` of its bytes: a download that stopped half-way."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: max(1, int(len(data) * keep))])


def garble_file(path: PathLike) -> None:
    """Replace a file with bytes that are no image at all."""
    Path(path).write_bytes(b"this is not an image\n" * 8)
