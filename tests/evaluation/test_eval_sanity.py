"""Each sanity check on synthetic counts: it passes on consistent numbers and warns on the
pattern it exists to catch (no model needed)."""

from __future__ import annotations

import pytest

from caat_peft.evaluation.sanity import run_sanity_checks, sanity_plan, tolerance_count

GRID = [8 / 255, 16 / 255]
N = 100


def _healthy_counts() -> dict[tuple[str, str], int]:
    return {
        ("pgd20", "0"): 90,
        ("pgd20", "8/255"): 50,
        ("pgd20", "16/255"): 20,
        ("pgd2", "8/255"): 60,
        ("fgsm", "8/255"): 65,
        ("fgsm", "16/255"): 40,
        ("pgd20", "255/255"): 0,
        ("noise", "8/255"): 88,
        ("noise", "16/255"): 85,
        ("square", "8/255"): 70,
        ("square", "16/255"): 45,
    }


def _run(counts=None, probe=None, perturbation=None, square_breaks=None, selected=None):
    selected = selected or ["fgsm", "pgd20", "square"]
    plan = sanity_plan(selected, GRID, "linf", 3 * 16 * 16)
    return run_sanity_checks(
        n=N,
        clean_count=90,
        counts=counts or _healthy_counts(),
        selected=selected,
        eps_grid=GRID,
        norm="linf",
        plan=plan,
        probe=probe or {"zero_grad": 0, "grad_checked": 50, "pred_flips": 0, "max_rel_diff": 0.0},
        perturbation=perturbation or {},
        square_breaks=square_breaks or {},
        tolerance=0.01,
    )


def _status(result) -> dict[str, str]:
    return {c["id"]: c["status"] for c in result["checks"]}


def test_tolerance_is_one_sample_or_one_percent():
    assert tolerance_count(0.01, 50) == 1
    assert tolerance_count(0.01, 100) == 1
    assert tolerance_count(0.01, 1000) == 10
    assert tolerance_count(0.0, 1000) == 1


def test_plan_adds_the_reference_attacks():
    plan = sanity_plan(["apgd-ce"], GRID, "linf", 768)
    assert ("pgd20", 0.0) in plan.pairs and ("pgd20", 1.0) in plan.pairs
    assert ("pgd2", 8 / 255) in plan.pairs and ("fgsm", 8 / 255) in plan.pairs
    l2 = sanity_plan(["apgd-l2"], [0.5], "l2", 768)
    assert l2.ref_pgd == "pgd-l2" and l2.unbounded_eps == pytest.approx(768**0.5)


def test_healthy_numbers_pass():
    result = _run()
    assert result["status"] == "PASS", result["checks"]
    assert set(_status(result).values()) == {"PASS"}


@pytest.mark.parametrize(
    "change,check",
    [
        ({("pgd20", "0"): 80}, "eps_zero"),
        ({("square", "16/255"): 72}, "monotone_eps"),  # rises above its 8/255 value
        ({("pgd2", "8/255"): 45}, "more_steps"),  # 2 steps stronger than 20
        ({("fgsm", "8/255"): 40, ("fgsm", "16/255"): 15}, "pgd_vs_single_step"),
        ({("square", "8/255"): 15, ("square", "16/255"): 10}, "black_box"),
        ({("pgd20", "255/255"): 12}, "unbounded"),
        ({("noise", "8/255"): 30}, "noise_vs_pgd"),
    ],
)
def test_each_check_warns_on_its_pattern(change, check):
    counts = _healthy_counts() | change
    status = _status(_run(counts))
    assert status[check] == "WARN"
    assert all(s == "PASS" for k, s in status.items() if k != check), status


def test_single_sample_differences_are_tolerated():
    counts = _healthy_counts() | {("pgd2", "8/255"): 49}  # one sample: noise, not masking
    assert _status(_run(counts))["more_steps"] == "PASS"


def test_model_level_checks_warn():
    status = _status(
        _run(probe={"zero_grad": 50, "grad_checked": 50, "pred_flips": 3, "probabilities": True})
    )
    assert status["gradients"] == status["deterministic"] == status["logits"] == "WARN"


def test_budget_and_autoattack_square_checks():
    status = _status(
        _run(
            perturbation={("fab", "8/255"): (0.01, 0), ("mifgsm", "8/255"): (0.0, 2)},
            square_breaks={"8/255": 5},
        )
    )
    assert status["budget"] == "WARN" and status["black_box"] == "WARN"


def test_black_box_check_skips_without_square():
    result = _run(selected=["fgsm", "pgd20"])
    assert _status(result)["black_box"] == "SKIP"
    assert result["status"] == "PASS"
