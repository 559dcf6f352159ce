"""``caat-peft report RUN...``: the paper's Table 1 across runs, every figure with its interval.

Rows are method × training ε (runs that differ only by seed share a row; their mean is shown
with a Student t interval over the seeds, a single run gets the Wilson interval over its
images). Columns are clean accuracy, each attack at each ε the runs were evaluated with, then
AutoAttack and the worst case. Each run is read through :func:`load_scored`: its
``eval/eval.json`` when ``caat-peft eval`` ran on it, else the trainer's final evaluation.
Written as ``report.json``, ``report.md`` and ``report.csv`` (and ``report.tex`` on request).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from caat_peft.errors import UserError
from caat_peft.evaluation.report import display_name
from caat_peft.evaluation.samples import CLEAN, Scored, load_scored
from caat_peft.evaluation.store import atomic_write_text
from caat_peft.stats import accuracy_interval, format_ci

FORMAT = "caat-peft-report/1"
_LAST = ("autoattack", "worst case")  # the paper's rightmost columns


def _eps_text(value: Any) -> str:
    """8/255 for the usual L∞ budgets, else the number."""
    try:
        frac = Fraction(float(value)).limit_denominator(255)
    except (TypeError, ValueError):
        return str(value)
    if frac.denominator == 255 and abs(float(frac) - float(value)) < 1e-9:
        return f"{frac.numerator}/255"
    return f"{float(value):g}"


def row_label(scored: Scored) -> tuple[str, str]:
    """(method, training ε) of a run from its config.yaml."""
    cfg = scored.config
    if not cfg:
        return (Path(scored.name).name, "?")
    comb, objective = cfg.get("combiner") or {}, (cfg.get("objective") or {}).get("kind", "")
    if comb.get("kind") == "caat":
        method = f"CA-AT γ = {comb.get('gamma')}"
    else:
        method = f"vanilla AT λ = {comb.get('lam')}"
    if objective and objective != "pgd-ce":
        method += f" ({objective})"
    return (method, _eps_text((cfg.get("attack") or {}).get("eps")))


def _columns(runs: Sequence[Scored]) -> list[tuple[str, str]]:
    seen = list(dict.fromkeys(k for r in runs for k in r.results))
    body = [k for k in seen if k != CLEAN and k[0] not in _LAST]
    last = [k for name in _LAST for k in seen if k[0] == name]
    return [CLEAN, *body, *last]


def build_report(paths: Sequence[str | Path], *, model: str = "last") -> dict[str, Any]:
    """The table as a JSON-able dict (the content of ``report.json``)."""
    if not paths:
        raise UserError("report needs at least one run directory or eval.json")
    runs = [load_scored(p, model=model) for p in paths]
    columns = _columns(runs)
    groups: dict[tuple[str, str], list[Scored]] = {}
    for run in runs:
        groups.setdefault(row_label(run), []).append(run)
    rows = []
    for (method, train_eps), members in groups.items():
        cells = {}
        for key in columns:
            have = [r for r in members if key in r.results]
            if have:
                counts = [(sum(r.results[key]), len(r.results[key])) for r in have]
                cells[_column_id(key)] = {**accuracy_interval(counts), "runs": len(have)}
        rows.append(
            {
                "method": method,
                "train_eps": train_eps,
                "runs": [r.name for r in members],
                "seeds": [r.seed for r in members],
                "n_images": sorted({len(r.labels) for r in members}),
                "cells": cells,
            }
        )
    return {"format": FORMAT, "columns": [_column_id(k) for k in columns], "rows": rows}


def _column_id(key: tuple[str, str]) -> str:
    return key[0] if not key[1] else f"{key[0]}@{key[1]}"


def _header(column: str) -> str:
    attack, _, eps = column.partition("@")
    base, trainer, _ = attack.partition(" (trainer)")
    if attack in ("clean", "worst case"):
        name = attack.capitalize()
    else:
        name = display_name(base) + (" (trainer)" if trainer else "")
    return f"{name} ({eps})" if eps else name


def render_markdown(report: dict[str, Any]) -> str:
    columns = report["columns"]
    lines = ["# Results across runs", ""]
    lines.append(
        "Accuracy with 95 % intervals: Wilson over images for a single run, Student t over "
        "seeds where a row holds several runs."
    )
    lines.append("")
    lines.append("| method | training ε | runs | " + " | ".join(map(_header, columns)) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(columns))
    for row in report["rows"]:
        cells = [_cell(row["cells"].get(c), len(row["runs"])) for c in columns]
        lines.append(
            f"| {row['method']} | {row['train_eps']} | {len(row['runs'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _cell(cell: dict[str, Any] | None, row_runs: int) -> str:
    if cell is None:
        return "—"
    text = format_ci(cell["value"], cell["ci"])
    return text if cell["runs"] == row_runs else f"{text} ({cell['runs']} of {row_runs} runs)"


def render_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    head = ["method", "train_eps", "runs"]
    for c in report["columns"]:
        head += [c, f"{c} ci_low", f"{c} ci_high"]
    writer.writerow(head)
    for row in report["rows"]:
        line = [row["method"], row["train_eps"], len(row["runs"])]
        for c in report["columns"]:
            cell = row["cells"].get(c)
            line += [cell["value"], *cell["ci"]] if cell and cell["ci"] else ["", "", ""]
        writer.writerow(line)
    return out.getvalue()


def render_latex(report: dict[str, Any]) -> str:
    """A booktabs tabular, values in percent with the interval half-width as ±."""
    columns = report["columns"]
    lines = [
        "\\begin{tabular}{ll" + "r" * len(columns) + "}",
        "\\toprule",
        "Method & Train $\\epsilon$ & "
        + " & ".join(_header(c).replace("_", "\\_") for c in columns)
        + " \\\\",
        "\\midrule",
    ]
    for row in report["rows"]:
        cells = []
        for c in columns:
            cell = row["cells"].get(c)
            if not cell or not cell["ci"]:
                cells.append("--")
                continue
            half = (cell["ci"][1] - cell["ci"][0]) / 2
            cells.append(f"{100 * cell['value']:.1f}$\\pm${100 * half:.1f}")
        method = row["method"].replace("γ", "$\\gamma$").replace("λ", "$\\lambda$")
        lines.append(f"{method} & {row['train_eps']} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path, *, latex: bool = False) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": json.dumps(report, indent=1, ensure_ascii=False) + "\n",
        "report.md": render_markdown(report),
        "report.csv": render_csv(report),
    }
    if latex:
        files["report.tex"] = render_latex(report)
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return [out / name for name in files]


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="the paper's Table 1 across runs (Markdown, CSV, JSON; LaTeX on request)"
    )
    p.add_argument("runs", nargs="+", help="run directories or eval.json files")
    p.add_argument("--model", choices=("last", "best"), default="last", help="which model")
    p.add_argument("--output-dir", default="report", help="where report.* go")
    p.add_argument("--latex", action="store_true", help="also write report.tex")


def cmd_report(args: Any) -> int:
    report = build_report(args.runs, model=args.model)
    paths = write_report(report, args.output_dir, latex=args.latex)
    print(paths[1].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
