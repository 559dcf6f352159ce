"""Robust linear initialisation (``train.init_head: robust-linear-probe``; RoLI, CVPR 2024).

Two runs of the ordinary trainer. Stage 1 trains the head alone (``peft.method: head``) with the
same model, data, attack, objective and combiner, for ``train.init_head_epochs`` epochs at
``train.init_head_lr``, into ``RUN/head_init/``: a complete run directory of its own (config,
metrics, checkpoints, ``adapter/``, ``final.json``). Stage 2 is the configured run in ``RUN/``;
its head starts as the tensors stage 1 saved in ``head_init/adapter/trainable.safetensors``
(the last head, its EMA when ``train.ema_decay`` is set), read back from that file on every
path, so a fresh run and a resumed one start stage 2 from the same bytes.

Resuming picks the stage from the files: ``RUN/config.yaml`` means stage 2 had started (stage 1
is finished and is only checked); else ``head_init/final.json`` means stage 1 finished; else
``head_init/config.yaml`` means stage 1 was interrupted and resumes from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from caat_peft.config import (
    Config,
    PeftConfig,
    first_difference,
    load_run_config,
    to_dict,
    validate,
)
from caat_peft.errors import UserError
from caat_peft.training.trainer import (
    HEAD_INIT_DIR,
    TrainResult,
    check_output_dir,
    check_same_config,
    make_accelerator,
    train_stage,
)


def stage_one_config(cfg: Config) -> Config:
    """The head-only run of stage 1: ``cfg`` with a fresh ``peft`` section (method head) and
    its own epochs and learning rate; nothing of stage 2's PEFT settings, so that changing
    them does not invalidate a finished stage 1."""
    tc = cfg.train
    epochs = tc.init_head_epochs
    train = dataclasses.replace(
        tc,
        epochs=epochs,
        lr=tc.init_head_lr if tc.init_head_lr is not None else tc.lr,
        warmup_epochs=min(tc.warmup_epochs, epochs),
        init_head="none",
        init_head_epochs=epochs,
        init_head_lr=None,
    )
    peft = PeftConfig(method="head", train_head=True)
    return validate(dataclasses.replace(cfg, peft=peft, train=train))


def read_head(stage_dir: Path) -> dict[str, torch.Tensor]:
    """The head tensors stage 1 saved (a UserError if it has not finished)."""
    from safetensors.torch import load_file

    path = stage_dir / "adapter" / "trainable.safetensors"
    if not (stage_dir / "final.json").is_file() or not path.is_file():
        raise UserError(
            f"{stage_dir}: the head-initialisation stage has not finished (no final.json or "
            "adapter/trainable.safetensors); resume the run or start it again with --overwrite"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: say which, never crash
        raise UserError(
            f"{path}: unreadable ({type(exc).__name__}); rerun with --overwrite"
        ) from None


def _start_afresh(output_dir: Path, overwrite: bool) -> None:
    """Before stage 1 of a new run: refuse a directory holding another run (or replace it)."""
    accelerator = make_accelerator(None)
    if accelerator.is_main_process:
        check_output_dir(output_dir, overwrite, ignore=(HEAD_INIT_DIR,))
        stage_dir = output_dir / HEAD_INIT_DIR
        if (stage_dir / "config.yaml").is_file() and not overwrite:
            raise UserError(
                f"output directory {output_dir} already holds a run (its {HEAD_INIT_DIR}/ "
                "stage); pass --resume to continue it, --overwrite to replace it, or another "
                "--output-dir"
            )
        # --overwrite: both stages of the old run go, so that no stale checkpoint of its
        # second stage could be resumed on top of the new first stage.
        if overwrite and ((output_dir / "config.yaml").is_file() or stage_dir.exists()):
            shutil.rmtree(output_dir)
    accelerator.wait_for_everyone()


def train_with_head_init(
    cfg: Config, output_dir: Path, *, overwrite: bool, resume: bool, progress: bool
) -> TrainResult:
    """Stage 1 (head alone, adversarially) into ``RUN/head_init/``, then ``cfg`` from its head."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other (pick one)")
    stage_cfg = stage_one_config(cfg)
    stage_dir = output_dir / HEAD_INIT_DIR
    second_started = (output_dir / "config.yaml").is_file()
    if not resume:
        _start_afresh(output_dir, overwrite)
        train_stage(stage_cfg, stage_dir, progress=progress)
    elif second_started:
        check_same_config(cfg, output_dir)
        check_same_config(stage_cfg, stage_dir)
    elif (stage_dir / "final.json").is_file():
        check_same_config(stage_cfg, stage_dir)
    elif (stage_dir / "config.yaml").is_file():
        train_stage(stage_cfg, stage_dir, resume=True, progress=progress)
    else:
        raise UserError(f"nothing to resume in {output_dir} (no config.yaml); drop --resume")
    head = read_head(stage_dir)
    return train_stage(
        cfg, output_dir, resume=resume and second_started, progress=progress, head_state=head
    )


def first_stage_only(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a robust-linear-probe run stopped before its second stage."""
    stage_config = run_dir / HEAD_INIT_DIR / "config.yaml"
    return stage_config.is_file() and not (run_dir / "config.yaml").is_file()


def stage_one_difference(cfg: Config, run_dir: Path) -> str | None:
    """How ``cfg``'s first stage differs from the one in ``run_dir/head_init`` (None: same),
    for sweeps that decide, before training anything, whether a stopped run may continue."""
    if cfg.train.init_head == "none":
        return f"train.init_head: set in the run (it has {HEAD_INIT_DIR}/), 'none' now"
    saved = load_run_config(run_dir / HEAD_INIT_DIR / "config.yaml")
    return first_difference(to_dict(stage_one_config(cfg)), to_dict(saved))
