"""study.md and the study's figures, from the content of study.json alone.

- ``study-fronts.png``: claim 1, both methods' SA–AA fronts, one panel per training ε.
- ``study-conflict.png``: claim 2, μ, φ, the adversarial share and λ* over training, one column
  per training ε, one colour per setting (each seed a line).
- ``study-mu.png``: claim 2, each setting's μ against the training ε (log–log, 95 %
  intervals) with Theorem 1's ε² rate as a dashed reference line.
- ``study-accuracy.png``: claim 3, accuracy against the evaluation ε (clean at ε = 0) per
  setting (colour) and training ε (line style), one panel per method (Fig. 6's layout).
- ``study-synthetic.png`` (with ``--synthetic``): Theorem 1 on synthetic data
  (:mod:`caat_peft.synthetic`), μ against δ and d.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caat_peft.evaluation.store import atomic_write_text
from caat_peft.front import DISPLAY, METHODS, SYMBOL, draw_front, fmt, save_figure
from caat_peft.stats import format_ci
from caat_peft.study_claims import setting_name

FIGURES = ("study-fronts.png", "study-conflict.png", "study-mu.png", "study-accuracy.png")
SYNTHETIC_FIGURE = "study-synthetic.png"


def write_reports(study: dict[str, Any], out: Path, *, plots: bool = True) -> None:
    """study.json, study.md and (with ``plots``) the four PNGs (five with the synthetic check),
    each written atomically."""
    text = json.dumps(study, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(out / "study.json", text)
    atomic_write_text(out / "study.md", render_markdown(study))
    if plots:
        plot_fronts(study, out / FIGURES[0])
        plot_conflict(study, out / FIGURES[1])
        plot_mu(study, out / FIGURES[2])
        plot_accuracy(study, out / FIGURES[3])
        if study.get("synthetic"):
            from caat_peft.synthetic import plot_synthetic

            plot_synthetic(study["synthetic"], out / SYNTHETIC_FIGURE)


# --------------------------------------------------------------------------------------------
# study.md


def render_markdown(study: dict[str, Any]) -> str:
    """One section per claim, each ending in its verdict; then the runs."""
    lines = _setup(study)
    claims = study.get("claims")
    if not claims:
        return "\n".join([*lines, "*Study in progress: no claims yet.*"]) + "\n"
    lines += _tradeoff_md(study, claims["tradeoff"])
    lines += _conflict_md(claims["conflict"])
    lines += _budget_md(study, claims["budget"])
    if study.get("synthetic"):
        from caat_peft.synthetic import synthetic_md

        lines += synthetic_md(study["synthetic"], SYNTHETIC_FIGURE, level=2)
    lines += _runs_md(study)
    return "\n".join(lines) + "\n"


def _setup(study: dict[str, Any]) -> list[str]:
    grid = study["grid"]
    runs = study.get("runs", [])
    n = runs[0]["n_images"] if runs else "?"
    lines = [f"# Study: {Path(study['study_file'] or study['recipe']).name}", ""]
    lines.append(
        f"Recipe `{study['recipe']}`"
        + (f", overrides `{' '.join(study['overrides'])}`" if study["overrides"] else "")
        + (", source model: the demo's robust stage-1 ViT" if study.get("source") else "")
        + "."
    )
    lines.append(
        f"Grid: training ε {', '.join(grid['train_eps_labels'])} × vanilla AT λ ∈ "
        f"{{{', '.join(map(fmt, grid['lambdas']))}}} and CA-AT γ ∈ "
        f"{{{', '.join(map(fmt, grid['gammas']))}}} × seeds {', '.join(map(str, grid['seeds']))}"
        f"; {len(runs)} run(s). Every model is scored on the same {n} held-out images "
        f"(clean, and {study['eval_attack_title']} at ε {', '.join(grid['eval_eps_labels'])}, "
        f"{study['norm']}). Intervals are 95 %."
    )
    if not study.get("complete", False):
        lines += ["", f"*Incomplete: {len(study.get('missing', []))} point(s) not finished.*"]
    return [*lines, ""]


def _tradeoff_md(study: dict[str, Any], claim: dict[str, Any]) -> list[str]:
    lines = ["## Claim 1: CA-AT's SA–AA front lies above vanilla AT's (Fig. 3, 4)", ""]
    for front in claim["per_eps"]:
        lines += [f"### Training ε = {front['label']} (AA at ε = {front['label']})", ""]
        lines += ["| method | trade-off | SA | AA | on front |", "|---|---|---:|---:|:---:|"]
        for p in front["points"]:
            knob = METHODS[p["method"]]
            on = p[knob] in front["pareto"][p["method"]]
            lines.append(
                f"| {DISPLAY[p['method']]} | {SYMBOL[p['method']]} = {fmt(p[knob])} | "
                f"{format_ci(p['clean_acc'], p.get('clean_acc_ci'))} | "
                f"{format_ci(p['robust_acc'], p.get('robust_acc_ci'))} | {'✓' if on else ''} |"
            )
        hv = front["hypervolume"]
        lines += ["", f"Hypervolume: vanilla AT {hv['vanilla']:.4f}, CA-AT {hv['caat']:.4f}.", ""]
    lines += [f"![fronts]({FIGURES[0]})", "", f"**Verdict (claim 1).** {claim['verdict']}", ""]
    return lines


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _conflict_md(claim: dict[str, Any]) -> list[str]:
    lines = ["## Claim 2: the conflict μ grows with the training ε (Theorem 1, Fig. 2)", ""]
    if claim["table"]:
        lines += [*_conflict_method_md(claim), ""]
        lines += [
            "| setting | training ε | μ | mean φ | adversarial share | λ* |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in claim["table"]:
            ci = r["mu_ci"]
            interval = f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""
            lines.append(
                f"| {setting_name(r['method'], r['value'])} | {r['label']} | "
                f"{_num(r['mu'])}{interval} | "
                f"{_num(r['cos'])} | {_num(r['adv_share'])} | {_num(r['lambda_star'])} |"
            )
        lines += ["", "| setting | exponent b (μ ∝ εᵇ) | Page's L p | verdict |"]
        lines.append("|---|---:|---:|---|")
        for t in claim["trends"]:
            e, page = t["exponent"], t["page"]
            exp = format_ci(e["exponent"], e["ci"], 2) if e else "—"
            p = f"{page['p_value']:.3g}" if page else "—"
            extra = f"; {t['against_bound']}" if t.get("against_bound") else ""
            lines.append(
                f"| {setting_name(t['method'], t['value'])} | {exp} | {p} | {t['verdict']}{extra} |"
            )
        bound = claim["bound"]
        if bound:
            lines += [
                "",
                f"{bound['statement']}. Applies here: {'yes' if bound['applies'] else 'no'}",
            ]
            lines[-1] += (
                f" ({bound['why']}); the dashed line in the figure is its ε² rate. The theorem "
                "is an upper bound on the order of μ: a slope below 2 is within it, and only an "
                "interval wholly above 2 is flagged, as steeper than the ε² bound (asymptotic): "
                "O(·) hides constants and lower-order terms, so over a finite range of budgets "
                "that is a warning, not a refutation."
            )
        lines += [
            "",
            f"![conflict over training]({FIGURES[1]})",
            f"![mu against eps]({FIGURES[2]})",
        ]
    lines += ["", f"**Verdict (claim 2).** {claim['verdict']}", ""]
    return lines


def _conflict_method_md(claim: dict[str, Any]) -> list[str]:
    """How claim 2's figures were made, in one paragraph."""
    several = len(claim.get("seeds", [])) > 1
    if several:
        how = (
            "A run's μ is its mean over the logged training steps; a cell's μ is the geometric "
            "mean over seeds with a Student t interval on log μ. The exponent b is fitted per "
            "seed (log μ on log ε) and its interval is Student t over the seeds' slopes; the "
            "CA-AT / vanilla AT ratio likewise over the seeds' log ratios."
        )
    else:
        how = (
            f"One seed: means over training steps, intervals by {claim['interval_method']}; "
            "they hold the step-to-step variation only, not the training randomness."
        )
    return [
        how + " Adversarial share = 1/(1+k); λ* = k (the clean loss's weight, paper Sec. 4), "
        "over the steps where CA-AT projected."
    ]


def _budget_md(study: dict[str, Any], claim: dict[str, Any]) -> list[str]:
    title = study["eval_attack_title"]
    lines = ["## Claim 3: CA-AT holds up at larger budgets (Table 1, Fig. 6)", ""]
    columns = claim["columns"]
    head = ["clean" if c == "clean" else f"{title} ε = {c}" for c in columns]
    lines += [f"| setting | training ε | {' | '.join(head)} |"]
    lines.append("|---|---|" + "---:|" * len(columns))
    for r in claim["accuracy"]:
        cells = [format_ci(r[c]["value"], r[c]["ci"]) for c in columns]
        lines.append(
            f"| {setting_name(r['method'], r['value'])} | {r['label']} | {' | '.join(cells)} |"
        )
    if claim["differences"]:
        lines += ["", *_differences_md(claim["differences"])]
    lines += ["", f"![accuracy against eps]({FIGURES[3]})", ""]
    lines += [f"**Verdict (claim 3).** {claim['verdict']}", ""]
    return lines


def _differences_md(rows: list[dict[str, Any]]) -> list[str]:
    """The paired CA-AT − vanilla AT table. McNemar's p only with one seed: pooled over seeds
    it would treat the disagreements of one seed's runs as independent of another's, which
    they are not (the same images, the same training recipe), and come out far too small."""
    one_seed = all(r["n_seeds"] == 1 for r in rows)
    if one_seed:
        intro = (
            "CA-AT − vanilla AT, paired on the same images (bootstrap interval over images; "
            "p: exact McNemar):"
        )
    else:
        intro = (
            "CA-AT − vanilla AT, paired on the same images and seeds (bootstrap interval over "
            "images and seeds). No p-value: McNemar's test pooled over seeds would treat "
            "disagreements that cluster by seed as independent."
        )
    head = "| training ε | pair | column | difference |" + (" p |" if one_seed else "")
    lines = [intro, "", head + " verdict |"]
    lines.append("|---|---|---|---:|" + ("---:|" if one_seed else "") + "---|")
    for r in rows:
        p = f" {r['p_value']:.3g} |" if one_seed else ""
        lines.append(
            f"| {r['label']} | γ = {fmt(r['gamma'])} vs λ = {fmt(r['lam'])} | {r['column']} | "
            f"{format_ci(r['difference'], r['ci'], signed=True)} |{p} {r['verdict']} |"
        )
    return lines


def _runs_md(study: dict[str, Any]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| run | model | SA | sanity | train s | eval s |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in study.get("runs", []):
        lines.append(
            f"| {r['name']} | {r.get('model')} | {r['clean_acc']:.4f} | {r.get('sanity') or '—'} | "
            f"{_num(r.get('train_seconds'), 4)} | {_num(r.get('eval_seconds'), 4)} |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's object API, not pyplot: a library must leave the caller's state alone)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _colours(study: dict[str, Any]) -> dict[tuple[str, float], Any]:
    """One colour per setting: blues for vanilla AT's λ, reds for CA-AT's γ."""
    from matplotlib import colormaps

    out: dict[tuple[str, float], Any] = {}
    for method, cmap in (("vanilla", "Blues"), ("caat", "Reds")):
        values = study["grid"]["lambdas" if method == "vanilla" else "gammas"]
        for i, v in enumerate(values):
            out[(method, float(v))] = colormaps[cmap](0.45 + 0.5 * (i + 1) / (len(values) + 1))
    return out


def plot_fronts(study: dict[str, Any], path: Path) -> None:
    fronts = study["claims"]["tradeoff"]["per_eps"]
    fig = _figure(5.2 * max(1, len(fronts)), 4.6)
    for i, front in enumerate(fronts):
        ax = fig.add_subplot(1, max(1, len(fronts)), i + 1)
        draw_front(
            ax, {**front, "eval_attack_title": study["eval_attack_title"]}, f"ε = {front['label']}"
        )
    fig.tight_layout()
    save_figure(fig, path)


def plot_conflict(study: dict[str, Any], path: Path) -> None:
    """μ, φ, adversarial share and λ* over training: rows = quantity, columns = training ε."""
    grid, colours = study["grid"], _colours(study)
    runs = [r for r in study["runs"] if r.get("conflict")]
    keys = [("mu", "μ"), ("cos", "φ = cos(g_a, g_c)"), ("adv_share", "adversarial share")]
    if any(any(v is not None for v in r["conflict"]["curve"]["lambda_star"]) for r in runs):
        keys.append(("lambda_star", "λ* (clean weight)"))
    n = len(grid["train_eps"])
    fig = _figure(4.2 * n, 2.3 * len(keys) + 0.6)
    axes = [
        [fig.add_subplot(len(keys), n, row * n + col + 1) for col in range(n)]
        for row in range(len(keys))
    ]
    for col, eps in enumerate(grid["train_eps"]):
        axes[0][col].set_title(f"training ε = {grid['train_eps_labels'][col]}", fontsize=9)
        for r in (r for r in runs if r["train_eps"] == eps):
            curve, colour = r["conflict"]["curve"], colours.get((r["method"], float(r["value"])))
            for row, (key, _) in enumerate(keys):
                ax = axes[row][col]
                xy = [(s, v) for s, v in zip(curve["step"], curve[key]) if v is not None]
                label = (
                    setting_name(r["method"], r["value"]) if r["seed"] == grid["seeds"][0] else None
                )
                if xy:
                    ax.plot(*zip(*xy), color=colour, lw=1.0, alpha=0.85, label=label)
    for row, (key, label) in enumerate(keys):
        for col in range(n):
            ax = axes[row][col]
            ax.grid(alpha=0.3)
            if key == "mu" and ax.lines:  # μ > 0 and spans orders of magnitude
                ax.set_yscale("log")
            elif key == "lambda_star" and ax.lines:  # k ≥ 0, 0 for vanilla AT at λ = 1
                ax.set_yscale("symlog", linthresh=1e-2)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == len(keys) - 1:
                ax.set_xlabel("optimiser step", fontsize=8)
    if axes[0][0].lines:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Gradient conflict during training (claim 2)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_mu(study: dict[str, Any], path: Path) -> None:
    """Mean μ against the training ε, log–log, with Theorem 1's ε² rate as a reference."""
    claim, colours = study["claims"]["conflict"], _colours(study)
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    for method, value in dict.fromkeys((r["method"], r["value"]) for r in claim["table"]):
        rows = [r for r in claim["table"] if (r["method"], r["value"]) == (method, value)]
        x = [r["train_eps"] for r in rows]
        y = [r["mu"] for r in rows]
        cis = [r["mu_ci"] or [r["mu"], r["mu"]] for r in rows]
        err = [
            [max(0.0, r["mu"] - ci[0]) for r, ci in zip(rows, cis)],
            [max(0.0, ci[1] - r["mu"]) for r, ci in zip(rows, cis)],
        ]
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker="o",
            capsize=3,
            color=colours.get((method, float(value))),
            label=setting_name(method, value),
        )
    bound = claim.get("bound") or {}
    reference = bound.get("reference")
    if reference:
        style = "k--" if bound.get("applies") else "k:"
        ax.plot(
            reference["eps"],
            reference["mu"],
            style,
            lw=1,
            label="Theorem 1's ε² bound (order only)",
        )
    if claim["table"]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("training ε")
    ax.set_ylabel("μ: mean over training, geometric mean over seeds")
    ax.set_title("μ against the training budget (claim 2)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy(study: dict[str, Any], path: Path) -> None:
    """Accuracy against the evaluation ε (clean at 0), per setting and training ε (Fig. 6)."""
    claim, grid, colours = study["claims"]["budget"], study["grid"], _colours(study)
    styles = ["-", "--", ":", "-."]
    labels = [c for c in claim["columns"] if c != "clean"]
    x = [0.0] + [e for e, lb in zip(grid["eval_eps"], grid["eval_eps_labels"]) if lb in labels]
    fig = _figure(10.0, 4.2)
    for i, method in enumerate(("vanilla", "caat")):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in (r for r in claim["accuracy"] if r["method"] == method):
            cols = ["clean", *labels]
            y = [r[c]["value"] for c in cols]
            lo = [max(0.0, r[c]["value"] - (r[c]["ci"] or [r[c]["value"]] * 2)[0]) for c in cols]
            hi = [max(0.0, (r[c]["ci"] or [r[c]["value"]] * 2)[1] - r[c]["value"]) for c in cols]
            style = styles[grid["train_eps"].index(r["train_eps"]) % len(styles)]
            ax.errorbar(
                x,
                y,
                yerr=[lo, hi],
                ls=style,
                marker="o",
                ms=3,
                capsize=2,
                color=colours.get((method, float(r["value"]))),
                label=f"{SYMBOL[method]} = {fmt(r['value'])}, trained at ε = {r['label']}",
            )
        ax.set_title(DISPLAY[method], fontsize=9)
        ax.set_xlabel(f"evaluation ε ({study['eval_attack_title']}; 0 = clean)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
