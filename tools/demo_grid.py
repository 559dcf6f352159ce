"""Runs of the offline demo's stage 2 over a grid of settings, and CA-AT − vanilla per cell.

Shared by ``tools/optimizer_effect.py`` and ``tools/methods_comparison.py``: each point is an
ordinary run directory (kept when finished, so a killed measurement resumes), the methods are the
demo's (vanilla AT λ = 0.5, CA-AT γ = 0.8), and a cell's two methods are compared by
``caat_peft.compare`` paired by seed on the same held-out images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caat_peft.compare import compare  # noqa: E402
from caat_peft.config import apply_overrides, from_dict, to_dict  # noqa: E402
from caat_peft.demo import METHODS, stage2_config  # noqa: E402
from caat_peft.stats import format_ci, seed_interval  # noqa: E402
from caat_peft.training.trainer import train  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def run_point(
    checkpoint: Path, method: str, overrides: list[str], seed: int, run_dir: Path
) -> Path:
    """Train the demo's stage 2 with ``method`` and ``overrides`` into ``run_dir`` (kept when
    it already holds a finished run)."""
    if (run_dir / "final.json").is_file():
        return run_dir
    data = to_dict(stage2_config(checkpoint, METHODS[method], seed=seed))
    cfg = from_dict(apply_overrides(data, overrides))
    train(cfg, run_dir, overwrite=True, progress=False)
    return run_dir


def cell_summary(runs: dict[str, list[Path]]) -> dict[str, Any]:
    """Per method the mean accuracies with a t interval over seeds; CA-AT − vanilla paired."""
    finals = {m: [json.loads((d / "final.json").read_text()) for d in ds] for m, ds in runs.items()}
    summary: dict[str, Any] = {"per_seed": {}, "mean": {}}
    for m, fs in finals.items():
        summary["per_seed"][m] = [{k: f[k] for k in ("clean_acc", "robust_acc")} for f in fs]
        summary["mean"][m] = {
            k: {
                "value": sum(f[k] for f in fs) / len(fs),
                "ci": _clipped(seed_interval([f[k] for f in fs])),
            }
            for k in ("clean_acc", "robust_acc")
        }
    rows = compare(runs["caat"], runs["vanilla"])["rows"]
    summary["caat_minus_vanilla"] = {
        ("clean" if r["attack"] == "clean" else "robust"): {
            k: r[k] for k in ("attack", "difference", "ci", "p_value", "verdict")
        }
        for r in rows
    }
    return summary


def _clipped(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [max(0.0, ci[0]), min(1.0, ci[1])]


def accuracy_cell(summary: dict[str, Any], method: str, key: str) -> str:
    entry = summary["mean"][method][key]
    return format_ci(entry["value"], entry["ci"])


def difference_cell(summary: dict[str, Any], key: str) -> str:
    d = summary["caat_minus_vanilla"][key]
    return f"{format_ci(d['difference'], d['ci'])}"
