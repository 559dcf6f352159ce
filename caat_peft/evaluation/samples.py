"""Per-image results as comparisons read them, from a run directory or an ``eval.json``.

A paired comparison needs, for each model, which images it got right: clean and under each
attack × ε. Two files hold that:

- ``RUN/eval_samples.json``, written by the trainer with ``final.json``: its final held-out
  evaluation (clean and the trainer's PGD at the evaluation ε), per image, and the selected
  ("best") model's when there is one;
- ``eval.json`` from ``caat-peft eval`` (``RUN/eval/eval.json`` by default): every attack × ε.

:func:`load_scored` turns either into a :class:`Scored`: the labels and subset that identify
the images, and one 0/1 list per (attack, ε).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caat_peft.errors import UserError
from caat_peft.evaluation.store import atomic_write_text

SAMPLES_FILENAME = "eval_samples.json"
SAMPLES_FORMAT = "caat-peft-eval-samples/1"
CLEAN = ("clean", "")


@dataclass
class Scored:
    """One model's per-image results: ``results[(attack, eps_label)]``, ``("clean", "")`` too."""

    name: str
    labels: list[int]
    subset: dict[str, Any] | None
    results: dict[tuple[str, str], list[int]]
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml, if any
    source: str = ""

    def same_images(self, other: Scored) -> str | None:
        """None when both were scored on the same images, else why not (one line)."""
        if len(self.labels) != len(other.labels):
            return f"{len(self.labels)} vs {len(other.labels)} images"
        if (self.subset or {}).get("sha256") != (other.subset or {}).get("sha256"):
            return "different image subsets (limit / eval.limit or the subset seed differ)"
        if self.labels != other.labels:
            return "the labels differ image by image (different data, split or order)"
        return None


def write_samples(
    run_dir: Path,
    final: dict[str, Any],
    samples: dict[str, dict[str, Any]],
    labels: list[int],
    subset: dict[str, Any] | None,
) -> Path:
    """``RUN/eval_samples.json``: the trainer's final evaluation(s), image by image."""
    body = {
        "format": SAMPLES_FORMAT,
        "attack": final["eval_attack"],
        "eps": final["eval_eps"],
        "subset": subset,
        "labels": labels,
        **{
            kind: {"clean": result["clean"], "robust": result["robust"]}
            for kind, result in samples.items()
        },
    }
    path = Path(run_dir) / SAMPLES_FILENAME
    atomic_write_text(path, json.dumps(body, separators=(",", ":")) + "\n")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); re-run the evaluation") from None


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _trainer_attack_label(attack: str, eps: float) -> tuple[str, str]:
    """("pgd20-linf (trainer)", "8/255"): named apart from the suite's torchattacks PGD."""
    from caat_peft.evaluation.registry import eps_label

    norm = "l2" if attack.endswith("-l2") else "linf"
    name = attack.removesuffix("-linf")  # pgd20-linf -> pgd20, the suite's naming
    return (f"{name} (trainer)", eps_label(float(eps), norm))


def _from_samples(path: Path, model: str) -> Scored:
    data = _read_json(path)
    if data.get("format") != SAMPLES_FORMAT:
        raise UserError(f"{path} is not a caat-peft {SAMPLES_FILENAME}; re-run the training")
    if model not in data:
        raise UserError(f"{path} has no {model!r} model evaluation (it has 'last' only)")
    chosen = data[model]
    run_dir = path.parent
    results = {
        CLEAN: chosen["clean"],
        _trainer_attack_label(data["attack"], data["eps"]): chosen["robust"],
    }
    return Scored(str(run_dir), data["labels"], data.get("subset"), results, source=str(path))


def _from_eval_json(path: Path) -> Scored:
    data = _read_json(path)
    if not str(data.get("format", "")).startswith("caat-peft-eval/"):
        raise UserError(f"{path} is not a caat-peft eval.json")
    per = data.get("per_sample") or {}
    if "labels" not in per:
        raise UserError(
            f"{path} was written by an older caat-peft without per-image labels; re-run "
            "caat-peft eval on it (the resume state makes that quick)"
        )
    results: dict[tuple[str, str], list[int]] = {CLEAN: per["clean"]}
    grid = [e["label"] for e in data["eps"]]  # not the sanity checks' extra ε
    for attack in data["attacks"]:
        for lb in grid:
            results[(attack, lb)] = per["attacks"][attack][lb]
    if len(data["attacks"]) > 1:
        for lb in grid:
            results[("worst case", lb)] = per["worst_case"][lb]
    subset = data.get("config", {}).get("subset")
    return Scored(str(path), per["labels"], subset, results, source=str(path))


def _add_trainer_results(scored: Scored, path: Path, model: str) -> None:
    """The trainer's PGD column too, when it scored the same images as the eval.json."""
    if not path.is_file():
        return
    trainer = _from_samples(path, model)
    if scored.same_images(trainer) is None:
        scored.results.update({k: v for k, v in trainer.results.items() if k != CLEAN})


def load_scored(path: str | Path, *, model: str = "last") -> Scored:
    """The per-image results behind ``path``: a run directory, an eval directory or file.

    A run directory means its ``eval/eval.json`` when ``caat-peft eval`` has been run on it
    (plus the trainer's PGD when that scored the same images), else the trainer's
    ``eval_samples.json`` (``model`` = "last" or "best"). The run's seed and config come from
    its ``config.yaml``.
    """
    p = Path(path)
    if p.is_file():
        scored = _from_eval_json(p) if p.name != SAMPLES_FILENAME else _from_samples(p, model)
        run_dir = p.parent.parent if p.name == "eval.json" else p.parent
    elif (p / "eval.json").is_file():
        scored, run_dir = _from_eval_json(p / "eval.json"), p.parent
    elif (p / "eval" / "eval.json").is_file():
        scored, run_dir = _from_eval_json(p / "eval" / "eval.json"), p
        _add_trainer_results(scored, p / SAMPLES_FILENAME, model)
    elif (p / SAMPLES_FILENAME).is_file():
        scored, run_dir = _from_samples(p / SAMPLES_FILENAME, model), p
    elif (p / "config.yaml").is_file():
        raise UserError(
            f"{p} has no per-image results ({SAMPLES_FILENAME} is written when a run finishes; "
            "runs from older versions: run caat-peft eval on it)"
        )
    else:
        raise UserError(f"{p} is neither a run directory nor an eval.json; check the path")
    scored.config = _run_config(run_dir)
    seed = (scored.config.get("train") or {}).get("seed")
    scored.seed = int(seed) if isinstance(seed, int) else None
    scored.name = str(path)
    return scored
