"""A deterministic, stratified validation split carved out of the training set.

Model selection (early stopping, picking γ or λ on a front) must never look at the test set, so
the validation set comes from train. Stratifying keeps every class represented in proportion,
which matters on CUB (≈30 training images per class): a purely random 10 % would leave some
classes with no validation images at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from caat_peft.errors import UserError


def _quotas(sizes: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray:
    """How many validation items each class gives: proportional, largest remainder first.

    Each class keeps at least one training item (a class absent from train cannot be learnt), so
    a class of one item gives none; that is the "where possible" of the stratification.
    """
    caps = np.maximum(sizes - 1, 0)
    ideal = sizes * (n_val / sizes.sum())
    quota = np.minimum(np.floor(ideal).astype(np.int64), caps)
    remainder = ideal - quota
    # Ties in the remainder are broken by a seeded random key, not by class order, so that the
    # low-numbered classes are not systematically favoured.
    tie_break = rng.random(len(sizes))
    order = np.lexsort((tie_break, -remainder))
    missing = n_val - int(quota.sum())
    while missing > 0:
        progressed = False
        for c in order:
            if missing == 0:
                break
            if quota[c] < caps[c]:
                quota[c] += 1
                missing -= 1
                progressed = True
        if not progressed:  # every class is down to one training item
            break
    return quota


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split indices 0..n-1 into (train, val), stratified by label, reproducible from ``seed``.

    ``round(n * val_fraction)`` items (at least one) go to val. The result depends only on the
    labels, the fraction and the seed, never on global RNG state.
    """
    if not 0.0 <= val_fraction < 1.0 or math.isnan(val_fraction):
        raise UserError(f"val_fraction={val_fraction} must be in [0, 1)")
    n = len(labels)
    if val_fraction == 0.0:
        return list(range(n)), []
    if n < 2:
        raise UserError(
            f"cannot carve a validation set out of {n} training item(s); set val_fraction to 0 "
            "or add training data"
        )
    y = np.asarray(labels, dtype=np.int64)
    classes, inverse = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(n * val_fraction))
    quota = _quotas(np.bincount(inverse, minlength=len(classes)), n_val, rng)
    val: list[int] = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        val.extend(rng.permutation(members)[: quota[c]].tolist())
    if not val:
        raise UserError(
            f"no class has two or more training items among {n}, so a validation set would "
            "leave a class out of training; set val_fraction to 0 or add training data"
        )
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, sorted(val)
