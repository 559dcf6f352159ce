"""Evaluation subsets: seeded, class-stratified, the same images for every run compared.

CUB's and Stanford Dogs' test lists run class by class, so "the first 1000 images" would be
about 34 of CUB's 200 classes. ``limit`` therefore draws a stratified sample: each class gets
its share of the limit (largest remainder), its images drawn by a seeded generator that depends
only on the labels, the limit and the seed, never on the model or the run. The chosen indices
are kept in dataset order and identified by a hash in every output that used them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

#: The subset seed used by the trainer, `front`, `study` and `caat-peft eval` unless told
#: otherwise: one value, so that every run of a comparison is scored on the same images.
SUBSET_SEED = 0


def stratified_indices(labels: Sequence[int], limit: int, seed: int = SUBSET_SEED) -> list[int]:
    """``limit`` indices into ``labels``, each class in proportion to its size, sorted.

    Quotas are ``limit · n_c / N`` rounded by largest remainder (ties broken by the seeded
    generator), so the totals are exact and a class with at least ``N / limit`` images is never
    left out. Within a class the images are a uniform draw without replacement.
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    if limit >= n:
        return list(range(n))
    rng = np.random.default_rng([seed, limit, n])
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (limit / n)
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    tie_break = rng.random(len(classes))
    order = np.lexsort((tie_break, -remainder))  # largest remainder first
    quota[order[: limit - int(quota.sum())]] += 1
    chosen: list[np.ndarray] = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(y == cls)
        chosen.append(rng.choice(members, size=int(q), replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))


def subset_record(indices: Sequence[int], of: int, seed: int) -> dict[str, Any]:
    """What an output says about its images: how they were chosen and a hash of which."""
    digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()[:16]
    return {"kind": "stratified", "seed": seed, "n": len(indices), "of": of, "sha256": digest}


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item, cheaply where the dataset says (no image decoded), else read."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return [int(v) for v in dataset.tensors[1].tolist()]
    for attr in ("labels", "targets"):
        value = getattr(dataset, attr, None)
        if isinstance(value, (list, tuple, torch.Tensor, np.ndarray)) and len(value) == len(
            dataset  # type: ignore[arg-type]
        ):
            return [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    return [_item_label(dataset[i]) for i in range(len(dataset))]  # type: ignore[arg-type]


def _item_label(item: Any) -> int:
    if isinstance(item, dict):
        for key in ("label", "labels", "y", "target"):
            if key in item:
                return int(item[key])
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return int(item[1])
    raise TypeError(f"cannot find the label of a dataset item of type {type(item).__name__}")


def limited(
    dataset: Dataset, limit: int | None, seed: int = SUBSET_SEED
) -> tuple[Dataset, dict[str, Any] | None]:
    """``dataset`` cut to a stratified ``limit`` (unchanged when None or ≥ its size) + record."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset, None
    indices = stratified_indices(dataset_labels(dataset), limit, seed)
    return Subset(dataset, indices), subset_record(indices, n, seed)
