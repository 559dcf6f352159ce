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
        ("lambda_star", "λ* (weight on L_clean; none: g_c alone)"),
    )
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        values = [r.get(key) for r in rows]
        ax.plot(steps, [float("nan") if v is None else v for v in values], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("symlog", linthresh=1e-4)
    axes[-1].set_xlabel("optimiser step")
    fig.suptitle("Gradient conflict during training")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# A step whose update is below this share of the clean gradient's norm has stalled: CA-AT's
# projected update has norm ‖g_a‖·√(1−φ²)/√(1−γ²), so it vanishes with L_adv (TRADES' KL term
# on a model whose outputs barely react to the input yet). Measured (docs/method.md): a TRADES
# run that collapsed to chance had a median ‖update‖/‖g_c‖ of 0.011; healthy runs 0.95-124.
STALL_RATIO = 0.05


class StallMonitor:
    """Counts stalled steps and says, once per run, why an epoch made no progress."""

    def __init__(self, stalled: int = 0, *, normalized: bool = False) -> None:
        self.stalled = stalled  # over the run (kept in checkpoints)
        self.normalized = normalized  # combiner.normalize: the update is built from unit vectors
        self.warned = False
        self._epoch: list[tuple[bool, float]] = []  # (stalled, ‖g_a‖ / ‖g_c‖) per step

    def update(self, stats: dict[str, Any]) -> None:
        norm_clean, norm_update = stats.get("norm_clean"), stats.get("norm_update")
        if not norm_clean or norm_update is None or "norm_adv" not in stats:
            return  # standard training, or a zero clean gradient (its own case)
        stalled = norm_update < STALL_RATIO * (1.0 if self.normalized else norm_clean)
        self.stalled += int(stalled)
        self._epoch.append((stalled, stats["norm_adv"] / norm_clean))

    def end_epoch(self, epoch: int, objective: str) -> str | None:
        """A one-line warning when most of this epoch's steps stalled (the first time only)."""
        steps, self._epoch = self._epoch, []
        n_stalled = sum(s for s, _ in steps)
        if self.warned or not steps or 2 * n_stalled < len(steps):
            return None
        self.warned = True
        ratios = sorted(r for _, r in steps)
        return (
            f"epoch {epoch}: the update was below {STALL_RATIO:g} of the clean gradient's norm "
            f"in {n_stalled} of {len(steps)} steps (median ‖g_a‖/‖g_c‖ = "
            f"{ratios[len(ratios) // 2]:.2g}): L_adv of objective {objective} is about 0, so "
            "the CA-AT projection leaves almost nothing to step with. Start from a trained "
            "backbone, set combiner.normalize=true, or use objective.kind=pgd-ce "
            "(docs/method.md)"
        )
