"""Cost curves of one adversarial training step: ``python -m benchmarks.bench_curves``.

How the time and peak memory of one ``training_step`` (PGD attack, g_c and g_a, combine, AdamW
step; float32) grow along four axes, each point measured as CA-AT (γ = 0.8) and vanilla
(λ = 0.5) on the same model copy and batch, interleaved, so that CA-AT / vanilla is a same-run
ratio with its spread (``bench_common.interleaved_until_stable``):

* ``batch``: batch size at ViT-Ti, 224 px, LoRA r 8;
* ``image``: image size (tokens) at ViT-Ti, batch 16;
* ``model``: ViT-Ti / ViT-S / ViT-B and Swin-T at 224 px, LoRA r 8, batch 16;
* ``params``: trainable-parameter count on ViT-S: LoRA r 4 … 64, the bottleneck adapter, full
  fine-tuning (where the projection's cost is largest; goal CA-AT / vanilla ≤ 1.02 everywhere).

Peak memory is the peak RSS (``VmHWM``, as in ``bench_memory``) of a process that builds the
point's model and runs one step with one method; each such process is forked from a lean fork
server (one fresh subprocess per run that has only imported the code), with its high-water mark
reset right after the fork, so that it measures what ``bench_memory``'s fresh subprocess would
without paying the interpreter's and torch's start-up (seconds) once per point and method.
``getrusage().ru_maxrss`` is not used: it survives fork + exec (see ``bench_memory``).

A configuration that recurs on several axes (ViT-Ti 224 px batch 16 LoRA r 8 is on three) is
measured once and shared. ``--quick``: 112 px, batch 8, PGD-3, fewer points; ``--tiny``: a
smoke test (ViT-Ti at 32 px, batch 2, PGD-1, 2 rounds), its figures mean nothing.

    python -m benchmarks.bench_curves --quick --out curves.json --plot curves.png
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import select
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    GAMMA,
    LAM,
    NUM_CLASSES,
    TARGET_SPREAD,
    Ratio,
    Workload,
    interleaved_until_stable,
    loadavg,
    machine,
    make_batch,
    make_trainee,
    table,
    to_jsonable,
)

AXES = ("batch", "image", "model", "params")
GOAL = 1.02  # CA-AT / vanilla step time at every point (the suite's caat_over_vanilla_step)
VIT_TI, VIT_S, VIT_B = "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"
SWIN_T = "swin_tiny_patch4_window7_224"
SHORT = {VIT_TI: "ViT-Ti", VIT_S: "ViT-S", VIT_B: "ViT-B", SWIN_T: "Swin-T"}
MEMORY_TIMEOUT_S = 3600
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Point:
    """One configuration: model, input, attack and PEFT method (hashable: measured once)."""

    model: str
    image_size: int
    batch: int
    pgd_steps: int
    peft: str = "lora"  # lora | adapter | full
    r: int = 8
    reduction: int = 8

    def peft_label(self) -> str:
        if self.peft == "lora":
            return f"LoRA r {self.r}"
        if self.peft == "adapter":
            return f"adapter (reduction {self.reduction})"
        return self.peft

    def describe(self) -> str:
        return (
            f"{SHORT.get(self.model, self.model)} {self.image_size} px, {self.peft_label()}, "
            f"batch {self.batch}, PGD-{self.pgd_steps}"
        )

    def workload(self) -> Workload:
        return Workload(self.image_size, self.batch, self.pgd_steps, self.model)


@dataclass(frozen=True)
class Mode:
    """The sizes of one grid (full, quick or tiny)."""

    name: str
    image_size: int
    batch: int
    pgd_steps: int
    batches: tuple[int, ...]
    images: tuple[int, ...]
    models: tuple[str, ...]
    params_model: str
    ranks: tuple[int, ...]
    min_rounds: int
    max_rounds: int


MODES = {
    "full": Mode("full", 224, 16, 10, (4, 8, 16, 32), (64, 112, 160, 224),
                 (VIT_TI, VIT_S, VIT_B, SWIN_T), VIT_S, (4, 8, 16, 32, 64), 5, 10),
    "quick": Mode("quick", 112, 8, 3, (4, 8, 16), (64, 112, 160),
                  (VIT_TI, VIT_S, VIT_B, SWIN_T), VIT_S, (4, 16, 64), 3, 6),
    "tiny": Mode("tiny", 32, 2, 1, (2, 4), (32, 48), (VIT_TI,), VIT_TI, (8,), 2, 2),
}  # fmt: skip


@dataclass
class Axis:
    """One curve: its points as (label, x value, configuration)."""

    name: str
    title: str
    x_label: str
    points: list[tuple[str, float, Point]] = field(default_factory=list)


def grid(mode: Mode, axes: tuple[str, ...] = AXES) -> dict[str, Axis]:
    """The points of each requested axis; the others are held at the mode's defaults."""
    img, batch, pgd = mode.image_size, mode.batch, mode.pgd_steps
    out = {
        "batch": Axis("batch", f"Batch size (ViT-Ti, {img} px, LoRA r 8)", "batch size",
                      [(str(b), b, Point(VIT_TI, img, b, pgd)) for b in mode.batches]),
        "image": Axis("image", f"Image size (ViT-Ti, batch {batch}, LoRA r 8)", "image size (px)",
                      [(f"{s} px ({_tokens(VIT_TI, s)} tokens)", s, Point(VIT_TI, s, batch, pgd))
                       for s in mode.images]),
        "model": Axis("model", f"Model size ({img} px, batch {batch}, LoRA r 8)", "model",
                      [(SHORT[m], i, Point(m, img, batch, pgd))
                       for i, m in enumerate(mode.models)]),
    }  # fmt: skip
    pm = mode.params_model
    params = [Point(pm, img, batch, pgd, "lora", r=r) for r in mode.ranks]
    params += [Point(pm, img, batch, pgd, "adapter"), Point(pm, img, batch, pgd, "full")]
    # x is the trainable-parameter count, filled in once the point is built
    title = f"Trainable parameters ({SHORT[pm]}, {img} px, batch {batch})"
    out["params"] = Axis(
        "params", title, "trainable parameters", [(p.peft_label(), 0, p) for p in params]
    )
    return {name: out[name] for name in axes}


def _tokens(model: str, image_size: int) -> int:
    """Patch tokens (/16 for these ViTs, /4 for Swin): attention grows with their square."""
    return (image_size // 16) ** 2 if "patch16" in model else (image_size // 4) ** 2


def build_point_model(point: Point, seed: int = 0) -> Any:
    """Random-weight classifier through the product's ``build_classifier`` (no network)."""
    import torch

    from caat_peft.config import ModelConfig, PeftConfig
    from caat_peft.models import build_classifier

    torch.manual_seed(seed)
    # timm's default input is 224 px; only other sizes are passed (Swin adapts its windows)
    kwargs = {"img_size": point.image_size} if point.image_size != 224 else {}
    peft = PeftConfig(method=point.peft, r=point.r, alpha=16, reduction=point.reduction)
    return build_classifier(ModelConfig(name=point.model, kwargs=kwargs), peft, NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# Measurements


def time_point(
    point: Point,
    min_rounds: int,
    max_rounds: int,
    target_spread: float = TARGET_SPREAD,
    gamma: float = GAMMA,
) -> dict[str, Any]:
    """One step of each method, interleaved until CA-AT / vanilla settles (or gives up)."""
    from benchmarks.bench_step import run_step

    before = loadavg()
    base = build_point_model(point)
    batch = make_batch(point.workload())
    vanilla = make_trainee(base, "vanilla", point.pgd_steps)
    caat = make_trainee(base, "caat", point.pgd_steps, gamma=gamma)
    del base  # the trainees hold their own copies
    projected: list[bool] = []

    def caat_step() -> None:
        projected.append(bool(run_step(caat, batch)["projected"]))

    run = interleaved_until_stable(
        {"vanilla": lambda: run_step(vanilla, batch), "caat": caat_step},
        ("caat", "vanilla"),
        min_repeats=min_rounds,
        max_repeats=max_rounds,
        target_spread=target_spread,
        warmup=1,
    )
    med = run.medians()
    return {
        "seconds_per_step": med,
        "images_per_second": {k: point.batch / v for k, v in med.items()},
        "caat_over_vanilla": run.ratio("caat", "vanilla"),
        "caat_projected_fraction": sum(projected) / max(1, len(projected)),
        "trainable_parameters": sum(p.numel() for p in vanilla.params),
        "trainable_tensors": len(vanilla.params),
        "rounds": run.rounds,
        "load": {"before": before, "after": loadavg()},
    }


def _measure_memory(spec: dict[str, Any], kind: str, gamma: float) -> dict[str, Any]:
    """In a freshly forked child: reset the high-water mark, build, one step, read the peak."""
    from benchmarks.bench_memory import _reset_hwm, _status_kib
    from benchmarks.bench_step import run_step

    # the fork inherited the server's pages (imports only); from here on the peak is the point's
    reset = _reset_hwm()
    point = Point(**spec)
    trainee = make_trainee(build_point_model(point), kind, point.pgd_steps, gamma=gamma)
    gc.collect()
    run_step(trainee, make_batch(point.workload()))
    return {"peak_rss_kib": _status_kib("VmHWM"), "hwm_reset": reset}


def _memory_server() -> None:
    """The lean fork server: one JSON request per stdin line, one JSON answer per stdout line;
    each request is measured in a child forked from this process (which only imported code)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints must not garble the answers
    for line in sys.stdin:
        request = json.loads(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer through the pipe, exit without clean-up
            os.close(read)
            try:
                result = _measure_memory(request["point"], request["kind"], request["gamma"])
            except BaseException as exc:  # reported, not raised: the curve goes on
                result = {"error": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(write, "w") as fh:
                fh.write(json.dumps(result))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        answer = text or json.dumps({"error": f"memory child died (wait status {status})"})
        answers.write(answer + "\n")
        answers.flush()


class MemoryServer:
    """Parent side of ``_memory_server``: started on first use, one per run."""

    def __init__(self, timeout_s: float = MEMORY_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[str] | None = None

    def ask(self, point: Point, kind: str, gamma: float = GAMMA) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            code = "from benchmarks.bench_curves import _memory_server; _memory_server()"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"point": asdict(point), "kind": kind, "gamma": gamma}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # timed out or the server died: a fresh one serves the next request
            self.close()
            return {"error": "no answer from the memory server"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the server's loop ends on end of input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def peak_memory(point: Point, server: MemoryServer, gamma: float = GAMMA) -> dict[str, Any]:
    """Peak RSS (MiB) of one step per method, each in its own child of the fork server."""
    out: dict[str, Any] = {"peak_rss_mib": {}, "hwm_reset": True}
    for kind in ("vanilla", "caat"):
        got = server.ask(point, kind, gamma)
        if "error" in got:
            return {"error": f"{kind}: {got['error']}"}
        kib = got["peak_rss_kib"]
        out["peak_rss_mib"][kind] = kib / 1024 if kib else None
        out["hwm_reset"] = out["hwm_reset"] and got["hwm_reset"]
    mib = out["peak_rss_mib"]
    if mib["vanilla"] and mib["caat"]:
        out["caat_over_vanilla"] = mib["caat"] / mib["vanilla"]
    return out


def verdict(ratio: Ratio) -> str:
    """``noisy`` for a ratio that never settled (never judged), else met / not met."""
    if not ratio.stable:
        return "noisy"
    return "met" if ratio.value <= GOAL else "not met"


def measure_point(
    point: Point, setup: dict[str, Any], memory: MemoryServer | None
) -> dict[str, Any]:
    """Time and (optionally) peak memory of one configuration, errors recorded, not raised."""
    try:
        result = time_point(
            point, setup["min_rounds"], setup["max_rounds"], setup["target_spread"], setup["gamma"]
        )
    except Exception as exc:  # e.g. a model too big for the machine: the others still run
        return {"error": f"{type(exc).__name__}: {exc}"}
    gc.collect()  # free the timed models before the memory processes allocate theirs
    result["verdict"] = verdict(result["caat_over_vanilla"])
    result["memory"] = peak_memory(point, memory, setup["gamma"]) if memory else None
    result["machine"] = machine()
    return result


# --------------------------------------------------------------------------------------------
# The run, its tables, JSON and figure


def run_curves(
    mode: Mode,
    axes: tuple[str, ...],
    *,
    memory: bool = True,
    target_spread: float = TARGET_SPREAD,
    max_rounds: int | None = None,
    gamma: float = GAMMA,
    out: str | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every point of every axis (a recurring configuration once) and build the report;
    the JSON is rewritten after each point, so a run cut short keeps what it measured."""
    setup = {
        "min_rounds": mode.min_rounds,
        "max_rounds": max(max_rounds or mode.max_rounds, mode.min_rounds),
        "target_spread": target_spread,
        "gamma": gamma,
    }
    report = _header(mode, axes, setup, memory, command)
    server = MemoryServer() if memory else None
    try:
        _measure_axes(mode, axes, setup, server, report, out, log)
    finally:
        if server is not None:
            server.close()
    report["loadavg_end"] = loadavg()["loadavg"]
    return report


def _measure_axes(
    mode: Mode,
    axes: tuple[str, ...],
    setup: dict[str, Any],
    server: MemoryServer | None,
    report: dict[str, Any],
    out: str | None,
    log: Callable[[str], None],
) -> None:
    measured: dict[Point, tuple[str, dict[str, Any]]] = {}
    for name, axis in grid(mode, axes).items():
        entry = {"title": axis.title, "x_label": axis.x_label, "points": []}
        report["axes"][name] = entry
        for label, x, point in axis.points:
            if point not in measured:
                log(f"measuring {name}: {point.describe()}")
                measured[point] = (name, measure_point(point, setup, server))
            first, result = measured[point]
            row = {"label": label, "x": x, "config": asdict(point), **result}
            if name == "params" and "trainable_parameters" in result:
                row["x"] = result["trainable_parameters"]
            if first != name:
                row["shared_with"] = first  # the same configuration, measured once
            entry["points"].append(row)
            if out:
                write_json(report, out)


def _header(
    mode: Mode, axes: tuple[str, ...], setup: dict[str, Any], memory: bool, command: str
) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "mode": mode.name,
        "what": "one float32 training_step (PGD L∞ ε = 8/255, g_c, g_a, combine, AdamW), "
        f"CA-AT γ = {setup['gamma']} vs vanilla λ = {LAM}, same model copy and batch, "
        "interleaved",
        "goal": f"CA-AT / vanilla ≤ {GOAL} at every point (noisy points are not judged)",
        "rounds": setup,
        "memory_method": (
            "peak RSS (VmHWM) after building the model and one step, one method per process, "
            "each forked from a lean fork server (a fresh subprocess that only imported the "
            "code), high-water mark reset right after the fork"
            if memory
            else None
        ),
        "machine": machine(),
        "loadavg_start": loadavg()["loadavg"],
        "requested_axes": list(axes),
        "axes": {},
    }


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=to_jsonable) + "\n")


def _mib(point: dict[str, Any], kind: str) -> Any:
    mem = point.get("memory") or {}
    if "error" in mem:
        return "error"
    value = mem.get("peak_rss_mib", {}).get(kind)
    return "n/a" if value is None else float(value)


def _as_ratio(value: Ratio | dict[str, Any]) -> Ratio:
    """A report read back from JSON holds the ratio's fields, not the object."""
    return value if isinstance(value, Ratio) else Ratio(**value)


def markdown(report: dict[str, Any]) -> str:
    """One Markdown table per axis; CA-AT / vanilla as ``Ratio.text()`` (noisy says so)."""
    headers = ["point", "trainable params", "vanilla s/step", "CA-AT s/step", "CA-AT / vanilla",
               "verdict", "vanilla img/s", "CA-AT img/s", "peak RSS vanilla MiB",
               "peak RSS CA-AT MiB", "projected", "load1"]  # fmt: skip
    parts = []
    for axis in report["axes"].values():
        rows = []
        for p in axis["points"]:
            if "error" in p:
                rows.append([p["label"], "error: " + p["error"]] + [""] * (len(headers) - 2))
                continue
            s, ips = p["seconds_per_step"], p["images_per_second"]
            rows.append(
                [p["label"], p["trainable_parameters"], s["vanilla"], s["caat"],
                 _as_ratio(p["caat_over_vanilla"]), p["verdict"], ips["vanilla"], ips["caat"],
                 _mib(p, "vanilla"), _mib(p, "caat"), f"{p['caat_projected_fraction']:.0%}",
                 f"{p['load']['before']['load1']:.2f}"]
            )  # fmt: skip
        parts.append(f"## {axis['title']}\n\n{table(headers, rows)}")
    return "\n\n".join(parts)


def plot(report: dict[str, Any], path: str) -> None:
    """Step time vs the axis value, both methods, one panel per axis (matplotlib's object API,
    not pyplot: the caller's backend and current figure are left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes = report["axes"]
    fig = Figure(figsize=(4.5 * max(1, len(axes)), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, (name, axis) in zip(panels, axes.items()):
        # in order of x, so that each line runs left to right (the adapter has fewer
        # trainable parameters than LoRA r 8, but is listed after the ranks)
        points = sorted((p for p in axis["points"] if "error" not in p), key=lambda p: p["x"])
        xs = [p["x"] for p in points]
        gamma = report["rounds"]["gamma"]
        for kind, label, marker in (
            ("vanilla", f"vanilla λ = {LAM}", "o"),
            ("caat", f"CA-AT γ = {gamma}", "s"),
        ):
            ax.plot(xs, [p["seconds_per_step"][kind] for p in points], marker=marker, label=label)
        if name == "model":  # categorical: the models in order of size
            ax.set_xticks(xs, [p["label"] for p in points])
        if name == "params" and xs and min(xs) > 0:
            ax.set_xscale("log")  # LoRA r 4 to full fine-tuning spans orders of magnitude
            for p in points:
                xy = (p["x"], p["seconds_per_step"]["caat"])
                ax.annotate(p["label"], xy, xytext=(3, 6), textcoords="offset points", fontsize=7)
        ax.set_title(axis["title"], fontsize=9)
        ax.set_xlabel(axis["x_label"])
        ax.set_ylabel("seconds per step")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"caat-peft cost curves ({report['mode']}, {report['machine']['cpu']})", fontsize=10
    )
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------
# Command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_curves", description=__doc__.splitlines()[0]
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="112 px, batch 8, PGD-3, fewer points")
    size.add_argument("--tiny", action="store_true", help="smoke test: 32 px, batch 2, PGD-1")
    p.add_argument("--axes", default=",".join(AXES), help=f"comma-separated: {','.join(AXES)}")
    p.add_argument("--out", default="bench_curves.json", help="JSON file (rewritten per point)")
    p.add_argument("--plot", default=None, help="also draw the curves into this PNG")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument(
        "--gamma",
        type=float,
        default=GAMMA,
        help="CA-AT threshold (default 0.8); near 1 (e.g. 0.999) CA-AT projects at almost every "
        "step, so the projecting branch, the costlier one, is what is timed",
    )
    p.add_argument("--max-rounds", type=int, default=None, help="most rounds while still noisy")
    p.add_argument(
        "--target-spread",
        type=float,
        default=TARGET_SPREAD,
        help="a ratio whose rounds spread more than this is reported as noisy (default 0.03)",
    )
    args = p.parse_args(argv)
    axes = tuple(a for a in args.axes.split(",") if a)
    unknown = set(axes) - set(AXES)
    if unknown or not axes:
        p.error(f"unknown axes {sorted(unknown)} (choose from {','.join(AXES)})")
    args.axes = axes
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    mode = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    command = "python -m benchmarks.bench_curves " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"# caat-peft cost curves ({mode.name}): CA-AT vs vanilla, one training step\n")
    sys.stdout.flush()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_curves(
        mode,
        args.axes,
        memory=not args.no_memory,
        target_spread=args.target_spread,
        max_rounds=args.max_rounds,
        gamma=args.gamma,
        out=args.out,
        command=command,
        log=log,
    )
    write_json(report, args.out)
    print(markdown(report))
    start, end = report["loadavg_start"][0], report["loadavg_end"][0]
    print(f"\nload average (1 min): start {start:.2f}, end {end:.2f}; JSON: {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
