"""Attack throughput: ``caat_peft.attacks.pgd`` vs ``torchattacks.PGD``, same model and batch.

Both run PGD-10 L∞ (ε = 8/255, step 2/255, uniform random start) with the model in eval mode,
in float32; the figure is images per second of ours over torchattacks'. Our PGD under bf16
autocast is measured in the same rounds, through the product's fast path (``autocast_for`` and
``prepare_model``; LoRA merged during the attack, attention in bf16), eager (``attack_bf16_over_fp32``) and compiled
(``attack_bf16_compiled_over_fp32``; its compilation is timed apart).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks.bench_common import (
    ALPHA,
    EPS,
    TARGET_SPREAD,
    Workload,
    build_model,
    interleaved_until_stable,
    load1,
    make_batch,
    spread,
)
from benchmarks.bench_step import make_torchattacks_pgd
from caat_peft.attacks import pgd
from caat_peft.training.fastpath import autocast_for, lora_merged, prepare_model


def attack_throughput(
    work: Workload,
    repeats: int,
    *,
    max_repeats: int | None = None,
    target_spread: float = TARGET_SPREAD,
) -> dict[str, Any]:
    model = build_model(work).eval()
    batch = make_batch(work)
    x, y = batch.x, batch.y
    load_before = load1()
    ta = make_torchattacks_pgd(model, work.steps)
    bf16_model = prepare_model(copy.deepcopy(model), precision="bf16")
    compiled = prepare_model(copy.deepcopy(model), precision="bf16", compile=True)

    def ours(net: torch.nn.Module = model) -> None:
        pgd(net, x, y, eps=EPS, alpha=ALPHA, steps=work.steps, init_delta=batch.init_delta)

    def ours_bf16(net: torch.nn.Module) -> None:
        with autocast_for("bf16", x.device, net), lora_merged(net):
            ours(net)

    started = time.perf_counter()
    ours_bf16(compiled)
    compile_seconds = time.perf_counter() - started
    run = interleaved_until_stable(
        {
            "ours": ours,
            "torchattacks": lambda: ta(x, y),
            "ours_bf16": lambda: ours_bf16(bf16_model),
            "ours_bf16_compiled": lambda: ours_bf16(compiled),
        },
        ("torchattacks", "ours"),  # the figure with a goal decides when to stop
        min_repeats=repeats,
        max_repeats=max_repeats or 2 * repeats,
        target_spread=target_spread,
        warmup=1,
    )
    times, med = run.times, run.medians()
    return {
        "attack_over_torchattacks": run.ratio("torchattacks", "ours"),
        "attack_bf16_over_fp32": run.ratio("ours", "ours_bf16"),
        "attack_bf16_compiled_over_fp32": run.ratio("ours", "ours_bf16_compiled"),
        "compile_seconds": compile_seconds,
        "images_per_second": {k: work.batch / v for k, v in med.items()},
        "spread": {k: spread(v) for k, v in times.items()},
        "rounds": run.rounds,
        "load1": [load_before, load1()],
    }
