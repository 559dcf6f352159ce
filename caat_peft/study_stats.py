"""The statistics behind ``caat-peft study``'s verdicts, as pure functions on plain arrays.

Two kinds of evidence, each with the uncertainty of the way it was measured:

- **Accuracies** (claims 1 and 3): every run is scored on the same images, and runs of a grid
  share training seeds. A contrast Σ wᵢ·accᵢ of several runs (a difference, a difference of
  differences) is resampled over the images — one draw shared by every run, which keeps it
  paired — and over the seeds: :func:`paired_contrast` (from :mod:`caat_peft.stats`, where
  ``paired_difference`` is its two-term case).
- **Gradient conflict** μ (claim 2): a run's μ is its mean over the logged steps. With k ≥ 2
  seeds the seeds are the replicates: the exponent b of μ ∝ εᵇ is fitted per seed (the slope of
  log μ on log ε, :func:`seed_exponent`) and a Student t interval is taken over the k slopes;
  CA-AT's μ over vanilla AT's works the same way on per-seed log ratios (:func:`seed_ratio`).
  A bootstrap over two or three seeds would see at most a handful of distinct resamples and give
  intervals far too narrow; the t interval's k − 1 degrees of freedom price that in. With one
  seed there are no replicates of the training randomness at all, and only the step-to-step
  variation inside the run can be resampled: :class:`ConflictBootstrap` draws contiguous blocks
  of steps (the block means keep the autocorrelation inside a block) — an interval the report
  flags as one that does not hold the training randomness.

The rank test :func:`page_trend` (Page's L, seeds as blocks, ε as the ordered treatments)
complements the exponent: it assumes no functional form and is exact for the small grids a
study has (it agrees with ``scipy.stats.page_trend_test(method="exact")``, which needs ≥ 2
seeds and ≥ 3 ε).

Verdicts are words chosen by where an interval lies (:func:`interval_verdict`): an interval
that contains the null value is always "not distinguishable", whatever the sign of the estimate.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from caat_peft.stats import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    REPLICATES,
    paired_contrast,
    percentile_interval,
    seed_interval,
)

__all__ = [
    "ConflictBootstrap",
    "block_means",
    "interval_verdict",
    "page_trend",
    "paired_contrast",
    "seed_exponent",
    "seed_log_mean",
    "seed_ratio",
]

#: Blocks of contiguous steps per run for the within-run resampling: enough for a percentile
#: interval, long enough blocks (a run of 300 logged steps: 15 steps each) to hold most of the
#: step-to-step autocorrelation of μ.
BLOCKS = 20
CONFLICT_BOOTSTRAP = "bootstrap over seeds and blocks of training steps"
CONFLICT_BOOTSTRAP_ONE_SEED = "bootstrap over blocks of training steps (one seed)"
T_SLOPES = "Student t over seeds of the per-seed log–log slopes"
T_LOG_RATIOS = "Student t over seeds of the per-seed log ratios"
T_LOG_MEANS = "Student t over seeds of log μ (geometric mean)"
#: Exact enumeration of Page's L up to this many within-seed permutations; Monte Carlo above.
PAGE_EXACT_LIMIT = 50_000
PAGE_DRAWS = 20_000


def interval_verdict(
    ci: Sequence[float] | None, *, above: str, below: str, neither: str, null: float = 0.0
) -> str:
    """``above`` when the whole interval lies above ``null``, ``below`` when below it, else
    ``neither`` (which should say "not distinguishable"); no interval is no verdict."""
    if not ci:
        return "no interval (too few runs)"
    if ci[0] > null:
        return above
    if ci[1] < null:
        return below
    return neither


# --------------------------------------------------------------------------------------------
# Gradient conflict with k ≥ 2 seeds: per-seed fits, Student t over seeds


def log_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y on log x (NaN when some y is not positive)."""
    yv = np.asarray(y, dtype=float)
    if not np.all(yv > 0):
        return float("nan")
    return _slope(np.log(np.asarray(x, dtype=float)), np.log(yv))


def seed_exponent(
    eps: Sequence[float], per_seed: Sequence[Sequence[float]], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """b in μ ∝ εᵇ from k ≥ 2 seeds: the log–log slope of each seed's μ over ε, then the mean
    of the k slopes with its Student t interval (the seeds are the independent replicates).

    ``per_seed[s][j]`` is seed s's μ at ``eps[j]``. Budgets where some seed's μ is not positive
    (no logarithm) or ε ≤ 0 are left out; None with fewer than two budgets or two seeds left.
    """
    rows = np.asarray(per_seed, dtype=float)
    x = np.asarray(eps, dtype=float)
    if rows.ndim != 2 or rows.shape[0] < 2 or rows.shape[1] != x.size:
        return None
    keep = (x > 0) & np.all(rows > 0, axis=0)
    if int(keep.sum()) < 2:
        return None
    slopes = [log_slope(x[keep], row[keep]) for row in rows]
    ci = seed_interval(slopes, confidence)
    return {
        "exponent": float(np.mean(slopes)),
        "ci": list(ci) if ci else None,
        "per_seed": slopes,
        "eps": x[keep].tolist(),
        "n_seeds": len(slopes),
        "interval_method": T_SLOPES,
    }


def seed_ratio(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """The ratio a / b of two settings' μ, paired by seed: exp of the mean per-seed log ratio
    (a geometric-mean ratio) with exp of its Student t interval; None unless k ≥ 2 and all > 0."""
    av, bv = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if av.shape != bv.shape or av.size < 2 or np.any(av <= 0) or np.any(bv <= 0):
        return None
    logs = np.log(av) - np.log(bv)
    ci = seed_interval(logs.tolist(), confidence)
    return {
        "ratio": float(np.exp(logs.mean())),
        "ci": [float(np.exp(ci[0])), float(np.exp(ci[1]))] if ci else None,
        "per_seed": np.exp(logs).tolist(),
        "n_seeds": int(av.size),
        "interval_method": T_LOG_RATIOS,
    }


def seed_log_mean(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, list[float] | None]:
    """(geometric mean, its interval) of positive per-seed values: a Student t interval on the
    logarithms, exponentiated; μ spans orders of magnitude and is fitted on log scale."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or np.any(v <= 0):
        return (float(np.mean(v)) if v.size else float("nan")), None
    ci = seed_interval(np.log(v).tolist(), confidence)
    return float(np.exp(np.log(v).mean())), ([float(np.exp(c)) for c in ci] if ci else None)


# --------------------------------------------------------------------------------------------
# Gradient conflict with one seed: per-run block means, the block bootstrap; the trend test


def block_means(values: Sequence[float], blocks: int = BLOCKS) -> tuple[list[float], list[int]]:
    """Contiguous blocks of a run's per-step values: (block means, block sizes).

    Non-finite values are dropped first. min(blocks, number of values) blocks of near-equal
    size; the size-weighted mean of the block means is exactly the run's mean.
    """
    clean = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if clean.size == 0:
        return [], []
    parts = np.array_split(clean, min(blocks, clean.size))
    return [float(p.mean()) for p in parts], [int(p.size) for p in parts]


RunBlocks = tuple[Sequence[float], Sequence[int]]  # (block means, block sizes) of one run


def _stable_seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "little")


class ConflictBootstrap:
    """Replicates of per-run mean μ, resampled over seeds and blocks of steps.

    The study uses it with one seed only (blocks of steps resampled; its intervals miss the
    training randomness): with a few seeds, resampling the seeds gives intervals far too narrow
    (see :func:`seed_exponent`). The seed draw (replicates × seeds counts) is made once and
    shared by every setting and ε, so comparisons between them stay paired by seed. Each run's
    block draw comes from a generator keyed by the run's name, so results do not depend on the
    order of the calls.
    """

    def __init__(
        self, seeds: Sequence[int], *, replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED
    ) -> None:
        self.seeds = list(seeds)
        self.replicates = replicates
        self.seed = seed
        k = len(self.seeds)
        if k == 0:
            raise ValueError("no seeds")
        rng = np.random.default_rng(seed)
        if k > 1:
            counts = rng.multinomial(k, np.full(k, 1.0 / k), size=replicates)
        else:
            counts = np.ones((replicates, 1))
        self.seed_counts = counts.astype(np.float64)
        self.interval_method = CONFLICT_BOOTSTRAP if k > 1 else CONFLICT_BOOTSTRAP_ONE_SEED

    def run_draws(self, key: str, run: RunBlocks) -> np.ndarray:
        """Replicates of one run's mean over its steps (blocks resampled with replacement)."""
        means, sizes = np.asarray(run[0], dtype=float), np.asarray(run[1], dtype=float)
        b = len(means)
        rng = np.random.default_rng(_stable_seed(key, self.seed))
        weights = rng.multinomial(b, np.full(b, 1.0 / b), size=self.replicates).astype(float)
        return (weights @ (sizes * means)) / (weights @ sizes)

    def cell(self, key: str, runs: Mapping[int, RunBlocks]) -> tuple[float, np.ndarray]:
        """(observed, replicates) of the mean over seeds of the runs' mean μ, for one cell
        (a setting at one ε); ``runs`` maps every seed of this bootstrap to its blocks."""
        missing = [s for s in self.seeds if s not in runs]
        if missing:
            raise ValueError(f"{key}: no run for seeds {missing}")
        observed = float(np.mean([_weighted_mean(runs[s]) for s in self.seeds]))
        draws = np.stack([self.run_draws(f"{key}|{s}", runs[s]) for s in self.seeds], axis=1)
        return observed, (draws * self.seed_counts).sum(axis=1) / len(self.seeds)

    def exponent(self, cells: Mapping[float, tuple[float, np.ndarray]]) -> dict[str, Any] | None:
        """b in μ ∝ εᵇ: the least-squares slope of log(mean μ) on log ε over the cells (ε > 0,
        mean μ > 0), with its percentile interval; None with fewer than two such ε."""
        usable = sorted(e for e, (obs, _) in cells.items() if e > 0 and obs > 0)
        if len(usable) < 2:
            return None
        x = np.log(np.asarray(usable))
        draws = np.stack([cells[e][1] for e in usable], axis=1)  # replicates × ε
        with np.errstate(divide="ignore", invalid="ignore"):
            y_draws = np.log(draws)
        observed = _slope(x, np.log([cells[e][0] for e in usable]))
        slopes = np.array([_slope(x, row) for row in y_draws])
        slopes = slopes[np.isfinite(slopes)]  # a replicate of zeros has no logarithm
        ci = list(percentile_interval(slopes)) if slopes.size else None
        return {
            "exponent": observed,
            "ci": ci,
            "eps": usable,
            "n_seeds": len(self.seeds),
            "interval_method": self.interval_method,
        }

    def ratio(
        self, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]
    ) -> dict[str, Any] | None:
        """mean μ of cell a / mean μ of cell b, with its percentile interval (paired by seed)."""
        if a[0] <= 0 or b[0] <= 0:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            draws = a[1] / b[1]
        draws = draws[np.isfinite(draws)]
        ci = list(percentile_interval(draws)) if draws.size else None
        return {
            "ratio": a[0] / b[0],
            "ci": ci,
            "n_seeds": len(self.seeds),
            "interval_method": self.interval_method,
        }


def _weighted_mean(run: RunBlocks) -> float:
    means, sizes = np.asarray(run[0], dtype=float), np.asarray(run[1], dtype=float)
    return float((means * sizes).sum() / sizes.sum())


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, dtype=float)
    if not np.all(np.isfinite(y)):
        return float("nan")
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def page_trend(data: Sequence[Sequence[float]], *, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Page's L test of an increasing trend: rows are seeds (blocks), columns ε ascending.

    L = Σ over seeds of Σₖ k·rank(row)ₖ; under "no trend" every order within a seed is equally
    likely, so the one-sided p-value is the share of within-seed permutations with an L at least
    as large: enumerated exactly up to PAGE_EXACT_LIMIT permutations, else PAGE_DRAWS Monte
    Carlo draws (seeded). Ties get average ranks. Works from one seed and two ε (where the
    smallest possible p is 1/2: such a grid cannot show a trend by ranks alone).
    """
    from scipy.stats import rankdata

    ranks = np.asarray([rankdata(row) for row in data], dtype=float)
    s, k = ranks.shape
    if k < 2 or s < 1:
        raise ValueError("need at least one seed and two ε")
    position = np.arange(1, k + 1, dtype=float)
    observed = float((ranks * position).sum())
    n_perm = math.factorial(k) ** s
    if n_perm <= PAGE_EXACT_LIMIT:
        per_seed = [
            sorted(float(np.dot(position, p)) for p in itertools.permutations(r)) for r in ranks
        ]
        totals = np.zeros(1)
        for values in per_seed:  # the distribution of the sum, seed by seed
            totals = (totals[:, None] + np.asarray(values)[None, :]).ravel()
        p_value, method = float(np.mean(totals >= observed - 1e-9)), "exact"
    else:
        rng = np.random.default_rng(seed)
        draws = np.stack([rng.permuted(np.tile(r, (PAGE_DRAWS, 1)), axis=1) for r in ranks])
        totals = (draws * position).sum(axis=2).sum(axis=0)
        p_value = float((1 + np.sum(totals >= observed - 1e-9)) / (PAGE_DRAWS + 1))
        method = f"Monte Carlo, {PAGE_DRAWS} permutations"
    return {"L": observed, "p_value": p_value, "method": method, "seeds": s, "levels": k}
