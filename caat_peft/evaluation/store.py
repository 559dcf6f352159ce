"""Per-sample results on disk, so that a long evaluation can stop and resume.

Layout of a resume directory::

    manifest.json              model fingerprint, norm, seed, classes, labels and clean
                               correctness of the samples seen so far
    pairs/<attack>__<eps>.json per (attack, ε): the attack's configuration, and for the first
                               n samples whether each is still correctly classified

Every file is replaced atomically (write a temp file in the same directory, fsync, os.replace):
a kill at any moment leaves either the old or the new version, never half a file. The pair files
are extended after every batch, so a resumed run loses at most one batch per pair.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caat_peft.errors import UserError

STATE_FORMAT = "caat-peft-eval-state/1"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")) + "\n")


@dataclass
class PairState:
    """Progress of one (attack, ε) pair: per-sample correctness for the first ``n_done`` samples."""

    attack: str
    eps: float
    eps_label: str
    config: dict
    correct: list[int] = field(default_factory=list)
    max_excess: float = 0.0
    nonfinite: int = 0
    seconds: float = 0.0
    broken_by: list[str | None] | None = None  # AutoAttack only: component that broke each sample

    @property
    def n_done(self) -> int:
        return len(self.correct)

    def to_json(self) -> dict:
        return {
            "attack": self.attack,
            "eps": self.eps,
            "eps_label": self.eps_label,
            "config": self.config,
            "n_done": self.n_done,
            "correct": self.correct,
            "max_excess": self.max_excess,
            "nonfinite": self.nonfinite,
            "seconds": self.seconds,
            "broken_by": self.broken_by,
        }


def pair_filename(attack: str, eps_label: str) -> str:
    return f"{attack}__eps={eps_label.replace('/', '-')}.json"


class ResultStore:
    """Resume state in a directory, or only in memory when ``root`` is None."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.labels: list[int] = []
        self.clean: list[int] = []
        self._manifest: dict = {}

    # ---------------------------------------------------------------- manifest

    def open(
        self,
        *,
        fingerprint: str,
        norm: str,
        seed: int,
        n_classes: int,
        subset: dict | None = None,
    ) -> None:
        """Create the manifest, or check that an existing one belongs to this evaluation.

        A different model, norm, seed, class count or image subset would make old per-sample
        results wrong, so that is a UserError rather than a silent mix.
        """
        self._manifest = {
            "format": STATE_FORMAT,
            "model_fingerprint": fingerprint,
            "norm": norm,
            "seed": seed,
            "n_classes": n_classes,
            "subset": subset,
        }
        if self.root is None:
            return
        path = self.root / "manifest.json"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.save_manifest()
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                f"resume state {path} is unreadable ({exc}); delete {self.root} or pass another "
                "resume directory"
            ) from None
        for key in ("format", "model_fingerprint", "norm", "seed", "n_classes", "subset"):
            if old.get(key) != self._manifest[key]:
                what = "model" if key == "model_fingerprint" else key
                raise UserError(
                    f"resume directory {self.root} holds results for a different {what} "
                    f"({old.get(key)!r} there, {self._manifest[key]!r} now); pass a fresh "
                    f"resume directory or delete {self.root}"
                )
        self.labels = [int(v) for v in old.get("labels", [])]
        self.clean = [int(v) for v in old.get("clean", [])]
        self.clean = self.clean[: len(self.labels)]

    def save_manifest(self) -> None:
        if self.root is None:
            return
        data = dict(self._manifest, labels=self.labels, clean=self.clean)
        atomic_write_json(self.root / "manifest.json", data)

    def record_batch(self, start: int, labels: list[int], clean: list[int]) -> None:
        """Check labels against what an earlier run saw at the same positions, then extend.

        Different labels mean the data (or its order) changed, and old results would be for
        other images.
        """
        overlap = self.labels[start : start + len(labels)]
        if overlap != labels[: len(overlap)]:
            raise UserError(
                f"resume directory {self.root}: the labels of samples {start}..{start + len(labels) - 1} "
                "differ from the earlier run (different data or order); evaluate the same data "
                "without shuffling, or use a fresh resume directory"
            )
        if start > len(self.labels) or start > len(self.clean):  # pragma: no cover
            raise RuntimeError("samples must be recorded in order")
        end = start + len(labels)
        self.labels = self.labels[:start] + list(labels) + self.labels[end:]
        self.clean = self.clean[:start] + list(clean) + self.clean[end:]

    # ---------------------------------------------------------------- pairs

    def load_pair(self, attack: str, eps: float, label: str, config: dict) -> PairState:
        """The saved state of a pair, or a fresh one if absent or made with another config."""
        fresh = PairState(attack, eps, label, config)
        if self.root is None:
            return fresh
        path = self.root / "pairs" / pair_filename(attack, label)
        if not path.exists():
            return fresh
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return fresh  # a damaged file is recomputed, not trusted
        if data.get("config") != config or data.get("attack") != attack:
            return fresh  # e.g. a different budget: the old numbers are for another attack
        state = PairState(
            attack,
            eps,
            label,
            config,
            correct=[int(v) for v in data.get("correct", [])],
            max_excess=float(data.get("max_excess", 0.0)),
            nonfinite=int(data.get("nonfinite", 0)),
            seconds=float(data.get("seconds", 0.0)),
            broken_by=data.get("broken_by"),
        )
        if state.broken_by is not None and len(state.broken_by) != state.n_done:
            return fresh
        return state

    def save_pair(self, state: PairState) -> None:
        if self.root is None:
            return
        atomic_write_json(
            self.root / "pairs" / pair_filename(state.attack, state.eps_label), state.to_json()
        )
