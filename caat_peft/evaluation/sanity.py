"""Sanity checks on an evaluation, after Carlini et al., "On Evaluating Adversarial Robustness".

A robust accuracy is only an upper bound found by the attacks that were tried. These checks look
for the usual signs that the attacks, not the model, failed (gradient masking, an attack that
has not converged, a broken pipeline, a randomised forward). Each is reported PASS, WARN or SKIP
with its numbers; a WARN does not stop the evaluation, it says which number not to trust.

Comparisons are made in *sample counts* with a tolerance of ``max(1, ceil(tolerance · n))``
samples (default tolerance 1 %): a single sample can flip by floating-point noise or by the
last-iterate PGD of torchattacks, and that is not evidence of masking. Two checks use the
reference AutoAttack's own thresholds instead (fra31/auto-attack, ``autoattack/checks.py``):
Square inside AutoAttack (0.2 % of the samples) and the randomness probe (5 passes, 1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from caat_peft.evaluation.registry import attack_kind, eps_label, pgd_steps

PASS, WARN, SKIP = "PASS", "WARN", "SKIP"
#: Largest overshoot of the ε-ball or of [0, 1] that counts as float rounding.
BOUND_SLACK = 1e-5
#: fra31's check_square_sr: Square, run after the white-box attacks inside AutoAttack, must not
#: lower the robust accuracy by more than 0.2 percentage points.
SQUARE_TOLERANCE = 0.002
#: fra31's check_randomized: this many forward passes of the same batch must agree ...
RANDOMNESS_PASSES = 5
#: ... to within this L2 distance between per-sample outputs scaled to unit L2 norm.
RANDOMNESS_TOLERANCE = 1e-4
#: The iterations-help check also compares PGD with its single step at these multiples of the
#: reference ε: at a small ε a robust, locally linear model leaves nothing beyond what FGSM finds
#: (FGSM is optimal for a linear model), so PGD ≈ FGSM there is no sign of masking.
WIDE_FACTORS: tuple[float, ...] = (2.0, 4.0)

Getter = Callable[[str, str], "int | None"]


@dataclass(frozen=True)
class SanityPlan:
    """The extra (attack, ε) pairs the checks need on top of the user's grid."""

    ref_pgd: str  # the reference multi-step PGD (pgd20 / pgd-l2)
    few_pgd: str  # the same with 2 steps
    long_pgd: str  # the same with 50 steps: has PGD-20 converged?
    single: str  # single-step attack (fgsm / fgm-l2)
    unbounded_pgd: str  # the reference PGD without random start (pgd20-nrs / pgd-l2-nrs)
    ref_eps: float  # the smallest positive ε of the grid
    wide_eps: tuple[float, ...]  # WIDE_FACTORS × ref_eps: where local linearity has ended
    unbounded_eps: float  # an ε that allows any image in [0, 1]
    pairs: tuple[tuple[str, float], ...]


def sanity_plan(
    selected: Sequence[str], eps_grid: Sequence[float], norm: str, input_numel: int
) -> SanityPlan:
    """Which extra attacks to run. Cheap ones only: square is never added (5,000 queries)."""
    linf = norm == "linf"
    names = (
        ("pgd20", "pgd2", "pgd50", "fgsm", "pgd20-nrs")
        if linf
        else ("pgd-l2", "pgd2-l2", "pgd50-l2", "fgm-l2", "pgd-l2-nrs")
    )
    ref_pgd, few_pgd, long_pgd, single, unbounded_pgd = names
    positive = [e for e in eps_grid if e > 0]
    ref_eps = positive[0] if positive else (8 / 255 if linf else 0.5)
    # In L2 the diameter of [0, 1]^d is sqrt(d): that radius reaches every image.
    unbounded = 1.0 if linf else math.sqrt(float(input_numel))
    wide = tuple(dict.fromkeys(_snap(min(f * ref_eps, unbounded / 2), norm) for f in WIDE_FACTORS))
    pairs = [(a, ref_eps) for a in (ref_pgd, few_pgd, long_pgd, single)]
    pairs += [(a, e) for e in wide for a in (ref_pgd, single)]
    pairs.append((unbounded_pgd, unbounded))
    noise_eps = list(eps_grid) if ref_pgd in selected else [ref_eps]
    pairs += [("noise", e) for e in noise_eps if e > 0]
    return SanityPlan(*names, ref_eps, wide, unbounded, tuple(pairs))


def _snap(eps: float, norm: str) -> float:
    """k/255 exactly for L∞ (so that 4 · 8/255 is the grid's 32/255, not a near-duplicate)."""
    k = round(eps * 255)
    return k / 255 if norm == "linf" and abs(eps * 255 - k) < 1e-4 else eps


def tolerance_count(tolerance: float, n: int) -> int:
    """Samples of slack: max(1, ceil(tolerance · n))."""
    return max(1, math.ceil(tolerance * n - 1e-9))


def square_tolerance_count(n: int) -> int:
    """Square breaks tolerated inside AutoAttack: max(1, floor(0.002 · n)).

    fra31 warns when Square lowers the robust accuracy by *more than* 0.2 points, i.e. breaks
    more than 0.002 · n samples, which in whole samples is more than floor(0.002 · n). Below 500
    samples that is 0, where one sample (a float flip) would warn: at least 1 is tolerated.
    """
    return max(1, math.floor(SQUARE_TOLERANCE * n + 1e-9))


def _acc(count: int, n: int) -> str:
    return f"{count / n:.4f}" if n else "n/a"


def _check(cid: str, title: str, status: str, detail: str, values: dict | None = None) -> dict:
    return {"id": cid, "title": title, "status": status, "detail": detail, "values": values or {}}


@dataclass(frozen=True)
class _Ctx:
    """What every count-based check reads."""

    n: int
    clean: int
    get: Getter
    selected: Sequence[str]
    grid_labels: list[str]
    ref_label: str
    wide_labels: tuple[str, ...]
    unbounded_label: str
    tol: int
    plan: SanityPlan
    norm: str

    @property
    def labels(self) -> list[str]:
        """The grid's ε labels and the reference ε (which the plan always computes)."""
        return list(dict.fromkeys([self.ref_label, *self.grid_labels]))

    @property
    def pgds(self) -> list[str]:
        """Selected multi-step white-box PGD-family attacks, fewest steps first."""
        return sorted(
            (s for s in self.selected if (pgd_steps(s) or 0) > 1 and attack_kind(s) == "white-box"),
            key=lambda s: pgd_steps(s) or 0,
        )


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
    ctx = _Ctx(
        n=n,
        clean=clean_count,
        get=lambda name, label: counts.get((name, label)),
        selected=list(selected),
        grid_labels=[eps_label(e, norm) for e in eps_grid],
        ref_label=eps_label(plan.ref_eps, norm),
        wide_labels=tuple(eps_label(e, norm) for e in plan.wide_eps),
        unbounded_label=eps_label(plan.unbounded_eps, norm),
        tol=tol,
        plan=plan,
        norm=norm,
    )
    checks = [
        _monotone_eps(ctx),
        _more_steps(ctx),
        _pgd_vs_single_step(ctx),
        _iterations_help(ctx),
        _converged(ctx),
        _black_box(ctx, square_breaks),
        _unbounded(ctx),
        _ordered_check(
            "noise_vs_pgd",
            "random noise at ε weaker than PGD",
            [("noise", plan.ref_pgd, lb) for lb in ctx.labels],
            ctx,
        ),
        *_model_checks(probe, tolerance),
        _budget(perturbation),
    ]
    n_warn = sum(c["status"] == WARN for c in checks)
    return {
        "status": WARN if n_warn else PASS,
        "n_warn": n_warn,
        "tolerance": {"fraction": tolerance, "samples": tol},
        "checks": checks,
    }


def _monotone_eps(ctx: _Ctx) -> dict:
    """Accuracy never rises with ε: a larger ball contains the smaller one."""
    worst = (0, "", "")
    for name in ctx.selected:
        seq = [("0", ctx.clean)] + [(lb, ctx.get(name, lb)) for lb in ctx.grid_labels]
        seq = [(lb, c) for lb, c in seq if c is not None]
        best_so_far = seq[0]
        for lb, c in seq[1:]:
            rise = c - best_so_far[1]
            if rise > worst[0]:
                worst = (rise, name, f"{best_so_far[0]} → {lb}")
            if c < best_so_far[1]:
                best_so_far = (lb, c)
    detail = (
        "no attack gains accuracy as ε grows"
        if worst[0] <= 0
        else f"largest rise: {worst[1]} +{worst[0]} sample(s) from ε = {worst[2]}"
    )
    return _check(
        "monotone_eps",
        "accuracy never rises with ε",
        PASS if worst[0] <= ctx.tol else WARN,
        detail,
        {"max_rise": worst[0]},
    )


def _more_steps(ctx: _Ctx) -> dict:
    """More PGD steps never help the model (PGD-2 vs PGD-20, every selected PGD pair)."""
    plan = ctx.plan
    comparisons = [(plan.few_pgd, plan.ref_pgd, ctx.ref_label)]
    pgds = ctx.pgds
    for i, a in enumerate(pgds):
        for b in pgds[i + 1 :]:
            comparisons += [(a, b, lb) for lb in ctx.grid_labels]
    return _ordered_check("more_steps", "more PGD steps never raise accuracy", comparisons, ctx)


def _pgd_vs_single_step(ctx: _Ctx) -> dict:
    """Multi-step PGD is at least as strong as its single step."""
    plan = ctx.plan
    comparisons = [(plan.single, plan.ref_pgd, lb) for lb in (ctx.ref_label, *ctx.wide_labels)]
    if plan.single in ctx.selected:
        comparisons += [(plan.single, p, lb) for p in ctx.pgds for lb in ctx.grid_labels]
    title = f"PGD ≤ {'FGSM' if ctx.norm == 'linf' else 'FGM'}"
    return _ordered_check("pgd_vs_single_step", title, comparisons, ctx)


def _iterations_help(ctx: _Ctx) -> dict:
    """PGD-20 must find clearly more than its single step at some ε where it can.

    Carlini et al.: iterative attacks must beat single-step ones; if iterating does not help,
    the gradient at the perturbed points carries no more than at the clean point (a constant
    gradient direction, a straight-through estimator that points nowhere). An ε is judged when
    the single step leaves more than ``tol`` samples (else nothing is left to find) and some
    attack broke more than ``tol`` (where nothing breaks, a robust model and useless gradients
    look the same). WARN only if PGD gains ≤ ``tol`` at *every* judged ε: at a small ε an
    honest, locally linear model is legitimately solved by FGSM, but not also at
    ``WIDE_FACTORS`` times that ε.
    """
    plan, n, tol = ctx.plan, ctx.n, ctx.tol
    single_name = "FGSM" if ctx.norm == "linf" else "FGM"
    title = f"PGD iterations help (PGD clearly below {single_name} at some ε)"
    rows = []
    for lb in dict.fromkeys([*ctx.labels, *ctx.wide_labels]):
        cs, cp = ctx.get(plan.single, lb), ctx.get(plan.ref_pgd, lb)
        if cs is not None and cp is not None and cs > tol and ctx.clean - min(cs, cp) > tol:
            rows.append({"eps": lb, "acc_single": cs / n, "acc_pgd": cp / n, "gain": cs - cp})
    values = {"comparisons": rows, "min_gain_samples": tol + 1}
    if not rows:
        detail = (
            f"no ε where {plan.single} leaves > {tol} sample(s) and an attack breaks > {tol}: "
            "nothing to compare"
        )
        return _check("iterations_help", title, SKIP, detail, values)
    best = max(rows, key=lambda r: r["gain"])
    detail = (
        f"largest gain ε = {best['eps']}: {plan.ref_pgd} {best['acc_pgd']:.4f} vs "
        f"{plan.single} {best['acc_single']:.4f} ({best['gain']} sample(s), tolerance {tol})"
    )
    if best["gain"] > tol:
        return _check("iterations_help", title, PASS, detail, values)
    detail += (
        f"; at no ε of {', '.join(r['eps'] for r in rows)} does PGD break more than {tol} "
        "sample(s) beyond its single step: the gradient directions are not informative "
        "(masking) or the model is linear"
    )
    return _check("iterations_help", title, WARN, detail, values)


def _converged(ctx: _Ctx) -> dict:
    """PGD-20 has converged: PGD-50 (and APGD-CE when selected) find little more.

    Carlini et al. §5: an attack that finds much more with more iterations was not run to
    convergence, so its accuracy is not an upper bound worth reporting. A WARN says the PGD-20
    column overstates robustness; the stronger attack's (or the worst case's) number stands.
    """
    plan = ctx.plan
    stronger = [plan.long_pgd] + [a for a in ("apgd-ce", "apgd-l2") if a in ctx.selected]
    comparisons = [(plan.ref_pgd, s, lb) for s in stronger for lb in ctx.labels]
    return _ordered_check(
        "converged",
        f"{plan.ref_pgd} has converged ({' / '.join(stronger)} not much stronger)",
        comparisons,
        ctx,
        reverse=True,
    )


def _black_box(ctx: _Ctx, square_breaks: Mapping[str, int]) -> dict:
    """A black-box attack must not beat the white-box ones: if it does, gradients are useless."""
    n, tol = ctx.n, ctx.tol
    parts: list[str] = []
    status = SKIP
    values: dict = {}
    if "square" in ctx.selected:
        status = PASS
        for lb in ctx.grid_labels:
            sq = ctx.get("square", lb)
            wb = [
                (ctx.get(w, lb), w)
                for w in ctx.selected
                if attack_kind(w) == "white-box" and ctx.get(w, lb) is not None
            ]
            if lb == ctx.ref_label and ctx.get(ctx.plan.ref_pgd, lb) is not None:
                wb.append((ctx.get(ctx.plan.ref_pgd, lb), ctx.plan.ref_pgd))
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
        sq_tol = square_tolerance_count(n)
        bad = {lb: k for lb, k in square_breaks.items() if k > sq_tol}
        values["square_after_white_box"] = dict(square_breaks)
        values["square_tolerance_samples"] = sq_tol
        if bad:
            status = WARN
            parts += [
                f"ε = {lb}: inside AutoAttack, Square broke {k} sample(s) ({k / n:.2%}) that "
                f"APGD-CE, APGD-T and FAB-T missed (tolerance {sq_tol})"
                for lb, k in bad.items()
            ]
        else:
            parts.append(f"inside AutoAttack Square breaks ≤ {sq_tol} sample(s) after APGD/FAB")
    if status == SKIP:
        parts.append("select 'square' or 'autoattack' to run this check")
    return _check(
        "black_box",
        "black-box (Square) not stronger than white-box",
        status,
        "; ".join(parts),
        values,
    )


def _unbounded(ctx: _Ctx) -> dict:
    """An unbounded attack from the clean input must reach (about) zero accuracy.

    No random start: at ε = 1 a random start is itself a random image, which a many-class model
    misclassifies without any help from its gradients.
    """
    name, lb = ctx.plan.unbounded_pgd, ctx.unbounded_label
    title = "unbounded ε drives accuracy to ~0"
    cu = ctx.get(name, lb)
    if cu is None:
        return _check("unbounded", title, SKIP, "not computed")
    return _check(
        "unbounded",
        title,
        PASS if cu <= ctx.tol else WARN,
        f"{name} (PGD-20 without random start) at ε = {lb}: {_acc(cu, ctx.n)} "
        f"({cu} sample(s), tolerance {ctx.tol})",
        {"accuracy": cu / ctx.n},
    )


def _model_checks(probe: Mapping[str, float | int | bool], tolerance: float) -> list[dict]:
    """Properties of the model itself, measured on the first batch."""
    zero, checked = int(probe.get("zero_grad", 0)), int(probe.get("grad_checked", 0))
    tol_probe = tolerance_count(tolerance, max(checked, 1))
    gradients = _check(
        "gradients",
        "input gradients are non-zero",
        PASS if zero <= tol_probe else WARN,
        f"{zero} of {checked} correctly classified sample(s) of the first batch have an "
        "all-zero input gradient of the cross-entropy",
        {"zero_grad": zero, "checked": checked},
    )
    flips = int(probe.get("pred_flips", 0))
    diff = float(probe.get("max_output_diff", 0.0))
    passes = int(probe.get("passes", RANDOMNESS_PASSES))
    deterministic = _check(
        "deterministic",
        "the forward pass is deterministic",
        PASS if flips == 0 and diff <= RANDOMNESS_TOLERANCE else WARN,
        f"{passes} forward passes of the first batch: {flips} prediction(s) differ, largest "
        f"distance between unit-normalised outputs {diff:.2e} (tolerance "
        f"{RANDOMNESS_TOLERANCE:.0e})",
        {"pred_flips": flips, "max_output_diff": diff, "passes": passes},
    )
    probs = bool(probe.get("probabilities", False))
    logits = _check(
        "logits",
        "the model returns logits, not probabilities",
        WARN if probs else PASS,
        "outputs are non-negative and sum to 1: cross-entropy on probabilities saturates "
        "and masks gradients; return the logits"
        if probs
        else "outputs are not a probability vector",
        {"probabilities": probs},
    )
    return [gradients, deterministic, logits]


def _budget(perturbation: Mapping[tuple[str, str], tuple[float, int]]) -> dict:
    """Every adversarial input stayed in the ε-ball and in [0, 1] (before our projection)."""
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
    return _check(
        "budget",
        "adversarial inputs respect ε and [0, 1]",
        PASS if ok else WARN,
        detail,
        {"max_excess": worst_excess[0], "nonfinite": sum(nonfinite.values())},
    )


def _ordered_check(
    cid: str,
    title: str,
    comparisons: Sequence[tuple[str, str, str]],
    ctx: _Ctx,
    *,
    reverse: bool = False,
) -> dict:
    """Compare (weaker, stronger, ε) triples of counts; the worst one decides.

    Default: WARN when ``count(stronger) > count(weaker) + tol`` (the stronger attack did
    worse). ``reverse``: WARN when ``count(weaker) − count(stronger) > tol`` (the stronger attack
    did much better, so the weaker one's number is not a converged bound).
    """
    n, tol = ctx.n, ctx.tol
    rows = []
    worst = None
    for weak, strong, lb in dict.fromkeys(comparisons):
        cw, cs = ctx.get(weak, lb), ctx.get(strong, lb)
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
        gap = cw - cs if reverse else cs - cw
        if worst is None or gap > worst[0]:
            worst = (gap, weak, strong, lb, cw, cs)
    if worst is None:
        return _check(cid, title, SKIP, "not computed")
    gap, weak, strong, lb, cw, cs = worst
    status = PASS if gap <= tol else WARN
    detail = f"worst case ε = {lb}: {strong} {_acc(cs, n)} vs {weak} {_acc(cw, n)}"
    if reverse:
        more = f"{gap} sample(s) more" if gap > 0 else "no more"
        detail += f" ({strong} breaks {more}, tolerance {tol})"
    if len(rows) > 1:
        detail += f" ({len(rows)} comparisons)"
    return _check(cid, title, status, detail, {"comparisons": rows})
