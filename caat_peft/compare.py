"""Paired comparison of two models (or two sets of seeds) evaluated on the same images.

``caat-peft compare A B`` (or ``A1 A2 … --vs B1 B2 …``) reads each side's per-image results
(:mod:`caat_peft.evaluation.samples`), pairs the runs by training seed, and reports for every
attack × ε both sides share: each accuracy with its 95 % interval, the difference A − B with a
paired bootstrap interval, and the exact McNemar p-value. A difference whose interval contains
0 is reported as not distinguishable at that number of images, whatever its sign.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caat_peft.errors import UserError
from caat_peft.evaluation.report import display_name
from caat_peft.evaluation.samples import CLEAN, Scored, load_scored
from caat_peft.evaluation.store import atomic_write_text
from caat_peft.stats import CONFIDENCE, accuracy_interval, format_ci, paired_difference

FORMAT = "caat-peft-compare/1"


def _pair(a: list[Scored], b: list[Scored]) -> list[tuple[Scored, Scored]]:
    """Runs paired by seed when every run's seed is known and unique, else in the given order."""
    if len(a) != len(b):
        raise UserError(
            f"{len(a)} run(s) on side A but {len(b)} on side B; give one per seed on each side"
        )
    seeds_a, seeds_b = [s.seed for s in a], [s.seed for s in b]
    known = None not in seeds_a + seeds_b
    if not known or len(set(seeds_a)) < len(a) or len(set(seeds_b)) < len(b):
        return list(zip(a, b))
    if set(seeds_a) != set(seeds_b):
        raise UserError(
            f"side A has seeds {sorted(seeds_a)} and side B {sorted(seeds_b)}; pair runs with "
            "the same training seeds"
        )
    by_seed = {s.seed: s for s in b}
    return [(s, by_seed[s.seed]) for s in a]


def _check_images(pairs: list[tuple[Scored, Scored]]) -> None:
    """Every run must have been scored on the first run's images: the pairing is per image."""
    first = pairs[0][0]
    for run in [r for pair in pairs for r in pair][1:]:
        why = first.same_images(run)
        if why:
            raise UserError(
                f"{run.name} and {first.name} were evaluated on different images ({why}); "
                "evaluate both on the same data with the same limit"
            )


def _verdict(ci: Sequence[float], n: int) -> str:
    if ci[0] > 0:
        return "A higher"
    if ci[1] < 0:
        return "B higher"
    return f"not distinguishable at {n} images"


def compare(
    side_a: Sequence[str | Path],
    side_b: Sequence[str | Path],
    *,
    model: str = "last",
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The comparison as a JSON-able dict (the content of ``compare.json``)."""
    if not side_a or not side_b:
        raise UserError("compare needs at least one run or eval.json on each side")
    pairs = _pair(
        [load_scored(p, model=model) for p in side_a], [load_scored(p, model=model) for p in side_b]
    )
    _check_images(pairs)
    keys = [k for k in pairs[0][0].results if all(k in r.results for pair in pairs for r in pair)]
    n = len(pairs[0][0].labels)
    rows = []
    for key in keys:
        a_rows = [pa.results[key] for pa, _ in pairs]
        b_rows = [pb.results[key] for _, pb in pairs]
        diff = paired_difference(a_rows, b_rows, confidence=confidence)
        rows.append(
            {
                "attack": key[0],
                "eps": key[1] or None,
                "a": accuracy_interval([(sum(r), n) for r in a_rows], confidence),
                "b": accuracy_interval([(sum(r), n) for r in b_rows], confidence),
                **diff,
                "verdict": _verdict(diff["ci"], n),
            }
        )
    return {
        "format": FORMAT,
        "confidence": confidence,
        "a": [pa.name for pa, _ in pairs],
        "b": [pb.name for _, pb in pairs],
        "seeds": [[pa.seed, pb.seed] for pa, pb in pairs],
        "n_images": n,
        "subset": pairs[0][0].subset,
        "only_in_one_side": sorted(
            {f"{k[0]}@{k[1]}" for pair in pairs for r in pair for k in r.results}
            - {f"{k[0]}@{k[1]}" for k in keys}
        ),
        "rows": rows,
    }


def render_markdown(result: dict[str, Any]) -> str:
    """compare.md: one row per attack × ε, the difference and the verdict in words."""
    n, k = result["n_images"], len(result["a"])
    lines = ["# Paired comparison", ""]
    lines.append(f"A: {', '.join(result['a'])}  ")
    lines.append(f"B: {', '.join(result['b'])}")
    lines.append("")
    how = f"{n} images" + (f", {k} seed pairs {result['seeds']}" if k > 1 else "")
    lines.append(
        f"Paired on the same {how}. Accuracies with {result['confidence']:.0%} intervals "
        f"({result['rows'][0]['a']['method'] if result['rows'] else ''}); A − B with a "
        f"{result['rows'][0]['method'] if result['rows'] else ''} interval; p: "
        f"{result['rows'][0]['test'] if result['rows'] else ''}."
    )
    lines.append("")
    lines.append("| attack | ε | A | B | A − B | p | A only / B only | verdict |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        name = "clean" if r["attack"] == CLEAN[0] else display_name(r["attack"])
        lines.append(
            f"| {name} | {r['eps'] or '—'} | {format_ci(r['a']['value'], r['a']['ci'])} | "
            f"{format_ci(r['b']['value'], r['b']['ci'])} | "
            f"{format_ci(r['difference'], r['ci'])} | {r['p_value']:.3g} | "
            f"{r['only_a']} / {r['only_b']} | {r['verdict']} |"
        )
    if result["only_in_one_side"]:
        lines += [
            "",
            "Not compared (missing on some run): " + ", ".join(result["only_in_one_side"]),
        ]
    return "\n".join(lines) + "\n"


def add_compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="paired comparison of two runs / eval.json (or seeds of each) on the same images",
    )
    p.add_argument("a", nargs="+", help="side A: run directories or eval.json files")
    p.add_argument(
        "--vs",
        nargs="+",
        default=None,
        metavar="B",
        help="side B (then every positional is side A); without it give exactly A and B",
    )
    p.add_argument("--model", choices=("last", "best"), default="last", help="which model")
    p.add_argument("--output-dir", default="compare", help="where compare.json / .md go")


def cmd_compare(args: Any) -> int:
    side_a, side_b = list(args.a), args.vs
    if side_b is None:
        if len(side_a) != 2:
            raise UserError("give two results (A B), or several with --vs (A1 A2 --vs B1 B2)")
        side_a, side_b = side_a[:1], side_a[1:]
    result = compare(side_a, side_b, model=args.model)
    json_path, md_path = write_compare(result, args.output_dir)
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


def write_compare(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "compare.json", out / "compare.md"
    atomic_write_text(json_path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, render_markdown(result))
    return json_path, md_path
