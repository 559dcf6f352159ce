"""Shared pieces of the benchmarks: the model / batch under test, interleaved timing, tables.

Every figure is a ratio of two things measured in the same process, in the same run, interleaved
(A B A B …) after a warm-up, and reduced to medians, so that a machine shared with other jobs
moves both sides alike. ``interleaved_until_stable`` goes on with rounds until the per-round ratio
stops moving (spread ≤ ``TARGET_SPREAD``) or gives up and says so (``Ratio.stable`` false): such
a figure is reported as noise, never judged against a goal. The load average is recorded around
each measurement.
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


def _round(
    fns: dict[str, Callable[[], Any]],
    inner: int,
    clock: Callable[[], float],
    sync: Callable[[], None] | None,
) -> dict[str, float]:
    """One A B … round: seconds per call of each function (``sync`` waits for queued work, e.g.
    ``torch.cuda.synchronize``, so that a GPU's asynchronous launches are not timed as free)."""
    out: dict[str, float] = {}
    for name, fn in fns.items():
        if sync is not None:
            sync()
        start = clock()
        for _ in range(inner):
            fn()
        if sync is not None:
            sync()
        out[name] = (clock() - start) / inner
    return out


def _warm_up(fns: dict[str, Callable[[], Any]], warmup: int, inner: int) -> None:
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(inner):
                fn()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    inner: int = 1,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured A B A B … after ``warmup`` rounds.

    ``inner`` calls are timed together (for functions too short to time one by one).
    """
    _warm_up(fns, warmup, inner)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, seconds in _round(fns, inner, clock, sync).items():
            times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative half-range of the middle of the samples (robust noise indicator)."""
    if len(values) < 3:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(values))


# A figure whose per-round ratios spread (relative half inter-quartile range) by more than this
# is noise, not a result: it is printed as "noisy" and never judged against its goal.
TARGET_SPREAD = 0.03
# Fewer rounds than this cannot show their own noise (``spread`` is 0 below 3 samples).
MIN_ROUNDS_FOR_SPREAD = 3


@dataclass(frozen=True)
class Ratio:
    """A figure measured as the median of per-round ratios, with how far those rounds spread."""

    value: float
    spread: float
    rounds: int
    stable: bool

    def __float__(self) -> float:
        return float(self.value)

    def scaled(self, factor: float) -> Ratio:
        """The same measurement times a constant (e.g. FLOPs over matmul FLOPs)."""
        return Ratio(self.value * factor, self.spread, self.rounds, self.stable)

    def text(self) -> str:
        if not self.stable and self.rounds < MIN_ROUNDS_FOR_SPREAD:
            return f"noisy ({self.rounds} rounds: too few to tell)"
        if not self.stable:
            return f"noisy (spread {100 * self.spread:.0f} %)"
        return f"{self.value:.3g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "value": round(self.value, 4),
            "spread": round(self.spread, 4),
            "rounds": self.rounds,
            "stable": self.stable,
        }


def make_ratio(ratios: list[float], target_spread: float = TARGET_SPREAD) -> Ratio:
    """Median and spread of per-round ratios; stable when enough rounds spread ≤ target."""
    s = spread(ratios)
    stable = len(ratios) >= MIN_ROUNDS_FOR_SPREAD and s <= target_spread
    return Ratio(median(ratios), s, len(ratios), stable)


Pair = tuple[str, str]


@dataclass
class StableRun:
    """What ``interleaved_until_stable`` measured: times per function, per round."""

    times: dict[str, list[float]]
    watched: list[Pair]
    target_spread: float

    @property
    def rounds(self) -> int:
        return len(next(iter(self.times.values())))

    def ratios(self, a: str, b: str) -> list[float]:
        """Per-round a / b (both sides from the same round, so a load change moves both)."""
        return [ta / tb for ta, tb in zip(self.times[a], self.times[b])]

    def ratio(self, a: str | None = None, b: str | None = None) -> Ratio:
        """The figure a / b (default: the first watched pair), with its own stability."""
        if a is None or b is None:
            a, b = self.watched[0]
        return make_ratio(self.ratios(a, b), self.target_spread)

    @property
    def value(self) -> float:
        return self.ratio().value

    @property
    def spread(self) -> float:
        return self.ratio().spread

    @property
    def stable(self) -> bool:
        return all(self.ratio(a, b).stable for a, b in self.watched)

    def medians(self) -> dict[str, float]:
        return {k: median(v) for k, v in self.times.items()}


def _pairs(ratio: Pair | list[Pair] | tuple[Pair, ...]) -> list[Pair]:
    if len(ratio) == 2 and all(isinstance(x, str) for x in ratio):
        return [ratio]  # type: ignore[list-item]
    return list(ratio)  # type: ignore[arg-type]


def interleaved_until_stable(
    fns: dict[str, Callable[[], Any]],
    ratio: Pair | list[Pair] | tuple[Pair, ...],
    *,
    min_repeats: int = 5,
    max_repeats: int = 15,
    target_spread: float = TARGET_SPREAD,
    warmup: int = 1,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> StableRun:
    """Interleaved rounds (A B A B …) until every watched ratio a / b is stable.

    ``ratio`` is one pair of names ``("a", "b")`` or a list of pairs. After ``min_repeats``
    rounds, stops as soon as the spread of each watched pair's per-round ratios is at most
    ``target_spread``; otherwise goes on to ``max_repeats`` rounds, and the result says
    ``stable=False``: the caller must report it as noise, not as a figure. ``clock`` and
    ``sync`` are injectable (tests use a fake clock; GPU timings pass
    ``torch.cuda.synchronize``).
    """
    watched = _pairs(ratio)
    for a, b in watched:
        if a not in fns or b not in fns:
            raise ValueError(f"ratio {a}/{b}: both must be among {sorted(fns)}")
    max_repeats = max(max_repeats, min_repeats)
    _warm_up(fns, warmup, inner)
    run = StableRun({name: [] for name in fns}, watched, target_spread)
    for done in range(1, max_repeats + 1):
        for name, seconds in _round(fns, inner, clock, sync).items():
            run.times[name].append(seconds)
        if done >= min_repeats and run.stable:
            break
    return run


def loadavg() -> dict[str, Any]:
    """The 1-, 5- and 15-minute load averages (the machine's business while we measured)."""
    one, five, fifteen = os.getloadavg()
    return {"load1": one, "loadavg": [one, five, fifteen]}


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
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, Ratio):
            return v.text()
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    """``json.dumps(default=...)``: a Ratio keeps its spread and rounds, numbers become floats."""
    if isinstance(obj, Ratio):
        return obj.to_json()
    return float(obj)
