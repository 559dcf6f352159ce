"""Does the bf16 fast path cost robustness? The demo's stage-2 CA-AT run, fp32 vs bf16.

The offline demo (``caat_peft.demo``): the cached robust stage-1 ViT (digits 0-4), then CA-AT
(γ = 0.8) LoRA fine-tuning on digits 5-9 with ``train.precision`` fp32 and bf16, same seed(s).
Both are scored by the trainer's own float32 PGD-20 evaluation on the held-out digits; the goal is
a bf16 robust accuracy within 1.5 points of the fp32 one.

A bf16 *attack* must not be a weaker attack, so each trained model is also attacked twice with
the same PGD-20 and the same random start, once in float32 and once under bf16 autocast
(``robust_acc_under_bf16_attack``, the attack under the fast path's own context: autocast,
attention in bf16, LoRA merged): a weaker bf16 attack would show as a higher accuracy.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.bench_common import load1, median
from caat_peft.attacks import pgd
from caat_peft.demo import ATTACK, EVAL, stage1_checkpoint, stage2_config
from caat_peft.models import preprocessing_for_config
from caat_peft.training.fastpath import autocast_for, lora_merged


@contextlib.contextmanager
def _fast_attack_region(model: nn.Module):
    """What the fast path's training attack runs under: bf16 autocast with attention in bf16,
    LoRA merged into the base weights."""
    with autocast_for("bf16", torch.device("cpu"), model), lora_merged(model):
        yield


@torch.no_grad()
def robust_accuracy(
    model: nn.Module, dataset, *, eps: float, alpha: float, steps: int, bf16: bool, seed: int
) -> float:
    """PGD-``steps`` accuracy, the attack in float32 or under bf16 autocast; logits in fp32."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    correct = total = 0
    for x, y in loader:
        start = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
        with _fast_attack_region(model) if bf16 else contextlib.nullcontext():
            x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, init_delta=start)
        correct += int((model(x_adv).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def bf16_vs_fp32(seeds: list[int], epochs: int | None = None) -> dict[str, Any]:
    from caat_peft.data import build_splits
    from caat_peft.training import train

    load_before = load1()
    checkpoint = stage1_checkpoint(progress=False)
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        for seed in seeds:
            for precision in runs:
                cfg = stage2_config(checkpoint, {"kind": "caat", "gamma": 0.8}, seed=seed)
                cfg.train.precision = precision
                cfg.train.plots = False
                cfg.eval.every = 0  # the end-of-run PGD-20 only: training is unchanged
                if epochs is not None:
                    cfg.train.epochs = epochs
                result = train(cfg, Path(tmp) / f"{precision}-{seed}", progress=False)
                splits = build_splits(cfg.data, preprocessing_for_config(cfg.model))
                attack = {"eps": ATTACK["eps"], "alpha": EVAL["alpha"], "steps": EVAL["steps"]}
                under_bf16 = robust_accuracy(
                    result.model, splits.test, **attack, bf16=True, seed=seed
                )
                under_fp32 = robust_accuracy(
                    result.model, splits.test, **attack, bf16=False, seed=seed
                )
                f = result.final
                runs[precision].append(
                    {
                        "seed": seed,
                        "clean_acc": f["clean_acc"],
                        "robust_acc": f["robust_acc"],
                        "robust_acc_under_fp32_attack": under_fp32,
                        "robust_acc_under_bf16_attack": under_bf16,
                        "train_seconds": f["seconds"],
                        "steps": f["steps"],
                    }
                )

    def med(precision: str, key: str) -> float:
        return median([r[key] for r in runs[precision]])

    gaps = [100 * (b["robust_acc"] - a["robust_acc"]) for a, b in zip(runs["fp32"], runs["bf16"])]
    attack_gaps = [
        100 * (r["robust_acc_under_bf16_attack"] - r["robust_acc_under_fp32_attack"])
        for rs in runs.values()
        for r in rs
    ]
    return {
        "bf16_minus_fp32_robust_points": median(gaps),
        "bf16_minus_fp32_clean_points": 100 * (med("bf16", "clean_acc") - med("fp32", "clean_acc")),
        "bf16_attack_minus_fp32_attack_points": max(attack_gaps),
        "fp32_train_seconds_over_bf16": med("fp32", "train_seconds") / med("bf16", "train_seconds"),
        "runs": runs,
        "checkpoint": str(checkpoint),
        "load1": [load_before, load1()],
    }
