"""Peak memory of a training step, CA-AT vs vanilla, each in a fresh subprocess.

The figure is the peak resident set size (the kernel's high-water mark ``VmHWM`` of
``/proc/self/status``) of a fresh Python process that builds the model and runs a few float32
``training_step`` calls with one combiner. torch's CPU allocator keeps no peak statistics and
``tracemalloc`` does not see tensor memory, so peak RSS is the honest CPU measure.
``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* usable here: it survives fork + exec, so a child
started by a large parent reports the parent's peak (an earlier version of this benchmark
measured the suite's own peak that way). The step's own share is also reported: after the
peak is read, the high-water mark is reset through ``/proc/self/clear_refs`` right before the
timed steps, so ``VmHWM − VmRSS-before`` is what the steps added. Runs alternate (vanilla,
CA-AT, vanilla, …) and medians are taken.

The goal: CA-AT's peak ≤ (vanilla's peak + two trainable-gradient buffers) × 1.05.

    python -m benchmarks.bench_memory --worker caat --image-size 112 --batch 16
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_common import Workload, load1, median

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(kind: str, work: Workload, steps: int) -> dict[str, Any]:
    """Build, warm up with one step, reset the high-water mark, run ``steps`` steps."""
    from benchmarks.bench_common import build_model, make_batch, make_trainee
    from benchmarks.bench_step import run_step

    trainee = make_trainee(build_model(work), kind, work.steps)
    batch = make_batch(work)
    for _ in range(steps):
        run_step(trainee, batch)
    peak = _status_kib("VmHWM")  # this process's own peak: build + warm-up + steps
    gc.collect()
    before = _status_kib("VmRSS")
    reset = _reset_hwm()
    for _ in range(steps):
        run_step(trainee, batch)
    hwm = _status_kib("VmHWM") if reset else None
    return {
        "kind": kind,
        "peak_rss_kib": peak,
        "rss_before_steps_kib": before,
        "step_hwm_kib": hwm,
        "step_added_kib": (hwm - before) if hwm is not None and before is not None else None,
        "trainable_bytes": trainee.trainable_bytes(),
    }


def _spawn(kind: str, work: Workload, steps: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_memory",
        "--worker",
        kind,
        "--image-size",
        str(work.image_size),
        "--batch",
        str(work.batch),
        "--pgd-steps",
        str(work.steps),
        "--steps",
        str(steps),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {kind} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_memory(work: Workload, repeats: int = 2, steps: int = 2) -> dict[str, Any]:
    load_before = load1()
    runs: dict[str, list[dict[str, Any]]] = {"vanilla": [], "caat": []}
    for _ in range(repeats):
        for kind in runs:
            runs[kind].append(_spawn(kind, work, steps))
    peak = {k: median([r["peak_rss_kib"] * 1024 for r in v]) for k, v in runs.items()}
    added = {
        k: median([r["step_added_kib"] * 1024 for r in v])
        for k, v in runs.items()
        if all(r["step_added_kib"] is not None for r in v)
    }
    buffers = 2 * runs["caat"][0]["trainable_bytes"]
    allowed = (peak["vanilla"] + buffers) * 1.05
    result: dict[str, Any] = {
        "peak_memory_caat_over_vanilla": peak["caat"] / peak["vanilla"],
        "peak_rss_mib": {k: v / 2**20 for k, v in peak.items()},
        "allowed_caat_peak_mib": allowed / 2**20,
        "two_gradient_buffers_mib": buffers / 2**20,
        "method": "peak RSS (VmHWM) of a fresh subprocess per method",
        "load1": [load_before, load1()],
    }
    if len(added) == 2:
        result["step_added_mib"] = {k: v / 2**20 for k, v in added.items()}
        if added["vanilla"] > 0:
            result["step_memory_caat_over_vanilla"] = added["caat"] / added["vanilla"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("vanilla", "caat"), required=True)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    work = Workload(image_size=args.image_size, batch=args.batch, steps=args.pgd_steps)
    print(json.dumps(worker(args.worker, work, args.steps)))


if __name__ == "__main__":
    main()
