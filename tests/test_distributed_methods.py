"""VPT, BitFit and robust linear initialisation under two processes end as under one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from caat_peft.config import load_config
from caat_peft.models import build_classifier, seeded_init
from caat_peft.training import train

from conftest import ROOT, TINY_RECIPE

# SGD: the update is the reduced gradient itself, so one and two processes agree up to the
# summation order of the batch mean (see test_distributed.py for the AdamW tolerance).
COMMON = ["train.epochs=1", "eval.limit=16", "eval.steps=1", "train.plots=false"]
COMMON += ["train.optimizer=sgd", "train.lr=0.05"]
CASES = {
    "vpt": ["peft.method=vpt", "peft.prompt_length=3"],
    "bitfit": ["peft.method=bitfit"],
    "rli-lora": ["train.init_head=robust-linear-probe", "train.init_head_epochs=1"],
}
TOLERANCE = 1e-6


def _saved(folder) -> dict[str, torch.Tensor]:
    peft_file = folder / "adapter_model.safetensors"
    return load_file(str(peft_file if peft_file.is_file() else folder / "trainable.safetensors"))


def _two_processes(runs: dict[str, list[str]], out) -> None:
    argv = []
    for name, sets in runs.items():
        args = ["train", str(TINY_RECIPE), "--output-dir", str(out / name), "--no-progress"]
        argv.append(args + [item for s in sets for item in ("--set", s)])
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    script = ROOT / "tests" / "distributed_many.py"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), json.dumps(argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _moved(saved: dict[str, torch.Tensor], sets: list[str]) -> bool:
    """Whether training changed what was saved (a comparison of untouched tensors shows nothing)."""
    if any("lora_B" in k for k in saved):  # LoRA: B starts at zero
        return any(torch.count_nonzero(v) for k, v in saved.items() if "lora_B" in k)
    cfg = load_config(TINY_RECIPE, sets)
    with seeded_init(cfg.train.seed):
        initial = dict(build_classifier(cfg.model, cfg.peft, 5).net.named_parameters())
    return all(not torch.equal(v, initial[k]) for k, v in saved.items())


def test_new_methods_under_two_processes_match_one(tmp_path, one_thread):
    runs = {name: [*COMMON, *sets] for name, sets in CASES.items()}
    _two_processes(runs, tmp_path / "two")
    for name, sets in runs.items():
        train(load_config(TINY_RECIPE, sets), tmp_path / "one" / name, progress=False)
    for name, sets in runs.items():
        final = json.loads((tmp_path / "two" / name / "final.json").read_text())
        assert final["num_processes"] == 2
        folders = ["adapter", "head_init/adapter"] if name.startswith("rli") else ["adapter"]
        for folder in folders:
            one = _saved(tmp_path / "one" / name / folder)
            two = _saved(tmp_path / "two" / name / folder)
            assert one.keys() == two.keys(), (name, folder)
            worst = max((one[k] - two[k]).abs().max().item() for k in one)
            assert worst < TOLERANCE, (name, folder, worst)
            stage = sets if folder == "adapter" else [*sets, "peft.method=head"]
            assert _moved(one, stage), (name, folder)
