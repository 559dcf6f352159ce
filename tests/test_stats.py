"""The intervals and tests the reports print, against scipy and on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sp

from caat_peft.stats import (
    accuracy_interval,
    mcnemar_exact,
    paired_difference,
    seed_interval,
    wilson_interval,
)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (81, 263), (300, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    ref = sp.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence)
    assert lo == pytest.approx(ref.low, abs=1e-12)
    assert hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_size_the_issue_quotes():
    """RobustBench-style 1000 images at ~30 % robust accuracy: about ±2.8 points."""
    lo, hi = wilson_interval(300, 1000)
    assert (hi - lo) / 2 == pytest.approx(0.0284, abs=5e-4)


@given(st.integers(1, 2000), st.data())
@settings(max_examples=60, deadline=None)
def test_wilson_contains_the_estimate(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_seed_interval_matches_scipy_t():
    values = [0.61, 0.64, 0.58, 0.66, 0.60]
    ref = sp.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sp.sem(values))
    assert seed_interval(values) == pytest.approx(ref, abs=1e-12)
    assert seed_interval([0.5]) is None


def test_accuracy_interval_states_its_method():
    one = accuracy_interval([(30, 100)])
    assert one["method"].startswith("Wilson") and one["value"] == 0.3
    several = accuracy_interval([(30, 100), (34, 100), (32, 100)])
    assert several["method"].startswith("Student t") and several["value"] == pytest.approx(0.32)
    assert several["ci"][0] < 0.32 < several["ci"][1]


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (3, 9), (12, 12), (40, 21), (1, 0)])
def test_mcnemar_matches_scipy_binomial_test(b, c):
    ref = 1.0 if b + c == 0 else sp.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)


def test_mcnemar_hand_made_table():
    # 10 disagreements all one way: p = 2 · 0.5^10.
    assert mcnemar_exact(10, 0) == pytest.approx(2 * 0.5**10)


@given(st.lists(st.lists(st.integers(0, 1), min_size=20, max_size=20), min_size=1, max_size=3))
@settings(max_examples=30, deadline=None)
def test_paired_interval_of_a_run_against_itself_is_zero(rows):
    out = paired_difference(rows, rows, replicates=200)
    assert out["difference"] == 0.0
    assert out["ci"] == [0.0, 0.0]
    assert out["p_value"] == 1.0


def test_paired_difference_on_hand_made_data():
    rng = np.random.default_rng(3)
    n = 2000
    truth = rng.random(n) < 0.5
    a = truth.astype(int)
    b = a.copy()
    flip = rng.choice(n, 100, replace=False)  # B loses 100 images A gets right (and 0 back)
    b[flip[a[flip] == 1]] = 0
    out = paired_difference([a], [b], replicates=2000)
    diff = (a.sum() - b.sum()) / n
    assert out["difference"] == pytest.approx(diff)
    assert out["ci"][0] > 0 and out["ci"][0] <= diff <= out["ci"][1]
    assert out["only_b"] == 0 and out["p_value"] < 1e-10
    # The bootstrap standard error of a paired difference with m one-way disagreements is
    # close to sqrt(m)/n; the 95 % interval is about ±1.96 of it.
    m = out["only_a"]
    half = (out["ci"][1] - out["ci"][0]) / 2
    assert half == pytest.approx(1.96 * np.sqrt(m * (1 - m / n)) / n, rel=0.15)


def test_paired_difference_pools_seeds_for_the_test():
    a = [[1, 1, 1, 0], [1, 1, 0, 0]]
    b = [[1, 0, 1, 0], [0, 1, 0, 0]]
    out = paired_difference(a, b, replicates=200)
    assert out["only_a"] == 2 and out["only_b"] == 0 and out["n_seeds"] == 2
    assert out["difference"] == pytest.approx(0.25)
    assert out["p_value"] == pytest.approx(mcnemar_exact(2, 0))


def test_paired_difference_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        paired_difference([[1, 0]], [[1, 0, 1]])
