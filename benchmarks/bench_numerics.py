"""What the float64 dots and norms of the combiner cost: ``python -m benchmarks.bench_numerics``.

The combiner accumulates ⟨g_a, g_c⟩, ‖g_a‖², ‖g_c‖² in float64, tensor by tensor (so that φ is
exact near ±1, docs/method.md "Numerics"). The baseline is the same combiner with those three
reductions in float32 (what it did before), patched in here. Both are timed interleaved on
"combine + write into .grad + AdamW step" (the update benchmark of docs/benchmarks.md), and on
the combine alone, for two gradient lists: ViT-Ti + LoRA r 8 on qkv/fc1/fc2 with a 200-class
head (76 tensors, 0.2 M values), and full fine-tuning of ViT-S (152 tensors, 22 M values).
A ratio whose repeats spread by more than 5 % is printed as noisy, not as a figure.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.bench_common import interleaved, load1, median, spread
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


def _float32_products(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    a, c = a.reshape(-1), c.reshape(-1)
    return torch.stack([torch.dot(a, c), torch.dot(a, a), torch.dot(c, c)]).double()


@contextmanager
def float32_products():
    saved = gradients._dot_and_squares
    gradients._dot_and_squares = _float32_products
    try:
        yield
    finally:
        gradients._dot_and_squares = saved


def _timed(shapes: list[tuple[int, ...]], repeats: int, with_step: bool) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    g_a = [torch.randn(s, generator=gen) for s in shapes]
    g_c = [torch.randn(s, generator=gen) for s in shapes]
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

    fns: dict[str, Callable[[], None]] = {"float64": update, "float32": baseline}
    inner = 20 if sum(torch.Size(s).numel() for s in shapes) < 10**6 else 2
    times = interleaved(fns, repeats=repeats, warmup=2, inner=inner)
    ratios = [a / b for a, b in zip(times["float64"], times["float32"])]
    return {
        "float64_s": median(times["float64"]),
        "float32_s": median(times["float32"]),
        "ratio": median(ratios),
        "spread": spread(ratios),
    }


def run(repeats: int = 11) -> dict[str, Any]:
    load_before = load1()
    out: dict[str, Any] = {}
    for name, shapes in (("lora_vit_tiny", lora_vit_tiny()), ("full_vit_small", full_vit_small())):
        for what, with_step in (("update", True), ("combine", False)):
            out[f"{name}_{what}"] = _timed(shapes, repeats, with_step)
    out["load1"] = [load_before, load1()]
    out["cpu"] = platform.processor() or platform.machine()
    return out


def main() -> None:
    result = run()
    print("| gradient list, timed | float64 s | float32 s | float64 / float32 |")
    print("|---|---:|---:|---:|")
    for key, r in result.items():
        if not isinstance(r, dict):
            continue
        ratio = f"{r['ratio']:.3f}" if r["spread"] <= NOISY else f"noisy (spread {r['spread']:.0%})"
        print(f"| {key} | {r['float64_s']:.5f} | {r['float32_s']:.5f} | {ratio} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
