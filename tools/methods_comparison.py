"""The PEFT methods side by side, under vanilla AT and CA-AT, with and without robust linear
initialisation (RoLI): ``python tools/methods_comparison.py [--seeds 0,1] [--out DIR]``.

On the offline demo's stage 2 (the cached robust digits-0-4 ViT fine-tuned on digits 5-9,
caat_peft.demo): every method of --methods, each trained with vanilla AT (λ = 0.5) and CA-AT
(γ = 0.8), once from the demo's new random head and once from a head first trained alone
adversarially (``train.init_head: robust-linear-probe``, --init-epochs epochs). Everything else
is the demo's (AdamW lr 3e-3, cosine, update clipped to norm 1, 15 epochs, PGD-3 in training).

Reported per cell: clean (SA) and PGD-20 (AA) accuracy on the held-out digits, the mean over
seeds with a t interval, and CA-AT − vanilla paired by seed on the same images (a bootstrap over
images and seeds, exact McNemar). JSON and a Markdown table go to --out; finished runs are kept,
so a killed comparison resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from demo_grid import accuracy_cell, cell_summary, difference_cell, parse_seeds, run_point

from caat_peft.demo import METHODS, stage1_checkpoint

# The method's own settings (the demo's stage 2 is LoRA r 8); the rest comes from the demo.
METHOD_OVERRIDES: dict[str, list[str]] = {
    "lora": ["peft.method=lora"],
    "adapter": ["peft.method=adapter"],
    "ia3": ["peft.method=ia3"],
    "vpt": ["peft.method=vpt", "peft.prompt_length=4", "peft.prompt_depth=deep"],
    "bitfit": ["peft.method=bitfit"],
    "head": ["peft.method=head"],
    "full": ["peft.method=full", "train.lr=5e-4"],  # all weights: the source model's own lr
}


def cell(
    checkpoint: Path, method: str, init: bool, seeds: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    overrides = list(METHOD_OVERRIDES[method])
    if init:
        overrides += [
            "train.init_head=robust-linear-probe",
            f"train.init_head_epochs={args.init_epochs}",
        ]
    name = f"{method}{'-roli' if init else ''}"
    runs = {
        m: [
            run_point(checkpoint, m, overrides, s, Path(args.out) / name / m / f"seed{s}")
            for s in seeds
        ]
        for m in METHODS
    }
    return {"peft": method, "robust_linear_init": init, "seeds": seeds, **cell_summary(runs)}


def markdown(cells: list[dict[str, Any]]) -> str:
    lines = [
        "| method | RoLI | vanilla SA | vanilla AA | CA-AT SA | CA-AT AA | CA-AT − vanilla, SA "
        "| CA-AT − vanilla, AA |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        values = [
            accuracy_cell(c, m, k) for m in ("vanilla", "caat") for k in ("clean_acc", "robust_acc")
        ]
        diffs = [difference_cell(c, k) for k in ("clean", "robust")]
        roli = "yes" if c["robust_linear_init"] else "no"
        lines.append(f"| {c['peft']} | {roli} | " + " | ".join(values + diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--methods", default=",".join(METHOD_OVERRIDES))
    p.add_argument("--init-epochs", type=int, default=5)
    p.add_argument("--out", default="methods_comparison")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHOD_OVERRIDES)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)} (choose from {','.join(METHOD_OVERRIDES)})")
    seeds = parse_seeds(args.seeds)
    checkpoint = stage1_checkpoint(progress=False)
    cells = []
    for method in args.methods.split(","):
        for init in (False, True):
            if method == "head" and init:
                continue  # a probed head, probed again: only a longer linear probe
            cells.append(cell(checkpoint, method, init, seeds, args))
            print(f"done: {method}{' + RoLI' if init else ''}", flush=True)
    out = Path(args.out)
    (out / "methods_comparison.json").write_text(json.dumps(cells, indent=2) + "\n")
    table = markdown(cells)
    (out / "methods_comparison.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
