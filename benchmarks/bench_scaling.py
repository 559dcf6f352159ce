"""Two-process CPU scaling of ``caat-peft train``: torchrun (gloo) vs one process.

The same recipe (``recipes/tiny.yaml`` with a heavier model and attack set by ``--set``, the
same global batch) runs as

* one process, torch's default threads (all cores),
* one process, one thread (``OMP_NUM_THREADS=1``): the per-process baseline,
* ``torchrun --standalone --nproc_per_node 2``: two processes, one thread each (torchrun's
  default), each attacking half of every global batch, gradients all-reduced by hand.

Steps per second come from ``final.json`` (``steps / seconds``). ``seconds`` also holds the end-
of-run evaluation, so it is kept tiny (32 images, PGD-1). Speed-up is over the one-process
default; efficiency is 2-process steps/s over twice the one-thread steps/s (1.0 = perfect).
On a 2-core machine the first is the figure that matters to a user, the second says how much of
the ideal the process group loses to communication and duplicated work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_common import load1, median

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny.yaml"


def model_overrides(quick: bool) -> list[str]:
    """ViT-Ti width at 32 px (64 tokens); fewer blocks for the quick run."""
    depth = 2 if quick else 12
    kwargs = f"{{img_size: 32, patch_size: 4, embed_dim: 192, depth: {depth}, num_heads: 3}}"
    return [
        f"model.kwargs={kwargs}",
        "peft.method=lora",  # the recipe itself trains every weight of its tiny model
        "data.image_size=32",
        "attack.steps=10",
        "attack.alpha=0.015",
        "train.epochs=1",
        "train.batch_size=32",
        "train.plots=false",
        "eval.limit=32",
        "eval.steps=1",
        "eval.every=0",
    ]


def _command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "caat_peft"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", "caat_peft"]


def run_once(nproc: int, threads: int | None, out: Path, overrides: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    args = ["train", str(RECIPE), "--output-dir", str(out), "--overwrite", "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.run(
        [*_command(nproc), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-process run failed:\n{proc.stderr[-3000:]}")
    final = json.loads((out / "final.json").read_text())
    return {
        "steps_per_second": final["steps"] / final["seconds"],
        "steps": final["steps"],
        "seconds": final["seconds"],
        "num_processes": final["num_processes"],
    }


def scaling(quick: bool, repeats: int = 1) -> dict[str, Any]:
    load_before = load1()
    overrides = model_overrides(quick)
    settings = {"1proc": (1, None), "1proc_1thread": (1, 1), "2proc": (2, 1)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for r in range(repeats):
            for name, (nproc, threads) in settings.items():
                out = Path(tmp) / f"{name}-{r}"
                runs[name].append(run_once(nproc, threads, out, overrides))
    sps = {k: median([r["steps_per_second"] for r in v]) for k, v in runs.items()}
    if runs["2proc"][0]["num_processes"] != 2:
        raise RuntimeError("torchrun did not give a 2-process run (final.json num_processes)")
    return {
        "two_process_speedup": sps["2proc"] / sps["1proc"],
        "two_process_efficiency": sps["2proc"] / (2 * sps["1proc_1thread"]),
        "steps_per_second": sps,
        "overrides": overrides,
        "runs": runs,
        "load1": [load_before, load1()],
    }
