"""What a run reports: metrics.jsonl, accelerate trackers, and the conflict plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSON lines, flushed at every row so that a killed run keeps what it logged.

    ``offset`` is the file size after the last row: a checkpoint records it, and a resumed run
    truncates the file there, so rows written after the checkpoint are not duplicated.
    """

    def __init__(self, path: Path | None, truncate_at: int | None = None) -> None:
        self.path = path
        self._fh = None
        if path is None:
            return
        if truncate_at is not None and path.exists():
            with open(path, "r+b") as fh:
                fh.truncate(truncate_at)
        self._fh = open(path, "a")  # noqa: SIM115

    @property
    def offset(self) -> int:
        return self._fh.tell() if self._fh is not None else 0

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tracker_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row, for accelerate trackers (TensorBoard, ...)."""
    prefix = "train" if row.get("type") == "step" else "eval"
    return {
        f"{prefix}/{k}": float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and k not in ("step", "epoch", "type")
    }


def plot_conflict(metrics_path: Path, out_path: Path) -> Path | None:
    """φ, μ and λ* over training steps, one panel each (PNG)."""
    rows = [r for r in read_metrics(metrics_path) if r.get("type") == "step" and "cos" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = (
        ("cos", "φ = cos(g_a, g_c)"),
        ("mu", "μ = ‖g_c‖‖g_a‖(1 − φ)"),
        ("lambda_eff", "λ* (effective adversarial weight)"),
    )
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-4)
    axes[-1].set_xlabel("optimiser step")
    fig.suptitle("Gradient conflict during training")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
