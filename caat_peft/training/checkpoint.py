"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-<N>/`` with the trainable parameters
(safetensors), the optimiser / scheduler / EMA / loss-scaler state and the loop position
(``state.pt``), and each process's RNG states (``rng-<rank>.pt``). It is written under a
temporary name, every file fsynced, then renamed: a crash mid-write leaves at worst a stray
temporary folder, never a half-written ``step-<N>``. Everything is loaded with
``torch.load(weights_only=True)`` or safetensors: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from caat_peft.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "state.pt").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    named_params: list[tuple[str, nn.Parameter]],
    state: dict[str, Any],
    *,
    keep: int,
    rank: int,
    is_main: bool,
    barrier,
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and prune to the newest ``keep``."""
    folder = run_dir / "checkpoints"
    tmp = folder / f".tmp-step-{step}"
    final = folder / f"step-{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    _fsync_file(tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        tensors = {n: p.detach().cpu().contiguous() for n, p in named_params}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path, named_params: list[tuple[str, nn.Parameter]], rank: int
) -> dict[str, Any]:
    """Load parameters and RNG states in place; return the saved loop state."""
    tensors = load_file(str(path / "trainable.safetensors"))
    names = {n for n, _ in named_params}
    if set(tensors) != names:
        raise UserError(
            f"{path}: its parameters do not match this model ({sorted(set(tensors) ^ names)[:4]}); "
            "resume with the run's own config"
        )
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(tensors[name])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state
