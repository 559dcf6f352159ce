"""Attack names, presets, budgets and ε parsing: the parts a user types."""

from __future__ import annotations

import pytest

from caat_peft.errors import UserError
from caat_peft.evaluation import (
    DEFAULT_L2_EPS,
    DEFAULT_LINF_EPS,
    AttackBudget,
    attack_config,
    eps_label,
    parse_eps,
    parse_eps_list,
    resolve_attack_names,
    resolve_budget,
)


def test_default_grid_is_the_papers():
    assert parse_eps_list(None) == list(DEFAULT_LINF_EPS)
    assert [eps_label(e) for e in DEFAULT_LINF_EPS] == ["8/255", "16/255", "24/255", "32/255"]
    assert parse_eps_list(None, "l2") == list(DEFAULT_L2_EPS) == [0.5, 1.0]


def test_eps_strings_sorted_and_deduplicated():
    assert parse_eps_list("16/255, 8/255,0.0313725") == [8 / 255, 16 / 255]
    assert parse_eps_list("0.031") == [0.031]  # not 8/255: kept as written
    assert parse_eps("2.5e-2") == pytest.approx(0.025)
    assert eps_label(0.5, "l2") == "0.5" and eps_label(0.0) == "0"


@pytest.mark.parametrize("bad", ["abc", "8/0", "-0.1", "nan", "inf", True])
def test_bad_eps_is_a_user_error(bad):
    with pytest.raises(UserError, match="ε"):
        parse_eps(bad)


def test_linf_eps_above_one_is_rejected_with_a_hint():
    with pytest.raises(UserError, match="8/255"):
        parse_eps_list([8])
    assert parse_eps_list([3.0], "l2") == [3.0]  # fine in L2
    with pytest.raises(UserError, match="empty"):
        parse_eps_list("")


def test_names_aliases_presets_and_parametric_pgd():
    assert resolve_attack_names("PGD20, aa,t-fab,pgd7") == ["pgd20", "autoattack", "fab-t", "pgd7"]
    assert resolve_attack_names(None) == [
        "fgsm",
        "pgd20",
        "apgd-ce",
        "mifgsm",
        "fab-t",
        "autoattack",
    ]
    assert resolve_attack_names(["paper"]) == ["pgd20", "apgd-ce", "mifgsm", "fab", "fab-t", "fgsm"]
    assert resolve_attack_names("pgd20-l2,apgd-l2", "l2") == ["pgd-l2", "apgd-l2"]
    assert "square" in resolve_attack_names("all") and "pgd50" in resolve_attack_names("all")


def test_unknown_attack_names_the_choices():
    with pytest.raises(UserError, match="unknown attack 'pgdx'.*apgd-ce"):
        resolve_attack_names(["pgdx"])


def test_attack_in_the_wrong_norm_names_the_fix():
    with pytest.raises(UserError, match="'fgsm' is L∞-only.*pgd-l2"):
        resolve_attack_names(["fgsm"], "l2")
    with pytest.raises(UserError, match="L2-only"):
        resolve_attack_names(["apgd-l2"], "linf")
    with pytest.raises(UserError, match="norm 'l1'"):
        resolve_attack_names(["pgd20"], "l1")


def test_standard_budget_is_the_autoattack_protocol_and_targets_are_capped():
    b = AttackBudget()
    assert (b.apgd_steps, b.fab_steps, b.square_queries, b.n_targets) == (100, 100, 5000, 9)
    assert b.is_standard and not resolve_budget("fast").is_standard
    assert attack_config("apgd-t", "linf", b, 200).attrs["n_target_classes"] == 9
    assert attack_config("apgd-t", "linf", b, 5).attrs["n_target_classes"] == 4
    assert attack_config("fab-t", "linf", b, 3).attrs["n_target_classes"] == 2
    assert resolve_budget({"apgd_steps": 5}).apgd_steps == 5


def test_budget_and_class_count_errors():
    with pytest.raises(UserError, match="budget"):
        resolve_budget("slow")
    with pytest.raises(UserError, match="apgd_stepz"):
        resolve_budget({"apgd_stepz": 3})
    with pytest.raises(UserError, match="apgd_steps"):
        AttackBudget(apgd_steps=0)
    with pytest.raises(UserError, match="at least 4 classes"):
        attack_config("autoattack", "linf", AttackBudget(), 3)
