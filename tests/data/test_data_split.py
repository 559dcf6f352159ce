"""The validation split: disjoint, complete, stratified, seeded."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caat_peft.data.split import stratified_split
from caat_peft.errors import UserError

labels_strategy = st.lists(st.integers(0, 6), min_size=2, max_size=200)


@settings(max_examples=150, deadline=None)
@given(labels=labels_strategy, fraction=st.floats(0.01, 0.9), seed=st.integers(0, 2**31))
def test_split_is_a_partition_that_keeps_every_class_in_train(labels, fraction, seed):
    counts = Counter(labels)
    if all(n < 2 for n in counts.values()):
        with pytest.raises(UserError):
            stratified_split(labels, fraction, seed)
        return
    train, val = stratified_split(labels, fraction, seed)
    assert sorted(train + val) == list(range(len(labels)))
    assert set(train).isdisjoint(val) and val
    assert {labels[i] for i in train} == set(counts)  # no class disappears from training
    capacity = sum(n - 1 for n in counts.values())
    assert len(val) == min(max(1, round(len(labels) * fraction)), capacity)
    assert stratified_split(labels, fraction, seed) == (train, val)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 40), min_size=1, max_size=8),
    fraction=st.floats(0.05, 0.5),
    seed=st.integers(0, 1000),
)
def test_each_class_gives_its_share_within_one(sizes, fraction, seed):
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    _, val = stratified_split(labels, fraction, seed)
    got = Counter(labels[i] for i in val)
    share = len(val) / len(labels)
    for c, n in enumerate(sizes):
        assert abs(got[c] - n * share) < 1 + 1e-9


def test_seed_changes_the_draw_and_order_of_classes_does_not_matter():
    labels = [i % 5 for i in range(100)]
    _, val0 = stratified_split(labels, 0.2, seed=0)
    _, val1 = stratified_split(labels, 0.2, seed=1)
    assert val0 != val1
    assert Counter(labels[i] for i in val0) == {c: 4 for c in range(5)}


def test_zero_fraction_keeps_everything_in_train():
    assert stratified_split([0, 1, 1], 0.0, seed=3) == ([0, 1, 2], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_bad_fraction_is_a_user_error(fraction):
    with pytest.raises(UserError, match="val_fraction"):
        stratified_split([0, 1, 0, 1], fraction, seed=0)


def test_too_small_train_set_is_a_user_error():
    with pytest.raises(UserError, match="validation"):
        stratified_split([0], 0.5, seed=0)
