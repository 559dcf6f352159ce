"""Robustness evaluation suite: torchattacks attacks by name, AutoAttack (standard protocol,
assembled explicitly), an ε grid, resumable per-sample results, sanity checks, JSON/Markdown
reports. See ``docs/evaluation.md``.

Library entry points: :func:`evaluate` (returns a dict) and :func:`write_reports`;
:func:`run_eval` is what ``caat-peft eval`` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from caat_peft.evaluation.registry import (
    ATTACK_NAMES,
    AUTOATTACK_COMPONENTS,
    BUDGETS,
    DEFAULT_ATTACKS,
    DEFAULT_EPS,
    DEFAULT_L2_EPS,
    DEFAULT_LINF_EPS,
    PRESETS,
    AttackBudget,
    AttackConfig,
    attack_config,
    eps_label,
    make_attack,
    parse_eps,
    parse_eps_list,
    resolve_attack_names,
    resolve_budget,
)
from caat_peft.evaluation.report import render_markdown, summarize, write_reports
from caat_peft.evaluation.suite import RESULT_FORMAT, evaluate, model_fingerprint

STATE_DIRNAME = "eval_state"


def run_eval(
    model: torch.nn.Module,
    data: Any,
    out_dir: str | Path,
    *,
    resume: bool = True,
    **options: Any,
) -> tuple[dict, Path, Path]:
    """Evaluate and write ``eval.json`` / ``eval.md`` into ``out_dir``: the CLI's entry point.

    Resumable state lives in ``out_dir/eval_state`` (re-running the same command continues
    where it stopped); ``resume=False`` recomputes in memory and leaves any old state alone.
    ``options`` are :func:`evaluate`'s keyword arguments (attacks, eps_list, norm, batch_size,
    limit, seed, device, budget, sanity, progress, tolerance, num_workers).
    """
    if "resume_dir" in options:
        raise TypeError("run_eval keeps its state in out_dir/eval_state; pass resume=False instead")
    out = Path(out_dir)
    state = out / STATE_DIRNAME if resume else None
    result = evaluate(model, data, resume_dir=state, **options)
    json_path, md_path = write_reports(result, out)
    return result, json_path, md_path


__all__ = [
    "ATTACK_NAMES",
    "AUTOATTACK_COMPONENTS",
    "BUDGETS",
    "DEFAULT_ATTACKS",
    "DEFAULT_EPS",
    "DEFAULT_L2_EPS",
    "DEFAULT_LINF_EPS",
    "PRESETS",
    "RESULT_FORMAT",
    "STATE_DIRNAME",
    "AttackBudget",
    "AttackConfig",
    "attack_config",
    "eps_label",
    "evaluate",
    "make_attack",
    "model_fingerprint",
    "parse_eps",
    "parse_eps_list",
    "render_markdown",
    "resolve_attack_names",
    "resolve_budget",
    "run_eval",
    "summarize",
    "write_reports",
]
