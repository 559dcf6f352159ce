"""The offline demo data: scikit-learn's bundled 8×8 handwritten digits, as small RGB images.

The 1,797 digits ship inside scikit-learn, so the demo and the tests never download anything.
Images are scaled to [0, 1], upsampled bilinearly to ``image_size`` and repeated over 3 channels
(backbones expect RGB). The held-out split is stratified and fixed (seed 0), so every training seed
is evaluated on the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from caat_peft.data.sources import DataSplits
from caat_peft.data.split import stratified_split

SPLIT_SEED = 0


def digits_tensors(
    image_size: int, classes: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits of ``classes`` as (N, 3, S, S) floats in [0, 1] and labels relabelled 0..n-1."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float() / 16.0
    labels = torch.from_numpy(bunch.target).long()
    classes = list(range(10)) if classes is None else list(classes)
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    labels = relabel[labels]
    images = images.unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
    images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    return images, labels


def load_digits_splits(
    image_size: int,
    classes: Sequence[int] | None = None,
    test_fraction: float = 0.3,
    val_fraction: float = 0.0,
    val_seed: int = 0,
) -> DataSplits:
    """Stratified train / (val) / held-out split of the bundled digits."""
    from sklearn.model_selection import train_test_split

    images, labels = digits_tensors(image_size, classes)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=SPLIT_SEED,
        stratify=labels.numpy(),
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    val = None
    if val_fraction > 0:
        keep, held = stratified_split(labels[idx_train].tolist(), val_fraction, val_seed)
        idx_val, idx_train = idx_train[held], idx_train[keep]
        val = TensorDataset(images[idx_val], labels[idx_val])
    names = [str(c) for c in (classes if classes is not None else range(10))]
    return DataSplits(
        train=TensorDataset(images[idx_train], labels[idx_train]),
        val=val,
        test=TensorDataset(images[idx_test], labels[idx_test]),
        num_classes=len(names),
        class_names=names,
    )
