"""What exact products cost the combiner: ``python -m benchmarks.bench_numerics``.

The combiner takes ⟨g_a, g_c⟩, ‖g_a‖², ‖g_c‖² in float32 and recomputes them with float64
accumulation where φ is near ±1 or γ (docs/method.md "Numerics"). The baseline is the same
combiner with float32 products only (what it did before issue 16), patched in here. Two cases:
``random`` gradients (φ ≈ 0: nothing is recomputed, the common case) and ``opposed`` ones
(g_a = −g_c + noise, φ ≈ −1: everything is, the worst case). Both are timed interleaved on
"combine + write into .grad + AdamW step" (the update benchmark of docs/benchmarks.md), and on
the combine alone, for two gradient lists: ViT-Ti + LoRA r 8 on qkv/fc1/fc2 with a 200-class
head (76 tensors, 0.2 M values), and full fine-tuning of ViT-S (152 tensors, 22 M values).
Rounds go on (up to twice the minimum) until the per-round ratio spreads by at most 5 %; a ratio
that does not settle is printed as noisy, not as a figure.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.bench_common import interleaved_until_stable, load1
from caat_peft import gradients
from caat_peft.gradients import combine_caat

NOISY = 0.05


def lora_vit_tiny() -> list[tuple[int, ...]]:
    per_block = [(8, 192), (576, 8), (8, 192), (768, 8), (8, 768), (192, 8)]
    return per_block * 12 + [(200, 192), (200,)]


def full_vit_small() -> list[tuple[int, ...]]:
    d = 384
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,)]
    block += [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(d, 3, 16, 16), (d,), (1, 197, d), (1, 1, d)] + block * 12 + [(d,), (d,), (200, d)]


def _float32_table(g_a: list[torch.Tensor], g_c: list[torch.Tensor], **_: Any) -> torch.Tensor:
    """The combiner's old products: three float32 dots per tensor, cast afterwards."""
    rows = []
    for a, c in zip(g_a, g_c):
        a, c = a.reshape(-1), c.reshape(-1)
        rows.append(torch.stack([torch.dot(a, c), torch.dot(a, a), torch.dot(c, c)]))
    return torch.stack(rows).double()


@contextmanager
def float32_products():
    saved = gradients._product_table
    gradients._product_table = _float32_table
    try:
        yield
    finally:
        gradients._product_table = saved


def _timed(
    shapes: list[tuple[int, ...]], repeats: int, with_step: bool, opposed: bool = False
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    g_c = [torch.randn(s, generator=gen) for s in shapes]
    g_a = [torch.randn(s, generator=gen) for s in shapes]
    if opposed:  # φ ≈ −1: the projection's worst case for precision
        g_a = [0.01 * a - c for a, c in zip(g_a, g_c)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def update() -> None:
        new, _ = combine_caat(g_a, g_c, 0.999)  # the projecting branch
        if with_step:
            for p, g in zip(params, new):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def baseline() -> None:
        with float32_products():
            update()

    fns: dict[str, Callable[[], None]] = {"exact": update, "float32": baseline}
    inner = 20 if sum(torch.Size(s).numel() for s in shapes) < 10**6 else 2
    run = interleaved_until_stable(
        fns,
        ("exact", "float32"),
        min_repeats=repeats,
        max_repeats=2 * repeats,  # more rounds where the first ones did not settle
        target_spread=NOISY,
        warmup=2,
        inner=inner,
    )
    figure, med = run.ratio(), run.medians()
    return {
        "exact_s": med["exact"],
        "float32_s": med["float32"],
        "ratio": figure.value,
        "spread": figure.spread,
        "rounds": figure.rounds,
        "stable": figure.stable,
    }


def run(repeats: int = 11) -> dict[str, Any]:
    load_before = load1()
    out: dict[str, Any] = {}
    for name, shapes in (("lora_vit_tiny", lora_vit_tiny()), ("full_vit_small", full_vit_small())):
        for what, with_step in (("update", True), ("combine", False)):
            for case in ("random", "opposed"):
                out[f"{name}_{what}_{case}"] = _timed(shapes, repeats, with_step, case == "opposed")
    out["load1"] = [load_before, load1()]
    out["cpu"] = platform.processor() or platform.machine()
    return out


def main() -> None:
    result = run()
    print("| gradient list, timed, gradients | exact s | float32 s | exact / float32 |")
    print("|---|---:|---:|---:|")
    for key, r in result.items():
        if not isinstance(r, dict):
            continue
        ratio = f"{r['ratio']:.3f}" if r["stable"] else f"noisy (spread {r['spread']:.0%})"
        print(f"| {key} | {r['exact_s']:.5f} | {r['float32_s']:.5f} | {ratio} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
