"""Shared pieces of the benchmarks: the model / batch under test, interleaved timing, tables.

Every figure is a ratio of two things measured in the same process, in the same run, interleaved
(A B A B …) after a warm-up, and reduced to medians, so that a machine shared with other jobs
moves both sides alike. The load average is recorded around each measurement.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from caat_peft.attacks import sample_random_start
from caat_peft.config import AttackConfig, ModelConfig, PeftConfig, TrainConfig
from caat_peft.gradients import make_combiner
from caat_peft.models import build_classifier, trainable_parameters
from caat_peft.objectives import build_objective
from caat_peft.training.optim import make_optimizer
from caat_peft.training.step import MicroBatch

EPS = 8 / 255
ALPHA = 2 / 255
NUM_CLASSES = 10
GAMMA = 0.8  # the paper's default threshold
LAM = 0.5  # the paper's default vanilla trade-off


@dataclass(frozen=True)
class Workload:
    """What one figure is measured on: ViT-Ti (timm) + LoRA r = 8, batch, PGD steps."""

    image_size: int
    batch: int
    steps: int = 10
    model: str = "vit_tiny_patch16_224"

    def describe(self) -> str:
        return (
            f"{self.model} at {self.image_size} px, LoRA r=8 on qkv/fc1/fc2 + head, "
            f"batch {self.batch}, PGD-{self.steps} L∞ ε=8/255"
        )


QUICK = Workload(image_size=112, batch=16)
FULL = Workload(image_size=224, batch=16)


def load1() -> float:
    return os.getloadavg()[0]


def build_model(work: Workload, seed: int = 0) -> nn.Module:
    """Random-weight ViT with LoRA through the product's own ``build_classifier`` (no network)."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(name=work.model, kwargs={"img_size": work.image_size})
    peft_cfg = PeftConfig(method="lora", r=8, alpha=16)
    return build_classifier(model_cfg, peft_cfg, NUM_CLASSES)


@dataclass
class Trainee:
    """A model with its trainable parameters, optimiser, objective and combiner."""

    model: nn.Module
    named: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    objective: Any
    combiner: Callable
    params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for _, p in self.named]

    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def make_trainee(model: nn.Module, kind: str, steps: int, gamma: float = GAMMA) -> Trainee:
    """A copy of ``model`` set up for ``kind`` (``vanilla`` λ = 0.5 or ``caat`` γ)."""
    model = copy.deepcopy(model)
    named = trainable_parameters(model)
    optimizer = make_optimizer(named, TrainConfig(lr=1e-3))
    objective = build_objective("pgd-ce", AttackConfig(eps=EPS, alpha=ALPHA, steps=steps))
    combiner = make_combiner(kind, lam=LAM, gamma=gamma)
    return Trainee(model, named, optimizer, objective, combiner)


def make_batch(work: Workload, seed: int = 1) -> MicroBatch:
    """Images in [0, 1], labels and the attack's random start, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (work.batch, 3, work.image_size, work.image_size)
    x = torch.rand(shape, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (work.batch,), generator=gen)
    delta = sample_random_start(shape, EPS, "linf", generator=gen)
    return MicroBatch(x, y, delta)


def no_reduce(g_c: list[Tensor], g_a: list[Tensor], scalars: Tensor):
    return g_c, g_a, scalars


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured A B A B … after ``warmup`` rounds.

    ``inner`` calls are timed together (for functions too short to time one by one).
    """
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(inner):
                fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative half-range of the middle of the samples (robust noise indicator)."""
    if len(values) < 3:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(values))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.is_available(),
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
