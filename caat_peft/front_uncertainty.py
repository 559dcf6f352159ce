"""How sure a front is: intervals on every point, and the hypervolume difference's bootstrap.

Every point of a front is scored on the same images (the same stratified ``eval.limit``), so
the natural uncertainty of "CA-AT's front is above vanilla AT's" comes from resampling those
images — one resample shared by every point of both methods, which keeps the comparison paired
— and, with several seeds, the seeds too (a drawn seed is drawn for every point). The
difference HV(CA-AT) − HV(vanilla AT) is computed on each resample; its 2.5 and 97.5 %
percentiles are the interval, and the verdict says whether it excludes 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from caat_peft.errors import UserError
from caat_peft.evaluation.samples import CLEAN, Scored, load_scored
from caat_peft.stats import (
    CONFIDENCE,
    PAIRED_BOOTSTRAP,
    PAIRED_BOOTSTRAP_SEEDS,
    REPLICATES,
    accuracy_interval,
    bootstrap_statistic,
    percentile_interval,
)

PointKey = tuple[str, float]  # (method, trade-off value)


def point_images(
    run_dir: Path, model_kind: str, eval_attack: str
) -> tuple[list[int], list[int], Scored] | None:
    """(clean, robust, their source) per image for one run as the front scores it; None for
    runs written before per-image results were kept."""
    try:
        if eval_attack == "autoattack":
            from caat_peft.front import AUTOATTACK_DIRNAME

            scored = load_scored(run_dir / AUTOATTACK_DIRNAME / "eval.json")
            robust = next(v for k, v in scored.results.items() if k[0] == "autoattack")
        else:
            scored = load_scored(run_dir / "eval_samples.json", model=model_kind)
            robust = next(v for k, v in scored.results.items() if k != CLEAN)
    except (UserError, StopIteration):
        return None
    return scored.results[CLEAN], robust, scored


def point_intervals(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``clean_acc_ci`` / ``robust_acc_ci`` of a point: Wilson for one run, t over seeds."""
    out: dict[str, Any] = {}
    for key in ("clean_acc", "robust_acc"):
        counts = [(round(e[key] * e["eval_n"]), e["eval_n"]) for e in per_seed if e.get("eval_n")]
        if len(counts) != len(per_seed):
            return {}
        interval = accuracy_interval(counts)
        out[f"{key}_ci"] = interval["ci"]
        out["interval_method"] = interval["method"]
    return out


def _same_images(images: dict[PointKey, dict[int, tuple]]) -> Scored | None:
    runs = [v[2] for per_seed in images.values() for v in per_seed.values()]
    first = runs[0]
    return first if all(first.same_images(r) is None for r in runs[1:]) else None


def hypervolume_difference(
    images: dict[PointKey, dict[int, tuple]],
    seeds: list[int],
    *,
    replicates: int = REPLICATES,
    confidence: float = CONFIDENCE,
) -> dict[str, Any] | None:
    """HV(CA-AT) − HV(vanilla AT) with its paired bootstrap interval; None when it can't be
    computed (a point without per-image results, a missing seed, or different images)."""
    from caat_peft.front import hypervolume

    methods = ("vanilla", "caat")
    keys = {m: [k for k in images if k[0] == m] for m in methods}
    complete = all(set(per_seed) == set(seeds) for per_seed in images.values())
    if not all(keys.values()) or not complete or _same_images(images) is None:
        return None
    # Per point: seeds × images arrays, seeds in the same order everywhere (paired by seed).
    arrays = {
        k: [np.asarray([images[k][s][j] for s in seeds], dtype=np.float64) for j in (0, 1)]
        for k in images
    }
    n, k_seeds = next(iter(arrays.values()))[0].shape[1], len(seeds)

    def accuracies(weights: np.ndarray, seed_counts: np.ndarray, key: PointKey) -> np.ndarray:
        # replicates × 2 (SA, AA): the resampled images, averaged over the resampled seeds
        per = [(seed_counts * (weights @ a.T)).sum(1) / (n * k_seeds) for a in arrays[key]]
        return np.stack(per, axis=1)

    def statistic(weights: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
        hv = {}
        for m in methods:
            xy = np.stack([accuracies(weights, seed_counts, key) for key in keys[m]], axis=1)
            hv[m] = np.array([hypervolume(points.tolist()) for points in xy])
        return hv["caat"] - hv["vanilla"]

    samples = bootstrap_statistic(statistic, n, k_seeds, replicates=replicates)
    ones_w, ones_s = np.ones((1, n)), np.ones((1, k_seeds))
    observed = float(statistic(ones_w, ones_s)[0])
    ci = list(percentile_interval(samples, confidence))
    return {
        "caat_minus_vanilla": observed,
        "ci": ci,
        "confidence": confidence,
        "interval_method": PAIRED_BOOTSTRAP_SEEDS if k_seeds > 1 else PAIRED_BOOTSTRAP,
        "replicates": replicates,
        "n_images": n,
        "n_seeds": k_seeds,
        "verdict": verdict(observed, ci, n, k_seeds),
    }


def verdict(diff: float, ci: list[float], n: int, k: int) -> str:
    """The front comparison in words, with the size it was measured at."""
    size = f"{n} images" + (f" × {k} seeds" if k > 1 else ", one seed")
    interval = f"{diff:+.4f}, 95 % interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    if ci[0] > 0:
        return f"CA-AT's front is above vanilla AT's (hypervolume difference {interval}; {size})."
    if ci[1] < 0:
        return f"Vanilla AT's front is above CA-AT's (hypervolume difference {interval}; {size})."
    return (
        f"The fronts are not distinguishable at this size (hypervolume difference {interval} "
        f"contains 0; {size})."
    )
