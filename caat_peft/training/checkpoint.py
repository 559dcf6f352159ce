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
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _writing(tmp: Path, final: Path) -> Iterator[None]:
    """Turn a failed write (a full disk surfaces as OSError or RuntimeError) into one clear
    line, leaving the previous checkpoints as they were."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free // 2**20
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(
            f"cannot write checkpoint {final} ({reason}; {free} MiB free): free space, "
            "then continue with --resume"
        ) from None


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
    with _writing(tmp, final):
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
        _fsync_file(tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        tensors = {n: p.detach().cpu().contiguous() for n, p in named_params}
        with _writing(tmp, final):
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


def _load_weights_only(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read(file: Path, loader) -> Any:
    """Load one checkpoint file; a truncated, corrupt or code-carrying file is a clear error."""
    try:
        return loader(file)
    except Exception as exc:  # never run its code, never crash with a traceback
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        raise UserError(
            f"checkpoint file {file} is unreadable ({type(exc).__name__}: {reason}); delete "
            f"{file.parent.name} to resume from the checkpoint before it"
        ) from None


def load_checkpoint(
    path: Path, named_params: list[tuple[str, nn.Parameter]], rank: int
) -> dict[str, Any]:
    """Load parameters and RNG states in place; return the saved loop state."""
    tensors = _read(path / "trainable.safetensors", lambda f: load_file(str(f)))
    state = _read(path / "state.pt", _load_weights_only)
    rng_file = path / f"rng-{rank}.pt"
    rng = _read(rng_file, _load_weights_only) if rng_file.is_file() else None
    names = {n for n, _ in named_params}
    if set(tensors) != names:
        raise UserError(
            f"{path}: its parameters do not match this model ({sorted(set(tensors) ^ names)[:4]}); "
            "resume with the run's own config"
        )
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(tensors[name])
    if rng is not None:
        set_rng_state(rng)
    return state
