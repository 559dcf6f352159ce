"""tools/stability.py: the plan, the figure ranges and the table (the runs themselves take an
hour; `make stability`)."""

from __future__ import annotations

import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("stability", ROOT / "tools" / "stability.py")
stability = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stability)


def _run(cap, threads, seed, outcome, clean):
    return {
        "capability": cap,
        "threads": threads,
        "seed": seed,
        "returncode": 0 if outcome == "pass" else 1,
        "tests": {"tests.test_x::test_a": outcome},
        "figures": [{"test": "a", "seed": seed, "clean_acc": clean, "sanity": "PASS"}],
    }


def test_seed_lists():
    assert stability.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert stability.parse_seeds("0,2") == [0, 2] and stability.parse_seeds("") == []


def test_ranges_and_table_show_every_variation_and_the_failures():
    runs = [_run("avx2", 1, 0, "pass", 0.9), _run("default", 2, 3, "FAIL", 0.4)]
    assert stability.figure_ranges(runs) == {"a": {"clean_acc": [0.4, 0.9]}}
    table = stability.markdown(runs)
    assert "| avx2 | 1 | 0 | 1 | - |" in table
    assert "| default | 2 | 3 | 0 | test_a |" in table
    assert "| a | clean_acc | 0.400 | 0.900 |" in table


def test_every_outcome_test_it_names_exists():
    for node in [*stability.OUTCOME_TESTS, stability.DEMO_TEST]:
        path, _, name = node.partition("::")
        text = (ROOT / path).read_text()
        assert not name or f"def {name}(" in text, node
