"""Shared fixtures: a tiny config, a saved random-weight checkpoint, an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caat_peft.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache (the demo keeps its stage-1 checkpoint there)."""
    monkeypatch.setenv("CAAT_PEFT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_cfg() -> Config:
    return load_config(TINY_RECIPE, ["train.epochs=1", "eval.limit=32", "eval.steps=2"])


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """The tiny recipe's backbone with random weights, saved as users bring them (.pth)."""
    import timm

    cfg = load_config(TINY_RECIPE)
    torch.manual_seed(123)
    model = timm.create_model(cfg.model.name, num_classes=1000, **cfg.model.kwargs)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path
