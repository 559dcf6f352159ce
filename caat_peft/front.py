"""SA–AA front sweeps: vanilla AT over λ and CA-AT over γ, their Pareto fronts and hypervolumes.

The paper's evidence is not one number but a front: standard accuracy (SA) against adversarial
accuracy (AA) as the trade-off knob moves (Fig. 3: λ ∈ {0, 0.5, 1}, γ ∈ {0.8, 0.9, 1}). A method
is better when its front lies up and to the right, which the hypervolume (the area of the unit
square it dominates, reference point (0, 0)) condenses into one number per method.

``run_front`` trains one run per (method, value, seed) point, each in its own run directory under
the output directory, and is resumable: a finished run (``final.json``) is reused, a killed one is
resumed from its newest checkpoint or restarted. Results go to ``front.json`` (machines),
``front.md`` (people) and ``front.png`` (both fronts as step lines). See ``docs/front.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caat_peft.config import (
    Config,
    ConfigError,
    first_difference,
    load_config,
    load_run_config,
    to_dict,
)
from caat_peft.errors import UserError
from caat_peft.evaluation.store import atomic_write_text
from caat_peft.front_uncertainty import hypervolume_difference, point_images, point_intervals
from caat_peft.stats import format_ci
from caat_peft.training import train
from caat_peft.training.checkpoint import list_checkpoints
from caat_peft.training.trainer import HEAD_INIT_DIR

#: The two methods of a front, with the config key of each one's trade-off knob.
METHODS: dict[str, str] = {"vanilla": "lam", "caat": "gamma"}
#: Each method's trade-off symbol and its name in reports (front.md, study.md, the figures).
SYMBOL = {"vanilla": "λ", "caat": "γ"}
DISPLAY = {"vanilla": "vanilla AT", "caat": "CA-AT"}
EVAL_ATTACKS = ("pgd20", "autoattack")
#: The PGD steps pinned for every run of a front, so that final.json always holds PGD-20 numbers
#: and a front evaluated with pgd20 and then autoattack reuses the same trained runs.
FRONT_EVAL_STEPS = 20
AUTOATTACK_DIRNAME = "eval-autoattack"
FORMAT = "caat-peft-front/1"

# option name -> (symbol, check, allowed range as written in messages)
_RANGES: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "lambdas": ("λ", lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
    "gammas": ("γ", lambda v: -1.0 < v <= 1.0, "(-1, 1]"),
}


# --------------------------------------------------------------------------------------------
# Parsing the sweep values


def _option_key(option: str) -> str:
    key = option.lstrip("-").lower()
    if key not in _RANGES:
        raise ValueError(f"unknown sweep option {option!r} (use --lambdas or --gammas)")
    return key


def check_values(values: Sequence[float], option: str = "--lambdas") -> list[float]:
    """Validate sweep values for ``option`` (--lambdas or --gammas); drop repeats, keep order.

    A repeat would train the same point twice into the same run directory, so it is dropped
    rather than refused: ``0.5,0.50`` means one point.
    """
    key = _option_key(option)
    symbol, ok, allowed = _RANGES[key]
    if len(values) == 0:
        raise UserError(f"--{key}: give at least one value of {symbol} in {allowed}, e.g. 0,0.5,1")
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"--{key}: {value!r} is not a number (values of {symbol} in {allowed})")
        number = float(value)
        if not math.isfinite(number) or not ok(number):
            raise UserError(f"--{key}: {symbol} = {value!r} is outside the allowed range {allowed}")
        if number not in out:
            out.append(number)
    return out


def parse_values(text: str, option: str = "--lambdas") -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``, checked against the range of ``option``.

    λ (--lambdas) must lie in [0, 1] and γ (--gammas) in (-1, 1], the ranges where the combiners
    are defined; anything else is a UserError with one line naming the option and the range.
    """
    key = _option_key(option)
    symbol, _, allowed = _RANGES[key]
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise UserError(f"--{key}: give at least one value of {symbol} in {allowed}, e.g. 0,0.5,1")
    parsed: list[float] = []
    for part in parts:
        try:
            parsed.append(float(part))
        except ValueError:
            raise UserError(
                f"--{key}: {part!r} is not a number (comma-separated values of {symbol} in "
                f"{allowed}, e.g. 0,0.5,1)"
            ) from None
    return check_values(parsed, option)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: training seeds (non-negative integers, repeats dropped)."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part.isdigit():
            raise UserError(
                f"--seeds: {part!r} is not a non-negative integer (comma-separated, e.g. 0,1,2)"
            )
        if int(part) not in seeds:
            seeds.append(int(part))
    return seeds


# --------------------------------------------------------------------------------------------
# Pareto front and hypervolume (pure functions on (SA, AA) pairs)


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """True if ``p`` is at least as good as ``q`` on both axes and better on one (maximising)."""
    return p[0] >= q[0] and p[1] >= q[1] and (p[0] > q[0] or p[1] > q[1])


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, ordered by SA ascending (so AA descending).

    Both axes are maximised. Identical points do not dominate each other, so every copy of a
    point on the front is kept; a point that ties on one axis and loses on the other is dropped.
    O(n²), which is nothing next to training one run per point.
    """
    keep = [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]
    return sorted(keep, key=lambda i: (points[i][0], -points[i][1], i))


def hypervolume(
    points: Sequence[Sequence[float]], reference: tuple[float, float] = (0.0, 0.0)
) -> float:
    """Area of the region of the unit square dominated by ``points`` and dominating ``reference``.

    With the front sorted by SA ascending (x₁ < x₂ < …, y₁ > y₂ > …) the region is a staircase:
    HV = Σ (xᵢ − xᵢ₋₁)·(yᵢ − r_y) with x₀ = r_x. Coordinates are clipped to [reference, 1]
    (accuracies never leave [0, 1]; the clip keeps a bad input from inflating the area).
    """
    rx, ry = reference
    clipped = [(min(max(p[0], rx), 1.0), min(max(p[1], ry), 1.0)) for p in points]
    useful = [p for p in clipped if p[0] > rx and p[1] > ry]
    area, previous_x = 0.0, rx
    for i in pareto_front(useful):
        x, y = useful[i]
        if x > previous_x:  # exact duplicates add nothing
            area += (x - previous_x) * (y - ry)
            previous_x = x
    return area


# --------------------------------------------------------------------------------------------
# The sweep plan


@dataclass(frozen=True)
class SweepPoint:
    """One training run of the sweep: a method, its trade-off value and a seed."""

    method: str  # vanilla | caat
    value: float  # λ for vanilla, γ for caat
    seed: int
    name: str  # run directory name under the output directory
    cfg: Config
    # every override after the recipe that rebuilds ``cfg``: what a printed `caat-peft train`
    # command for this point (``caat-peft study --plan``) has to pass
    overrides: tuple[str, ...] = ()

    @property
    def knob(self) -> str:
        return METHODS[self.method]


def fmt(value: float) -> str:
    """Exact, short text for a value in a directory name or label: 0.5, 1, 0.95, -0.2.

    The shortest round-tripping repr, so that two different values never share a run directory
    (``f"{v:g}"`` would round to 6 digits).
    """
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def point_name(method: str, value: float, seed: int, base_seed: int) -> str:
    """``vanilla-lam0.5``, ``caat-gamma0.9``; ``-seed1`` when the seed is not the recipe's own.

    The recipe's seed gets no suffix, so a single-seed sweep extended later with more seeds
    reuses its runs instead of training them again under a new name.
    """
    name = f"{method}-{METHODS[method]}{fmt(value)}"
    return name if seed == base_seed else f"{name}-seed{seed}"


def saved_config_difference(point: SweepPoint, run_dir: Path) -> str | None:
    """How the run in ``run_dir`` was configured differently from ``point`` (None: the same)."""
    from caat_peft.training.head_init import first_stage_only, stage_one_difference

    if first_stage_only(run_dir):  # train.init_head, stopped in (or after) its first stage
        return stage_one_difference(point.cfg, run_dir)
    try:
        saved = load_run_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise UserError(
            f"{point.name}: the run's config.yaml in {run_dir} no longer loads ({exc}); delete "
            "that run directory or choose another --output-dir"
        ) from None
    return first_difference(to_dict(point.cfg), to_dict(saved))


def run_state(run_dir: Path) -> str:
    """done (final.json), resume (killed, with a checkpoint), restart (killed, none), or new."""
    if (run_dir / "final.json").is_file():
        return "done"
    if (run_dir / HEAD_INIT_DIR / "config.yaml").is_file():
        return "resume"  # train.init_head: a finished first stage is kept, a killed one resumes
    if (run_dir / "config.yaml").is_file():
        return "resume" if list_checkpoints(run_dir) else "restart"
    return "new"


def plan_sweep(
    recipe: str | Path,
    *,
    lambdas: Sequence[float],
    gammas: Sequence[float],
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> list[SweepPoint]:
    """Every point's resolved config, built (and so validated) before anything is trained.

    The front's own overrides come after the user's, so they win: ``combiner.kind`` and the
    knob, ``train.seed``, and ``eval.steps`` pinned to 20 (the eval attack is explicit).
    """
    base = load_config(recipe, list(overrides))
    base_seed = base.train.seed
    seed_list = [base_seed] if seeds is None else list(dict.fromkeys(int(s) for s in seeds))
    if not seed_list:
        raise UserError("--seeds: give at least one seed, e.g. 0,1,2")
    sweep = {"vanilla": list(lambdas), "caat": list(gammas)}
    points: list[SweepPoint] = []
    # Seed-major: a sweep stopped half-way already holds whole fronts for the first seeds.
    for seed in seed_list:
        for method, values in sweep.items():
            for value in values:
                extra = [
                    f"combiner.kind={method}",
                    f"combiner.{METHODS[method]}={value!r}",
                    f"train.seed={seed}",
                    f"eval.steps={FRONT_EVAL_STEPS}",
                ]
                everything = (*overrides, *extra)
                cfg = load_config(recipe, list(everything))
                name = point_name(method, value, seed, base_seed)
                points.append(SweepPoint(method, float(value), seed, name, cfg, everything))
    return points


def check_saved_configs(points: Sequence[SweepPoint], out: Path) -> None:
    """Refuse, before anything trains, a finished or resumable run configured differently from
    what is asked now: reusing it would silently mix two experiments in one result."""
    for point in points:
        run_dir = out / point.name
        if run_state(run_dir) in ("done", "resume"):
            difference = saved_config_difference(point, run_dir)
            if difference is not None:
                raise UserError(
                    f"{point.name}: the run in {run_dir} was made with another config "
                    f"({difference}); pass the same --set values, delete that run directory, "
                    "or choose another --output-dir"
                )


def train_point(
    point: SweepPoint,
    run_dir: Path,
    trainer: Callable[..., Any],
    *,
    head: str,
    progress: bool,
) -> tuple[dict[str, Any], str]:
    """(final.json, "reused" | "trained") of one point: reuse, resume, restart or train it.

    ``trainer`` is passed in (``caat_peft.training.train`` in production) so that each caller's
    module-level ``train`` stays the one tests replace.
    """
    state = run_state(run_dir)
    if state == "done":
        return json.loads((run_dir / "final.json").read_text()), "reused"
    verb = {"new": "training", "resume": "resuming", "restart": "restarting"}[state]
    say(progress, f"{head}: {verb} …")
    try:
        result = trainer(
            point.cfg,
            run_dir,
            overwrite=state == "restart",
            resume=state == "resume",
            progress=progress,
        )
    except UserError as exc:
        raise UserError(f"{point.name}: {exc}") from None
    return result.final, "trained"


# --------------------------------------------------------------------------------------------
# Measuring one finished run


def selected_model(final: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The model a user would keep: the validation-selected one when the run has a val split."""
    best = final.get("best")
    if isinstance(best, dict) and "clean_acc" in best and "robust_acc" in best:
        return "best", best
    return "last", final


class SplitCache:
    """Test splits by data config: every point of a sweep evaluates on the same images."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, cfg: Config) -> Any:
        from caat_peft.data import build_splits
        from caat_peft.models import preprocessing_for_config

        key = json.dumps([to_dict(cfg)["data"], to_dict(cfg)["model"]], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = build_splits(cfg.data, preprocessing_for_config(cfg.model))
        return self._cache[key]


def check_autoattack(cfg: Config, budget: Any, splits: SplitCache) -> None:
    """Fail before training when AutoAttack cannot run on this data (e.g. under 4 classes)."""
    from caat_peft.evaluation import attack_config, resolve_budget

    data = splits.get(cfg)
    try:
        attack_config(
            "autoattack",
            cfg.attack.norm,
            resolve_budget(budget),
            cfg.model.num_classes or data.num_classes,
        )
    except UserError as exc:
        raise UserError(f"--eval-attack autoattack: {exc} (or use --eval-attack pgd20)") from None


def evaluate_run(
    cfg: Config,
    run_dir: Path,
    model_kind: str,
    splits: SplitCache,
    dirname: str,
    *,
    attacks: str | Sequence[str],
    eps_list: Sequence[float],
    budget: Any,
    sanity: bool,
    progress: bool,
) -> tuple[dict[str, Any], Path]:
    """The evaluation suite on a finished run's selected model (``model_kind``: last | best),
    on its held-out split, into ``run_dir / dirname`` (resumable per sample): the front's
    AutoAttack and the study's evaluation at every ε. Returns (eval result, eval.json path)."""
    from caat_peft.evaluation import run_eval
    from caat_peft.models.loading import load_trained

    data = splits.get(cfg)
    adapter = run_dir / ("best_adapter" if model_kind == "best" else "adapter")
    model = load_trained(cfg, cfg.model.num_classes or data.num_classes, adapter)
    result, json_path, _ = run_eval(
        model,
        data.test,
        run_dir / dirname,
        attacks=attacks,
        eps_list=list(eps_list),
        norm=cfg.attack.norm,
        budget=budget,
        limit=cfg.eval.limit,
        batch_size=cfg.eval.batch_size,
        seed=0,
        sanity=sanity,
        device="auto",
        progress=progress,
    )
    return result, json_path


def _autoattack(
    point: SweepPoint,
    run_dir: Path,
    model_kind: str,
    splits: SplitCache,
    *,
    budget: Any,
    sanity: bool,
    progress: bool,
) -> dict[str, Any]:
    """AutoAttack at the run's evaluation ε on its held-out split; resumable per sample."""
    cfg = point.cfg
    eps = cfg.attack.eps if cfg.eval.eps is None else cfg.eval.eps
    result, json_path = evaluate_run(
        cfg,
        run_dir,
        model_kind,
        splits,
        AUTOATTACK_DIRNAME,
        attacks="autoattack",
        eps_list=[eps],
        budget=budget,
        sanity=sanity,
        progress=progress,
    )
    label = result["eps"][0]["label"]
    return {
        "clean_acc": result["clean_accuracy"],
        "robust_acc": result["worst_case"][label],
        "eval_n": result["n_samples"],
        "protocol": result["protocol"],
        "sanity": (result.get("sanity") or {}).get("status"),
        "eval_json": str(json_path.relative_to(run_dir.parent)),
    }


def _measure(
    point: SweepPoint,
    run_dir: Path,
    final: dict[str, Any],
    eval_attack: str,
    splits: SplitCache,
    *,
    budget: Any,
    sanity: bool,
    progress: bool,
) -> dict[str, Any]:
    """(SA, AA) of one run, with where they came from."""
    model_kind, scores = selected_model(final)
    entry: dict[str, Any] = {
        "seed": point.seed,
        "clean_acc": float(scores["clean_acc"]),
        "robust_acc": float(scores["robust_acc"]),
        "run_dir": point.name,
        "model": model_kind,
        "eval_n": final.get("eval_n"),
        "train_seconds": final.get("seconds"),
    }
    if eval_attack == "autoattack":
        entry["pgd20_acc"] = entry["robust_acc"]
        entry.update(
            _autoattack(
                point,
                run_dir,
                model_kind,
                splits,
                budget=budget,
                sanity=sanity,
                progress=progress,
            )
        )
    return entry


# --------------------------------------------------------------------------------------------
# Aggregation and reports


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values))


def summarize_points(
    entries: dict[tuple[str, float], list[dict[str, Any]]],
    images: dict[tuple[str, float], dict[int, tuple]] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """The front.json body from per-seed entries keyed by (method, value).

    A point's SA and AA are the means over its seeds (per-seed values kept under "seeds"),
    with 95 % intervals (Wilson over images for one seed, t over seeds for several); fronts
    and hypervolumes are computed on those means. With every point's per-image results
    (``images[(method, value)][seed]``) the hypervolume difference gets its bootstrap interval.
    """
    points: list[dict[str, Any]] = []
    for (method, value), per_seed in entries.items():
        sa = [e["clean_acc"] for e in per_seed]
        aa = [e["robust_acc"] for e in per_seed]
        point: dict[str, Any] = {
            "method": method,
            METHODS[method]: value,
            "clean_acc": _mean(sa),
            "robust_acc": _mean(aa),
            "run_dir": per_seed[0]["run_dir"],
            "seeds": per_seed,
            **point_intervals(per_seed),
        }
        if len(per_seed) > 1:
            point["clean_acc_std"] = statistics.stdev(sa)
            point["robust_acc_std"] = statistics.stdev(aa)
        points.append(point)

    hv: dict[str, float] = {}
    pareto: dict[str, list[float]] = {}
    for method, knob in METHODS.items():
        mine = [p for p in points if p["method"] == method]
        xy = [(p["clean_acc"], p["robust_acc"]) for p in mine]
        pareto[method] = [mine[i][knob] for i in pareto_front(xy)]
        hv[method] = hypervolume(xy)
    body: dict[str, Any] = {"points": points, "hypervolume": hv, "pareto": pareto}
    if images and seeds:
        body["hypervolume_difference"] = hypervolume_difference(images, seeds)

    n_seeds = max((len(p["seeds"]) for p in points), default=0)
    if n_seeds > 1:  # the spread of the hypervolume over seeds, seed by seed
        per_seed_hv: dict[str, list[float]] = {}
        for method in METHODS:
            mine = [p for p in points if p["method"] == method]
            per_seed_hv[method] = [
                hypervolume(
                    [(p["seeds"][k]["clean_acc"], p["seeds"][k]["robust_acc"]) for p in mine]
                )
                for k in range(n_seeds)
                if all(len(p["seeds"]) > k for p in mine)
            ]
        body["hypervolume_per_seed"] = per_seed_hv
    return body


def attack_title(eval_attack: str, budget: Any) -> str:
    if eval_attack == "pgd20":
        return "PGD-20"
    return "AutoAttack" if budget in (None, "standard") else f"AutoAttack, {budget} budget"


def render_markdown(front: dict[str, Any]) -> str:
    """front.md: one row per point, the Pareto marks, and each method's hypervolume."""
    attack = front.get("eval_attack_title", "robust")
    several = any(len(p["seeds"]) > 1 for p in front["points"])
    lines = [f"# SA–AA front: {Path(front.get('recipe', '')).name}", ""]
    seeds = front.get("seeds")
    if seeds:
        lines.append(
            f"SA = clean accuracy, AA = {attack} accuracy on the held-out split"
            + (f"; means over seeds {', '.join(map(str, seeds))}" if several else "")
            + ". Brackets: 95 % intervals ("
            + ("Student t over seeds" if several else "Wilson score over images")
            + ")."
        )
        lines.append("")
    lines.append(f"| method | trade-off | SA | AA ({attack}) | on front | run |")
    lines.append("|---|---|---:|---:|:---:|---|")
    for p in front["points"]:
        method, knob = p["method"], METHODS[p["method"]]
        on = p[knob] in front["pareto"][method]
        sa = format_ci(p["clean_acc"], p.get("clean_acc_ci"), 4)
        aa = format_ci(p["robust_acc"], p.get("robust_acc_ci"), 4)
        lines.append(
            f"| {DISPLAY[method]} | {SYMBOL[method]} = {fmt(p[knob])} | {sa} | {aa} | "
            f"{'✓' if on else ''} | {p['run_dir']} |"
        )
    hv = front["hypervolume"]
    lines += [
        "",
        "Hypervolume (area of the unit square dominated by the front, reference (0, 0); "
        f"higher is better): vanilla AT **{hv['vanilla']:.4f}**, CA-AT **{hv['caat']:.4f}**.",
    ]
    difference = front.get("hypervolume_difference")
    if difference:
        lines += [
            "",
            f"**{difference['verdict']}** ({difference['interval_method']}, "
            f"{difference['replicates']} resamples.)",
        ]
    elif front.get("complete", True) and "hypervolume_difference" in front:
        lines += [
            "",
            "No interval on the hypervolume difference: some run lacks per-image "
            "results (eval_samples.json) or was scored on other images.",
        ]
    if not front.get("complete", True):
        lines += ["", "*Sweep in progress: points still missing.*"]
    return "\n".join(lines) + "\n"


def plot_front(front: dict[str, Any], path: str | Path) -> None:
    """front.png: SA (x) against AA (y), each method's front as a step line, points labelled.

    Uses the object-oriented Agg API, not pyplot, so that plotting from a library leaves the
    caller's matplotlib state (backend, current figure) alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_front(ax, front, f"SA–AA front: {Path(front.get('recipe', '')).name}")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> None:
    """Write a PNG atomically: a killed run never leaves half an image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def draw_front(ax: Any, front: dict[str, Any], title: str) -> None:
    """Both methods' fronts on one matplotlib axis (front.png's panel; the study's per ε).

    ``front`` needs ``points``, ``hypervolume`` and optionally ``hypervolume_difference`` and
    ``eval_attack_title``, as :func:`summarize_points` returns them.
    """
    colours = {"vanilla": "tab:blue", "caat": "tab:red"}
    for method, knob in METHODS.items():
        mine = [p for p in front["points"] if p["method"] == method]
        if not mine:
            continue
        colour = colours[method]
        xy = [(p["clean_acc"], p["robust_acc"]) for p in mine]
        on_front = pareto_front(xy)
        fx = [xy[i][0] for i in on_front]
        fy = [xy[i][1] for i in on_front]
        hv = front["hypervolume"][method]
        ax.step(fx, fy, where="pre", color=colour, lw=1.8, label=f"{DISPLAY[method]} (HV {hv:.3f})")
        off = [i for i in range(len(mine)) if i not in on_front]
        ax.scatter(fx, fy, color=colour, zorder=3, s=28)
        if off:
            ax.scatter(
                [xy[i][0] for i in off],
                [xy[i][1] for i in off],
                facecolors="none",
                edgecolors=colour,
                zorder=3,
                s=28,
            )
        for p, (x, y) in zip(mine, xy):
            if p.get("clean_acc_ci") and p.get("robust_acc_ci"):  # the 95 % intervals
                (x_lo, x_hi), (y_lo, y_hi) = p["clean_acc_ci"], p["robust_acc_ci"]
                ax.errorbar(
                    x,
                    y,
                    xerr=[[max(0.0, x - x_lo)], [max(0.0, x_hi - x)]],
                    yerr=[[max(0.0, y - y_lo)], [max(0.0, y_hi - y)]],
                    color=colour,
                    lw=0.8,
                )
            ax.annotate(
                f"{SYMBOL[method]}={fmt(p[knob])}",
                (x, y),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
                color=colour,
            )
    ax.set_xlabel("SA (clean accuracy)")
    ax.set_ylabel(f"AA ({front.get('eval_attack_title', 'robust')} accuracy)")
    difference = front.get("hypervolume_difference")
    if difference:  # the verdict in words, as front.md gives it
        lo, hi = difference["ci"]
        said = "CA-AT above" if lo > 0 else "vanilla AT above" if hi < 0 else "not distinguishable"
        title += (
            f"\nHV(CA-AT) − HV(vanilla) {difference['caat_minus_vanilla']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}]: {said}"
        )
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if front["points"]:
        ax.legend(fontsize=8, loc="best")


def _write_reports(front: dict[str, Any], out: Path, *, plot: bool) -> None:
    atomic_write_text(out / "front.json", json.dumps(front, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "front.md", render_markdown(front))
    if plot:
        plot_front(front, out / "front.png")


# --------------------------------------------------------------------------------------------
# The sweep


def say(enabled: bool, message: str) -> None:
    """Progress on stderr, so that stdout keeps only the results table."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _check_front_options(
    lambdas: Sequence[float], gammas: Sequence[float], eval_attack: str, budget: Any, out: Path
) -> tuple[list[float], list[float]]:
    """The sweep values checked, and everything else a user can get wrong before planning."""
    if eval_attack not in EVAL_ATTACKS:
        raise UserError(
            f"--eval-attack {eval_attack!r} is not supported (use one of: {', '.join(EVAL_ATTACKS)})"
        )
    lambdas = check_values(lambdas, "--lambdas") if len(lambdas) else []
    gammas = check_values(gammas, "--gammas") if len(gammas) else []
    if not lambdas and not gammas:
        raise UserError("give --lambdas or --gammas (or both): the sweep has no points")
    if eval_attack == "autoattack":
        from caat_peft.evaluation import resolve_budget

        resolve_budget(budget)  # a bad budget fails now, not after the first training run
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file (choose another --output-dir)")
    return lambdas, gammas


def run_front(
    recipe: str | Path,
    *,
    lambdas: Sequence[float],
    gammas: Sequence[float],
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    eval_attack: str = "pgd20",
    budget: Any = "standard",
    seeds: Sequence[int] | None = None,
    sanity: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) every point of the sweep, then write and return the front.

    ``lambdas`` sweep vanilla AT, ``gammas`` CA-AT (one of the two may be empty). ``seeds`` are
    training seeds (None: the recipe's own ``train.seed``); a point's SA / AA are the means over
    them. ``eval_attack`` is "pgd20" (the runs' own PGD-20 held-out numbers) or "autoattack"
    (the evaluation suite on each run, ``budget`` "standard" or "fast", its sanity checks unless
    ``sanity=False``). Each run's validation-selected model is used when it has a val split.
    Returns the content of ``front.json``.
    """
    out = Path(output_dir)
    lambdas, gammas = _check_front_options(lambdas, gammas, eval_attack, budget, out)
    points = plan_sweep(recipe, lambdas=lambdas, gammas=gammas, overrides=overrides, seeds=seeds)
    check_saved_configs(points, out)
    splits = SplitCache()
    if eval_attack == "autoattack":
        check_autoattack(points[0].cfg, budget, splits)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out} ({exc.strerror})") from None

    front: dict[str, Any] = {
        "format": FORMAT,
        "recipe": str(recipe),
        "overrides": list(overrides),
        "eval_attack": eval_attack,
        "eval_attack_title": attack_title(eval_attack, budget),
        "seeds": list(dict.fromkeys(p.seed for p in points)),
    }
    if eval_attack == "autoattack":
        front["budget"] = budget if isinstance(budget, str) else repr(budget)
    entries: dict[tuple[str, float], list[dict[str, Any]]] = {}
    images: dict[tuple[str, float], dict[int, tuple]] = {}
    measure = {"budget": budget, "sanity": sanity, "progress": progress}
    for number, point in enumerate(points, 1):
        head = (
            f"[{number}/{len(points)}] {point.name} "
            f"({SYMBOL[point.method]} = {fmt(point.value)}, seed {point.seed})"
        )
        entry, scored = _front_point(point, out, eval_attack, splits, head, measure)
        entries.setdefault((point.method, point.value), []).append(entry)
        if scored is not None:
            images.setdefault((point.method, point.value), {})[point.seed] = scored
        done = number == len(points)
        front.update(summarize_points(entries, images if done else None, front["seeds"]))
        front["complete"] = done
        _write_reports(front, out, plot=done)
    return front


def _front_point(
    point: SweepPoint,
    out: Path,
    eval_attack: str,
    splits: SplitCache,
    head: str,
    measure: dict[str, Any],
) -> tuple[dict[str, Any], tuple | None]:
    """Train (or reuse) and measure one point: (its entry, its per-image results or None)."""
    run_dir = out / point.name
    start = time.perf_counter()
    final, what = train_point(point, run_dir, train, head=head, progress=measure["progress"])
    entry = _measure(point, run_dir, final, eval_attack, splits, **measure)
    scored = point_images(run_dir, entry["model"], eval_attack)
    say(
        measure["progress"],
        f"{head}: {what}, SA {entry['clean_acc']:.4f}, AA {entry['robust_acc']:.4f} "
        f"({time.perf_counter() - start:.1f} s)",
    )
    return entry, scored


# --------------------------------------------------------------------------------------------
# Command line (wired into caat_peft.cli)


def add_front_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``caat-peft front`` on the CLI's sub-parsers; returns the new parser."""
    p = sub.add_parser(
        "front",
        help="SA–AA front: vanilla AT over λ and CA-AT over γ, Pareto fronts and hypervolume",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument(
        "--lambdas", default="0,0.5,1", help="vanilla AT λ values in [0, 1] (default 0,0.5,1)"
    )
    p.add_argument(
        "--gammas", default="0.8,0.9,1", help="CA-AT γ values in (-1, 1] (default 0.8,0.9,1)"
    )
    p.add_argument(
        "--eval-attack",
        choices=EVAL_ATTACKS,
        default="pgd20",
        help="AA axis: the runs' PGD-20 accuracy, or AutoAttack on each run (default pgd20)",
    )
    p.add_argument(
        "--budget",
        choices=("standard", "fast"),
        default="standard",
        help="AutoAttack budget (fast: reduced, not comparable with RobustBench)",
    )
    p.add_argument("--no-sanity", action="store_true", help="skip the AutoAttack sanity checks")
    p.add_argument(
        "--seeds", default=None, help="training seeds, e.g. 0,1,2 (default: the recipe's seed)"
    )
    p.add_argument(
        "--output-dir", default=None, help="sweep directory (default runs/front-<recipe>)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def cmd_front(args: argparse.Namespace) -> int:
    """``caat-peft front``: run the sweep, print the Markdown table, name the files written."""
    lambdas = parse_values(args.lambdas, "--lambdas")
    gammas = parse_values(args.gammas, "--gammas")
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    output_dir = Path(args.output_dir or Path("runs") / f"front-{Path(args.recipe).stem}")
    front = run_front(
        args.recipe,
        lambdas=lambdas,
        gammas=gammas,
        output_dir=output_dir,
        overrides=args.overrides,
        eval_attack=args.eval_attack,
        budget=args.budget,
        seeds=seeds,
        sanity=not args.no_sanity,
        progress=not args.no_progress,
    )
    print(render_markdown(front))
    print(
        f"wrote {output_dir / 'front.json'}, {output_dir / 'front.md'}, {output_dir / 'front.png'}"
    )
    return 0
