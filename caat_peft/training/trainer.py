"""The accelerate-driven trainer: data, model, optimiser, the epoch loop, evaluation, outputs.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one row per
logged step and one per epoch), ``final.json`` and ``adapter/`` (peft ``save_pretrained``).
Everything that can fail on user input (config, data, checkpoint) is checked before the run
directory is created.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from caat_peft.attacks import pgd, sample_random_start
from caat_peft.config import Config, TrainConfig, save_config
from caat_peft.data import build_splits
from caat_peft.data.loader import make_loader
from caat_peft.errors import UserError
from caat_peft.gradients import make_combiner
from caat_peft.models import (
    PixelClassifier,
    build_classifier,
    preprocessing_for_config,
    save_trainable,
    trainable_parameters,
)
from caat_peft.objectives import build_objective
from caat_peft.training.distributed import broadcast_parameters, make_reducer
from caat_peft.training.step import training_step


@dataclass
class TrainResult:
    run_dir: Path
    final: dict[str, Any]
    model: PixelClassifier
    is_main_process: bool = True


# --------------------------------------------------------------------------------------------
# Files


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; called before any work starts."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"output directory {output_dir} is a file (choose another --output-dir)")
    if any(output_dir.iterdir()):
        if not (output_dir / "config.yaml").exists():
            raise UserError(
                f"output directory {output_dir} is not empty and holds no caat-peft run "
                "(choose an empty or new --output-dir)"
            )
        if not overwrite:
            raise UserError(
                f"output directory {output_dir} already holds a run "
                "(pass --overwrite to replace it, or choose another --output-dir)"
            )


def _make_run_dir(output_dir: Path, overwrite: bool) -> None:
    if overwrite and (output_dir / "config.yaml").exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"output directory {output_dir} is not writable (choose another)")


class MetricsLog:
    """Append-only JSON lines, flushed at every row so a killed run keeps what it logged."""

    def __init__(self, path: Path | None) -> None:
        self._fh = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


# --------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig):
    """AdamW / SGD; no weight decay on biases and normalisation weights (1-D tensors)."""
    decay = [p for _, p in named_params if p.ndim > 1]
    no_decay = [p for _, p in named_params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up then constant or cosine decay, stepped once per optimiser step."""
    warmup = int(round(cfg.warmup_epochs / cfg.epochs * total_steps)) if cfg.epochs else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    seed: int,
) -> dict[str, float]:
    """Clean accuracy and PGD-``steps`` accuracy (random start, fixed seed) over ``loader``."""
    model.eval()
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    correct_clean, correct_adv = [], []
    for x, y in loader:
        pred_clean = model(x).argmax(1)
        x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator)
        pred_adv = model(x_adv).argmax(1)
        pair = torch.stack([pred_clean == y, pred_adv == y], dim=1)
        pair = accelerator.gather_for_metrics(pair)
        correct_clean.append(pair[:, 0])
        correct_adv.append(pair[:, 1])
    clean = torch.cat(correct_clean).float()
    adv = torch.cat(correct_adv).float()
    return {"clean_acc": clean.mean().item(), "robust_acc": adv.mean().item(), "n": clean.numel()}


# --------------------------------------------------------------------------------------------
# The run


def make_accelerator() -> Accelerator:
    """An Accelerator whose data loaders split the global batch over processes.

    Under ``torchrun`` without a GPU, accelerate only sets up its gloo process group (MULTI_CPU)
    when asked for the CPU explicitly; without that, every process would train alone.
    """
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=multi_process_cpu,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _uses_adversarial_gradient(cfg: Config) -> bool:
    """False for standard training: vanilla λ = 0 and CA-AT γ = 1 both update with g_c."""
    c = cfg.combiner
    if c.kind == "vanilla":
        return c.lam > 0
    return c.gamma < 1


def train(
    cfg: Config,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run adversarial PEFT as configured and write the run directory; see the module doc."""
    output_dir = Path(output_dir)
    accelerator = make_accelerator()
    is_main = accelerator.is_main_process
    if is_main:
        check_output_dir(output_dir, overwrite)
    world = accelerator.num_processes
    if cfg.train.batch_size % world:
        raise UserError(
            f"train.batch_size = {cfg.train.batch_size} must be divisible by the number of "
            f"processes ({world}); it is the global batch"
        )
    set_seed(cfg.train.seed)

    # Data and model: every user-caused failure happens here, before the run directory exists.
    preprocessing = preprocessing_for_config(cfg.model)
    splits = build_splits(cfg.data, preprocessing)
    num_classes = cfg.model.num_classes or splits.num_classes
    model = build_classifier(cfg.model, cfg.peft, num_classes).to(accelerator.device)
    broadcast_parameters(model, accelerator)
    named = trainable_parameters(model)
    if not named:
        raise UserError("no trainable parameters: check peft.method and peft.target_modules")
    params = [p for _, p in named]
    if len(splits.train) < cfg.train.batch_size:
        raise UserError(
            f"train.batch_size = {cfg.train.batch_size} is larger than the training set "
            f"({len(splits.train)} images); lower it"
        )

    train_loader = make_loader(
        splits.train,
        cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        drop_last=True,  # equal global batches: the run does not depend on the process count
    )
    eval_set = splits.test
    if cfg.eval.limit is not None and cfg.eval.limit < len(eval_set):
        eval_set = Subset(eval_set, range(cfg.eval.limit))
    eval_loader = make_loader(
        eval_set,
        cfg.eval.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        drop_last=False,
    )
    optimizer = make_optimizer(named, cfg.train)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)

    objective = build_objective(cfg.objective.kind, cfg.attack)
    c = cfg.combiner
    combiner = make_combiner(
        c.kind, lam=c.lam, gamma=c.gamma, granularity=c.granularity, normalize=c.normalize
    )
    reduce = make_reducer(accelerator)
    clean_only = not _uses_adversarial_gradient(cfg)
    eval_eps = cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps
    eval_alpha = eval_eps / 4 if cfg.eval.alpha is None else cfg.eval.alpha

    if is_main:
        _make_run_dir(output_dir, overwrite)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    log = MetricsLog(output_dir / "metrics.jsonl" if is_main else None)

    start = time.perf_counter()
    step, skipped = 0, 0
    last_eval: dict[str, float] = {}
    bar = tqdm(total=total_steps, disable=not (progress and is_main), desc="train", leave=False)
    local_batch = cfg.train.batch_size // world
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            for x, y in train_loader:
                init_delta = None
                if not clean_only and cfg.attack.random_start:
                    # Drawn for the whole global batch from a per-step seed, then sliced: every
                    # process count sees the same random starts for the same images.
                    gen = torch.Generator(device=x.device).manual_seed(
                        cfg.train.seed * 1_000_003 + step
                    )
                    full = sample_random_start(
                        (cfg.train.batch_size, *x.shape[1:]),
                        cfg.attack.eps,
                        cfg.attack.norm,
                        generator=gen,
                        device=x.device,
                        dtype=x.dtype,
                    )
                    rank = accelerator.process_index
                    init_delta = full[rank * local_batch : (rank + 1) * local_batch]
                result = training_step(
                    model,
                    params,
                    objective,
                    combiner,
                    optimizer,
                    x,
                    y,
                    reduce=reduce,
                    grad_clip=cfg.train.grad_clip,
                    clean_only=clean_only,
                    init_delta=init_delta,
                )
                step += 1
                if result.skipped:
                    skipped += 1
                else:
                    scheduler.step()
                if step % cfg.train.log_every == 0 or result.skipped:
                    row = {"type": "step", "epoch": epoch, "step": step, "skipped": result.skipped}
                    row["lr"] = optimizer.param_groups[0]["lr"]
                    row.update(result.stats)
                    log.write(row)
                bar.update(1)
                bar.set_postfix(_postfix(result.stats), refresh=False)

            last_epoch = epoch == cfg.train.epochs
            every = cfg.eval.every
            if last_epoch or (every and epoch % every == 0):
                last_eval = evaluate(
                    model,
                    eval_loader,
                    accelerator,
                    eps=eval_eps,
                    alpha=eval_alpha,
                    steps=cfg.eval.steps,
                    norm=cfg.attack.norm,
                    seed=cfg.train.seed,
                )
                row = {"type": "epoch", "epoch": epoch, "step": step, **last_eval}
                row["seconds"] = round(time.perf_counter() - start, 3)
                log.write(row)
                if is_main and progress:
                    tqdm.write(
                        f"epoch {epoch}: clean acc {last_eval['clean_acc']:.3f}, "
                        f"PGD-{cfg.eval.steps} acc {last_eval['robust_acc']:.3f}"
                    )
    finally:
        bar.close()
        log.close()

    seconds = time.perf_counter() - start
    final = {
        "clean_acc": last_eval["clean_acc"],
        "robust_acc": last_eval["robust_acc"],
        "eval_n": last_eval["n"],
        "eval_attack": f"pgd{cfg.eval.steps}-{cfg.attack.norm}",
        "eval_eps": eval_eps,
        "epochs": cfg.train.epochs,
        "steps": step,
        "skipped_steps": skipped,
        "seconds": round(seconds, 3),
        "num_processes": world,
        "trainable_parameters": sum(p.numel() for p in params),
    }
    if is_main:
        save_trainable(model.net, output_dir / "adapter")
        atomic_write_text(output_dir / "final.json", json.dumps(final, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=output_dir, final=final, model=model, is_main_process=is_main)


def _postfix(stats: dict[str, Any]) -> dict[str, str]:
    keys = ("loss_clean", "loss_adv", "cos", "mu", "lambda_eff")
    return {k: f"{stats[k]:.3g}" for k in keys if k in stats}
