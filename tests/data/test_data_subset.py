"""`limit` / `eval.limit`: a seeded, class-stratified subset, the same for every run."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from caat_peft.data.fixtures import make_cub_fixture
from caat_peft.data.sources import load_source
from caat_peft.data.subset import dataset_labels, limited, stratified_indices

CFG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0}


def test_cub_with_200_classes_keeps_every_class_in_proportion(tmp_path):
    root = make_cub_fixture(tmp_path, n_classes=200, per_class=6, image_size=(12, 10))
    test = load_source("cub", str(root.parent), data_config=CFG).test
    labels = dataset_labels(test)
    assert len(labels) == 600 and labels == sorted(labels)  # the official list is by class
    subset, record = limited(test, 500)
    per_class = Counter(labels[i] for i in subset.indices)
    assert len(subset) == 500 and len(per_class) == 200  # the first 500 would hold 167
    assert set(per_class.values()) <= {2, 3}  # 2.5 per class, rounded either way
    again, record_again = limited(test, 500)
    assert again.indices == subset.indices and record_again == record
    assert record["kind"] == "stratified" and record["n"] == 500 and record["of"] == 600
    other, record_other = limited(test, 500, seed=1)
    assert other.indices != subset.indices and record_other["sha256"] != record["sha256"]


@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.data())
@settings(max_examples=80, deadline=None)
def test_every_class_gets_its_share_rounded(labels, data):
    limit = data.draw(st.integers(1, len(labels)))
    chosen = stratified_indices(labels, limit, seed=data.draw(st.integers(0, 3)))
    assert len(chosen) == limit and len(set(chosen)) == limit and chosen == sorted(chosen)
    counts, picked = Counter(labels), Counter(labels[i] for i in chosen)
    for cls, n_c in counts.items():
        share = n_c * limit / len(labels)
        assert np.floor(share) <= picked[cls] <= np.ceil(share)


def test_limit_at_or_above_the_size_is_everything():
    assert stratified_indices([0, 1, 1], 3) == [0, 1, 2]
    assert stratified_indices([0, 1, 1], 10) == [0, 1, 2]
