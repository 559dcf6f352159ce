"""The accelerate-driven trainer: data, model, optimiser, the epoch loop, evaluation, outputs.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one row per
logged step, one per epoch), ``final.json``, ``adapter/`` (peft ``save_pretrained``; the last
model), ``best_adapter/`` (the best on the validation split, when there is one), resumable
``checkpoints/`` and ``conflict.png``. Everything that can fail on user input (config, data,
checkpoint) is checked before the run directory is created.

The model is not wrapped in DDP and the data loaders are not handed to accelerate: every process
draws its slice of each global batch from the same seeded permutation (``GlobalBatchSampler``)
and gradients are reduced by hand (``distributed.py``), so the result does not depend on the
number of processes and a resumed run continues exactly where its checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from caat_peft.attacks import pgd, sample_random_start
from caat_peft.config import (
    Config,
    config_yaml,
    first_difference,
    load_run_config,
    to_dict,
)
from caat_peft.data import build_splits
from caat_peft.data.subset import SUBSET_SEED, dataset_labels, limited
from caat_peft.errors import UserError
from caat_peft.evaluation.samples import write_samples
from caat_peft.gradients import make_combiner
from caat_peft.models import (
    PixelClassifier,
    build_classifier,
    preprocessing_for_config,
    save_trainable,
    seeded_init,
    trainable_parameters,
)
from caat_peft.objectives import build_objective
from caat_peft.stats import WILSON, wilson_interval
from caat_peft.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from caat_peft.training.distributed import broadcast_parameters, make_reducer
from caat_peft.training.fastpath import check_can_compile, prepare_model
from caat_peft.training.optim import LossScaler, ParameterEMA, make_optimizer, make_scheduler
from caat_peft.training.step import MicroBatch, training_step
from caat_peft.training.telemetry import (
    MetricsLog,
    StallMonitor,
    plot_conflict,
    tracker_scalars,
)


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


def check_output_dir(output_dir: Path, overwrite: bool, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to mix two runs in one directory; called before any work starts. Entries named
    in ``ignore`` do not count (a robust-linear-probe run's own ``head_init/`` stage)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"output directory {output_dir} is a file (choose another --output-dir)")
    skip = (PROBE_NAME, *ignore)  # a killed probe is no run
    if any(p.name not in skip for p in output_dir.iterdir()):
        if not (output_dir / "config.yaml").exists():
            raise UserError(
                f"output directory {output_dir} is not empty and holds no caat-peft run "
                "(choose an empty or new --output-dir)"
            )
        if not overwrite:
            raise UserError(
                f"output directory {output_dir} already holds a run "
                "(pass --resume to continue it, --overwrite to replace it, or another --output-dir)"
            )


HEAD_INIT_DIR = "head_init"  # train.init_head's first stage, a run directory of its own
PROBE_BYTES = 1 << 20  # written, fsynced and removed once: a full disk shows before training
PROBE_NAME = ".caat-peft-write-probe"
MIN_FREE_BYTES = 64 << 20  # logs, plots and reports beside the tensors


def space_needed(
    trainable_bytes: int,
    keep_checkpoints: int,
    checkpoints: bool,
    *,
    ema: bool = False,
    best: bool = False,
    adam: bool = True,
) -> int:
    """An estimate of a run's disk use: the adapter (and best adapter), and each kept checkpoint
    (parameters, the optimiser's moments, EMA and best weights when used) plus one being
    written."""
    copies = 1 + (2 if adam else 1) + int(ema) + int(best)
    per_checkpoint = copies * trainable_bytes if checkpoints else 0
    adapters = (1 + int(best)) * trainable_bytes
    return MIN_FREE_BYTES + adapters + per_checkpoint * (keep_checkpoints + 1)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _child_towards(existing: Path, target: Path) -> Path | None:
    """The first folder below ``existing`` on the way to ``target`` (None if it exists)."""
    target = target.absolute()
    if target == existing:
        return None
    rel = target.relative_to(existing)
    return existing / rel.parts[0]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _make_run_dir(output_dir: Path, overwrite: bool, needed_bytes: int = MIN_FREE_BYTES) -> None:
    """Create the run directory, refusing an unwritable or (nearly) full location up front."""
    try:
        usage = shutil.disk_usage(_existing_parent(output_dir))
        # Some network / FUSE file systems report no sizes at all: then only the probe decides.
        free = usage.free if usage.total > 0 else None
    except OSError:
        free = None
    replaced = overwrite and (output_dir / "config.yaml").exists()
    if free is not None and replaced:
        free += _tree_bytes(output_dir)  # the old run is removed first
    if free is not None and free < needed_bytes:
        raise UserError(
            f"output directory {output_dir}: {_mib(free)} free on its disk, the run needs about "
            f"{_mib(needed_bytes)}; free space or choose another --output-dir"
        )
    if replaced:
        shutil.rmtree(output_dir)
    # What to remove again if the probe fails: the first folder this call creates, if any.
    first_made = _child_towards(_existing_parent(output_dir), output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {output_dir} ({exc.strerror})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"output directory {output_dir} is not writable (choose another)")
    probe = output_dir / PROBE_NAME
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        probe.unlink(missing_ok=True)
        if first_made is not None:  # nothing half-made is left behind, parents included
            shutil.rmtree(first_made, ignore_errors=True)
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"cannot write to output directory {output_dir} ({reason}); free space or choose "
            "another --output-dir"
        ) from None
    probe.unlink()


# --------------------------------------------------------------------------------------------
# Data order


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's slice of every global (micro-)batch of a seeded per-epoch permutation.

    Every process builds the same permutation from (seed, epoch), cuts it into global batches
    (dropping the incomplete last one) and keeps its contiguous slice, so a step sees the same
    images whatever the process count. ``start`` skips batches when resuming mid-epoch.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int) -> None:
        self.n, self.global_batch, self.rank, self.world, self.seed = (
            n,
            global_batch,
            rank,
            world,
            seed,
        )
        self.local = global_batch // world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, self.n // self.global_batch):
            first = b * self.global_batch + self.rank * self.local
            yield order[first : first + self.local]


class _ShardSampler(Sampler[int]):
    """Every ``world``-th index starting at ``rank``: evaluation split over processes."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _loader(dataset: Dataset, num_workers: int, **kwargs: Any) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    accelerator: Accelerator,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    seed: int,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, float]:
    """Clean accuracy and PGD-``steps`` accuracy (random start from ``seed``) over ``dataset``,
    with every image's result (``clean`` / ``robust``: lists of 0/1 in dataset order).

    Each process takes every ``world``-th sample; the results are summed across processes.
    """
    model.eval()
    device = accelerator.device
    sampler = _ShardSampler(len(dataset), accelerator.process_index, accelerator.num_processes)
    # A generator of its own for the loader too: iterating a DataLoader draws its base seed from
    # the global RNG, and evaluating must not change what training draws next.
    loader = _loader(
        dataset,
        num_workers,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(dataset)
    # Per image (clean correct, robust correct), each process filling its own positions: the
    # sum over processes is every image's result, which paired comparisons need.
    flags = torch.zeros(2, n, device=device)
    positions = torch.tensor(sampler.indices, dtype=torch.long, device=device)
    done = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        pred_clean = model(x).argmax(1)
        x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator)
        pred_adv = model(x_adv).argmax(1)
        where = positions[done : done + len(y)]
        flags[0, where] = (pred_clean == y).float()
        flags[1, where] = (pred_adv == y).float()
        done += len(y)
    flags = accelerator.reduce(flags, reduction="sum")
    clean, robust = (flags > 0.5).int().tolist()
    return {
        "clean_acc": sum(clean) / n,
        "robust_acc": sum(robust) / n,
        "n": n,
        "clean": clean,
        "robust": robust,
    }


# --------------------------------------------------------------------------------------------
# The run


def _uses_adversarial_gradient(cfg: Config) -> bool:
    """False for standard training: vanilla λ = 0 and CA-AT γ = 1 both update with g_c."""
    c = cfg.combiner
    if c.kind == "vanilla":
        return c.lam > 0
    return c.gamma < 1


def make_accelerator(cfg: Config | None = None, project_dir: Path | None = None) -> Accelerator:
    """An Accelerator for this process group (and the config's trackers).

    Under ``torchrun`` without a GPU, accelerate only sets up its gloo process group (MULTI_CPU)
    when asked for the CPU explicitly; without that, every process would train alone.
    """
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    log_with = list(cfg.train.log_with) if cfg is not None and cfg.train.log_with else None
    return Accelerator(
        cpu=multi_process_cpu,
        log_with=log_with,
        project_dir=str(project_dir) if project_dir is not None and log_with else None,
    )


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            ok = isinstance(value, (int, float, str, bool))
            flat[f"{section}.{key}"] = value if ok else str(value)
    return flat


class RunState:
    """Where a run stands: the loop position, the counters and the best model so far, which a
    checkpoint saves (:meth:`state_dict`) and a resumed run restores (:meth:`load_state_dict`).
    """

    COUNTERS = ("step", "epoch", "step_in_epoch", "skipped", "consecutive_nonfinite")

    def __init__(self, *, normalized: bool) -> None:
        self.step = 0  # optimiser steps taken
        self.epoch = 1  # the epoch in progress
        self.step_in_epoch = 0
        self.skipped = 0  # steps with non-finite losses or gradients, not applied
        self.consecutive_nonfinite = 0
        self.best: dict[str, Any] = {}  # the best epoch on the validation split, with weights
        self.epochs_since_best = 0
        # steps whose update vanished (L_adv ≈ 0 under CA-AT)
        self.stall = StallMonitor(normalized=normalized)
        # Not checkpointed: what this process has seen since it started.
        self.stopped_early = False
        self.last_eval: dict[str, Any] = {}
        self.samples: dict[str, dict[str, Any]] = {}  # final evaluations, per image

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {key: getattr(self, key) for key in self.COUNTERS}
        state.update(
            best={k: v for k, v in self.best.items() if k != "weights"},
            best_weights=self.best.get("weights"),
            epochs_since_best=self.epochs_since_best,
            stalled=self.stall.stalled,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.COUNTERS:
            setattr(self, key, state[key])
        self.best, self.epochs_since_best = state["best"], state["epochs_since_best"]
        if self.best:
            self.best["weights"] = state["best_weights"]
        self.stall = StallMonitor(state.get("stalled", 0), normalized=self.stall.normalized)


@dataclass
class _Run:
    """One training run: what :func:`_prepare` built, and its :class:`RunState`."""

    cfg: Config
    output_dir: Path
    accelerator: Accelerator
    model: PixelClassifier
    named: list[tuple[str, nn.Parameter]]
    splits: Any
    sampler: GlobalBatchSampler
    train_loader: DataLoader
    steps_per_epoch: int
    micro_global: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ParameterEMA | None
    scaler: LossScaler | None
    objective: Any
    combiner: Any
    reduce: Any
    clean_only: bool
    state: RunState
    skipped_files: dict[str, int] = dataclasses.field(default_factory=dict)  # bad_files=skip
    log: MetricsLog | None = None
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        # The same stratified images for every run of a comparison (seed fixed, not train.seed).
        self.test_set, self.test_subset = limited(
            self.splits.test, self.cfg.eval.limit, SUBSET_SEED
        )
        self.eval_eps = self.cfg.attack.eps if self.cfg.eval.eps is None else self.cfg.eval.eps
        self.eval_alpha = self.eval_eps / 4 if self.cfg.eval.alpha is None else self.cfg.eval.alpha

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def evaluate(self, dataset: Dataset, steps: int, seed_offset: int) -> dict[str, Any]:
        return evaluate(
            self.model,
            dataset,
            self.accelerator,
            eps=self.eval_eps,
            alpha=self.eval_alpha,
            steps=steps,
            norm=self.cfg.attack.norm,
            seed=self.cfg.train.seed + seed_offset,
            batch_size=self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
        )

    def write_row(self, row: dict[str, Any]) -> None:
        layers = row.pop("layers", None)
        self.log.write(row)
        if layers is not None:
            self.log.write({"type": "layers", "step": row["step"], "cos": layers})
        if self.cfg.train.log_with:
            self.accelerator.log(tracker_scalars(row), step=row["step"])

    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "metrics_offset": self.log.offset,
            **self.state.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def restore(self, checkpoint: Path) -> int:
        """Load a checkpoint into the run; returns where metrics.jsonl continues."""
        state = load_checkpoint(checkpoint, self.named, self.accelerator.process_index)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state)
        return state["metrics_offset"]


def train(
    cfg: Config,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run adversarial PEFT as configured and write the run directory; see the module doc.

    With ``train.init_head`` set, the head is first trained alone in ``RUN/head_init/``
    (:mod:`caat_peft.training.head_init`), then the configured method starts from it.
    """
    if cfg.train.init_head != "none":
        from caat_peft.training.head_init import train_with_head_init

        return train_with_head_init(
            cfg, Path(output_dir), overwrite=overwrite, resume=resume, progress=progress
        )
    return train_stage(cfg, output_dir, overwrite=overwrite, resume=resume, progress=progress)


def train_stage(
    cfg: Config,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    head_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """One training run into ``output_dir``: prepare, loop, finish. ``head_state`` (the first
    stage's head under ``train.init_head``) replaces the new head before the PEFT method is
    attached."""
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other (pick one)")
    accelerator = make_accelerator(cfg, output_dir)
    checkpoint = _resume_point(cfg, output_dir) if resume else None
    if accelerator.is_main_process and not resume:
        ignore = (HEAD_INIT_DIR,) if cfg.train.init_head != "none" else ()
        check_output_dir(output_dir, overwrite, ignore)
    run = _prepare(cfg, output_dir, accelerator, head_state)
    metrics_offset = 0 if resume else None  # resuming with no checkpoint yet: start afresh
    if checkpoint is not None:
        metrics_offset = run.restore(checkpoint)
    _open_outputs(
        run,
        fresh=checkpoint is None,
        overwrite=overwrite and not resume,
        metrics_offset=metrics_offset,
    )
    _loop(run, progress)
    return _finish_run(run)


def _prepare(
    cfg: Config,
    output_dir: Path,
    accelerator: Accelerator,
    head_state: dict[str, torch.Tensor] | None,
) -> _Run:
    """Data, model, optimiser and the step's parts. Every user-caused failure happens here,
    before the run directory exists."""
    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_global = tc.batch_size // tc.grad_accum_steps
    if micro_global % world:
        raise UserError(
            f"train.batch_size / train.grad_accum_steps = {micro_global} must be divisible by "
            f"the number of processes ({world}); train.batch_size is the global batch"
        )
    set_seed(tc.seed)
    splits = build_splits(cfg.data, preprocessing_for_config(cfg.model))
    model, named = _build_model(cfg, splits, accelerator, head_state)
    if len(splits.train) < tc.batch_size:
        raise UserError(
            f"train.batch_size = {tc.batch_size} is larger than the training set "
            f"({len(splits.train)} images); lower it"
        )
    sampler = GlobalBatchSampler(len(splits.train), micro_global, rank, world, tc.seed)
    steps_per_epoch = (len(splits.train) // micro_global) // tc.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError("the training set is smaller than one global batch; lower train.batch_size")
    optimizer = make_optimizer(named, tc)
    c = cfg.combiner
    run = _Run(
        cfg=cfg,
        output_dir=output_dir,
        accelerator=accelerator,
        model=model,
        named=named,
        splits=splits,
        sampler=sampler,
        train_loader=_loader(splits.train, cfg.data.num_workers, batch_sampler=sampler),
        steps_per_epoch=steps_per_epoch,
        micro_global=micro_global,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, tc, steps_per_epoch * tc.epochs),
        ema=ParameterEMA([p for _, p in named], tc.ema_decay) if tc.ema_decay else None,
        scaler=LossScaler() if tc.precision == "fp16" else None,
        objective=build_objective(cfg.objective, cfg.attack),  # kind and its options
        combiner=make_combiner(
            c.kind, lam=c.lam, gamma=c.gamma, granularity=c.granularity, normalize=c.normalize
        ),
        reduce=make_reducer(accelerator),
        clean_only=not _uses_adversarial_gradient(cfg),
        state=RunState(normalized=c.normalize),
    )
    for entry in splits.skipped:
        run.skipped_files[entry.split] = run.skipped_files.get(entry.split, 0) + 1
    return run


def _build_model(
    cfg: Config, splits: Any, accelerator: Accelerator, head_state: dict[str, torch.Tensor] | None
) -> tuple[PixelClassifier, list[tuple[str, nn.Parameter]]]:
    """The classifier with its PEFT modules on the device, the same on every process, and its
    trainable parameters."""
    num_classes = cfg.model.num_classes or splits.num_classes
    if num_classes < splits.num_classes:
        raise UserError(
            f"model.num_classes = {num_classes} is below the data's {splits.num_classes} classes "
            "(raise it, or leave it null to follow the data)"
        )
    if cfg.train.compile:
        check_can_compile(accelerator.device)
    with seeded_init(
        cfg.train.seed
    ):  # so that `caat-peft eval` rebuilds the same untrained weights
        model = build_classifier(cfg.model, cfg.peft, num_classes, head_state=head_state)
    model = model.to(accelerator.device)
    _check_model_fits_data(model, splits.train, accelerator.device)
    broadcast_parameters(model, accelerator)
    prepare_model(
        model, precision=cfg.train.precision, compile=cfg.train.compile
    )  # after the fit check
    named = trainable_parameters(model)
    if not named:
        raise UserError("no trainable parameters: check peft.method and peft.target_modules")
    return model, named


def _open_outputs(run: _Run, *, fresh: bool, overwrite: bool, metrics_offset: int | None) -> None:
    """Create the run directory (a new run), open metrics.jsonl and the trackers."""
    cfg, output_dir = run.cfg, run.output_dir
    if run.is_main:
        if fresh:
            needed = space_needed(
                sum(p.numel() * p.element_size() for p in run.params),
                cfg.train.keep_checkpoints,
                checkpoints=bool(cfg.train.save_every),
                ema=bool(cfg.train.ema_decay),
                best=run.splits.val is not None,
                adam=cfg.train.optimizer == "adamw",
            )
            _make_run_dir(output_dir, overwrite, needed)
            atomic_write_text(output_dir / "config.yaml", config_yaml(cfg))
            if run.splits.skipped:  # what bad_files=skip left out, so that nothing goes silently
                listing = [dataclasses.asdict(e) for e in run.splits.skipped]
                atomic_write_text(
                    output_dir / "skipped_files.json", json.dumps(listing, indent=2) + "\n"
                )
        elif not (output_dir / "metrics.jsonl").exists():
            metrics_offset = None
    run.accelerator.wait_for_everyone()
    path = output_dir / "metrics.jsonl" if run.is_main else None
    run.log = MetricsLog(path, truncate_at=metrics_offset)
    if cfg.train.log_with:
        run.accelerator.init_trackers("caat-peft", config=_flat_hparams(cfg))


def _loop(run: _Run, progress: bool) -> None:
    """Epochs of optimiser steps, each epoch ended by validation and the held-out curve."""
    tc, state = run.cfg.train, run.state
    run.start = time.perf_counter()  # "seconds" count the loop and evaluations, not set-up
    bar = tqdm_bar(run.total_steps, state.step, progress and run.is_main)
    try:
        while state.epoch <= tc.epochs and not state.stopped_early:
            run.sampler.set_epoch(state.epoch, start=state.step_in_epoch * tc.grad_accum_steps)
            batches = iter(run.train_loader)
            while state.step_in_epoch < run.steps_per_epoch:
                result = _one_step(run, batches)
                bar.update(1)
                bar.set_postfix(_postfix(result.stats), refresh=False)
                if tc.save_every and state.step % tc.save_every == 0:
                    _save_checkpoint(run)
            warning = state.stall.end_epoch(state.epoch, run.cfg.objective.kind)
            if warning and run.is_main:
                print(f"caat-peft: warning: {warning}", file=sys.stderr)
            _end_of_epoch(run)
            state.epoch += 1
            state.step_in_epoch = 0
    finally:
        bar.close()


def _one_step(run: _Run, batches: Iterator) -> Any:
    """One optimiser step (:func:`training_step`), its bookkeeping and its metrics row."""
    cfg, state = run.cfg, run.state
    tc = cfg.train
    micro_batches = _next_micro_batches(
        batches, state.step, cfg, run.accelerator, run.clean_only, run.micro_global
    )
    result = training_step(
        run.model,
        run.params,
        run.objective,
        run.combiner,
        run.optimizer,
        micro_batches,
        reduce=run.reduce,
        grad_clip=tc.grad_clip,
        clean_only=run.clean_only,
        precision=tc.precision,
        scaler=run.scaler,
        param_names=[n for n, _ in run.named],
        layer_conflict=bool(tc.layer_conflict_every)
        and (state.step + 1) % tc.layer_conflict_every == 0,
    )
    state.step += 1
    state.step_in_epoch += 1
    row = {"type": "step", "epoch": state.epoch, "step": state.step}
    if result.skipped:
        state.skipped += 1
        state.consecutive_nonfinite += 1
        if state.consecutive_nonfinite >= tc.max_nonfinite_steps:
            run.write_row({**row, "skipped": True, **result.stats})
            raise UserError(
                f"{state.consecutive_nonfinite} consecutive steps had non-finite losses or "
                f"gradients (train.max_nonfinite_steps = {tc.max_nonfinite_steps}); start a new "
                "run with a lower train.lr, train.grad_clip set, or train.precision=fp32"
            )
    else:
        state.consecutive_nonfinite = 0
        state.stall.update(result.stats)
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
    if state.step % tc.log_every == 0 or result.skipped or "layers" in result.stats:
        row.update(skipped=result.skipped, lr=run.optimizer.param_groups[0]["lr"])
        run.write_row({**row, **result.stats})
    return result


def _save_checkpoint(run: _Run) -> None:
    save_checkpoint(
        run.output_dir,
        run.state.step,
        run.named,
        run.checkpoint_state(),
        keep=run.cfg.train.keep_checkpoints,
        rank=run.accelerator.process_index,
        is_main=run.is_main,
        barrier=run.accelerator.wait_for_everyone,
    )


def _finish_run(run: _Run) -> TrainResult:
    """The final evaluation, final.json, the adapter, the samples and the plot."""
    final = _finish(run)
    run.log.close()
    if run.cfg.train.log_with:
        run.accelerator.end_training()
    final["eval_subset"] = run.test_subset
    output_dir = run.output_dir
    if run.is_main:
        _save_model(run.model, run.ema, output_dir / "adapter")
        labels = dataset_labels(run.test_set)
        write_samples(output_dir, final, run.state.samples, labels, run.test_subset)
        atomic_write_text(output_dir / "final.json", json.dumps(final, indent=2) + "\n")
        if run.cfg.train.plots:
            plot_conflict(output_dir / "metrics.jsonl", output_dir / "conflict.png")
    run.accelerator.wait_for_everyone()
    return TrainResult(
        run_dir=output_dir, final=final, model=run.model, is_main_process=run.is_main
    )


def tqdm_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", leave=False)


@torch.no_grad()
def _check_model_fits_data(model: nn.Module, dataset: Dataset, device: torch.device) -> None:
    """One forward pass on one training image, so that a size mismatch is a clear error now."""
    x, _ = dataset[0]
    try:
        model.eval()(x.unsqueeze(0).to(device))
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"the model does not accept the data's images of shape {tuple(x.shape)} ({detail}); "
            "check data.image_size and model.kwargs (img_size)"
        ) from None


def _resume_point(cfg: Config, output_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir`` (None: start it afresh)."""
    check_same_config(cfg, output_dir)
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def check_same_config(cfg: Config, output_dir: Path) -> None:
    """Refuse to continue the run in ``output_dir`` with another config than its own."""
    if not (output_dir / "config.yaml").is_file():
        raise UserError(f"nothing to resume in {output_dir} (no config.yaml); drop --resume")
    saved = load_run_config(output_dir / "config.yaml")
    now, before = to_dict(cfg), to_dict(saved)
    now["train"]["compile"] = before["train"]["compile"]  # speed only: may change on resume
    difference = first_difference(now, before)
    if difference is not None:
        raise UserError(
            f"the config differs from the run being resumed ({difference}); resume with the "
            "same config or start a new run"
        )


def _next_micro_batches(
    batches: Iterator,
    step: int,
    cfg: Config,
    accelerator: Accelerator,
    clean_only: bool,
    micro_global: int,
) -> list[MicroBatch]:
    """The micro-batches of one optimiser step, with this process's slice of the random start.

    The start is drawn for the whole global batch from a per-step seed and sliced, so every
    process count sees the same starts for the same images.
    """
    device = accelerator.device
    local = micro_global // accelerator.num_processes
    with_start = not clean_only and cfg.attack.random_start
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
    full = None  # drawn once the image shape is known
    out = []
    for m in range(cfg.train.grad_accum_steps):
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        init_delta = None
        if with_start:
            if full is None:
                shape = (cfg.train.batch_size, *x.shape[1:])
                full = sample_random_start(
                    shape,
                    cfg.attack.eps,
                    cfg.attack.norm,
                    generator=gen,
                    device=device,
                    dtype=x.dtype,
                )
            first = m * micro_global + accelerator.process_index * local
            init_delta = full[first : first + local]
        out.append(MicroBatch(x, y, init_delta))
    return out


def _end_of_epoch(run: _Run) -> None:
    """Validation (model selection, early stopping) and the held-out curve."""
    cfg, state, ema = run.cfg, run.state, run.ema
    row: dict[str, Any] = {"type": "epoch", "epoch": state.epoch, "step": state.step}
    if ema is not None:
        ema.swap()
    try:
        if run.splits.val is not None:
            _select(run, row)
        last_epoch = state.epoch == cfg.train.epochs or state.stopped_early
        every = cfg.eval.every
        if last_epoch or (every and state.epoch % every == 0):
            state.last_eval = run.evaluate(run.test_set, cfg.eval.steps, seed_offset=0)
            row.update(
                clean_acc=state.last_eval["clean_acc"], robust_acc=state.last_eval["robust_acc"]
            )
    finally:
        if ema is not None:
            ema.swap()
    row["seconds"] = round(time.perf_counter() - run.start, 3)
    if len(row) > 4:
        run.write_row(row)
        if run.is_main and "robust_acc" in row:
            from tqdm.auto import tqdm

            tqdm.write(
                f"epoch {state.epoch}: held-out clean acc {row['clean_acc']:.3f}, "
                f"PGD-{cfg.eval.steps} acc {row['robust_acc']:.3f}"
            )


def _select(run: _Run, row: dict[str, Any]) -> None:
    """Validation robust accuracy: keep the best epoch's weights, stop early on patience."""
    cfg, state = run.cfg, run.state
    val = run.evaluate(run.splits.val, cfg.eval.select_steps, seed_offset=1)
    row.update(val_clean_acc=val["clean_acc"], val_robust_acc=val["robust_acc"])
    if not state.best or val["robust_acc"] > state.best["val_robust_acc"]:
        state.best = {
            "epoch": state.epoch,
            "step": state.step,
            "val_clean_acc": val["clean_acc"],
            "val_robust_acc": val["robust_acc"],
            "weights": [p.detach().clone().cpu() for p in run.params],
        }
        state.epochs_since_best = 0
        if run.is_main:
            # EMA weights are swapped in already, so save what is live.
            _save_model(run.model, None, run.output_dir / "best_adapter")
    else:
        state.epochs_since_best += 1
    patience = cfg.train.early_stop_patience
    if patience is not None and state.epochs_since_best >= patience:
        state.stopped_early = True


def _save_model(model: nn.Module, ema: ParameterEMA | None, directory: Path) -> None:
    """Save the trainable modules (EMA weights when enabled) atomically into ``directory``."""
    if ema is not None:
        ema.swap()
    try:
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_trainable(model.net, tmp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        if ema is not None:
            ema.swap()


def _finish(run: _Run) -> dict[str, Any]:
    cfg, state, ema = run.cfg, run.state, run.ema
    if not state.last_eval:  # resumed after the last epoch's evaluation was logged
        if ema is not None:
            ema.swap()
        state.last_eval = run.evaluate(run.test_set, cfg.eval.steps, seed_offset=0)
        if ema is not None:
            ema.swap()
    state.samples = {"last": state.last_eval}
    final: dict[str, Any] = {
        **_scores(state.last_eval),
        "eval_n": state.last_eval["n"],
        "interval_method": WILSON,
        "eval_attack": f"pgd{cfg.eval.steps}-{cfg.attack.norm}",
        "eval_eps": run.eval_eps,
        "epochs": state.epoch - 1,
        "steps": state.step,
        "skipped_steps": state.skipped,
        "stalled_steps": state.stall.stalled,  # update < 1e-3·‖g_c‖ (telemetry.StallMonitor)
        "skipped_files": run.skipped_files,
        "stopped_early": state.stopped_early,
        "seconds": round(time.perf_counter() - run.start, 3),
        "num_processes": run.accelerator.num_processes,
        "trainable_parameters": sum(p.numel() for p in run.params),
    }
    if state.best and state.best.get("weights") is not None:
        final["best"] = _score_best(run)
    return final


def _score_best(run: _Run) -> dict[str, Any]:
    """The selected model, scored on the held-out split once, after training."""
    params, best = run.params, run.state.best
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, best["weights"]):
            p.copy_(w)
    best_test = run.evaluate(run.test_set, run.cfg.eval.steps, seed_offset=0)
    with torch.no_grad():
        for p, w in zip(params, live):
            p.copy_(w)
    run.state.samples["best"] = best_test
    return {**{k: v for k, v in best.items() if k != "weights"}, **_scores(best_test)}


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    """final.json's accuracies with their 95 % Wilson intervals over the held-out images."""
    n = result["n"]
    return {
        "clean_acc": result["clean_acc"],
        "robust_acc": result["robust_acc"],
        "clean_acc_ci": list(wilson_interval(sum(result["clean"]), n)),
        "robust_acc_ci": list(wilson_interval(sum(result["robust"]), n)),
    }


def _postfix(stats: dict[str, Any]) -> dict[str, str]:
    keys = ("loss_clean", "loss_adv", "acc_clean", "acc_adv", "cos", "mu", "lambda_star")
    return {k: f"{stats[k]:.3g}" for k in keys if stats.get(k) is not None}
