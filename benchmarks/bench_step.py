"""Training-step figures: CA-AT vs vanilla, the fast path vs a reference step, FLOP utilisation.

* ``caat_over_vanilla_step``: one full ``training_step`` (PGD attack, both losses, g_c and g_a,
  combine, AdamW step), CA-AT (γ = 0.8) over vanilla (λ = 0.5), float32, same model copy,
  batch and random start.
* ``caat_over_vanilla_update``: only what differs between the two: combine + write the update +
  AdamW step + zero_grad, on the same (g_c, g_a) taken from a real step (CA-AT in its
  projecting branch, the costlier one). ``caat_over_vanilla_step_noattack`` is the step with a
  PGD-0 attack (losses, both gradients, combine, step).
* ``fast_over_reference_step``: the reference, written here the way the authors' code does it
  (float32 eager, torchattacks PGD, two ``.backward()`` passes each followed by a flattened copy
  of every ``.grad``, the CA-AT formula on the flat vectors, written back), over the product's
  fast path (``train.precision: bf16`` and ``train.compile: true``: ``prepare_model`` and
  ``training_step(precision="bf16")``); ``fp32_over_reference_step`` separates the
  implementation from the fast path, ``bf16_eager_over_reference_step`` bf16 from compilation.
  The compiled model's compilation (its first step) is timed apart: ``compile_seconds``.
* ``step_flops_utilisation``: FLOPs of one step (``FlopCounterMode``, with timm's fused
  attention switched off in the counting copy so that the attention matmuls are counted as
  ``bmm``; the CPU flash-attention kernel has no FLOP formula in torch) divided by the median
  step time, over the FLOP/s of a large dense matmul measured interleaved with the steps.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_common import (
    ALPHA,
    EPS,
    GAMMA,
    TARGET_SPREAD,
    Trainee,
    Workload,
    build_model,
    interleaved_until_stable,
    load1,
    make_batch,
    make_trainee,
    median,
    no_reduce,
    spread,
)
from caat_peft.gradients import conflict_stats
from caat_peft.training.fastpath import prepare_model
from caat_peft.training.step import MicroBatch, micro_batch_gradients, training_step, write_grads

MATMUL_N = 2048


def run_step(t: Trainee, batch: MicroBatch, precision: str = "fp32") -> dict[str, Any]:
    return training_step(
        t.model,
        t.params,
        t.objective,
        t.combiner,
        t.optimizer,
        [batch],
        reduce=no_reduce,
        precision=precision,
    ).stats


# --------------------------------------------------------------------------------------------
# The reference step (the authors' approach, re-written here from the method's description)


def reference_caat_step(
    model: nn.Module,
    params: list[nn.Parameter],
    attack: torchattacks.attack.Attack,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    gamma: float,
) -> bool:
    """Float32 eager CA-AT step on flat gradient copies; returns whether it projected."""
    model.train()
    x_adv = attack(x, y)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    g_c = torch.cat([p.grad.flatten() for p in params]).clone()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x_adv), y).backward()
    g_a = torch.cat([p.grad.flatten() for p in params]).clone()
    norm_c, norm_a = g_c.norm(), g_a.norm()
    cos = float(torch.dot(g_a, g_c) / (norm_a * norm_c))
    projected = cos < gamma
    if projected:
        sin_phi, sin_gamma = math.sqrt(1 - cos * cos), math.sqrt(1 - gamma * gamma)
        k = float(norm_a) * (gamma * sin_phi - cos * sin_gamma) / (float(norm_c) * sin_gamma)
        g = g_a + k * g_c
    else:
        g = g_c
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(g[offset : offset + n].view_as(p))
        offset += n
    optimizer.step()
    return projected


def make_torchattacks_pgd(model: nn.Module, steps: int) -> torchattacks.attack.Attack:
    return torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)


# --------------------------------------------------------------------------------------------
# Measurements


def caat_vs_vanilla(
    work: Workload,
    repeats: int,
    *,
    max_repeats: int | None = None,
    target_spread: float = TARGET_SPREAD,
) -> dict[str, Any]:
    """Full step, PGD-0 step and update-only, CA-AT over vanilla (float32).

    Each figure takes at least its number of rounds and at most ``max_repeats`` (default twice
    the minimum), stopping once its per-round ratio spreads by ≤ ``target_spread``."""
    rounds: dict[str, Any] = {"target_spread": target_spread}

    def upto(least: int) -> dict[str, Any]:
        return {"min_repeats": least, "max_repeats": max(max_repeats or 2 * least, least)}

    base = build_model(work)
    batch = make_batch(work)
    load_before = load1()
    vanilla = make_trainee(base, "vanilla", work.steps)
    caat = make_trainee(base, "caat", work.steps)
    projected: list[bool] = []

    def caat_step() -> None:
        projected.append(run_step(caat, batch)["projected"])

    step_run = interleaved_until_stable(
        {"vanilla": lambda: run_step(vanilla, batch), "caat": caat_step},
        ("caat", "vanilla"),
        warmup=1,
        **upto(repeats),
        **rounds,
    )

    vanilla0 = make_trainee(base, "vanilla", 0)
    caat0 = make_trainee(base, "caat", 0)
    step0_run = interleaved_until_stable(
        {"vanilla": lambda: run_step(vanilla0, batch), "caat": lambda: run_step(caat0, batch)},
        ("caat", "vanilla"),
        warmup=2,
        **upto(max(repeats, 7)),
        **rounds,
    )

    # The same (g_c, g_a) for both combiners, from a real attack.
    g_c, g_a, _ = micro_batch_gradients(
        vanilla.model, vanilla.params, vanilla.objective, batch, clean_only=False
    )
    # The projecting branch (the costlier one) needs φ < γ: γ = 0.8 unless φ is above it.
    phi = conflict_stats(g_c, g_a)["cos"]
    gamma = GAMMA if phi < GAMMA else (1.0 + phi) / 2
    caat_proj = make_trainee(base, "caat", work.steps, gamma=gamma)
    caat_keep = make_trainee(base, "caat", work.steps, gamma=-0.99)  # φ ≥ γ: update = g_c

    def update(t: Trainee) -> dict[str, Any]:
        new, stats = t.combiner(g_a, g_c)
        write_grads(t.params, new)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        return stats

    assert update(caat_proj)["projected"] and not update(caat_keep)["projected"]
    upd_run = interleaved_until_stable(
        {
            "vanilla": lambda: update(vanilla),
            "caat": lambda: update(caat_proj),
            "caat_no_projection": lambda: update(caat_keep),
        },
        [("caat", "vanilla"), ("caat_no_projection", "vanilla")],
        warmup=3,
        inner=50,
        **upto(max(repeats, 9)),
        **rounds,
    )
    step, step0, upd = step_run.times, step0_run.times, upd_run.times
    return {
        # medians of per-round ratios, each with its spread and whether it settled
        "caat_over_vanilla_step": step_run.ratio("caat", "vanilla"),
        "caat_over_vanilla_step_noattack": step0_run.ratio("caat", "vanilla"),
        "caat_over_vanilla_update": upd_run.ratio("caat", "vanilla"),
        "caat_noproj_over_vanilla_update": upd_run.ratio("caat_no_projection", "vanilla"),
        "seconds": {
            "step_vanilla": median(step["vanilla"]),
            "step_caat": median(step["caat"]),
            "step0_vanilla": median(step0["vanilla"]),
            "step0_caat": median(step0["caat"]),
            "update_vanilla": median(upd["vanilla"]),
            "update_caat": median(upd["caat"]),
            "update_caat_no_projection": median(upd["caat_no_projection"]),
        },
        "spread": {
            "step_vanilla": spread(step["vanilla"]),
            "step_caat": spread(step["caat"]),
            "update_vanilla": spread(upd["vanilla"]),
            "update_caat": spread(upd["caat"]),
        },
        "caat_projected_fraction": sum(projected) / max(1, len(projected)),
        "trainable_parameters": sum(p.numel() for p in vanilla.params),
        "trainable_tensors": len(vanilla.params),
        "load1": [load_before, load1()],
    }


def _matmul(dtype: torch.dtype):
    a = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    b = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    return lambda: torch.mm(a, b)


def count_step_flops(work: Workload) -> int:
    """FLOPs of one float32 CA-AT step, attention counted through the unfused path."""
    model = build_model(work)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    trainee = make_trainee(model, "caat", work.steps)
    counter = FlopCounterMode(display=False)
    with counter:
        run_step(trainee, make_batch(work))
    return counter.get_total_flops()


def fast_vs_reference(
    work: Workload,
    repeats: int,
    *,
    max_repeats: int | None = None,
    target_spread: float = TARGET_SPREAD,
) -> dict[str, Any]:
    """Reference (fp32, torchattacks, flat copies) vs ``training_step`` on the fast path (bf16,
    compiled), bf16 eager and fp32, with dense-matmul FLOP/s measured in the same rounds."""
    base = build_model(work)
    batch = make_batch(work)
    flops = count_step_flops(work)
    load_before = load1()
    ref = make_trainee(base, "caat", work.steps)
    ref_attack = make_torchattacks_pgd(ref.model, work.steps)
    fast = make_trainee(base, "caat", work.steps)
    prepare_model(fast.model, precision="bf16", compile=True)
    started = time.perf_counter()
    run_step(fast, batch, "bf16")  # compiles (train-mode losses and eval-mode attack graphs)
    compile_seconds = time.perf_counter() - started
    eager = make_trainee(base, "caat", work.steps)
    prepare_model(eager.model, precision="bf16")
    fp32 = make_trainee(base, "caat", work.steps)
    mm32, mm16 = _matmul(torch.float32), _matmul(torch.bfloat16)
    run = interleaved_until_stable(
        {
            "reference": lambda: reference_caat_step(
                ref.model, ref.params, ref_attack, ref.optimizer, batch.x, batch.y, GAMMA
            ),
            "fast": lambda: run_step(fast, batch, "bf16"),
            "bf16_eager": lambda: run_step(eager, batch, "bf16"),
            "step_fp32": lambda: run_step(fp32, batch, "fp32"),
            "matmul_fp32": lambda: [mm32() for _ in range(3)],
            "matmul_bf16": lambda: [mm16() for _ in range(3)],
        },
        # the two figures with a goal decide when to stop
        [("reference", "fast"), ("matmul_fp32", "step_fp32")],
        min_repeats=repeats,
        max_repeats=max_repeats or 2 * repeats,
        target_spread=target_spread,
        warmup=1,
    )
    times, med = run.times, run.medians()
    mm_flops = 3 * 2 * MATMUL_N**3
    matmul32 = mm_flops / med["matmul_fp32"]
    matmul16 = mm_flops / med["matmul_bf16"]
    achieved32 = flops / med["step_fp32"]
    achieved_fast = flops / med["fast"]
    # utilisation = (flops / t_step) / (mm_flops / t_matmul): a per-round time ratio, scaled
    per_matmul = flops / mm_flops
    return {
        "fast_over_reference_step": run.ratio("reference", "fast"),
        "fp32_over_reference_step": run.ratio("reference", "step_fp32"),
        "bf16_eager_over_reference_step": run.ratio("reference", "bf16_eager"),
        "fast_over_fp32_step": run.ratio("step_fp32", "fast"),
        "compile_seconds": compile_seconds,
        "step_flops_utilisation": run.ratio("matmul_fp32", "step_fp32").scaled(per_matmul),
        "step_flops_utilisation_fast_bf16": run.ratio("matmul_bf16", "fast").scaled(per_matmul),
        "step_flops_utilisation_bf16_eager": run.ratio("matmul_bf16", "bf16_eager").scaled(
            per_matmul
        ),
        "step_gflop": flops / 1e9,
        "achieved_gflops_fp32": achieved32 / 1e9,
        "achieved_gflops_fast": achieved_fast / 1e9,
        "achieved_gflops_bf16_eager": flops / med["bf16_eager"] / 1e9,
        "matmul_gflops_fp32": matmul32 / 1e9,
        "matmul_gflops_bf16": matmul16 / 1e9,
        "seconds": {k: med[k] for k in ("reference", "fast", "bf16_eager", "step_fp32")},
        "spread": {k: spread(v) for k, v in times.items()},
        "rounds": run.rounds,
        "load1": [load_before, load1()],
    }
