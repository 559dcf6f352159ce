"""Run the benchmarks: ``python -m benchmarks [--quick] [--only step,attack,...]``.

Prints one Markdown table per section, a summary table of the figures against their goals, and,
as the very last line, one JSON object with everything (for machines).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

SECTIONS = ("step", "fast", "attack", "memory", "accuracy", "scaling", "proposals")

# (figure, goal as text, test on the value); None: reported without a goal.
GOALS: dict[str, tuple[str, Any]] = {
    "caat_over_vanilla_step": ("≤ 1.02", lambda v: v <= 1.02),
    "caat_over_vanilla_update": ("≤ 1.05", lambda v: v <= 1.05),
    "attack_over_torchattacks": ("≥ 1.0", lambda v: v >= 1.0),
    "fast_over_reference_step": ("≥ 2.5 (224 px)", lambda v: v >= 2.5),
    "bf16_minus_fp32_robust_points": ("within ±1.5", lambda v: abs(v) <= 1.5),
    "peak_memory_caat_over_vanilla": ("≤ (vanilla + 2 grad buffers) × 1.05", None),
    "step_flops_utilisation": ("≥ 0.5 (ViT-Ti 224 px, batch 16)", lambda v: v >= 0.5),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced workload (112 px), few repeats")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections: {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="least timed rounds (default 3 / 5)")
    p.add_argument(
        "--max-repeats",
        type=int,
        default=None,
        help="most timed rounds while a ratio is still noisy (default: twice the least)",
    )
    p.add_argument(
        "--target-spread",
        type=float,
        default=None,
        help="a ratio is a figure once its rounds spread by at most this (default 0.03); "
        "above it, it is reported as noisy and not judged against its goal",
    )
    p.add_argument("--seeds", default=None, help="accuracy seeds, e.g. 0,1 (default 0 / 0,1)")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "inherit"),
        default="inherit",
        help="OMP_WAIT_POLICY for this run and its subprocesses (default: as set outside; "
        "passive helps on a shared, loaded machine, active is faster on a quiet one)",
    )
    p.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)} (choose from {','.join(SECTIONS)})")
    return args


def _section(title: str, rows: list[list[Any]], headers: list[str]) -> None:
    from benchmarks.bench_common import table

    print(f"\n## {title}\n")
    print(table(headers, rows))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.omp_wait_policy != "inherit":
        # Must happen before torch (and its OpenMP runtime) is loaded; subprocesses inherit it.
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    from benchmarks.bench_common import FULL, QUICK, TARGET_SPREAD, load1, loadavg, machine

    work = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 5)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    only = args.only.split(",")
    target = args.target_spread if args.target_spread is not None else TARGET_SPREAD
    rounds = {"max_repeats": args.max_repeats, "target_spread": target}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "workload": work.describe(),
        "repeats": repeats,
        "max_repeats": args.max_repeats,  # None: twice each figure's least number of rounds
        "target_spread": target,
        "machine": machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load1_start": load1(),
        "loadavg_start": loadavg()["loadavg"],
        "sections": {},
    }
    print(f"# caat-peft benchmarks ({'quick' if args.quick else 'full'})\n")
    most = args.max_repeats or "twice that"
    print(f"workload: {work.describe()}; medians of ≥ {repeats} (at most {most}) interleaved "
          f"rounds after warm-up; a ratio spreading > {target:.0%} is reported as noisy")  # fmt: skip
    print(f"machine: {report['machine']}; OMP_WAIT_POLICY={report['omp_wait_policy']}")
    print(f"load average (1 min) at start: {report['load1_start']:.2f}")
    sys.stdout.flush()
    sec = report["sections"]

    if "step" in only:
        from benchmarks.bench_step import caat_vs_vanilla

        r = _measure(sec, "step", lambda: caat_vs_vanilla(work, repeats, **rounds))
        s = r["seconds"]
        _section(
            "CA-AT vs vanilla (float32, same model, batch and start)",
            [
                ["full step (PGD attack … AdamW)", s["step_vanilla"], s["step_caat"],
                 r["caat_over_vanilla_step"]],
                ["step with PGD-0", s["step0_vanilla"], s["step0_caat"],
                 r["caat_over_vanilla_step_noattack"]],
                ["combine + step (projecting)", s["update_vanilla"], s["update_caat"],
                 r["caat_over_vanilla_update"]],
                ["combine + step (φ ≥ γ)", s["update_vanilla"], s["update_caat_no_projection"],
                 r["caat_noproj_over_vanilla_update"]],
            ],
            ["what", "vanilla s", "CA-AT s", "CA-AT / vanilla"],
        )  # fmt: skip
        print(f"\nprojected in {r['caat_projected_fraction']:.0%} of the timed CA-AT steps; "
              f"{r['trainable_parameters']} trainable parameters in "
              f"{r['trainable_tensors']} tensors; load {r['load1']}")  # fmt: skip

    if "fast" in only:
        from benchmarks.bench_step import fast_vs_reference

        r = _measure(sec, "fast", lambda: fast_vs_reference(work, repeats, **rounds))
        s = r["seconds"]
        _section(
            "Fast path vs reference step (CA-AT, same work)",
            [
                ["reference: fp32, torchattacks, flat copies", s["reference"], 1.0],
                ["training_step fp32", s["step_fp32"], r["fp32_over_reference_step"]],
                ["training_step bf16, eager", s["bf16_eager"], r["bf16_eager_over_reference_step"]],
                ["fast path: bf16 + compile", s["fast"], r["fast_over_reference_step"]],
            ],
            ["step", "seconds", "speed-up over reference"],
        )
        print(f"\ncompilation (the fast path's first step): {r['compile_seconds']:.1f} s")
        _section(
            "FLOP utilisation of the step",
            [
                ["fp32", r["step_gflop"], r["achieved_gflops_fp32"], r["matmul_gflops_fp32"],
                 r["step_flops_utilisation"]],
                ["bf16, eager", r["step_gflop"], r["achieved_gflops_bf16_eager"],
                 r["matmul_gflops_bf16"], r["step_flops_utilisation_bf16_eager"]],
                ["bf16 + compile", r["step_gflop"], r["achieved_gflops_fast"],
                 r["matmul_gflops_bf16"], r["step_flops_utilisation_fast_bf16"]],
            ],
            ["precision", "GFLOP / step", "achieved GFLOP/s", "matmul GFLOP/s (n=2048)",
             "utilisation"],
        )  # fmt: skip

    if "attack" in only:
        from benchmarks.bench_attack import attack_throughput

        r = _measure(sec, "attack", lambda: attack_throughput(work, repeats, **rounds))
        ips = r["images_per_second"]
        _section(
            f"PGD-{work.steps} throughput (images/s)",
            [
                ["torchattacks.PGD fp32", ips["torchattacks"], 1.0],
                ["caat_peft pgd fp32", ips["ours"], r["attack_over_torchattacks"]],
                ["caat_peft pgd bf16 autocast", ips["ours_bf16"],
                 ips["ours_bf16"] / ips["torchattacks"]],
                ["caat_peft pgd bf16 + compile", ips["ours_bf16_compiled"],
                 ips["ours_bf16_compiled"] / ips["torchattacks"]],
            ],
            ["attack", "images/s", "over torchattacks"],
        )  # fmt: skip

    if "memory" in only:
        from benchmarks.bench_memory import peak_memory

        r = _measure(sec, "memory", lambda: peak_memory(work, repeats=2 if args.quick else 3))
        added = r.get("step_added_mib", {})
        _section(
            "Peak memory (peak RSS of a fresh subprocess per method, MiB)",
            [
                ["vanilla", r["peak_rss_mib"]["vanilla"], added.get("vanilla", "n/a")],
                ["CA-AT", r["peak_rss_mib"]["caat"], added.get("caat", "n/a")],
                ["allowed for CA-AT", r["allowed_caat_peak_mib"], ""],
            ],
            ["method", "peak RSS MiB", "added by the steps MiB"],
        )

    if "accuracy" in only:
        from benchmarks.bench_accuracy import bf16_vs_fp32

        r = _measure(sec, "accuracy", lambda: bf16_vs_fp32(seeds))
        rows = []
        for precision, runs in r["runs"].items():
            for run in runs:
                rows.append(
                    [precision, run["seed"], run["clean_acc"], run["robust_acc"],
                     run["robust_acc_under_fp32_attack"], run["robust_acc_under_bf16_attack"],
                     run["train_seconds"]]
                )  # fmt: skip
        _section(
            "Demo stage 2, CA-AT γ = 0.8: training precision fp32 vs bf16",
            rows,
            ["train precision", "seed", "clean acc", "PGD-20 acc (trainer)",
             "PGD-20 fp32 attack", "PGD-20 bf16 attack", "train s"],
        )  # fmt: skip

    if "scaling" in only:
        from benchmarks.bench_scaling import scaling

        r = _measure(sec, "scaling", lambda: scaling(args.quick))
        sps = r["steps_per_second"]
        _section(
            "2-process CPU scaling (caat-peft train, same global batch)",
            [
                ["1 process, default threads", sps["1proc"], 1.0],
                ["1 process, 1 thread", sps["1proc_1thread"], sps["1proc_1thread"] / sps["1proc"]],
                ["torchrun 2 processes × 1 thread", sps["2proc"], r["two_process_speedup"]],
            ],
            ["setting", "steps/s", "over 1 process"],
        )
        print(f"\nparallel efficiency (2 procs vs 2 × one 1-thread proc): "
              f"{r['two_process_efficiency']:.2f}")  # fmt: skip

    if "proposals" in only:
        from benchmarks.bench_proposals import omp_policy, update_figures

        def proposals() -> dict[str, Any]:
            omp = omp_policy(1 if args.quick else 2)
            return {**update_figures(work, repeats, **rounds), **omp, "load1": omp["load1"]}

        r = _measure(sec, "proposals", proposals)
        s = r["seconds"]
        _section(
            "Proposed product changes (measured against the product, same run)",
            [
                ["CA-AT update: host-side coefficients", s["product"], s["host_coefficients"],
                 r["caat_host_over_product_update"]],
                ["CA-AT update: AdamW foreach (adopted) vs loop", s["adamw_loop"], s["product"],
                 r["adamw_foreach_over_loop_update"]],
                ["step (64 px, PGD-2): OMP_WAIT_POLICY=PASSIVE vs ACTIVE",
                 r["step_seconds"]["ACTIVE"], r["step_seconds"]["PASSIVE"],
                 r["omp_passive_over_active_step"]],
            ],
            ["change", "product s", "proposal s", "speed-up"],
        )  # fmt: skip

    figures = _figures(sec)
    goals = _goals(figures, sec)
    report["figures"] = {k: figure_entry(k, v, goals) for k, v in figures.items()}
    report["goals"] = goals
    report["load1_end"] = load1()
    report["loadavg_end"] = loadavg()["loadavg"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    _section("Summary", summary_rows(figures, goals), ["figure", "value", "goal", "verdict"])
    print(f"\nload average (1 min): start {report['load1_start']:.2f}, end "
          f"{report['load1_end']:.2f}; {report['seconds']} s in all")  # fmt: skip
    _write_json(report, args.json_out)
    return 0


def _measure(sec: dict[str, Any], name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section, recording the machine and its load around it (a figure measured while
    other jobs ran is read against that load)."""
    from benchmarks.bench_common import loadavg, machine

    before = loadavg()
    result = run()
    result["load"] = {"before": before, "after": loadavg()}
    result["machine"] = machine()
    sec[name] = result
    return result


def _write_json(report: dict[str, Any], path: str | None) -> None:
    from benchmarks.bench_common import to_jsonable

    if path:
        with open(path, "w") as fh:
            fh.write(json.dumps(report, indent=2, default=to_jsonable) + "\n")
    print(json.dumps(report, default=to_jsonable))


def _figures(sec: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: a ``Ratio`` where timed rounds made it, else a rounded float."""
    from benchmarks.bench_common import Ratio

    keys = {
        "step": ("caat_over_vanilla_step", "caat_over_vanilla_update",
                 "caat_over_vanilla_step_noattack", "caat_noproj_over_vanilla_update"),
        "fast": ("fast_over_reference_step", "fp32_over_reference_step",
                 "bf16_eager_over_reference_step", "fast_over_fp32_step", "compile_seconds",
                 "step_flops_utilisation", "step_flops_utilisation_bf16_eager",
                 "step_flops_utilisation_fast_bf16"),
        "attack": ("attack_over_torchattacks", "attack_bf16_over_fp32",
                   "attack_bf16_compiled_over_fp32"),
        "memory": ("peak_memory_caat_over_vanilla", "step_memory_caat_over_vanilla"),
        "accuracy": ("bf16_minus_fp32_robust_points", "bf16_minus_fp32_clean_points",
                     "bf16_attack_minus_fp32_attack_points", "fp32_train_seconds_over_bf16"),
        "scaling": ("two_process_speedup", "two_process_efficiency"),
        "proposals": ("caat_host_over_product_update", "adamw_foreach_over_loop_update",
                      "omp_passive_over_active_step"),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for section, names in keys.items():
        for name in names:
            if section in sec and name in sec[section]:
                v = sec[section][name]
                out[name] = v if isinstance(v, Ratio) else round(float(v), 4)
    return out


def verdict(name: str, value: Any, sec: dict[str, Any]) -> str:
    """``noisy`` for a ratio that never settled (never judged: its value says nothing about the
    goal), ``no goal`` where there is none, else ``met`` / ``not met``."""
    from benchmarks.bench_common import Ratio

    if isinstance(value, Ratio) and not value.stable:
        return "noisy"
    if name not in GOALS:
        return "no goal"
    if name == "peak_memory_caat_over_vanilla":
        m = sec["memory"]
        met = m["peak_rss_mib"]["caat"] <= m["allowed_caat_peak_mib"]
    else:
        met = bool(GOALS[name][1](float(value)))
    return "met" if met else "not met"


def _goals(figures: dict[str, Any], sec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each figure that has a goal: the goal, its verdict and ``met`` (None when noisy)."""
    goals: dict[str, dict[str, Any]] = {}
    for name, (text, _) in GOALS.items():
        if name not in figures:
            continue
        v = verdict(name, figures[name], sec)
        goals[name] = {"goal": text, "verdict": v, "met": None if v == "noisy" else v == "met"}
    return goals


def figure_entry(name: str, value: Any, goals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A figure's JSON entry: value (and spread, rounds for a timed ratio) and its verdict."""
    from benchmarks.bench_common import Ratio

    entry: dict[str, Any] = value.to_json() if isinstance(value, Ratio) else {"value": value}
    if isinstance(value, Ratio) and not value.stable:
        entry["verdict"] = "noisy"
    else:
        entry["verdict"] = goals.get(name, {}).get("verdict", "no goal")
    return entry


def summary_rows(figures: dict[str, Any], goals: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of the summary table: a noisy ratio shows ``noisy (spread …)`` and no verdict on
    its goal."""
    rows = []
    for name, value in figures.items():
        goal = goals.get(name, {}).get("goal", "")
        rows.append([name, value, goal, figure_entry(name, value, goals)["verdict"]])
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
