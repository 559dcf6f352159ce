"""A hand-written CA-AT loop on the public pieces, and its run under torchrun.

``hand_written_loop(cfg)`` trains as ``caat-peft train`` does, but with nothing of the trainer's
own loop: the config, the model under ``seeded_init``, ``build_splits``, the trainer's data order
(``GlobalBatchSampler``), the attack's random start drawn as ``_next_micro_batches`` draws it,
``make_optimizer`` / ``make_scheduler`` and ``ConflictAware.backward_batch`` + ``apply``.
tests/test_conflict_aware.py compares it with ``caat_peft.training.train``.

``torchrun --nproc_per_node 2 tests/conflict_aware_ddp.py OUT '<JSON {name: [overrides]}>'``
runs the loop on a model that ``accelerate.Accelerator(cpu=True).prepare`` wrapped in DDP, once
per named config (one start-up of torch and the process group for all), and rank 0 saves each
run's trainable parameters as ``OUT/<name>.safetensors``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from caat_peft import ConflictAware
from caat_peft.attacks import sample_random_start
from caat_peft.config import Config, load_config
from caat_peft.data import build_splits
from caat_peft.models import (
    build_classifier,
    preprocessing_for_config,
    seeded_init,
    trainable_parameters,
)
from caat_peft.training.optim import make_optimizer, make_scheduler
from caat_peft.training.trainer import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"


def _random_starts(cfg: Config, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole global batch's random start of optimiser step ``step``: a per-step generator,
    as ``trainer._next_micro_batches`` draws it, so that every process count sees the same."""
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    return sample_random_start(shape, cfg.attack.eps, cfg.attack.norm, generator=gen)


def hand_written_loop(cfg: Config, accelerator: Any = None) -> tuple[nn.Module, nn.Module]:
    """Train ``cfg`` (epochs, accumulation, precision; CPU); return the model and what it was
    trained as (the same model, or its DDP wrapper).

    With ``accelerator``, the model goes through ``accelerator.prepare`` (DDP under several
    processes) and this process trains on its slice of every global batch.
    """
    tc = cfg.train
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    torch.manual_seed(tc.seed)  # what the trainer's set_seed does; nothing below draws from it
    splits = build_splits(cfg.data, preprocessing_for_config(cfg.model))
    with seeded_init(tc.seed):
        model = build_classifier(cfg.model, cfg.peft, cfg.model.num_classes or splits.num_classes)
    named = trainable_parameters(model)
    micro_global = tc.batch_size // tc.grad_accum_steps  # images per micro-batch, all processes
    local = micro_global // world
    steps_per_epoch = len(splits.train) // micro_global // tc.grad_accum_steps
    optimizer = make_optimizer(named, tc)
    scheduler = make_scheduler(optimizer, tc, steps_per_epoch * tc.epochs)
    trained = accelerator.prepare(model) if accelerator is not None else model
    c = cfg.combiner
    ca = ConflictAware(
        trained,
        method=c.kind,
        gamma=c.gamma,
        lam=c.lam,
        granularity=c.granularity,
        normalize=c.normalize,
        objective=cfg.objective,
        attack=cfg.attack,
        precision=tc.precision,
        accelerator=accelerator,
    )
    sampler = GlobalBatchSampler(len(splits.train), micro_global, rank, world, tc.seed)
    loader = DataLoader(splits.train, batch_sampler=sampler)
    with_start = cfg.attack.random_start and not ca.clean_only
    step = 0
    for epoch in range(1, tc.epochs + 1):  # the trainer counts epochs from 1
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            trained.train()
            starts = None
            for m in range(tc.grad_accum_steps):
                x, y = next(batches)
                init_delta = None
                if with_start:
                    if starts is None:
                        starts = _random_starts(cfg, step, (tc.batch_size, *x.shape[1:]))
                    first = m * micro_global + rank * local
                    init_delta = starts[first : first + local]
                ca.backward_batch(x, y, init_delta=init_delta)
            stats = ca.apply()
            if not stats["finite"]:
                raise RuntimeError(f"step {step}: non-finite step in a run that expects none")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
    return model, trained


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


def main(out: Path, runs: dict[str, list[str]], with_trainer: bool = False) -> None:
    """Each run by the loop (``OUT/<name>.safetensors``) and, ``with_trainer``, by
    ``caat_peft.training.train`` in the same process group (``OUT/<name>-train.safetensors``)."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from caat_peft.training import train

    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes < 2:
        raise SystemExit("run under torchrun --nproc_per_node 2 (this checks the DDP path)")
    for name, overrides in runs.items():
        cfg = load_config(RECIPE, overrides)
        model, wrapped = hand_written_loop(cfg, accelerator)
        if not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            raise SystemExit(f"accelerator.prepare gave {type(wrapped).__name__}, not DDP")
        if accelerator.is_main_process:
            save_file(trainable_state(model), str(out / f"{name}.safetensors"))
        if with_trainer:
            result = train(cfg, out / f"{name}-run", progress=False)
            if accelerator.is_main_process:
                save_file(trainable_state(result.model), str(out / f"{name}-train.safetensors"))
        accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]), with_trainer="--with-trainer" in sys.argv[3:])
