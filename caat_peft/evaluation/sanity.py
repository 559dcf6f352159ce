"""Sanity checks on an evaluation, after Carlini et al., "On Evaluating Adversarial Robustness".

A robust accuracy is only an upper bound found by the attacks that were tried. These checks look
for the usual signs that the attacks, not the model, failed (gradient masking, a broken pipeline,
a randomised forward). Each is reported PASS, WARN or SKIP with its numbers; a WARN does not stop
the evaluation, it says which number not to trust.

Comparisons are made in *sample counts* with a tolerance of ``max(1, ceil(tolerance · n))``
samples (default tolerance 1 %): a single sample can flip by floating-point noise or by the
last-iterate PGD of torchattacks, and that is not evidence of masking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from caat_peft.evaluation.registry import attack_kind, eps_label, pgd_steps

PASS, WARN, SKIP = "PASS", "WARN", "SKIP"
#: Largest overshoot of the ε-ball or of [0, 1] that counts as float rounding.
BOUND_SLACK = 1e-5


@dataclass(frozen=True)
class SanityPlan:
    """The extra (attack, ε) pairs the checks need on top of the user's grid."""

    ref_pgd: str  # the reference multi-step PGD (pgd20 / pgd-l2)
    few_pgd: str  # the same with 2 steps
    single: str  # single-step attack (fgsm / fgm-l2)
    ref_eps: float  # the smallest positive ε of the grid
    unbounded_eps: float  # an ε that allows any image in [0, 1]
    pairs: tuple[tuple[str, float], ...]


def sanity_plan(
    selected: Sequence[str], eps_grid: Sequence[float], norm: str, input_numel: int
) -> SanityPlan:
    """Which extra attacks to run. Cheap ones only: square is never added (5,000 queries)."""
    linf = norm == "linf"
    ref_pgd, few_pgd, single = (
        ("pgd20", "pgd2", "fgsm") if linf else ("pgd-l2", "pgd2-l2", "fgm-l2")
    )
    positive = [e for e in eps_grid if e > 0]
    ref_eps = positive[0] if positive else (8 / 255 if linf else 0.5)
    # In L2 the diameter of [0, 1]^d is sqrt(d): that radius reaches every image.
    unbounded = 1.0 if linf else math.sqrt(float(input_numel))
    pairs = [(ref_pgd, 0.0), (ref_pgd, ref_eps), (few_pgd, ref_eps), (single, ref_eps)]
    pairs.append((ref_pgd, unbounded))
    noise_eps = list(eps_grid) if ref_pgd in selected else [ref_eps]
    pairs += [("noise", e) for e in noise_eps if e > 0]
    return SanityPlan(ref_pgd, few_pgd, single, ref_eps, unbounded, tuple(pairs))


def tolerance_count(tolerance: float, n: int) -> int:
    """Samples of slack: max(1, ceil(tolerance · n))."""
    return max(1, math.ceil(tolerance * n - 1e-9))


def _acc(count: int, n: int) -> str:
    return f"{count / n:.4f}" if n else "n/a"


def _check(cid: str, title: str, status: str, detail: str, values: dict | None = None) -> dict:
    return {"id": cid, "title": title, "status": status, "detail": detail, "values": values or {}}


def run_sanity_checks(
    *,
    n: int,
    clean_count: int,
    counts: Mapping[tuple[str, str], int],
    selected: Sequence[str],
    eps_grid: Sequence[float],
    norm: str,
    plan: SanityPlan,
    probe: Mapping[str, float | int | bool],
    perturbation: Mapping[tuple[str, str], tuple[float, int]],
    square_breaks: Mapping[str, int],
    tolerance: float,
) -> dict:
    """All checks; ``counts[(attack, eps_label)]`` is the number of samples still correct."""
    tol = tolerance_count(tolerance, n)
    lab = {e: eps_label(e, norm) for e in [*eps_grid, plan.ref_eps, plan.unbounded_eps, 0.0]}
    grid_labels = [lab[e] for e in eps_grid]

    def get(name: str, label: str) -> int | None:
        return counts.get((name, label))

    checks: list[dict] = []
    ref_label = lab[plan.ref_eps]

    # 1. ε = 0 must reproduce the clean accuracy (catches train-mode BN/dropout, randomness,
    #    attacks that move the input when they should not).
    c0 = get(plan.ref_pgd, lab[0.0])
    if c0 is None:
        checks.append(_check("eps_zero", "ε = 0 gives the clean accuracy", SKIP, "not computed"))
    else:
        ok = clean_count - c0 <= tol
        checks.append(
            _check(
                "eps_zero",
                "ε = 0 gives the clean accuracy",
                PASS if ok else WARN,
                f"{plan.ref_pgd} at ε = 0: {_acc(c0, n)} vs clean {_acc(clean_count, n)}",
                {"eps0": c0 / n, "clean": clean_count / n},
            )
        )

    # 2. Accuracy never rises with ε (a larger ball contains the smaller one).
    worst = (0, "", "")
    for name in [*selected]:
        seq = [("0", clean_count)] + [(lb, get(name, lb)) for lb in grid_labels]
        seq = [(lb, c) for lb, c in seq if c is not None]
        best_so_far = seq[0]
        for lb, c in seq[1:]:
            rise = c - best_so_far[1]
            if rise > worst[0]:
                worst = (rise, name, f"{best_so_far[0]} → {lb}")
            if c < best_so_far[1]:
                best_so_far = (lb, c)
    status = PASS if worst[0] <= tol else WARN
    detail = (
        "no attack gains accuracy as ε grows"
        if worst[0] <= 0
        else f"largest rise: {worst[1]} +{worst[0]} sample(s) from ε = {worst[2]}"
    )
    checks.append(
        _check(
            "monotone_eps", "accuracy never rises with ε", status, detail, {"max_rise": worst[0]}
        )
    )

    # 3. More PGD steps never help the model.
    comparisons: list[tuple[str, str, str]] = []  # (fewer steps, more steps, eps label)
    comparisons.append((plan.few_pgd, plan.ref_pgd, ref_label))
    pgds = sorted(
        (s for s in selected if (pgd_steps(s) or 0) > 1 and attack_kind(s) == "white-box"),
        key=lambda s: pgd_steps(s) or 0,
    )
    for i, a in enumerate(pgds):
        for b in pgds[i + 1 :]:
            comparisons += [(a, b, lb) for lb in grid_labels]
    checks.append(
        _ordered_check(
            "more_steps",
            "more PGD steps never raise accuracy",
            comparisons,
            get,
            n,
            tol,
        )
    )

    # 4. Multi-step PGD is at least as strong as its single step.
    comparisons = [(plan.single, plan.ref_pgd, ref_label)]
    if plan.single in selected:
        comparisons += [(plan.single, p, lb) for p in pgds for lb in grid_labels]
    checks.append(
        _ordered_check(
            "pgd_vs_single_step",
            f"PGD ≤ {'FGSM' if norm == 'linf' else 'FGM'}",
            comparisons,
            get,
            n,
            tol,
        )
    )

    # 5. A black-box attack must not beat the white-box ones: if it does, gradients are useless.
    parts: list[str] = []
    status = SKIP
    values: dict = {}
    if "square" in selected:
        status = PASS
        for lb in grid_labels:
            sq = get("square", lb)
            wb = [
                (get(w, lb), w)
                for w in selected
                if attack_kind(w) == "white-box" and get(w, lb) is not None
            ]
            if lb == ref_label and get(plan.ref_pgd, lb) is not None:
                wb.append((get(plan.ref_pgd, lb), plan.ref_pgd))
            if sq is None or not wb:
                continue
            best, best_name = min(wb)
            values[lb] = {"square": sq / n, "best_white_box": best / n}
            if sq < best - tol:
                status = WARN
                parts.append(f"ε = {lb}: square {_acc(sq, n)} < {best_name} {_acc(best, n)}")
        if status == PASS:
            parts.append("square is never stronger than the best white-box attack")
    if square_breaks:
        status = PASS if status == SKIP else status
        bad = {lb: k for lb, k in square_breaks.items() if k > tol}
        values["square_after_white_box"] = dict(square_breaks)
        if bad:
            status = WARN
            parts += [
                f"ε = {lb}: inside AutoAttack, Square broke {k} sample(s) that APGD-CE, APGD-T "
                "and FAB-T missed"
                for lb, k in bad.items()
            ]
        else:
            parts.append("inside AutoAttack Square adds nothing beyond tolerance")
    if status == SKIP:
        parts.append("select 'square' or 'autoattack' to run this check")
    checks.append(
        _check(
            "black_box",
            "black-box (Square) not stronger than white-box",
            status,
            "; ".join(parts),
            values,
        )
    )

    # 6. An unbounded attack must reach (about) zero accuracy.
    cu = get(plan.ref_pgd, lab[plan.unbounded_eps])
    if cu is None:
        checks.append(
            _check("unbounded", "unbounded ε drives accuracy to ~0", SKIP, "not computed")
        )
    else:
        checks.append(
            _check(
                "unbounded",
                "unbounded ε drives accuracy to ~0",
                PASS if cu <= tol else WARN,
                f"{plan.ref_pgd} at ε = {lab[plan.unbounded_eps]}: {_acc(cu, n)} "
                f"({cu} sample(s), tolerance {tol})",
                {"accuracy": cu / n},
            )
        )

    # 7. Random noise at ε must be weaker than PGD.
    comparisons = [("noise", plan.ref_pgd, lb) for lb in [*grid_labels, ref_label]]
    checks.append(
        _ordered_check(
            "noise_vs_pgd", "random noise at ε weaker than PGD", comparisons, get, n, tol
        )
    )

    # 8-10. Properties of the model itself, measured on the first batch.
    zero, checked = int(probe.get("zero_grad", 0)), int(probe.get("grad_checked", 0))
    tol_probe = tolerance_count(tolerance, max(checked, 1))
    checks.append(
        _check(
            "gradients",
            "input gradients are non-zero",
            PASS if zero <= tol_probe else WARN,
            f"{zero} of {checked} correctly classified sample(s) of the first batch have an "
            "all-zero input gradient of the cross-entropy",
            {"zero_grad": zero, "checked": checked},
        )
    )
    flips, rel = int(probe.get("pred_flips", 0)), float(probe.get("max_rel_diff", 0.0))
    checks.append(
        _check(
            "deterministic",
            "the forward pass is deterministic",
            PASS if flips == 0 and rel <= 1e-3 else WARN,
            f"two forward passes of the first batch: {flips} prediction(s) differ, "
            f"max relative logit difference {rel:.2e}",
            {"pred_flips": flips, "max_rel_diff": rel},
        )
    )
    probs = bool(probe.get("probabilities", False))
    checks.append(
        _check(
            "logits",
            "the model returns logits, not probabilities",
            WARN if probs else PASS,
            "outputs are non-negative and sum to 1: cross-entropy on probabilities saturates "
            "and masks gradients; return the logits"
            if probs
            else "outputs are not a probability vector",
            {"probabilities": probs},
        )
    )

    # 11. Every adversarial input stayed in the ε-ball and in [0, 1] (before our projection).
    worst_excess = max(((v[0], k) for k, v in perturbation.items()), default=(0.0, ("", "")))
    nonfinite = {k: v[1] for k, v in perturbation.items() if v[1]}
    ok = worst_excess[0] <= BOUND_SLACK and not nonfinite
    detail = f"largest overshoot {worst_excess[0]:.2e}"
    if worst_excess[0] > 0:
        detail += f" ({worst_excess[1][0]} at ε = {worst_excess[1][1]})"
    if nonfinite:
        detail += "; non-finite adversarial inputs (counted as not fooled): " + ", ".join(
            f"{a}@{e}: {c}" for (a, e), c in nonfinite.items()
        )
    if not ok:
        detail += "; inputs were projected back before scoring"
    checks.append(
        _check(
            "budget",
            "adversarial inputs respect ε and [0, 1]",
            PASS if ok else WARN,
            detail,
            {"max_excess": worst_excess[0], "nonfinite": sum(nonfinite.values())},
        )
    )

    n_warn = sum(c["status"] == WARN for c in checks)
    return {
        "status": WARN if n_warn else PASS,
        "n_warn": n_warn,
        "tolerance": {"fraction": tolerance, "samples": tol},
        "checks": checks,
    }


def _ordered_check(
    cid: str,
    title: str,
    comparisons: Sequence[tuple[str, str, str]],
    get,
    n: int,
    tol: int,
) -> dict:
    """WARN when ``count(stronger) > count(weaker) + tol`` for any (weaker, stronger, ε)."""
    rows = []
    worst = None
    for weak, strong, lb in dict.fromkeys(comparisons):
        cw, cs = get(weak, lb), get(strong, lb)
        if cw is None or cs is None:
            continue
        rows.append(
            {
                "weaker": weak,
                "stronger": strong,
                "eps": lb,
                "acc_weaker": cw / n,
                "acc_stronger": cs / n,
            }
        )
        gap = cs - cw
        if worst is None or gap > worst[0]:
            worst = (gap, weak, strong, lb, cw, cs)
    if worst is None:
        return _check(cid, title, SKIP, "not computed")
    gap, weak, strong, lb, cw, cs = worst
    status = PASS if gap <= tol else WARN
    detail = f"worst case ε = {lb}: {strong} {_acc(cs, n)} vs {weak} {_acc(cw, n)}"
    if len(rows) > 1:
        detail += f" ({len(rows)} comparisons)"
    return _check(cid, title, status, detail, {"comparisons": rows})
