"""Candidate product changes, each measured against the product as it is, in the same run.

Nothing here changes the product: each candidate is applied to a copy of a model, or written out
here as a prototype, and timed interleaved with the product's own code.

* ``caat_host_over_product_update``: CA-AT's global rule with its scalar decisions made on host
  floats after the one read-back (the product computes them with ~25 tensor ops on 0-dim
  tensors), same update; combine + write + AdamW step + zero_grad, over the product's.
* ``adamw_foreach_over_loop_update`` (adopted): the product's ``AdamW(foreach=True)`` over the
  per-tensor loop that torch picks on CPU by default, same update.
* ``omp_passive_over_active_step``: one float32 step (PGD-2, small images) in a fresh process
  with ``OMP_WAIT_POLICY=PASSIVE`` over ``ACTIVE``. libgomp's spinning threads collapse when
  the cores are shared with other jobs (seen here: a step 8-20× slower at load 6 on 2 cores),
  but on a quiet machine spinning is faster, so the product sets nothing.

The bf16 attention / LoRA-cast change that an earlier run measured here was adopted
(``caat_peft/training/fastpath.py``) and is measured in the fast-path section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.bench_common import (
    TARGET_SPREAD,
    Workload,
    build_model,
    interleaved_until_stable,
    load1,
    make_batch,
    make_trainee,
    median,
)
from caat_peft.gradients import _check_pair, _linear_combination, _product_table, combine_caat
from caat_peft.training.step import micro_batch_gradients, write_grads

ROOT = Path(__file__).resolve().parent.parent


def combine_caat_host(
    g_adv: list[Tensor], g_clean: list[Tensor], gamma: float
) -> tuple[list[Tensor], dict[str, Any]]:
    """Prototype: CA-AT, global granularity, decisions on host floats (same update, same
    stats keys, same degenerate cases as ``caat_peft.gradients.combine_caat``)."""
    _check_pair(g_adv, g_clean)
    # The product's own products (float64 where φ is near ±1 or γ): float32 dots alone are off
    # by 1e-3 of the update at φ = 0.998, γ = 0.999, which would compare precision, not speed.
    table = _product_table(g_adv, g_clean, gamma=gamma)
    dot, sq_a, sq_c = table.sum(0).tolist()  # one read-back
    na, nc = math.sqrt(sq_a), math.sqrt(sq_c)
    finite = all(map(math.isfinite, (dot, na, nc)))
    cos = max(-1.0, min(1.0, dot / (na * nc))) if finite and na > 0 and nc > 0 else 0.0
    stats: dict[str, Any] = {
        "cos": cos,
        "mu": nc * na * (1.0 - cos),
        "norm_clean": nc,
        "norm_adv": na,
        "finite": finite,
        "projected": False,
        "projected_fraction": 0.0,
        "adv_share": 0.0,
        "lambda_star": None,
    }
    if not finite:
        return [torch.zeros_like(g) for g in g_clean], stats
    if gamma < 1.0 and na > 0 and nc > 0 and cos < gamma:
        sin_gamma = math.sqrt(1.0 - gamma * gamma)
        sin_phi = math.sqrt(max(0.0, 1.0 - cos * cos))
        k = na * (gamma * sin_phi - cos * sin_gamma) / (nc * sin_gamma)
        stats.update(
            projected=True, projected_fraction=1.0, adv_share=1.0 / (1.0 + k), lambda_star=k
        )
        return _linear_combination(g_adv, g_clean, 1.0, k), stats
    if nc == 0 and na > 0:  # no clean direction: follow g_a
        stats.update(adv_share=1.0, lambda_star=0.0)
        return [g.clone() for g in g_adv], stats
    return [g.clone() for g in g_clean], stats


def update_figures(
    work: Workload,
    repeats: int,
    *,
    max_repeats: int | None = None,
    target_spread: float = TARGET_SPREAD,
) -> dict[str, Any]:
    base = build_model(work)
    batch = make_batch(work)
    load_before = load1()
    probe = make_trainee(base, "caat", work.steps)
    g_c, g_a, _ = micro_batch_gradients(
        probe.model, probe.params, probe.objective, batch, clean_only=False
    )
    gamma = 0.999  # the projecting branch, whatever φ is
    ref_update, ref_stats = combine_caat(g_a, g_c, gamma)
    new_update, new_stats = combine_caat_host(g_a, g_c, gamma)
    assert ref_stats["projected"] and new_stats["projected"]
    assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-12) for u, v in zip(ref_update, new_update))

    product = make_trainee(base, "caat", work.steps)
    host = make_trainee(base, "caat", work.steps)
    loop = make_trainee(base, "caat", work.steps)
    for group in loop.optimizer.param_groups:
        group["foreach"] = False

    def update(t, combine) -> None:
        new, _ = combine(g_a, g_c, gamma)
        write_grads(t.params, new)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    least = max(repeats, 9)
    run = interleaved_until_stable(
        {
            "product": lambda: update(product, combine_caat),
            "host_coefficients": lambda: update(host, combine_caat_host),
            "adamw_loop": lambda: update(loop, combine_caat),
        },
        [("product", "host_coefficients"), ("adamw_loop", "product")],
        min_repeats=least,
        max_repeats=max(max_repeats or 2 * least, least),
        target_spread=target_spread,
        warmup=3,
        inner=50,
    )
    return {
        "caat_host_over_product_update": run.ratio("product", "host_coefficients"),
        "adamw_foreach_over_loop_update": run.ratio("adamw_loop", "product"),
        "seconds": run.medians(),
        "rounds": run.rounds,
        "load1": [load_before, load1()],
    }


OMP_WORK = Workload(image_size=64, batch=16, steps=2)


def _omp_worker(steps: int) -> dict[str, Any]:
    import time

    from benchmarks.bench_step import run_step

    trainee = make_trainee(build_model(OMP_WORK), "caat", OMP_WORK.steps)
    batch = make_batch(OMP_WORK)
    run_step(trainee, batch)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step(trainee, batch)
        seconds.append(time.perf_counter() - start)
    return {"step_seconds": median(seconds), "policy": os.environ.get("OMP_WAIT_POLICY")}


def omp_policy(repeats: int = 2, steps: int = 3) -> dict[str, Any]:
    load_before = load1()
    runs: dict[str, list[float]] = {"ACTIVE": [], "PASSIVE": []}
    for _ in range(repeats):
        for policy in runs:
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            cmd = [sys.executable, "-m", "benchmarks.bench_proposals", "--omp-worker", str(steps)]
            out = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
            )
            if out.returncode != 0:
                raise RuntimeError(f"OMP worker failed:\n{out.stderr[-2000:]}")
            runs[policy].append(json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"])
    med = {k: median(v) for k, v in runs.items()}
    return {
        "omp_passive_over_active_step": med["ACTIVE"] / med["PASSIVE"],
        "step_seconds": med,
        "workload": OMP_WORK.describe(),
        "load1": [load_before, load1()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omp-worker", type=int, required=True, help="timed steps")
    args = parser.parse_args(argv)
    print(json.dumps(_omp_worker(args.omp_worker)))


if __name__ == "__main__":
    main()
