"""The paper's three claims as one experiment: ``caat-peft study RECIPE``.

A study is a grid — training ε × {vanilla AT over λ, CA-AT over γ} × seeds — of ordinary run
directories (each point planned, resumed and config-checked exactly as ``caat-peft front`` does
it, through the functions of :mod:`caat_peft.front`). Every trained model is then scored by the
evaluation suite at a list of evaluation ε (PGD-20, and AutoAttack with
``eval_attack="autoattack"``) on the same stratified images, and its gradient-conflict
telemetry (μ, φ, the adversarial share and λ* per step, from ``metrics.jsonl``) is summarised.

The report (:mod:`caat_peft.study_claims`, :mod:`caat_peft.study_report`) answers each claim
with a verdict and its uncertainty: (1) CA-AT's SA–AA front above vanilla AT's at each training
ε; (2) μ rising with the training ε (Theorem 1) and CA-AT keeping it lower; (3) CA-AT holding up
at larger training and evaluation budgets (Table 1 / Fig. 6). See ``docs/study.md``.

A study file (a YAML file whose top level is a ``study:`` section) names the recipe and the
grid, so that a study is one reproducible command; command-line options override it.
``--synthetic`` adds Theorem 1's check on synthetic Gaussian data (:mod:`caat_peft.synthetic`),
or runs it alone without a recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from caat_peft.config import Config, load_config
from caat_peft.errors import UserError
from caat_peft.evaluation.store import atomic_write_text
from caat_peft.front import (
    EVAL_ATTACKS,
    METHODS,
    SYMBOL,
    SplitCache,
    SweepPoint,
    attack_title,
    check_autoattack,
    check_saved_configs,
    check_values,
    evaluate_run,
    fmt,
    parse_seeds,
    parse_values,
    plan_sweep,
    run_state,
    say,
    selected_model,
    train_point,
)
from caat_peft.training import train

FORMAT = "caat-peft-study/1"
#: Where each run's study evaluation lives: apart from ``eval/`` (a user's own
#: ``caat-peft eval``) and ``eval-autoattack/`` (the front's), so that none overwrites another.
EVAL_DIRNAME = "eval-study"
#: The paper's training budgets (Fig. 6: 8/255 and 16/255) and Table 1's evaluation grid.
DEFAULT_TRAIN_EPS: dict[str, tuple[float, ...]] = {"linf": (8 / 255, 16 / 255), "l2": (0.5, 1.0)}
DEFAULT_LAMBDAS = (0.0, 0.5, 1.0)
DEFAULT_GAMMAS = (0.8, 0.9, 1.0)
#: The PGD-20 attack of the suite, per norm.
PGD20 = {"linf": "pgd20", "l2": "pgd-l2"}
_STUDY_KEYS = {
    "recipe",
    "source",
    "train_eps",
    "eval_eps",
    "lambdas",
    "gammas",
    "seeds",
    "eval_attack",
    "budget",
    "sanity",
    "set",
    "output_dir",
}
SOURCES = ("demo",)


# --------------------------------------------------------------------------------------------
# Settings: a recipe or a study file, then the options


@dataclass
class StudySettings:
    """Everything that defines a study, resolved (paths absolute where they came from a file)."""

    recipe: Path  # the training recipe (a study file's ``recipe``, or the path given)
    train_eps: list[float]
    eval_eps: list[float]  # the evaluation grid, the training ε included
    lambdas: list[float]
    gammas: list[float]
    seeds: list[int] | None  # None: the recipe's train.seed
    file_overrides: list[str]  # the study file's ``set``
    cli_overrides: list[str]  # the command line's --set (after the file's: they win)
    eval_attack: str = "pgd20"
    budget: str = "standard"
    sanity: bool = True
    output_dir: Path = Path("runs/study")
    source: str | None = None  # "demo": the demo's robust source model as model.checkpoint
    study_file: Path | None = None
    norm: str = "linf"

    @property
    def overrides(self) -> list[str]:
        return [*self.file_overrides, *self.cli_overrides]


def read_study_file(path: Path) -> dict[str, Any] | None:
    """The ``study:`` section of a YAML file, or None when the file is a plain recipe."""
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (pass a YAML recipe or study file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path}: not valid YAML (fix the syntax)") from None
    if not isinstance(data, dict) or "study" not in data:
        return None
    if set(data) != {"study"} or not isinstance(data["study"], dict):
        raise UserError(
            f"{path}: a study file holds one top-level section, study: (put the training "
            "config in the recipe it names)"
        )
    section = data["study"]
    unknown = sorted(set(section) - _STUDY_KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown study key {unknown[0]!r} (allowed: {', '.join(sorted(_STUDY_KEYS))})"
        )
    if "recipe" not in section:
        raise UserError(f"{path}: the study section needs recipe: (a path, relative to the file)")
    return section


def _as_text_list(value: Any, key: str) -> str:
    """A study-file list ([0, 0.5] or "0,0.5" or 8/255 strings) as the CLI's comma text."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"study.{key}: expected a list of numbers, got {value!r}")


def parse_eps_values(text: str, option: str, norm: str, *, positive: bool) -> list[float]:
    """``"8/255,16/255"`` → ascending ε values (exact k/255 for L∞), named after ``option``."""
    from caat_peft.evaluation.registry import parse_eps_list

    try:
        values = parse_eps_list(text, norm)
    except UserError as exc:
        raise UserError(f"{option}: {exc}") from None
    if positive and any(v <= 0 for v in values):
        raise UserError(f"{option}: training ε must be > 0 (ε = 0 is standard training)")
    return values


def resolve_settings(
    recipe: str | Path,
    *,
    train_eps: Sequence[float] | str | None = None,
    eval_eps: Sequence[float] | str | None = None,
    lambdas: Sequence[float] | str | None = None,
    gammas: Sequence[float] | str | None = None,
    seeds: Sequence[int] | str | None = None,
    overrides: Sequence[str] = (),
    eval_attack: str | None = None,
    budget: str | None = None,
    sanity: bool | None = None,
    output_dir: str | Path | None = None,
) -> StudySettings:
    """The study's settings: what is given here, else the study file's value, else the default.

    ``recipe`` is a training recipe or a study file (top level ``study:``, naming the recipe
    and its ``output_dir`` relative to itself). Lists may be given as sequences or as the CLI's
    comma-separated text. Every value is checked here, so a bad one fails before anything is
    trained or written.
    """
    path = Path(recipe)
    section = read_study_file(path) or {}
    base, file_sets = _file_recipe(path, section)
    norm = load_config(base, [*file_sets, *overrides]).attack.norm  # validates the recipe too

    def pick(given: Any, key: str, default: Any, listy: bool = True) -> Any:
        return _pick(section, given, key, default, listy)

    train_list, eval_list = _eps_grids(
        pick(train_eps, "train_eps", DEFAULT_TRAIN_EPS[norm]),
        pick(eval_eps, "eval_eps", None),
        norm,
    )
    lam_list = _trade_offs(pick(lambdas, "lambdas", DEFAULT_LAMBDAS), "--lambdas")
    gam_list = _trade_offs(pick(gammas, "gammas", DEFAULT_GAMMAS), "--gammas")
    if not lam_list and not gam_list:
        raise UserError("give --lambdas or --gammas (or both): the study has no points")
    seed_value = pick(seeds, "seeds", None)
    if seed_value is not None and not isinstance(seed_value, str):
        seed_value = ",".join(map(str, seed_value))
    attack = pick(eval_attack, "eval_attack", "pgd20", listy=False)
    if attack not in EVAL_ATTACKS:
        raise UserError(f"--eval-attack {attack!r} is not supported (use pgd20 or autoattack)")
    budget_value = str(pick(budget, "budget", "standard", listy=False))
    if budget_value not in ("standard", "fast"):
        raise UserError(f"--budget {budget_value!r} is not supported (use standard or fast)")
    return StudySettings(
        recipe=base,
        train_eps=train_list,
        eval_eps=eval_list,
        lambdas=lam_list,
        gammas=gam_list,
        seeds=None if seed_value is None else parse_seeds(seed_value),
        file_overrides=list(file_sets),
        cli_overrides=list(overrides),
        eval_attack=attack,
        budget=budget_value,
        sanity=_file_bool(path, section, sanity, "sanity", True),
        output_dir=_output_dir(path, section, output_dir),
        source=_file_source(path, section),
        study_file=path if section else None,
        norm=norm,
    )


def _file_recipe(path: Path, section: dict[str, Any]) -> tuple[Path, list[str]]:
    """(the training recipe, the study file's ``set``): ``path`` itself for a plain recipe."""
    if not section:
        return path, []
    base = (path.parent / str(section["recipe"])).resolve()
    if not base.is_file():
        raise UserError(f"{path}: study.recipe {section['recipe']!r} not found ({base})")
    file_sets = section.get("set", [])
    if not isinstance(file_sets, list) or not all(isinstance(s, str) for s in file_sets):
        raise UserError(f"{path}: study.set must be a list of key=value strings")
    return base, list(file_sets)


def _file_bool(
    path: Path, section: dict[str, Any], given: bool | None, key: str, default: bool
) -> bool:
    """A yes/no setting: given here, else the study file's (a real YAML bool: ``"false"`` in
    quotes would be truthy), else the default."""
    if given is not None:
        if not isinstance(given, bool):
            raise UserError(f"{key}={given!r}: give True or False")
        return given
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{path}: study.{key} must be true or false, not {value!r}")
    return value


def _output_dir(path: Path, section: dict[str, Any], given: str | Path | None) -> Path:
    """--output-dir (relative to where the command runs), else the study file's ``output_dir``
    (relative to the file, like its ``recipe``), else ``runs/study-<file name>``."""
    if given is not None:
        return Path(given)
    value = section.get("output_dir")
    if value is None:
        return Path("runs") / f"study-{path.stem}"
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: study.output_dir must be a path, not {value!r}")
    return (path.parent / value).resolve()


def _file_source(path: Path, section: dict[str, Any]) -> str | None:
    source = section.get("source")
    if source is not None and source not in SOURCES:
        raise UserError(f"{path}: study.source {source!r} is not known (use: {SOURCES[0]})")
    return source


def _pick(section: dict[str, Any], given: Any, key: str, default: Any, listy: bool) -> Any:
    """The option given, else the study file's value (lists as comma text), else the default."""
    if given is not None:
        return given
    if key not in section:
        return default
    return _as_text_list(section[key], key) if listy else section[key]


def _as_eps_text(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(repr(float(v)) for v in value)


def _eps_grids(train: Any, evaluation: Any, norm: str) -> tuple[list[float], list[float]]:
    """(training ε, evaluation ε) checked; the evaluation grid always holds the training ε,
    since claim 1's fronts are drawn at them. ``evaluation`` None: the norm's default grid."""
    from caat_peft.evaluation.registry import DEFAULT_EPS

    train_text = _as_eps_text(train)
    train_list = parse_eps_values(train_text, "--train-eps", norm, positive=True)
    if evaluation is None:
        evaluation = DEFAULT_EPS[norm]
    eval_text = _as_eps_text(evaluation)
    parse_eps_values(eval_text, "--eval-eps", norm, positive=False)  # its own errors first
    eval_list = parse_eps_values(f"{eval_text},{train_text}", "--eval-eps", norm, positive=False)
    return train_list, eval_list


def _trade_offs(value: Any, option: str) -> list[float]:
    """λ or γ values from text or a sequence; an empty text or list sweeps no point."""
    if isinstance(value, str):
        return parse_values(value, option) if value.strip() else []
    return check_values(list(value), option) if len(value) else []


# --------------------------------------------------------------------------------------------
# The plan: one SweepPoint per (training ε, method, value, seed)


@dataclass(frozen=True)
class StudyPoint:
    """One run of the study: a front point (method, value, seed, config) at one training ε."""

    eps: float
    point: SweepPoint

    @property
    def name(self) -> str:
        return self.point.name


def eps_tag(eps: float, norm: str = "linf") -> str:
    """``eps8-255``, ``eps0.06``: the directory of a training budget's runs."""
    from caat_peft.evaluation.registry import eps_label

    return "eps" + eps_label(eps, norm).replace("/", "-")


def eps_overrides(base: Config, eps: float) -> list[str]:
    """The overrides that move a recipe to training budget ε.

    The PGD step sizes scale with ε (``attack.alpha``, and ``eval.alpha`` when the recipe sets
    it), so that every budget runs the recipe's attack shape: the recipe's steps of its α at
    its ε would not even reach a larger ε. ``attack.fgsm_alpha`` scales the same way.
    """
    ratio = eps / base.attack.eps if base.attack.eps > 0 else 1.0
    out = [f"attack.eps={eps!r}", f"attack.alpha={base.attack.alpha * ratio!r}"]
    if base.attack.fgsm_alpha is not None:
        out.append(f"attack.fgsm_alpha={base.attack.fgsm_alpha * ratio!r}")
    if base.eval.alpha is not None:
        out.append(f"eval.alpha={base.eval.alpha * ratio!r}")
    if base.eval.eps is not None:
        out.append(f"eval.eps={eps!r}")  # the trainer's own evaluation at the training budget
    return out


def plan_study(settings: StudySettings, extra_overrides: Sequence[str] = ()) -> list[StudyPoint]:
    """Every point's resolved (and so validated) config, seed-major: a study stopped half-way
    already holds whole grids for its first seeds. ``extra_overrides`` go first (the source
    checkpoint), the settings' after them (so a user's --set wins)."""
    overrides = [*extra_overrides, *settings.overrides]
    base = load_config(settings.recipe, overrides)
    points: list[StudyPoint] = []
    for eps in settings.train_eps:
        sweep = plan_sweep(
            settings.recipe,
            lambdas=settings.lambdas,
            gammas=settings.gammas,
            overrides=[*overrides, *eps_overrides(base, eps)],
            seeds=settings.seeds,
        )
        tag = eps_tag(eps, settings.norm)
        points += [StudyPoint(eps, replace(p, name=f"{tag}/{p.name}")) for p in sweep]
    seed_order = list(dict.fromkeys(p.point.seed for p in points))
    return sorted(points, key=lambda p: seed_order.index(p.point.seed))  # stable: ε, method


def source_checkpoint(settings: StudySettings) -> Path | None:
    """Where a study file's ``source: demo`` model is cached (it may not be there yet): every
    point is planned and checked with this path before stage 1 trains, if it has to."""
    if settings.source != "demo":
        return None
    from caat_peft.demo import stage1_path

    return stage1_path()


def source_overrides(settings: StudySettings) -> list[str]:
    """``model.checkpoint=…`` for a study file's ``source:`` (none without one)."""
    path = source_checkpoint(settings)
    return [] if path is None else [f"model.checkpoint={path}"]


def ensure_source(settings: StudySettings, *, progress: bool) -> None:
    """Train the demo's stage 1 when ``source: demo`` and it is not cached yet (once; ~30 s).
    Called after every refusal check, so that a bad option never costs a stage-1 training."""
    path = source_checkpoint(settings)
    if path is None or path.is_file():
        return
    import contextlib

    from caat_peft.demo import stage1_checkpoint

    # stage 1 reports on stdout; keep stdout for results (study.md, --plan's commands)
    with contextlib.redirect_stdout(sys.stderr):
        stage1_checkpoint(progress=progress)


#: What ``caat-peft train`` needs for a run directory in each state (see front.run_state).
RESUME_FLAGS: dict[str, list[str]] = {"resume": ["--resume"], "restart": ["--overwrite"]}


def plan_commands(
    settings: StudySettings,
    points: Sequence[StudyPoint],
    launcher: str,
    collect_extra: Sequence[str] = (),
) -> str:
    """One ``… caat-peft train`` command per unfinished point (for Slurm or any scheduler),
    then the study command that collects and evaluates what is finished.

    A point killed half-way gets what ``caat-peft train`` needs to take it up again, as the
    in-process study does: ``--resume`` when it has a checkpoint, ``--overwrite`` when it has
    none (a bare command would refuse the non-empty run directory). ``collect_extra`` goes on
    the collect line (``--synthetic``).
    """
    out = settings.output_dir
    lines = [
        f"# {len(points)} training run(s) of the study in {out}; each line is independent.",
    ]
    for sp in points:
        args = [*launcher.split(), str(settings.recipe)]
        for item in sp.point.overrides:
            args += ["--set", item]
        args += ["--output-dir", str(out / sp.name), "--no-progress"]
        args += RESUME_FLAGS.get(run_state(out / sp.name), [])
        lines.append(shlex.join(args))
    lines.append("# afterwards (or at any time): evaluate what is finished and write the report")
    collect = ["caat-peft", "study", *collect_argv(settings), "--collect", *collect_extra]
    lines.append(shlex.join(collect))
    return "\n".join(lines) + "\n"


def collect_argv(settings: StudySettings) -> list[str]:
    """The command-line arguments that plan exactly these points again (for --plan / --jobs)."""
    argv = [str(settings.study_file or settings.recipe)]
    argv += ["--train-eps", ",".join(map(repr, settings.train_eps))]
    argv += ["--eval-eps", ",".join(map(repr, settings.eval_eps))]
    argv += ["--lambdas", ",".join(map(fmt, settings.lambdas))]
    argv += ["--gammas", ",".join(map(fmt, settings.gammas))]
    if settings.seeds is not None:
        argv += ["--seeds", ",".join(map(str, settings.seeds))]
    argv += ["--eval-attack", settings.eval_attack, "--budget", settings.budget]
    if not settings.sanity:
        argv.append("--no-sanity")
    # the study file brings its own ``set``: pass only what the command line added
    for item in settings.cli_overrides if settings.study_file else settings.overrides:
        argv += ["--set", item]
    return [*argv, "--output-dir", str(settings.output_dir)]


# --------------------------------------------------------------------------------------------
# Measuring one finished run: the evaluation suite, the conflict telemetry

#: Telemetry keys by what they mean, newest name first: the trainer has logged the adversarial
#: share 1/(1+k) as ``lambda_eff`` and now as ``adv_share``, and the paper's λ* = k (the clean
#: loss's weight) as ``lambda_star`` (null on steps without a projection).
CONFLICT_KEYS: dict[str, tuple[str, ...]] = {
    "mu": ("mu",),
    "cos": ("cos",),
    "adv_share": ("adv_share", "lambda_eff"),
    "lambda_star": ("lambda_star",),
}
CURVE_POINTS = 100  # per-run curves in study.json are binned to at most this many points


def _value(row: dict[str, Any], names: tuple[str, ...]) -> float | None:
    for name in names:
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else None
    return None


def conflict_summary(metrics_path: Path) -> dict[str, Any] | None:
    """μ, φ, adversarial share and λ* of one run: means over its logged steps, μ's block means
    (for the bootstrap) and binned curves; None for runs without an adversarial gradient."""
    from caat_peft.study_stats import block_means
    from caat_peft.training.telemetry import read_metrics

    if not metrics_path.is_file():
        return None
    rows = [
        r
        for r in read_metrics(metrics_path)
        if r.get("type") == "step" and not r.get("skipped") and _value(r, ("mu",)) is not None
    ]
    if not rows:
        return None
    series = {key: [_value(r, names) for r in rows] for key, names in CONFLICT_KEYS.items()}
    means = {}
    for key, values in series.items():
        present = [v for v in values if v is not None]
        means[key] = sum(present) / len(present) if present else None
    blocks, sizes = block_means(series["mu"])
    m = min(CURVE_POINTS, len(rows))
    edges = [round(i * len(rows) / m) for i in range(m + 1)]
    bins = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    curve: dict[str, list[Any]] = {"step": [rows[b - 1]["step"] for _, b in bins]}
    for key, values in series.items():
        curve[key] = []
        for a, b in bins:
            present = [v for v in values[a:b] if v is not None]
            curve[key].append(sum(present) / len(present) if present else None)
    return {
        "steps": len(rows),
        **means,
        "mu_blocks": blocks,
        "mu_block_sizes": sizes,
        "curve": curve,
    }


def evaluate_point(
    sp: StudyPoint,
    run_dir: Path,
    final: dict[str, Any],
    splits: SplitCache,
    settings: StudySettings,
    *,
    progress: bool,
) -> dict[str, Any]:
    """The suite on the run's selected model at every evaluation ε (resumable per sample)."""
    model_kind, _ = selected_model(final)
    start = time.perf_counter()
    result, json_path = evaluate_run(
        sp.point.cfg,
        run_dir,
        model_kind,
        splits,
        EVAL_DIRNAME,
        attacks=study_attacks(settings),
        eps_list=settings.eval_eps,
        budget=settings.budget,
        sanity=settings.sanity,
        progress=progress,
    )
    return {
        "model": model_kind,
        "clean_acc": result["clean_accuracy"],
        "accuracy": {a: dict(result["accuracy"][a]) for a in result["attacks"]},
        "n_images": result["n_samples"],
        "eval_json": json_path.relative_to(settings.output_dir).as_posix(),
        "sanity": (result.get("sanity") or {}).get("status"),
        "input_shape": result["config"]["input_shape"],
        "eval_seconds": round(time.perf_counter() - start, 2),
    }


def study_attacks(settings: StudySettings) -> list[str]:
    """PGD-20 always (Table 1's first column); AutoAttack on top with --eval-attack autoattack."""
    pgd = PGD20[settings.norm]
    return [pgd, "autoattack"] if settings.eval_attack == "autoattack" else [pgd]


def claim_attack(settings: StudySettings) -> str:
    """The attack whose accuracies the claims read."""
    return "autoattack" if settings.eval_attack == "autoattack" else PGD20[settings.norm]


# --------------------------------------------------------------------------------------------
# The study


def _prepare(
    settings: StudySettings, progress: bool, *, plan: bool = False
) -> tuple[list[StudyPoint], SplitCache]:
    """Plan every point and check everything a user can get wrong, before anything is written
    or trained — the demo's stage 1 for ``source: demo`` included, which trains only after the
    checks, and never for ``plan`` (a plan only names the cached model's path)."""
    out = settings.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} is a file (choose another --output-dir)")
    if settings.eval_attack == "autoattack":
        from caat_peft.evaluation import resolve_budget

        resolve_budget(settings.budget)
    points = plan_study(settings, source_overrides(settings))
    check_saved_configs([sp.point for sp in points], out)
    splits = SplitCache()
    if settings.eval_attack == "autoattack":
        check_autoattack(points[0].point.cfg, settings.budget, splits)
    source = source_checkpoint(settings)
    if plan and source is not None and not source.is_file():
        raise UserError(
            f"source: demo: the demo's source model is not cached yet ({source}); run "
            "`caat-peft demo` (or this study without --plan) once, then plan again"
        )
    if not plan:
        ensure_source(settings, progress=progress)
    return points, splits


def _head(number: int, total: int, sp: StudyPoint, norm: str) -> str:
    from caat_peft.evaluation.registry import eps_label

    return (
        f"[{number}/{total}] {sp.name} ({SYMBOL[sp.point.method]} = {fmt(sp.point.value)}, "
        f"ε = {eps_label(sp.eps, norm)}, seed {sp.point.seed})"
    )


def _run_one(
    sp: StudyPoint, splits: SplitCache, settings: StudySettings, head: str, progress: bool
) -> dict[str, Any]:
    """Train (or reuse) one point, evaluate it, summarise its telemetry: its study.json entry."""
    from caat_peft.evaluation.registry import eps_label

    run_dir = settings.output_dir / sp.name
    start = time.perf_counter()
    final, what = train_point(sp.point, run_dir, train, head=head, progress=progress)
    try:
        measured = evaluate_point(sp, run_dir, final, splits, settings, progress=progress)
    except UserError as exc:
        raise UserError(f"{sp.name}: {exc}") from None
    point = sp.point
    entry = {
        "name": sp.name,
        "method": point.method,
        "value": point.value,
        METHODS[point.method]: point.value,
        "train_eps": sp.eps,
        "train_eps_label": eps_label(sp.eps, settings.norm),
        "seed": point.seed,
        "run_dir": sp.name,
        **measured,
        "train_seconds": final.get("seconds"),
        "conflict": conflict_summary(run_dir / "metrics.jsonl"),
    }
    attack, label = claim_attack(settings), entry["train_eps_label"]
    robust = entry["accuracy"][attack][label]
    say(
        progress,
        f"{head}: {what}, SA {entry['clean_acc']:.4f}, AA@{label} {robust:.4f} "
        f"({time.perf_counter() - start:.1f} s)",
    )
    return entry


def run_study(
    recipe: str | Path,
    *,
    progress: bool = True,
    collect: bool = False,
    jobs: int = 1,
    only: str | None = None,
    synthetic: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Train (or reuse) and evaluate every point of the study, then write and return its report.

    ``recipe`` is a training recipe or a study file; ``options`` are :func:`resolve_settings`'
    (train_eps, eval_eps, lambdas, gammas, seeds, overrides, eval_attack, budget, sanity,
    output_dir). ``collect=True`` trains nothing: it evaluates and reports the finished points
    (those trained elsewhere from ``--plan`` commands). ``jobs > 1`` trains and evaluates that
    many points at once in child processes (one GPU each when there are enough), then reports.
    ``only`` trains and evaluates the one named point and writes no report (what a job runs).
    ``synthetic=True`` adds Theorem 1's check on synthetic data (:mod:`caat_peft.synthetic`)
    to the report. Returns the content of ``study.json``.
    """
    settings = resolve_settings(recipe, **options)
    parallel = jobs > 1 and not collect and only is None
    environments = job_environments(jobs) if parallel else None  # may refuse: before any write
    points, splits = _prepare(settings, progress)
    if only is not None:
        points = [sp for sp in points if sp.name == only]
        if not points:
            raise UserError(f"--point {only!r} is not a point of this study")
    out = settings.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out} ({exc.strerror})") from None
    if parallel:
        pending = [sp for sp in points if run_state(out / sp.name) != "done"]
        run_jobs(settings, pending, jobs, progress=progress, environments=environments)
    runs: list[dict[str, Any]] = []
    missing: list[str] = []
    for number, sp in enumerate(points, 1):
        if collect and run_state(out / sp.name) != "done":
            missing.append(sp.name)
            continue
        head = _head(number, len(points), sp, settings.norm)
        runs.append(_run_one(sp, splits, settings, head, progress))
        if only is None and number < len(points):  # a killed study still says how far it got
            _write_progress(settings, runs, points)
    if only is not None:
        return {"format": FORMAT, "runs": runs}
    from caat_peft.study_report import write_reports

    study = assemble_study(settings, runs, missing)
    if synthetic:
        from caat_peft.synthetic import run_synthetic

        study["synthetic"] = run_synthetic(progress=progress)
    write_reports(study, out)
    return study


def _write_progress(
    settings: StudySettings, runs: list[dict[str, Any]], points: list[StudyPoint]
) -> None:
    done = {r["name"] for r in runs}
    body = {
        **study_header(settings),
        "complete": False,
        "missing": [sp.name for sp in points if sp.name not in done],
        "runs": runs,
    }
    text = json.dumps(body, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(settings.output_dir / "study.json", text)


def study_header(settings: StudySettings) -> dict[str, Any]:
    """How the study was made: recipe, grid, evaluation (the first keys of study.json)."""
    from caat_peft.evaluation.registry import eps_label

    cfg = load_config(settings.recipe, settings.overrides)
    return {
        "format": FORMAT,
        "recipe": str(settings.recipe),
        "study_file": str(settings.study_file) if settings.study_file else None,
        "overrides": settings.overrides,
        "source": settings.source,
        "output_dir": str(settings.output_dir),
        "grid": {
            "train_eps": settings.train_eps,
            "train_eps_labels": [eps_label(e, settings.norm) for e in settings.train_eps],
            "eval_eps": settings.eval_eps,
            "eval_eps_labels": [eps_label(e, settings.norm) for e in settings.eval_eps],
            "lambdas": settings.lambdas,
            "gammas": settings.gammas,
            "seeds": settings.seeds if settings.seeds is not None else [cfg.train.seed],
        },
        "norm": settings.norm,
        "objective": cfg.objective.kind,
        "eval_attack": settings.eval_attack,
        "claim_attack": claim_attack(settings),
        "eval_attack_title": attack_title(settings.eval_attack, settings.budget),
        "budget": settings.budget if settings.eval_attack == "autoattack" else None,
        "sanity_checks": settings.sanity,
    }


def assemble_study(
    settings: StudySettings, runs: list[dict[str, Any]], missing: list[str]
) -> dict[str, Any]:
    """study.json: the header, every run's entry, and the three claims with their verdicts."""
    from caat_peft.evaluation.samples import load_scored
    from caat_peft.study_claims import compute_claims

    header = study_header(settings)
    scored = {r["name"]: load_scored(settings.output_dir / r["eval_json"]) for r in runs}
    claims = compute_claims(header, runs, scored)
    return {**header, "complete": not missing, "missing": missing, "runs": runs, "claims": claims}


# --------------------------------------------------------------------------------------------
# Several points at once on one machine


def job_environments(jobs: int) -> list[dict[str, str]]:
    """One environment per job slot: a GPU each (CUDA_VISIBLE_DEVICES) when there are at least
    as many GPUs as jobs, else the CPU threads shared out (OMP_NUM_THREADS)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    base = dict(os.environ)
    if gpus >= jobs:
        # the GPUs this process may use: a CUDA_VISIBLE_DEVICES already set is respected
        visible = [d for d in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = visible if len(visible) >= jobs else [str(i) for i in range(gpus)]
        return [{**base, "CUDA_VISIBLE_DEVICES": ids[i].strip()} for i in range(jobs)]
    if gpus:
        raise UserError(f"--jobs {jobs}: only {gpus} GPU(s) here (use --jobs {gpus} or fewer)")
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return [{**base, "OMP_NUM_THREADS": threads} for _ in range(jobs)]


def job_command(settings: StudySettings, sp: StudyPoint) -> list[str]:
    """A child process that trains and evaluates one point (and writes no report)."""
    argv = [sys.executable, "-m", "caat_peft", "study", *collect_argv(settings)]
    return [*argv, "--point", sp.name, "--no-progress"]


def run_jobs(
    settings: StudySettings,
    pending: Sequence[StudyPoint],
    jobs: int,
    *,
    progress: bool,
    environments: list[dict[str, str]] | None = None,
) -> None:
    """Train and evaluate ``pending`` points in up to ``jobs`` child processes at once.

    Each child is ``caat-peft study … --point NAME`` (the same planning, resume and checks),
    its output in ``OUT/logs/``. A failed point stops nothing else; afterwards one line names
    every failed point and its log. If this process is interrupted (Ctrl-C) or fails, the
    children still running are terminated and their logs closed: no orphan keeps training.
    """
    if not pending:
        return
    slots = environments if environments is not None else job_environments(jobs)
    logs = settings.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    free = list(range(len(slots)))
    running: list[tuple[subprocess.Popen, int, StudyPoint, Any]] = []
    failed: list[str] = []
    queue = list(pending)
    try:
        while queue or running:
            while queue and free:
                sp, slot = queue.pop(0), free.pop(0)
                running.append(_start_job(settings, sp, slot, slots[slot], logs))
                say(progress, f"job {slot}: {sp.name} started (log {running[-1][3].name})")
            time.sleep(0.2)
            for item in [r for r in running if r[0].poll() is not None]:
                proc, slot, sp, log = item
                log.close()
                running.remove(item)
                free.append(slot)
                ok = proc.returncode == 0
                say(progress, f"job {slot}: {sp.name} {'done' if ok else 'FAILED'}")
                if not ok:
                    failed.append(f"{sp.name} (log {logs / Path(log.name).name})")
    finally:
        _stop_jobs(running)
    if failed:
        raise UserError(f"{len(failed)} point(s) failed: {'; '.join(failed)}")


def _start_job(
    settings: StudySettings, sp: StudyPoint, slot: int, env: dict[str, str], logs: Path
) -> tuple[subprocess.Popen, int, StudyPoint, Any]:
    log = (logs / (sp.name.replace("/", "_") + ".log")).open("w")
    try:
        argv = job_command(settings, sp)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    except BaseException:
        log.close()
        raise
    return proc, slot, sp, log


def _stop_jobs(running: Sequence[tuple[subprocess.Popen, int, StudyPoint, Any]]) -> None:
    """Terminate the children still running (then kill what ignores it), close their logs."""
    for proc, *_ in running:
        if proc.poll() is None:
            proc.terminate()
    for proc, _, _, log in running:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --------------------------------------------------------------------------------------------
# Command line (wired into caat_peft.cli)


def add_study_parser(sub: Any) -> Any:
    """Register ``caat-peft study`` on the CLI's sub-parsers; returns the new parser."""
    p = sub.add_parser(
        "study",
        help="the paper's claims: fronts per training ε, μ against ε, accuracy against ε",
    )
    p.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help="a YAML recipe, or a study file (top-level study: section); optional with --synthetic",
    )
    p.add_argument("--train-eps", default=None, help="training ε, e.g. 8/255,16/255 (default)")
    p.add_argument(
        "--eval-eps", default=None, help="evaluation ε (default 8,16,24,32/255; + training ε)"
    )
    p.add_argument("--lambdas", default=None, help="vanilla AT λ in [0, 1] (default 0,0.5,1)")
    p.add_argument("--gammas", default=None, help="CA-AT γ in (-1, 1] (default 0.8,0.9,1)")
    p.add_argument("--seeds", default=None, help="training seeds (default: the recipe's)")
    p.add_argument("--eval-attack", choices=EVAL_ATTACKS, default=None, help="default pgd20")
    p.add_argument("--budget", choices=("standard", "fast"), default=None, help="AutoAttack")
    p.add_argument("--no-sanity", action="store_true", help="skip the suite's sanity checks")
    p.add_argument("--output-dir", default=None, help="default runs/study-<recipe name>")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run (repeatable)",
    )
    p.add_argument(
        "--plan", action="store_true", help="print one training command per point and stop"
    )
    p.add_argument(
        "--launcher",
        default="accelerate launch -m caat_peft train",
        help="what --plan's commands start with",
    )
    p.add_argument("--jobs", type=int, default=1, help="points at once (one GPU each)")
    p.add_argument(
        "--collect", action="store_true", help="train nothing: evaluate and report what is done"
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="Theorem 1 on synthetic Gaussian data (μ against δ and d); alone without a recipe",
    )
    p.add_argument("--point", default=None, help=argparse.SUPPRESS)  # what a --jobs child runs
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def cmd_study(args: Any) -> int:
    """``caat-peft study``: run (or plan) the study, print study.md, name the files written."""
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give a number of parallel points ≥ 1")
    progress = not args.no_progress
    if args.recipe is None:
        return _synthetic_alone(args, progress)
    options = {
        "train_eps": args.train_eps,
        "eval_eps": args.eval_eps,
        "lambdas": args.lambdas,
        "gammas": args.gammas,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "eval_attack": args.eval_attack,
        "budget": args.budget,
        "sanity": False if args.no_sanity else None,
        "output_dir": args.output_dir,
    }
    if args.plan:
        settings = resolve_settings(args.recipe, **options)
        points, _ = _prepare(settings, progress, plan=True)
        pending = [sp for sp in points if run_state(settings.output_dir / sp.name) != "done"]
        extra = ["--synthetic"] if args.synthetic else []
        print(plan_commands(settings, pending, args.launcher, extra), end="")
        return 0
    study = run_study(
        args.recipe,
        progress=progress,
        collect=args.collect,
        jobs=args.jobs,
        only=args.point,
        synthetic=args.synthetic and args.point is None,
        **options,
    )
    if args.point is not None:
        return 0
    from caat_peft.study_report import render_markdown

    print(render_markdown(study))
    where = Path(study["output_dir"])
    print(f"wrote {where / 'study.json'}, {where / 'study.md'} and the study-*.png figures")
    return 0


def _synthetic_alone(args: Any, progress: bool) -> int:
    """``caat-peft study --synthetic`` without a recipe: Theorem 1's check by itself."""
    if not args.synthetic:
        raise UserError(
            "give a recipe or study file (or --synthetic for the synthetic check alone)"
        )
    given = {
        "--train-eps": args.train_eps,
        "--eval-eps": args.eval_eps,
        "--lambdas": args.lambdas,
        "--gammas": args.gammas,
        "--seeds": args.seeds,
        "--eval-attack": args.eval_attack,
        "--budget": args.budget,
        "--set": args.overrides,
        "--no-sanity": args.no_sanity,
        "--plan": args.plan,
        "--collect": args.collect,
        "--jobs": args.jobs != 1,
        "--point": args.point,
    }
    used = [name for name, value in given.items() if value not in (None, False, [])]
    if used:
        raise UserError(
            f"{used[0]} needs a recipe or study file (--synthetic alone takes only "
            "--output-dir and --no-progress)"
        )
    from caat_peft.synthetic import render_markdown, run_synthetic, write_synthetic

    result = run_synthetic(progress=progress)
    out = Path(args.output_dir or Path("runs") / "synthetic")
    write_synthetic(result, out)
    print(render_markdown(result))
    print(f"wrote {out / 'synthetic.json'}, {out / 'synthetic.md'} and {out / 'synthetic.png'}")
    return 0
