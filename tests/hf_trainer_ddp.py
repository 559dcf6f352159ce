"""Run by tests/test_hf_trainer.py under ``torchrun --nproc_per_node 2``: two optimiser steps
of CAATTrainer on a DDP-wrapped tiny ViT + LoRA; rank 0 saves the trained parameters."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[1]
EVAL_SAMPLES = 45


def settings(out: Path, per_device_batch: int) -> dict[str, Any]:
    """The run both sides share (the single-process side with twice the per-device batch)."""
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": per_device_batch,
        "max_steps": 2,
        "optim": "sgd",
        "learning_rate": 0.05,
        "max_grad_norm": 0.5,
        "caat_gamma": 0.999,  # projects on both steps at this init (φ ≈ 0.99)
        "attack_random_start": False,  # the same x_adv whichever process holds a sample
        "train_sampling_strategy": "sequential",
        "logging_steps": 1,
        **eval_settings(),
    }


def eval_settings() -> dict[str, Any]:
    return {"per_device_eval_batch_size": 8, "eval_attack_steps": 2}


def main(out: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import transformers
    from test_hf_trainer import caat_args, tiny_model, trainable

    from caat_peft.integrations.hf_trainer import CAATTrainer

    transformers.logging.set_verbosity_error()
    train, test = __import__("test_hf_trainer").example.digits_datasets(16)
    model = tiny_model()
    init = trainable(model)
    args = caat_args(out, **settings(out / "ddp", per_device_batch=8))
    trainer = CAATTrainer(model=model, args=args, train_dataset=Subset(train, range(32)))
    trainer.train()
    wrapped = trainer.model_wrapped
    # Evaluation of a model the test trained beforehand (one that does better than a constant
    # guess): 45 samples over 2 processes in batches of 8, so the shards are uneven and
    # accelerate pads the last batch, which gather_for_metrics must drop again.
    scored = tiny_model("full")
    scored.load_state_dict(torch.load(out / "eval_model.pt", weights_only=True))
    evaluator = CAATTrainer(model=scored, args=args)
    metrics = evaluator.evaluate(eval_dataset=Subset(test, range(EVAL_SAMPLES)))
    if trainer.is_world_process_zero():
        result = {
            "params": trainable(model),
            "init": init,
            "metrics": metrics,
            "wrapped": type(wrapped).__name__,
            "sync_flag": bool(getattr(wrapped, "require_backward_grad_sync", True)),
        }
        torch.save(result, out / "ddp.pt")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
