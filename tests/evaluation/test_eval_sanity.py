"""Each sanity check on synthetic counts: it passes on consistent numbers and warns on the
pattern it exists to catch (no model needed). ``test_eval_sanity_traps.py`` does the same
through real evaluations of models built to trip each check."""

from __future__ import annotations

import pytest

from caat_peft.evaluation.sanity import (
    run_sanity_checks,
    sanity_plan,
    square_tolerance_count,
    tolerance_count,
)

GRID = [8 / 255, 16 / 255]
N = 100


def _healthy_counts() -> dict[tuple[str, str], int]:
    return {
        ("pgd20", "8/255"): 50,
        ("pgd20", "16/255"): 20,
        ("pgd20", "32/255"): 5,
        ("pgd2", "8/255"): 60,
        ("pgd50", "8/255"): 49,
        ("fgsm", "8/255"): 65,
        ("fgsm", "16/255"): 40,
        ("fgsm", "32/255"): 25,
        ("pgd20-nrs", "255/255"): 0,
        ("noise", "8/255"): 88,
        ("noise", "16/255"): 85,
        ("square", "8/255"): 70,
        ("square", "16/255"): 45,
    }


def _run(
    counts=None, probe=None, perturbation=None, square_breaks=None, selected=None, n=N, clean=90
):
    selected = selected or ["fgsm", "pgd20", "square"]
    plan = sanity_plan(selected, GRID, "linf", 3 * 16 * 16)
    return run_sanity_checks(
        n=n,
        clean_count=clean,
        counts=counts or _healthy_counts(),
        selected=selected,
        eps_grid=GRID,
        norm="linf",
        plan=plan,
        probe=probe
        or {"zero_grad": 0, "grad_checked": 50, "pred_flips": 0, "max_output_diff": 0.0},
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


@pytest.mark.parametrize(
    "n,slack",
    [(100, 1), (499, 1), (500, 1), (999, 1), (1000, 2), (1499, 2), (1500, 3), (10_000, 20)],
)
def test_square_tolerance_is_fra31s_two_tenths_of_a_percent(n, slack):
    # fra31 warns when Square lowers robust accuracy by more than 0.002: k > 0.002 n breaks.
    # That is k > floor(0.002 n); below 500 samples the floor of 1 sample applies instead.
    assert square_tolerance_count(n) == slack


def test_plan_adds_the_reference_attacks():
    plan = sanity_plan(["apgd-ce"], GRID, "linf", 768)
    assert ("pgd20-nrs", 1.0) in plan.pairs and ("pgd20", 1.0) not in plan.pairs
    assert all(e > 0 for _, e in plan.pairs)  # ε = 0 runs no attack: nothing to check there
    for name in ("pgd20", "pgd2", "pgd50", "fgsm"):
        assert (name, 8 / 255) in plan.pairs
    assert plan.wide_eps == (16 / 255, 32 / 255)
    for e in plan.wide_eps:
        assert ("pgd20", e) in plan.pairs and ("fgsm", e) in plan.pairs
    l2 = sanity_plan(["apgd-l2"], [0.5], "l2", 768)
    assert (l2.ref_pgd, l2.long_pgd, l2.single) == ("pgd-l2", "pgd50-l2", "fgm-l2")
    assert l2.unbounded_pgd == "pgd-l2-nrs" and l2.unbounded_eps == pytest.approx(768**0.5)
    assert ("pgd-l2", 2.0) in l2.pairs and ("fgm-l2", 2.0) in l2.pairs


def test_sanity_only_attacks_have_distinct_configs():
    from caat_peft.evaluation.registry import AttackBudget, attack_config

    nrs = attack_config("pgd20-nrs", "linf", AttackBudget(), 10)
    ref = attack_config("pgd20", "linf", AttackBudget(), 10)
    assert nrs.kwargs == {**ref.kwargs, "random_start": False} and nrs.eps_scaled == ref.eps_scaled
    assert nrs.describe() != ref.describe()  # so old pgd20 resume files are never reused
    assert attack_config("pgd-l2-nrs", "l2", AttackBudget(), 10).cls == "PGDL2"


def test_healthy_numbers_pass():
    result = _run()
    assert result["status"] == "PASS", result["checks"]
    assert set(_status(result).values()) == {"PASS"}


@pytest.mark.parametrize(
    "change,check",
    [
        ({("square", "16/255"): 72}, "monotone_eps"),  # rises above its 8/255 value
        ({("pgd2", "8/255"): 45}, "more_steps"),  # 2 steps stronger than 20
        ({("fgsm", "8/255"): 40, ("fgsm", "16/255"): 15}, "pgd_vs_single_step"),
        # PGD-20 only matches FGSM, at every ε where FGSM leaves room
        (
            {("fgsm", "8/255"): 50, ("fgsm", "16/255"): 20, ("fgsm", "32/255"): 5},
            "iterations_help",
        ),
        ({("pgd50", "8/255"): 40}, "converged"),  # 50 steps find 10 more than 20
        ({("square", "8/255"): 15, ("square", "16/255"): 10}, "black_box"),
        ({("pgd20-nrs", "255/255"): 12}, "unbounded"),
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
    counts = _healthy_counts() | {("pgd50", "8/255"): 49}
    assert _status(_run(counts))["converged"] == "PASS"


def test_iterations_help_needs_a_gain_at_one_eps_only():
    # At 8/255 PGD finds nothing beyond FGSM (a locally linear model), at 32/255 it does.
    counts = _healthy_counts() | {("fgsm", "8/255"): 50, ("fgsm", "16/255"): 20}
    check = next(c for c in _run(counts)["checks"] if c["id"] == "iterations_help")
    assert check["status"] == "PASS" and "32/255" in check["detail"]


def test_iterations_help_skips_where_there_is_nothing_to_compare():
    # FGSM leaves ≤ tol samples, or nothing is broken at all (a robust model looks the same as
    # useless gradients there): no ε is judged.
    robust = {k: 90 for k in _healthy_counts() if k[0] in ("fgsm", "pgd20")}
    broken = {("fgsm", lb): 1 for lb in ("8/255", "16/255", "32/255")}
    for change in (robust, broken):
        check = next(
            c for c in _run(_healthy_counts() | change)["checks"] if c["id"] == "iterations_help"
        )
        assert check["status"] == "SKIP", check


def test_converged_compares_with_a_selected_apgd_ce():
    counts = _healthy_counts() | {("apgd-ce", "8/255"): 40, ("apgd-ce", "16/255"): 19}
    result = _run(counts, selected=["fgsm", "pgd20", "apgd-ce", "square"])
    check = next(c for c in result["checks"] if c["id"] == "converged")
    assert check["status"] == "WARN" and "apgd-ce" in check["detail"]
    assert {r["stronger"] for r in check["values"]["comparisons"]} == {"pgd50", "apgd-ce"}


def test_model_level_checks_warn():
    status = _status(
        _run(probe={"zero_grad": 50, "grad_checked": 50, "pred_flips": 3, "probabilities": True})
    )
    assert status["gradients"] == status["deterministic"] == status["logits"] == "WARN"


@pytest.mark.parametrize("diff,expected", [(0.0, "PASS"), (1e-4, "PASS"), (1.1e-4, "WARN")])
def test_randomness_uses_fra31s_threshold(diff, expected):
    probe = {"zero_grad": 0, "grad_checked": 50, "pred_flips": 0, "max_output_diff": diff}
    assert _status(_run(probe=probe))["deterministic"] == expected


def test_budget_and_autoattack_square_checks():
    status = _status(
        _run(
            perturbation={("fab", "8/255"): (0.01, 0), ("mifgsm", "8/255"): (0.0, 2)},
            square_breaks={"8/255": 5},
        )
    )
    assert status["budget"] == "WARN" and status["black_box"] == "WARN"


@pytest.mark.parametrize(
    "n,breaks,expected", [(1000, 2, "PASS"), (1000, 3, "WARN"), (100, 1, "PASS"), (100, 2, "WARN")]
)
def test_square_inside_autoattack_uses_the_two_tenths_tolerance(n, breaks, expected):
    # With n = 1000 the general tolerance would allow 10 samples; fra31's rule allows 2.
    scale = n // N
    counts = {k: v * scale for k, v in _healthy_counts().items()}
    result = _run(
        counts, square_breaks={"8/255": breaks}, selected=["fgsm", "pgd20"], n=n, clean=90 * scale
    )
    assert _status(result)["black_box"] == expected


def test_black_box_check_skips_without_square():
    result = _run(selected=["fgsm", "pgd20"])
    assert _status(result)["black_box"] == "SKIP"
    assert result["status"] == "PASS"
