"""Training-attack throughput: ``caat_peft.attacks.pgd`` against ``torchattacks.PGD``.

The attack is most of the cost of every adversarial training step, so ours must be no slower than
the reference implementation. Both run PGD-``steps`` L∞ (ε = 8/255, step 2/255, uniform random
start) on the same model (timm ViT-Ti/16 with LoRA r = 8 on qkv / fc1 / fc2 and a new head,
random weights, eval mode), the same batch, in float32. A third row, "ours, θ frozen", runs our
PGD with ``requires_grad`` switched off on every parameter for the attack, to measure whether
trainable parameters cost anything during an input-gradient-only attack.

Timing: one warm-up call each, then ``--repeats`` rounds in which every variant runs once, in an
order that alternates between rounds (A B C, C B A, …) so that a machine shared with other jobs
moves all of them alike; figures are medians. The ratio ``attack_over_torchattacks`` is
torchattacks' median time over ours (> 1: ours is faster).

    python benchmarks/attack_throughput.py [--batch 16] [--image-size 224] [--steps 10]
                                           [--repeats 5] [--threads N]

Prints a Markdown table, then one JSON line for machines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torchattacks
from torch import nn

from caat_peft.attacks import pgd, sample_random_start
from caat_peft.config import ModelConfig, PeftConfig
from caat_peft.models import build_classifier

EPS = 8 / 255
ALPHA = 2 / 255
NUM_CLASSES = 200  # CUB-200


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """``requires_grad_(False)`` on every trainable parameter for the block, then restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: a warm-up each, then alternating-order rounds."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    model_cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": args.image_size})
    model = build_classifier(model_cfg, PeftConfig(method="lora", r=8), NUM_CLASSES)
    model = model.to(device).eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.image_size, args.image_size)
    x = torch.rand(shape, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)
    start = sample_random_start(shape, EPS, "linf", generator=gen).to(device)
    reference = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=args.steps)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=args.steps, init_delta=start)
        sync()

    def ours_frozen() -> None:
        with frozen(model):
            ours()

    def theirs() -> None:
        reference(x, y)
        sync()

    load_before = os.getloadavg()[0]
    times = interleaved(
        {"ours": ours, "torchattacks": theirs, "ours, θ frozen": ours_frozen}, args.repeats
    )
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in times.items()}

    workload = (
        f"PGD-{args.steps} L∞, ViT-Ti/16 + LoRA r=8 at {args.image_size} px, batch {args.batch}, "
        f"float32, {device.type}, {torch.get_num_threads()} threads"
    )
    print(f"\n{workload}; {args.repeats} interleaved repeats, medians\n")
    print("| attack | median s / batch | images / s | min – max s | vs torchattacks |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        print(
            f"| {name} | {med[name]:.3f} | {args.batch / med[name]:.2f} | "
            f"{min(values):.3f} – {max(values):.3f} | {med['torchattacks'] / med[name]:.3f} |"
        )
    result = {
        "benchmark": "attack_throughput",
        "attack_over_torchattacks": round(med["torchattacks"] / med["ours"], 4),
        "frozen_over_ours": round(med["ours"] / med["ours, θ frozen"], 4),
        "images_per_second": {k: round(args.batch / v, 3) for k, v in med.items()},
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "workload": workload,
        "trainable_parameters": trainable,
        "load1": [round(load_before, 2), round(load_after, 2)],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
