"""The three claims of a study, computed from its runs: figures, intervals, one verdict each.

Inputs are the study's run entries (``study.json → runs``: method, trade-off value, training ε,
seed, conflict telemetry) and every run's per-image results (:class:`Scored`, from its
``eval-study/eval.json``). Nothing here trains or reads a model, so the verdict logic can be
tested on hand-made inputs.

1. **Trade-off** (Fig. 3): per training ε, both methods' SA–AA fronts (AA at that ε) and the
   hypervolume difference with its paired bootstrap interval (:mod:`caat_peft.front`).
2. **Conflict** (Theorem 1, Fig. 2): per setting and ε, the mean μ over training with an
   interval; per setting, the exponent b of μ ∝ εᵇ with an interval and Page's trend test;
   CA-AT's mean μ over vanilla AT's at each ε (a ratio with an interval).
3. **Budget** (Table 1, Fig. 6): accuracy against evaluation ε per setting and training ε;
   CA-AT − vanilla AT at each ε (paired difference); whether that gap moves in CA-AT's favour
   with the evaluation and the training ε; what training at the larger ε does to each setting.

A study reports many intervals, and at 95 % one in twenty excludes the null by chance alone.
So every verdict starts with one **headline** fixed before any result is seen — the largest
training ε (for accuracies evaluated at that ε, as Table 1) and the (γ, λ) pair nearest the
paper's defaults — and every count of distinguishable cells carries the number chance alone
would give (0.05 × cells).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from caat_peft.errors import UserError
from caat_peft.evaluation.samples import CLEAN, Scored
from caat_peft.front import DISPLAY, SYMBOL, fmt, summarize_points
from caat_peft.stats import (
    CONFIDENCE,
    accuracy_interval,
    format_ci,
    paired_contrast,
    paired_difference,
    percentile_interval,
)
from caat_peft.study_stats import (
    T_LOG_MEANS,
    ConflictBootstrap,
    interval_verdict,
    page_trend,
    seed_exponent,
    seed_log_mean,
    seed_ratio,
)

Cell = tuple[str, float, float]  # (method, trade-off value, training ε)
Cells = dict[Cell, dict[int, dict[str, Any]]]  # cell -> seed -> run entry
#: Theorem 1's rate in the budget: μ ≤ O(ε²) (L2), O(d²ε²) (L∞, d fixed by the data).
BOUND_RATE = 2.0
#: The paper's default trade-offs (λ = 0.5, γ = 0.8): each claim's headline compares the grid's
#: adversarial values nearest to them, a choice made before any result is seen.
HEADLINE_LAMBDA, HEADLINE_GAMMA = 0.5, 0.8
#: The share of cells an interval at CONFIDENCE calls distinguishable when nothing is there.
CHANCE = 1.0 - CONFIDENCE
RISES, FALLS = "μ rises with the training ε", "μ falls with the training ε"
PAGE_UNCONFIRMED = " (Page's test does not confirm)"


def setting_name(method: str, value: float) -> str:
    """``vanilla AT λ = 0.5``, ``CA-AT γ = 0.8``."""
    return f"{DISPLAY[method]} {SYMBOL[method]} = {fmt(value)}"


def adversarial(method: str, value: float) -> bool:
    """False for the two standard-training points (λ = 0, γ = 1): they use no g_a at all."""
    return value > 0 if method == "vanilla" else value < 1


def index_runs(runs: Sequence[dict[str, Any]]) -> Cells:
    """Runs by (method, value, training ε), then seed; in the order the study ran them."""
    cells: Cells = {}
    for run in runs:
        cell = (run["method"], float(run["value"]), float(run["train_eps"]))
        cells.setdefault(cell, {})[int(run["seed"])] = run
    return cells


def _settings(cells: Cells) -> list[tuple[str, float]]:
    found = list(dict.fromkeys((m, v) for m, v, _ in cells))
    return sorted(found, key=lambda s: (s[0] != "vanilla", found.index(s)))


def _pairs(grid: dict[str, Any]) -> list[tuple[float, float]]:
    """(γ, λ) pairs compared: every adversarial CA-AT γ against every adversarial vanilla λ
    (standard training is no trade-off); all pairs when the grid has no adversarial point."""
    gammas = [g for g in grid["gammas"] if adversarial("caat", g)] or list(grid["gammas"])
    lambdas = [v for v in grid["lambdas"] if adversarial("vanilla", v)] or list(grid["lambdas"])
    return [(g, v) for g in gammas for v in lambdas]


def headline_pair(grid: dict[str, Any]) -> tuple[float, float] | None:
    """The (γ, λ) pair of every claim's headline: the compared pair nearest the paper's
    defaults (γ = 0.8, λ = 0.5; the first in the grid's order on a tie). None without pairs."""
    pairs = _pairs(grid)
    if not pairs:
        return None
    return min(pairs, key=lambda p: abs(p[0] - HEADLINE_GAMMA) + abs(p[1] - HEADLINE_LAMBDA))


def chance_text(distinguishable: int, cells: int) -> str:
    """ "distinguishable in 3 of 8; 0.05 × 8 = 0.4 expected by chance alone"."""
    return (
        f"distinguishable in {distinguishable} of {cells}; {CHANCE:.2g} × {cells} = "
        f"{CHANCE * cells:.2g} expected by chance alone"
    )


def _key(column: str, attack: str) -> tuple[str, str]:
    return CLEAN if column == "clean" else (attack, column)


def _array(
    by_seed: dict[int, dict[str, Any]],
    scored: dict[str, Scored],
    seeds: Sequence[int],
    key: tuple[str, str],
) -> np.ndarray:
    """seeds × images 0/1 correctness of one cell under one attack × ε (or clean)."""
    return np.asarray([scored[by_seed[s]["name"]].results[key] for s in seeds], dtype=float)


def _paired_cells(grid: dict[str, Any], cells: Cells) -> Iterator[tuple[Any, ...]]:
    """(training ε, its label, γ, λ, CA-AT cell, vanilla cell, common seeds) of every compared
    pair at every training ε where both methods have runs with the same seeds."""
    for eps, label in zip(grid["train_eps"], grid["train_eps_labels"]):
        for gamma, lam in _pairs(grid):
            a, b = cells.get(("caat", gamma, eps)), cells.get(("vanilla", lam, eps))
            seeds = _common_seeds(a, b)
            if seeds:
                yield eps, label, gamma, lam, a, b, seeds


def _common_seeds(*cells: dict[int, Any] | None) -> list[int]:
    if any(c is None for c in cells):
        return []
    return sorted(set.intersection(*(set(c) for c in cells)))  # type: ignore[union-attr]


def _signed(value: float, ci: Sequence[float] | None, digits: int = 3) -> str:
    return format_ci(value, ci, digits, signed=True)


def check_same_images(scored: dict[str, Scored]) -> None:
    """Every run must be scored on the first run's images: all comparisons are per image."""
    names = list(scored)
    for name in names[1:]:
        why = scored[names[0]].same_images(scored[name])
        if why:
            raise UserError(
                f"{name} and {names[0]} were evaluated on different images ({why}); the "
                "study's runs must share data and eval.limit"
            )


def compute_claims(
    header: dict[str, Any], runs: Sequence[dict[str, Any]], scored: dict[str, Scored]
) -> dict[str, Any]:
    """study.json → claims: {"tradeoff", "conflict", "budget"}, each with its "verdict"."""
    if scored:
        check_same_images(scored)
    cells = index_runs(runs)
    shapes = [r["input_shape"] for r in runs if r.get("input_shape")]
    header = {**header, "input_dim": math.prod(shapes[0]) if shapes else None}
    return {
        "tradeoff": tradeoff_claim(header, cells, scored),
        "conflict": conflict_claim(header, cells),
        "budget": budget_claim(header, cells, scored),
    }


# --------------------------------------------------------------------------------------------
# Claim 1: the fronts per training ε


def tradeoff_claim(header: dict[str, Any], cells: Cells, scored: dict[str, Scored]) -> dict:
    """Per training ε: the front body of ``caat-peft front`` (points, hypervolumes, the
    hypervolume difference with its interval), AA measured at that ε."""
    grid, attack = header["grid"], header["claim_attack"]
    per_eps = []
    for eps, label in zip(grid["train_eps"], grid["train_eps_labels"]):
        entries: dict[tuple[str, float], list[dict[str, Any]]] = {}
        images: dict[tuple[str, float], dict[int, tuple]] = {}
        for (method, value, cell_eps), by_seed in cells.items():
            if cell_eps != eps:
                continue
            for seed, run in sorted(by_seed.items()):
                s = scored[run["name"]]
                clean, robust = s.results[CLEAN], s.results[(attack, label)]
                entries.setdefault((method, value), []).append(
                    {
                        "seed": seed,
                        "clean_acc": sum(clean) / len(clean),
                        "robust_acc": sum(robust) / len(robust),
                        "run_dir": run["name"],
                        "model": run.get("model"),
                        "eval_n": len(clean),
                    }
                )
                images.setdefault((method, value), {})[seed] = (clean, robust, s)
        if entries:
            body = summarize_points(entries, images, list(grid["seeds"]))
            body.setdefault("hypervolume_difference", None)
            per_eps.append({"train_eps": eps, "label": label, **body})
    return {"per_eps": per_eps, "verdict": tradeoff_verdict(per_eps)}


def tradeoff_verdict(per_eps: Sequence[dict[str, Any]]) -> str:
    """The headline (the fronts at the largest training ε), then how many training budgets put
    CA-AT's front above, below or level with vanilla AT's, then each budget's difference."""
    counts = {"above": 0, "below": 0, "level": 0, "none": 0}
    parts = []
    for front in per_eps:
        difference = front.get("hypervolume_difference")
        if not difference:
            counts["none"] += 1
            parts.append(f"At training ε = {front['label']}: no interval (a method has no points")
            parts[-1] += " or a run lacks per-image results)."
            continue
        word = interval_verdict(difference["ci"], above="above", below="below", neither="level")
        counts[word] += 1
        parts.append(f"At training ε = {front['label']}: {difference['verdict']}")
    if not per_eps:
        return "No front could be drawn: no run has per-image results."
    top = per_eps[-1]
    said = (top.get("hypervolume_difference") or {}).get("verdict", "no interval.")
    headline = (
        f"Headline (pre-specified: the largest training ε, {top['label']}, AA at that ε): {said}"
    )
    rated = counts["above"] + counts["below"]
    head = (
        f"Over {len(per_eps)} training budget(s), CA-AT's front is above vanilla AT's at "
        f"{counts['above']}, below it at {counts['below']}, and not distinguishable at "
        f"{counts['level']}"
        + (f" ({counts['none']} without an interval)" if counts["none"] else "")
        + f" ({chance_text(rated, len(per_eps) - counts['none'])})."
    )
    return " ".join([headline, head, *parts])


# --------------------------------------------------------------------------------------------
# Claim 2: the conflict μ against the training ε


def _mean_of(by_seed: dict[int, dict[str, Any]], seeds: Sequence[int], key: str) -> float | None:
    values = [by_seed[s]["conflict"].get(key) for s in seeds]
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _conflict_cells(header: dict[str, Any], cells: Cells) -> tuple[list, list[int]]:
    """The adversarial settings with telemetry, and the seeds every one of their cells has."""
    grid = header["grid"]
    settings = [
        (m, v)
        for m, v in _settings(cells)
        if adversarial(m, v)
        and any(
            (r.get("conflict") or {}).get("steps")
            for e in grid["train_eps"]
            for r in cells.get((m, v, e), {}).values()
        )
    ]
    seeds = [
        s
        for s in grid["seeds"]
        if all(
            s in cells[(m, v, e)] and cells[(m, v, e)][s].get("conflict")
            for m, v in settings
            for e in grid["train_eps"]
            if (m, v, e) in cells
        )
    ]
    return settings, seeds


class _Conflict:
    """Per-cell μ of the claim-2 settings, and the interval machinery that fits the seeds:
    Student t over seeds with k ≥ 2 (see :mod:`caat_peft.study_stats`), the block bootstrap
    of one run's steps with k = 1."""

    def __init__(self, cells: Cells, seeds: Sequence[int]) -> None:
        self.cells, self.seeds = cells, list(seeds)
        self.boot = ConflictBootstrap(self.seeds) if len(self.seeds) == 1 else None
        self.interval_method = self.boot.interval_method if self.boot else T_LOG_MEANS
        self.mus: dict[Cell, list[float]] = {}
        self.draws: dict[Cell, tuple[float, np.ndarray]] = {}

    def cell(self, cell: Cell) -> tuple[float, list[float] | None]:
        """(μ of the cell, its interval): the geometric mean over seeds with k ≥ 2."""
        by_seed = self.cells[cell]
        self.mus[cell] = [by_seed[s]["conflict"]["mu"] for s in self.seeds]
        if self.boot is None:
            return seed_log_mean(self.mus[cell])
        conflict = by_seed[self.seeds[0]]["conflict"]
        blocks = {self.seeds[0]: (conflict["mu_blocks"], conflict["mu_block_sizes"])}
        key = f"{cell[0]}|{cell[1]!r}|{cell[2]!r}"
        self.draws[cell] = self.boot.cell(key, blocks)
        return self.draws[cell][0], list(percentile_interval(self.draws[cell][1]))

    def exponent(self, method: str, value: float, eps_list: Sequence[float]) -> dict | None:
        if self.boot is not None:
            return self.boot.exponent({e: self.draws[(method, value, e)] for e in eps_list})
        rows = self.rows(method, value, eps_list)
        return seed_exponent(eps_list, rows)

    def rows(self, method: str, value: float, eps_list: Sequence[float]) -> list[list[float]]:
        """Seeds × ε run means (Page's blocks × treatments)."""
        return [[self.mus[(method, value, e)][i] for e in eps_list] for i in range(len(self.seeds))]

    def ratio(self, a: Cell, b: Cell) -> dict[str, Any] | None:
        if self.boot is not None:
            return self.boot.ratio(self.draws[a], self.draws[b])
        return seed_ratio(self.mus[a], self.mus[b])


def conflict_claim(header: dict[str, Any], cells: Cells) -> dict[str, Any]:
    """Mean μ (and φ, adversarial share, λ*) per setting and ε; the trend of μ with ε per
    setting; CA-AT over vanilla AT at each ε; Theorem 1's reference."""
    grid = header["grid"]
    settings, seeds = _conflict_cells(header, cells)
    if not settings or not seeds:
        return {
            "table": [],
            "trends": [],
            "comparisons": [],
            "bound": None,
            "verdict": "No run with an adversarial gradient logged μ (standard-training points "
            "have none), so claim 2 cannot be assessed.",
        }
    conflict = _Conflict(cells, seeds)
    table = []
    for method, value in settings:
        for eps, label in zip(grid["train_eps"], grid["train_eps_labels"]):
            by_seed = cells.get((method, value, eps))
            if not by_seed:
                continue
            mu, ci = conflict.cell((method, value, eps))
            table.append(
                {"method": method, "value": value, "train_eps": eps, "label": label}
                | {"mu": mu, "mu_ci": ci, "mu_per_seed": conflict.mus[(method, value, eps)]}
                | {k: _mean_of(by_seed, seeds, k) for k in ("cos", "adv_share", "lambda_star")}
                | {"n_seeds": len(seeds)}
            )
    bound = theorem_bound(header, table)
    trends = [_trend(conflict, m, v, grid, bound) for m, v in settings]
    comparisons = _mu_comparisons(conflict, grid)
    return {
        "seeds": seeds,
        "interval_method": conflict.interval_method,
        "table": table,
        "trends": trends,
        "comparisons": comparisons,
        "bound": bound,
        "verdict": conflict_verdict(trends, comparisons, len(seeds), grid),
    }


def _trend(
    conflict: _Conflict, method: str, value: float, grid: dict[str, Any], bound: dict | None
) -> dict[str, Any]:
    """One setting's μ against ε: the exponent with its interval, Page's L, the verdict."""
    eps_list = [e for e in grid["train_eps"] if (method, value, e) in conflict.mus]
    exponent = conflict.exponent(method, value, eps_list)
    page = page_trend(conflict.rows(method, value, eps_list)) if len(eps_list) >= 2 else None
    out: dict[str, Any] = {"method": method, "value": value, "exponent": exponent, "page": page}
    ci = exponent["ci"] if exponent else None
    direction = interval_verdict(ci, above="rises", below="falls", neither="none")
    out["direction"] = direction if direction in ("rises", "falls", "none") else "none"
    out["verdict"] = {
        "rises": RISES,
        "falls": FALLS,
        "none": "no trend of μ with ε distinguishable at this size",
    }.get(direction, direction)
    if direction == "rises" and page and page["p_value"] > CHANCE:
        out["verdict"] += PAGE_UNCONFIRMED
    if exponent is None:
        out["verdict"] = "fewer than two training ε with μ > 0: no trend"
    if ci and bound and bound["applies"]:
        # an upper bound on the order: only a slope steeper than 2 (lower limit above) is news
        steeper = ci[0] > BOUND_RATE
        out["against_bound"] = (
            "steeper than the ε² bound (asymptotic)" if steeper else "within the ε² bound"
        )
    return out


def _mu_comparisons(conflict: _Conflict, grid: dict[str, Any]) -> list[dict[str, Any]]:
    """CA-AT's mean μ over vanilla AT's, per training ε and (γ, λ) pair, paired by seed."""
    rows = []
    for eps, label in zip(grid["train_eps"], grid["train_eps_labels"]):
        for gamma, lam in _pairs(grid):
            a, b = ("caat", gamma, eps), ("vanilla", lam, eps)
            if a not in conflict.mus or b not in conflict.mus:
                continue
            ratio = conflict.ratio(a, b)
            if ratio is None:
                continue
            ratio["verdict"] = interval_verdict(
                ratio["ci"],
                null=1.0,
                above="CA-AT's μ higher",
                below="CA-AT's μ lower",
                neither="not distinguishable",
            )
            rows.append({"train_eps": eps, "label": label, "gamma": gamma, "lam": lam, **ratio})
    return rows


def theorem_bound(header: dict[str, Any], table: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Theorem 1 as a reference: its rate ε², drawn through the smallest ε's mean μ.

    The theorem bounds the order of μ from above (O(ε²) in L2, O(d²ε²) in L∞), not its
    constant, so only the slope of the reference line is comparable with the data, and only a
    steeper slope would contradict it. It is stated for L_adv = L(x + δ, y): objectives whose
    adversarial loss is another function (TRADES' KL, CLP's distance) are shown against it for
    reference only.
    """
    norm, objective = header["norm"], header.get("objective", "pgd-ce")
    d = header.get("input_dim")
    applies = norm in ("linf", "l2") and objective == "pgd-ce"
    why = (
        "L_adv is the cross-entropy on x + δ, as in the theorem"
        if applies
        else f"the theorem is stated for L_adv = CE(x + δ); objective {objective} differs"
    )
    statement = (
        "Theorem 1: μ ≤ O(δ²) under an L2 budget and μ ≤ O(d²δ²) under L∞ (d = input "
        f"dimension{f', here {d}' if d else ''}); for a fixed input size both grow at most as δ²"
    )
    eps_all = sorted({row["train_eps"] for row in table})
    smallest = [row["mu"] for row in table if row["train_eps"] == eps_all[0] and row["mu"] > 0]
    reference = None
    if smallest:
        anchor = float(np.exp(np.mean(np.log(smallest))))  # geometric mean over settings
        reference = {"eps": eps_all, "mu": [anchor * (e / eps_all[0]) ** 2 for e in eps_all]}
    return {
        "statement": statement,
        "rate": BOUND_RATE,
        "applies": applies,
        "why": why,
        "input_dim": d,
        "reference": reference,
    }


def _trend_text(t: dict[str, Any]) -> str:
    name, e = setting_name(t["method"], t["value"]), t["exponent"]
    if e is None:
        return f"{name}: {t['verdict']}."
    page = f", Page's L one-sided p = {t['page']['p_value']:.3g}" if t["page"] else ""
    rate = f"; {t['against_bound']}" if t.get("against_bound") else ""
    return f"{name}: μ ∝ ε^b with b = {_signed(e['exponent'], e['ci'], 2)}{page}: {t['verdict']}{rate}."


def _ratio_text(c: dict[str, Any]) -> str:
    return (
        f"γ = {fmt(c['gamma'])} vs λ = {fmt(c['lam'])} at ε = {c['label']}: "
        f"{format_ci(c['ratio'], c['ci'], 2)}"
    )


def _conflict_headline(
    trends: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]], grid: dict[str, Any]
) -> str:
    """The pre-specified headline: the headline λ's exponent, and the headline pair's ratio at
    the largest training ε."""
    pair = headline_pair(grid)
    if pair is None:
        return ""
    gamma, lam = pair
    top = grid["train_eps"][-1]
    bits = [_trend_text(t) for t in trends if (t["method"], t["value"]) == ("vanilla", lam)]
    bits += [
        f"CA-AT's μ over vanilla AT's, {_ratio_text(c)} ({c['verdict']})."
        for c in comparisons
        if (c["gamma"], c["lam"], c["train_eps"]) == (gamma, lam, top)
    ]
    if not bits:
        return ""
    return (
        f"Headline (pre-specified: vanilla AT λ = {fmt(lam)} and CA-AT γ = {fmt(gamma)}, the "
        f"largest training ε {grid['train_eps_labels'][-1]}): " + " ".join(bits)
    )


def conflict_verdict(
    trends: Sequence[dict[str, Any]],
    comparisons: Sequence[dict[str, Any]],
    n_seeds: int,
    grid: dict[str, Any] | None = None,
) -> str:
    """Claim 2 in words: the headline, the trend per setting, then CA-AT against vanilla AT."""
    rises = sum(t.get("direction") == "rises" for t in trends)
    falls = sum(t.get("direction") == "falls" for t in trends)
    parts = [_conflict_headline(trends, comparisons, grid)] if grid else []
    parts.append(
        f"μ rises with the training ε for {rises} of {len(trends)} setting(s) and falls for "
        f"{falls}; for the rest no trend is distinguishable ({chance_text(rises + falls, len(trends))})."
    )
    parts += [_trend_text(t) for t in trends]
    if comparisons:
        lower = sum(c["verdict"] == "CA-AT's μ lower" for c in comparisons)
        higher = sum(c["verdict"] == "CA-AT's μ higher" for c in comparisons)
        listed = "; ".join(_ratio_text(c) for c in comparisons)
        parts.append(
            f"CA-AT's mean μ over vanilla AT's (ratio, 95 % interval): lower in {lower} of "
            f"{len(comparisons)} comparison(s), higher in {higher}, not distinguishable in "
            f"{len(comparisons) - lower - higher} ({chance_text(lower + higher, len(comparisons))}"
            f"; {listed})."
        )
    if n_seeds == 1:
        parts.append(
            "One seed: the intervals hold the step-to-step variation within runs, not the "
            "training randomness; add seeds before reading much into them."
        )
    return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------
# Claim 3: accuracy against the evaluation ε, per training ε (Table 1 / Fig. 6)


def _said(ci: Sequence[float], higher: str, lower: str, n: int) -> str:
    return interval_verdict(
        ci, above=higher, below=lower, neither=f"not distinguishable at {n} images"
    )


FAVOUR, AGAINST = "moves in CA-AT's favour", "moves against CA-AT"


def budget_claim(header: dict[str, Any], cells: Cells, scored: dict[str, Scored]) -> dict:
    """Table 1 (accuracy per setting × training ε × evaluation ε), the paired CA-AT − vanilla
    AT differences, how that gap moves, and what a larger training ε does."""
    grid, attack = header["grid"], header["claim_attack"]
    columns = ["clean", *grid["eval_eps_labels"]]
    accuracy = []
    for method, value in _settings(cells):
        for eps, label in zip(grid["train_eps"], grid["train_eps_labels"]):
            by_seed = cells.get((method, value, eps))
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            row: dict[str, Any] = {"method": method, "value": value, "train_eps": eps}
            row.update(label=label, seeds=seeds)
            for column in columns:
                arr = _array(by_seed, scored, seeds, _key(column, attack))
                interval = accuracy_interval([(int(r.sum()), r.size) for r in arr])
                row[column] = {
                    "value": interval["value"],
                    "ci": interval["ci"],
                    "interval_method": interval["method"],
                }
            accuracy.append(row)
    claim = {
        "columns": columns,
        "accuracy": accuracy,
        "headline": _headline_cell(grid),
        "differences": _differences(grid, cells, scored, attack, columns),
        "widening_eval": _widening_eval(grid, cells, scored, attack),
        "widening_train": _widening_train(grid, cells, scored, attack),
        "larger_eps": _larger_eps(grid, cells, scored, attack, columns),
    }
    claim["verdict"] = budget_verdict(claim, grid)
    return claim


def _headline_cell(grid: dict[str, Any]) -> dict[str, Any] | None:
    """Claim 3's pre-specified cell: the headline pair at the largest training ε, evaluated at
    that same ε (Table 1's layout; the largest evaluation ε can sit at the floor, 0 for every
    model, where no difference can show), else at the largest evaluation ε."""
    pair = headline_pair(grid)
    labels = [lb for lb in grid["eval_eps_labels"] if lb != "0"]
    if pair is None or not labels:
        return None
    train_label = grid["train_eps_labels"][-1]
    column = train_label if train_label in labels else labels[-1]
    return {"gamma": pair[0], "lam": pair[1], "train_eps": grid["train_eps"][-1]} | {
        "column": column
    }


def _differences(
    grid: dict[str, Any], cells: Cells, scored: dict[str, Scored], attack: str, columns: list
) -> list[dict[str, Any]]:
    """CA-AT γ − vanilla AT λ at every training ε and column, paired by image and seed."""
    rows = []
    for eps, label, gamma, lam, a, b, seeds in _paired_cells(grid, cells):
        for column in columns:
            key = _key(column, attack)
            diff = paired_difference(_array(a, scored, seeds, key), _array(b, scored, seeds, key))
            diff["interval_method"] = diff.pop("method")
            said = _said(diff["ci"], "CA-AT higher", "vanilla AT higher", diff["n_images"])
            rows.append(
                {"train_eps": eps, "label": label, "gamma": gamma, "lam": lam}
                | {"column": column, **diff, "verdict": said}
            )
    return rows


def _gap(caat: dict[int, Any], vanilla: dict[int, Any], scored, seeds, key) -> float:
    """CA-AT − vanilla AT accuracy of one cell, the mean over seeds and images."""
    return float(
        _array(caat, scored, seeds, key).mean() - _array(vanilla, scored, seeds, key).mean()
    )


def _gap_change(
    start: tuple[dict[int, Any], dict[int, Any], tuple[str, str]],
    end: tuple[dict[int, Any], dict[int, Any], tuple[str, str]],
    scored: dict[str, Scored],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """gap(end) − gap(start), a contrast of four terms bootstrapped on the shared images and
    seeds, with both gaps: a positive change moves the gap in CA-AT's favour (a negative gap
    shrinking counts too), which "widens" would misname."""
    (a0, b0, k0), (a1, b1, k1) = start, end
    terms = [
        (1.0, _array(a1, scored, seeds, k1)),
        (-1.0, _array(b1, scored, seeds, k1)),
        (-1.0, _array(a0, scored, seeds, k0)),
        (1.0, _array(b0, scored, seeds, k0)),
    ]
    contrast = paired_contrast(terms)
    contrast["gap_from"] = _gap(a0, b0, scored, seeds, k0)
    contrast["gap_to"] = _gap(a1, b1, scored, seeds, k1)
    contrast["verdict"] = _said(contrast["ci"], FAVOUR, AGAINST, contrast["n_images"])
    return contrast


def _widening_eval(
    grid: dict[str, Any], cells: Cells, scored: dict[str, Scored], attack: str
) -> list[dict[str, Any]]:
    """gap(largest evaluation ε) − gap(smallest), per training ε and pair."""
    labels = [lb for lb in grid["eval_eps_labels"] if lb != "0"]
    if len(labels) < 2:
        return []
    rows = []
    for eps, label, gamma, lam, a, b, seeds in _paired_cells(grid, cells):
        change = _gap_change(
            (a, b, (attack, labels[0])), (a, b, (attack, labels[-1])), scored, seeds
        )
        rows.append(
            {"train_eps": eps, "label": label, "gamma": gamma, "lam": lam}
            | {"from": labels[0], "to": labels[-1], **change}
        )
    return rows


def _widening_train(
    grid: dict[str, Any], cells: Cells, scored: dict[str, Scored], attack: str
) -> list[dict[str, Any]]:
    """gap at the largest training ε − gap at the smallest, per pair and evaluation ε."""
    if len(grid["train_eps"]) < 2:
        return []
    low, high = grid["train_eps"][0], grid["train_eps"][-1]
    rows = []
    for gamma, lam in _pairs(grid):
        a_hi, b_hi = cells.get(("caat", gamma, high)), cells.get(("vanilla", lam, high))
        a_lo, b_lo = cells.get(("caat", gamma, low)), cells.get(("vanilla", lam, low))
        seeds = _common_seeds(a_hi, b_hi, a_lo, b_lo)
        if not seeds:
            continue
        for column in grid["eval_eps_labels"]:
            key = _key(column, attack)
            change = _gap_change((a_lo, b_lo, key), (a_hi, b_hi, key), scored, seeds)
            rows.append(
                {"gamma": gamma, "lam": lam, "column": column, "from_eps": low, "to_eps": high}
                | change
            )
    return rows


def _larger_eps(
    grid: dict[str, Any], cells: Cells, scored: dict[str, Scored], attack: str, columns: list
) -> list[dict[str, Any]]:
    """Each adversarial setting trained at the largest ε minus at the smallest, per column."""
    if len(grid["train_eps"]) < 2:
        return []
    low, high = grid["train_eps"][0], grid["train_eps"][-1]
    rows = []
    for method, value in _settings(cells):
        if not adversarial(method, value):
            continue
        hi, lo = cells.get((method, value, high)), cells.get((method, value, low))
        seeds = _common_seeds(hi, lo)
        if not seeds:
            continue
        for column in columns:
            key = _key(column, attack)
            diff = paired_difference(_array(hi, scored, seeds, key), _array(lo, scored, seeds, key))
            said = _said(diff["ci"], "gains", "loses", diff["n_images"])
            rows.append(
                {**diff, "interval_method": diff["method"], "method": method, "value": value}
                | {"column": column, "from_eps": low, "to_eps": high, "verdict": said}
            )
    return rows


def _count(rows: Sequence[dict[str, Any]], words: tuple[str, str]) -> str:
    up = sum(r["verdict"] == words[0] for r in rows)
    down = sum(r["verdict"] == words[1] for r in rows)
    return (
        f"{words[0]} in {up}, {words[1]} in {down}, not distinguishable in "
        f"{len(rows) - up - down} ({chance_text(up + down, len(rows))})"
    )


def _pair_text(row: dict[str, Any]) -> str:
    return f"γ = {fmt(row['gamma'])} − λ = {fmt(row['lam'])}"


def _change_text(row: dict[str, Any]) -> str:
    return (
        f"gap {row['gap_from']:+.3f} → {row['gap_to']:+.3f}, change "
        f"{_signed(row['value'], row['ci'])}"
    )


def _budget_headline(claim: dict[str, Any], grid: dict[str, Any]) -> str:
    cell = claim["headline"]
    if cell is None:
        return ""
    found = [
        r
        for r in claim["differences"]
        if (r["gamma"], r["lam"], r["train_eps"], r["column"])
        == (cell["gamma"], cell["lam"], cell["train_eps"], cell["column"])
    ]
    said = (
        f"{_signed(found[0]['difference'], found[0]['ci'])} ({found[0]['verdict']})"
        if found
        else "not measured"
    )
    return (
        f"Headline (pre-specified: CA-AT γ = {fmt(cell['gamma'])} − vanilla AT λ = "
        f"{fmt(cell['lam'])}, robust accuracy at the largest training ε = "
        f"{grid['train_eps_labels'][-1]}, evaluated at ε = {cell['column']}): {said}."
    )


def budget_verdict(claim: dict[str, Any], grid: dict[str, Any]) -> str:
    """Claim 3 in words: the headline, the paired gap at each budget, how it moves, and what a
    larger training ε does to each setting."""
    labels = [lb for lb in grid["eval_eps_labels"] if lb != "0"]
    robust = [r for r in claim["differences"] if r["column"] != "clean"]
    clean = [r for r in claim["differences"] if r["column"] == "clean"]
    if not robust:
        return "No CA-AT and vanilla AT runs share seeds here: nothing to compare."
    parts = [
        _budget_headline(claim, grid),
        f"CA-AT − vanilla AT robust accuracy over {len(robust)} (pair, training ε, evaluation ε) "
        f"cell(s): {_count(robust, ('CA-AT higher', 'vanilla AT higher'))}; clean accuracy: "
        f"{_count(clean, ('CA-AT higher', 'vanilla AT higher'))}.",
    ]
    top_label = labels[-1] if labels else None
    if claim["widening_eval"]:
        w = claim["widening_eval"]
        parts.append(
            f"From evaluation ε = {w[0]['from']} to {w[0]['to']}, over {len(w)} (pair, training "
            f"ε) case(s), the gap {_count(w, (FAVOUR, AGAINST))}: "
            + "; ".join(
                f"{_pair_text(r)} at training ε = {r['label']}: {_change_text(r)}" for r in w
            )
            + "."
        )
    wt = [r for r in claim["widening_train"] if r["column"] == top_label]
    if wt:
        parts.append(
            f"From training ε = {grid['train_eps_labels'][0]} to {grid['train_eps_labels'][-1]}, "
            f"over {len(wt)} pair(s), the gap at evaluation ε = {top_label} "
            f"{_count(wt, (FAVOUR, AGAINST))}: "
            + "; ".join(f"{_pair_text(r)}: {_change_text(r)}" for r in wt)
            + "."
        )
    parts += _larger_eps_text(claim["larger_eps"], grid, top_label)
    return " ".join(p for p in parts if p)


def _larger_eps_text(rows: Sequence[dict[str, Any]], grid: dict[str, Any], top: str | None) -> list:
    """ "vanilla AT λ = 0.5 trained at 16/255 instead of 8/255: SA −0.04 [..] (loses), …"."""
    if not rows:
        return []
    out = []
    for method, value in dict.fromkeys((r["method"], r["value"]) for r in rows):
        mine = {r["column"]: r for r in rows if (r["method"], r["value"]) == (method, value)}
        bits = [
            f"{'SA' if column == 'clean' else f'AA@{column}'} "
            f"{_signed(mine[column]['difference'], mine[column]['ci'])} ({mine[column]['verdict']})"
            for column in ("clean", top)
            if column in mine
        ]
        out.append(
            f"{setting_name(method, value)} trained at ε = {grid['train_eps_labels'][-1]} instead "
            f"of {grid['train_eps_labels'][0]}: " + ", ".join(bits) + "."
        )
    return out
