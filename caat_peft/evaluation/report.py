"""eval.json for machines, eval.md for people (a table laid out like the paper's Table 1)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from caat_peft.evaluation.store import atomic_write_text

_DISPLAY = {
    "fgsm": "FGSM",
    "mifgsm": "MIFGSM",
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "apgd-t": "APGD-T",
    "apgd-l2": "APGD-CE (L2)",
    "fab": "FAB",
    "fab-t": "FAB-T",
    "square": "Square",
    "autoattack": "AutoAttack",
    "pgd-l2": "PGD-L2-20",
    "fgm-l2": "FGM-L2",
    "noise": "Noise",
    "pgd20-nrs": "PGD-20 (no random start)",
    "pgd-l2-nrs": "PGD-L2-20 (no random start)",
}


def display_name(name: str) -> str:
    """Column header for an attack name (``pgd20`` → ``PGD-20``)."""
    if name in _DISPLAY:
        return _DISPLAY[name]
    m = re.match(r"^pgd(\d+)(-l2)?$", name)
    if m:
        return f"PGD-{'L2-' if m.group(2) else ''}{m.group(1)}"
    return name


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _with_ci(value: float, ci: list[float] | None) -> str:
    """``0.4500 [0.419, 0.481]``; results written before intervals existed print bare."""
    return f"{value:.4f}" if not ci else f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def render_markdown(result: dict) -> str:
    """The report: clean accuracy, ε × attack table, AutoAttack breakdown, sanity checks."""
    n = result["n_samples"]
    cfg = result["config"]
    norm = "L∞" if result["norm"] == "linf" else "L2"
    labels = [e["label"] for e in result["eps"]]
    attacks = result["attacks"]
    lines = ["# Robustness evaluation", ""]
    lines.append(
        f"{n} samples · {norm} · seed {cfg['seed']} · model `{cfg['model_fingerprint']}` · "
        f"torchattacks {cfg['versions']['torchattacks']}"
    )
    lines.append("")
    if result["protocol"] != "standard":
        b = cfg["budget"]
        lines.append(
            f"> **Reduced attack budget** (APGD {b['apgd_steps']} steps, FAB {b['fab_steps']} steps, "
            f"Square {b['square_queries']} queries, {b['n_targets']} targets): these numbers are "
            "not comparable with standard AutoAttack / RobustBench figures."
        )
        lines.append("")
    ci = result.get("intervals") or {}
    clean_ci = _with_ci(result["clean_accuracy"], ci.get("clean"))
    lines.append(f"**Standard (clean) accuracy: {clean_ci}**")
    lines.append("")
    subset = cfg.get("subset")
    if subset:
        lines.append(
            f"Images: a class-stratified subset of {subset['n']} of {subset['of']} (seed "
            f"{subset['seed']}, indices hash `{subset['sha256']}`)."
        )
        lines.append("")
    header = ["ε", *[display_name(a) for a in attacks]]
    if len(attacks) > 1:
        header.append("Worst case")
    lines.append(_row(header))
    lines.append(_row(["---"] + ["---:"] * (len(header) - 1)))
    for lb in labels:
        acc_ci = ci.get("accuracy", {})
        cells = [lb] + [
            _with_ci(result["accuracy"][a][lb], acc_ci.get(a, {}).get(lb)) for a in attacks
        ]
        if len(attacks) > 1:
            worst = _with_ci(result["worst_case"][lb], ci.get("worst_case", {}).get(lb))
            cells.append(f"**{worst}**")
        lines.append(_row(cells))
    lines.append("")
    lines.append(
        "Entries are robust accuracy (correct on the clean input *and* under the attack). "
        "*Worst case* counts a sample as robust only if it survives every attack in its row."
        + (
            f" Brackets: {ci['confidence']:.0%} {ci['method']} (n = {n}); to compare two "
            "models on the same images use `caat-peft compare`."
            if ci
            else ""
        )
    )

    aa = result.get("autoattack")
    if aa:
        comps = list(next(iter(aa.values()))["robust_after"])[1:]
        lines += ["", "## AutoAttack breakdown", ""]
        lines.append(
            "Robust accuracy after each component (each runs only on samples all earlier ones "
            "missed):"
        )
        lines.append("")
        lines.append(_row(["ε", "clean", *[f"+ {display_name(c)}" for c in comps]]))
        lines.append(_row(["---"] + ["---:"] * (len(comps) + 1)))
        for lb in labels:
            after = aa[lb]["robust_after"]
            lines.append(_row([lb, *[f"{after[k]:.4f}" for k in ["clean", *comps]]]))

    sanity = result.get("sanity")
    lines += ["", "## Sanity checks", ""]
    if not sanity:
        lines.append("Not run (sanity=False).")
    else:
        tol = sanity["tolerance"]
        lines.append(
            f"After Carlini et al., *On Evaluating Adversarial Robustness*. Tolerance: "
            f"{tol['samples']} sample(s) (max of 1 and {tol['fraction']:.0%} of {n}). "
            f"Overall: **{sanity['status']}**"
            + (f" ({sanity['n_warn']} warning(s))" if sanity["n_warn"] else "")
        )
        lines.append("")
        lines.append(_row(["check", "status", "numbers"]))
        lines.append(_row(["---", "---", "---"]))
        for c in sanity["checks"]:
            status = f"**{c['status']}**" if c["status"] == "WARN" else c["status"]
            lines.append(_row([c["title"], status, c["detail"].replace("|", "\\|")]))
        if sanity.get("accuracy"):
            lines += ["", "Extra attacks run for the checks:", ""]
            lines.append(_row(["attack", "ε", "accuracy"]))
            lines.append(_row(["---", "---", "---:"]))
            for a, per_eps in sanity["accuracy"].items():
                for lb, acc in per_eps.items():
                    lines.append(_row([display_name(a), lb, f"{acc:.4f}"]))
    lines.append("")
    return "\n".join(lines)


def summarize(result: dict) -> str:
    """One line for a terminal or a log: clean, worst case per ε, sanity status."""
    parts = [f"clean {result['clean_accuracy']:.4f}"]
    key = "autoattack" if result.get("autoattack") else "worst case"
    for e in result["eps"]:
        lb = e["label"]
        value = (
            result["accuracy"]["autoattack"][lb]
            if key == "autoattack"
            else result["worst_case"][lb]
        )
        parts.append(f"{key}@{lb} {value:.4f}")
    if result.get("sanity"):
        parts.append(f"sanity {result['sanity']['status']}")
    if result["protocol"] != "standard":
        parts.append("REDUCED budget")
    return " | ".join(parts)


def write_reports(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    body = dict(result)
    per_sample = body.pop("per_sample", None)
    text = json.dumps(body, indent=1, ensure_ascii=False)
    if per_sample is not None:  # one line per list: thousands of 0/1 entries, not lines
        text = text[: text.rfind("}")].rstrip() + ',\n "per_sample": '
        text += json.dumps(per_sample, separators=(",", ":")) + "\n}"
    atomic_write_text(json_path, text + "\n")
    atomic_write_text(md_path, render_markdown(result))
    return json_path, md_path
