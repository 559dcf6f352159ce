"""DataLoader construction with the settings that matter for throughput and reproducibility."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from caat_peft.errors import UserError


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and `random` are not seeded by
    # torch, so derive them from the same seed to keep any numpy-based augmentation reproducible
    # and different across workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
) -> DataLoader:
    """A DataLoader whose order and worker augmentations are fixed by ``seed``.

    Pinned memory only when CUDA is there (it costs page-locked RAM for nothing on CPU);
    persistent workers so that a new epoch does not pay the worker start-up again. With
    ``num_workers=0`` the random transforms draw from torch's global RNG: seed it in the caller.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    if num_workers < 0:
        raise UserError(f"num_workers={num_workers} must be 0 or more")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )
