"""Every shipped recipe parses, builds its model from config (random weights) and trains a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from caat_peft.config import load_config
from caat_peft.data.fixtures import make_cub_fixture, make_dogs_fixture
from caat_peft.models import build_classifier, trainable_parameters
from caat_peft.training import train

from conftest import ROOT

ALL_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "tiny.yaml")
# The authors'-optimiser variants change only train.*: they are checked against their base below.
RECIPES = [p for p in ALL_RECIPES if not p.stem.endswith("_sgd")]
SGD_VARIANTS = [p for p in ALL_RECIPES if p.stem.endswith("_sgd")]

# The same architecture family, shrunk so that a CPU step at 224 px takes a fraction of a second.
SHRINK = {
    "swin": "model.kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}",
    "vit": "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
}


def test_the_paper_grid_is_shipped():
    names = {p.stem for p in RECIPES}
    expected = {
        f"{d}_{m}_{p}"
        for d in ("cub", "dogs")
        for m in ("swin", "vit")
        for p in ("adapter", "lora")
    }
    assert expected <= names


def test_every_paper_recipe_has_an_authors_optimiser_variant():
    assert {p.stem for p in SGD_VARIANTS} == {f"{p.stem}_sgd" for p in RECIPES}


@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=lambda p: p.stem)
def test_sgd_variant_is_its_base_with_nesterov_sgd(variant: Path):
    cfg = load_config(variant)
    base = load_config(variant.with_name(variant.stem.removesuffix("_sgd") + ".yaml"))
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.nesterov) == ("sgd", 0.9, True)
    assert cfg.model == base.model and cfg.peft == base.peft and cfg.data == base.data
    assert cfg.attack == base.attack and cfg.combiner == base.combiner
    assert cfg.train.epochs == base.train.epochs and cfg.train.schedule == base.train.schedule


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_its_full_size_model(recipe: Path):
    cfg = load_config(recipe, ["model.checkpoint=null"])  # random weights: never downloads
    assert cfg.attack.eps == pytest.approx(8 / 255)
    model = build_classifier(cfg.model, cfg.peft, num_classes=200)
    names = [n for n, _ in trainable_parameters(model)]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    assert names and trainable < 0.1 * total  # parameter-efficient: PEFT modules + head only
    assert not any("patch_embed" in n for n in names)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # ARES: ImageNet


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step_on_fixture_data(tmp_path: Path, recipe: Path):
    cfg = load_config(recipe)
    assert cfg.model.checkpoint
    make = make_cub_fixture if cfg.data.name == "cub" else make_dogs_fixture
    root = make(tmp_path / "data", n_classes=2, per_class=2)
    small = load_config(
        recipe,
        [
            "model.checkpoint=null",  # random weights: tests never download
            SHRINK["swin" if "swin" in recipe.stem else "vit"],
            f"data.root={root}",
            "data.val_fraction=0",
            "data.num_workers=0",
            "attack.steps=1",
            "train.batch_size=2",
            "train.epochs=1",
            "train.warmup_epochs=0",
            "train.precision=fp32",
            "train.save_every=0",
            "train.plots=false",
            "eval.steps=1",
            "eval.limit=2",
        ],
    )
    final = train(small, tmp_path / "run", progress=False).final
    assert final["steps"] >= 1 and final["skipped_steps"] == 0
