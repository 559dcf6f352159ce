"""A CA-AT run of the trainer with the bottleneck adapter on the tiny recipe."""

from __future__ import annotations

import json

import torch
from peft import PeftModel

from caat_peft.config import load_config
from caat_peft.models import PixelClassifier, build_backbone
from caat_peft.training import train

from conftest import TINY_RECIPE


def test_trainer_runs_the_bottleneck_adapter(tmp_path, tiny_checkpoint):
    overrides = [
        "peft.method=adapter",
        "peft.reduction=4",
        f"model.checkpoint={tiny_checkpoint}",
        "data.classes=[0, 1]",
        "attack.steps=1",
        "train.epochs=1",
        "eval.limit=8",
        "eval.steps=1",
    ]
    cfg = load_config(TINY_RECIPE, overrides)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.final["steps"] >= 1 and 0 <= result.final["clean_acc"] <= 1
    trained = result.model.eval()
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names and all("bottleneck_" in n or "modules_to_save" in n for n in names)

    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "CAAT_BOTTLENECK" and config["reduction"] == 4
    base = build_backbone(cfg.model, num_classes=2)  # same checkpoint, a fresh random head
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    wrapped = PixelClassifier(
        reloaded, trained.mean.flatten().tolist(), trained.std.flatten().tolist()
    )
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(wrapped(x), trained(x))
