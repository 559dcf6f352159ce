"""How sure a figure is: intervals for accuracies, paired tests between models, the bootstrap.

An accuracy measured on n images is a binomial proportion; two models evaluated on the *same*
images are paired, and their difference is decided by the images on which they disagree. The
functions here are the few the reports need, each stating its method so that a report can:

- :func:`wilson_interval`: one accuracy over images (Wilson score interval; good coverage even
  near 0 and 1, where the normal approximation collapses to a point).
- :func:`seed_interval`: the mean of a figure over training seeds (Student t over seeds).
- :func:`mcnemar_exact`: exact McNemar test of two models on the same images.
- :func:`paired_difference`: accuracy difference of two models on the same images, with a
  bootstrap interval over images (and over seeds when several runs per side are paired by seed).
- :func:`paired_contrast`: any weighted sum of such accuracies (a difference of differences),
  bootstrapped the same way; :func:`paired_difference` is its two-term case.
- :func:`bootstrap_weights`: the image resampling that fronts share across all their points.

All resampling uses a fixed generator seed: the same inputs always print the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import stats as _sp

CONFIDENCE = 0.95
#: Bootstrap replicates: the Monte-Carlo error of a 95 % percentile bound is then ~0.1 of the
#: bootstrap standard error, small next to the interval itself.
REPLICATES = 4000
BOOTSTRAP_SEED = 0
WILSON = "Wilson score interval over images"
T_OVER_SEEDS = "Student t interval over seeds"
PAIRED_BOOTSTRAP = "paired bootstrap over images"
PAIRED_BOOTSTRAP_SEEDS = "paired bootstrap over images and seeds"


def _z(confidence: float) -> float:
    return float(_sp.norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for ``successes / n``; (0, 1) when n = 0 (nothing is known)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    z = _z(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Exact at the edges: the score interval touches 0 (1) when no (every) image succeeds.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def seed_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """Student t interval for the mean of ``values`` (one per seed); None with fewer than 2."""
    k = len(values)
    if k < 2:
        return None
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1))
    half = float(_sp.t.ppf(0.5 + confidence / 2, k - 1)) * sd / math.sqrt(k)
    return (mean - half, mean + half)


def accuracy_interval(
    per_seed: Sequence[tuple[int, int]], confidence: float = CONFIDENCE
) -> dict[str, object]:
    """The interval a report prints for one accuracy: (correct, n) for each seed's run.

    One run: Wilson over its images. Several seeds: t over the seeds' accuracies (this holds
    the training randomness, which dominates the image noise once runs differ by seed).
    """
    accs = [c / n for c, n in per_seed]
    if len(per_seed) == 1:
        (c, n) = per_seed[0]
        return {"value": accs[0], "ci": list(wilson_interval(c, n, confidence)), "method": WILSON}
    ci = seed_interval(accs, confidence)
    # An accuracy lies in [0, 1]: a t interval from few seeds can reach past either end.
    clipped = [max(0.0, ci[0]), min(1.0, ci[1])] if ci else []
    return {"value": float(np.mean(accs)), "ci": clipped, "method": T_OVER_SEEDS}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: images right only for A vs right only for B.

    Under "the models are equally accurate" each disagreement goes either way with probability
    1/2, so ``only_a`` is Binomial(only_a + only_b, 1/2); the p-value doubles the smaller tail.
    """
    m = only_a + only_b
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * _sp.binom.cdf(min(only_a, only_b), m, 0.5)))


def bootstrap_weights(
    n: int, replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED, chunk: int = 500
) -> Iterator[np.ndarray]:
    """Image resamples as count weights, ``chunk`` replicates at a time (shape chunk × n).

    A resample of n images with replacement is a Multinomial(n, 1/n) count per image; a weighted
    mean with these counts is the statistic on the resample. Sharing the same weights across
    every model evaluated on the same images keeps the comparison paired.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < replicates:
        size = min(chunk, replicates - done)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        done += size


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return (float(lo), float(hi))


def bootstrap_statistic(
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_images: int,
    n_seeds: int,
    *,
    replicates: int = REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> np.ndarray:
    """``statistic(image_weights, seed_counts)`` over bootstrap replicates (one value each).

    ``image_weights`` is chunk × n_images (resampled images, the same for every model), and
    ``seed_counts`` chunk × n_seeds (how often each seed is drawn; all ones with one seed, so
    that only the images are resampled).
    """
    rng = np.random.default_rng(seed + 1)
    values: list[np.ndarray] = []
    for weights in bootstrap_weights(n_images, replicates, seed):
        if n_seeds > 1:
            counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=len(weights))
        else:
            counts = np.ones((len(weights), 1))
        values.append(np.asarray(statistic(weights, counts.astype(np.float64)), dtype=float))
    return np.concatenate(values)


def paired_contrast(
    terms: Sequence[tuple[float, Sequence[Sequence[int]] | np.ndarray]],
    *,
    replicates: int = REPLICATES,
    confidence: float = CONFIDENCE,
) -> dict[str, object]:
    """Σ wᵢ·accuracyᵢ over runs scored on the same images, with a paired bootstrap interval.

    Each term is (weight, seeds × images 0/1 array); row k of every array is the same training
    seed. ``[(1, a), (-1, b)]`` is the accuracy difference a − b; four terms make a difference
    of differences (does a gap move?). The images are resampled once for every term (they share
    the images) and, with several seeds, the seeds too (a drawn seed counts for every term):
    this is the one implementation behind :func:`paired_difference` as well.
    """
    arrays = [np.asarray(a, dtype=np.float64) for _, a in terms]
    if not arrays or any(a.ndim != 2 or a.shape != arrays[0].shape for a in arrays):
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ValueError(f"need equal (seeds × images) 0/1 arrays, one per term; got {shapes}")
    combined = sum(float(w) * a for (w, _), a in zip(terms, arrays))
    k, n = combined.shape
    if n == 0:
        raise ValueError("need equal (seeds × images) 0/1 arrays with at least one image")

    def statistic(weights: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
        per_seed = weights @ combined.T / n  # replicates × seeds
        return (per_seed * seed_counts).sum(axis=1) / k

    samples = bootstrap_statistic(statistic, n, k, replicates=replicates)
    return {
        "value": float(combined.mean()),
        "ci": list(percentile_interval(samples, confidence)),
        "confidence": confidence,
        "interval_method": PAIRED_BOOTSTRAP if k == 1 else PAIRED_BOOTSTRAP_SEEDS,
        "n_images": n,
        "n_seeds": k,
    }


def paired_difference(
    correct_a: Sequence[Sequence[int]],
    correct_b: Sequence[Sequence[int]],
    *,
    confidence: float = CONFIDENCE,
    replicates: int = REPLICATES,
) -> dict[str, object]:
    """Accuracy of A minus accuracy of B on the same images, one row per seed (paired by seed).

    Returns the difference (mean over seeds), its percentile-bootstrap interval resampling the
    images (the same resample for every seed: they share the images) and, with several seeds,
    the seeds too (:func:`paired_contrast` of the two terms); and the exact McNemar p-value
    pooled over seeds (the disagreements of every seed pair, each a fair coin under the null).
    A model against itself gives exactly [0, 0].
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"need two equal (seeds × images) 0/1 arrays; got {a.shape}, {b.shape}")
    contrast = paired_contrast([(1.0, a), (-1.0, b)], replicates=replicates, confidence=confidence)
    k = contrast["n_seeds"]
    gain = a - b  # per seed and image: +1 only A right, -1 only B right
    only_a = int((gain > 0).sum())
    only_b = int((gain < 0).sum())
    return {
        "difference": contrast["value"],
        "ci": contrast["ci"],
        "p_value": mcnemar_exact(only_a, only_b),
        "only_a": only_a,
        "only_b": only_b,
        "n_images": contrast["n_images"],
        "n_seeds": k,
        "method": contrast["interval_method"],
        "test": "exact McNemar" + (" pooled over seeds" if k > 1 else ""),
    }


def format_ci(
    value: float, ci: Sequence[float] | None, digits: int = 3, *, signed: bool = False
) -> str:
    """``0.452 [0.421, 0.483]``: a figure with its interval, as the reports print it
    (``signed``: ``+0.012 [-0.004, +0.028]``, for differences)."""
    spec = f"{'+' if signed else ''}.{digits}f"
    if not ci:
        return f"{value:{spec}}"
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"
