"""VPT and BitFit through the trainer on the tiny recipe: what trains, what is saved, and that
the attack sees the prompts."""

from __future__ import annotations

import pytest
import torch

from caat_peft.config import load_config
from caat_peft.models import build_classifier, seeded_init
from caat_peft.models.loading import load_trained
from caat_peft.models.prompts import prompt_names
from caat_peft.objectives import build_objective
from caat_peft.training import train
from caat_peft.training import trainer as trainer_module

from conftest import TINY_RECIPE

FAST = ["train.epochs=1", "eval.limit=16", "eval.steps=1", "train.plots=false"]
METHODS = {
    "vpt-deep": ["peft.method=vpt", "peft.prompt_length=3", "peft.prompt_depth=deep"],
    "vpt-shallow": ["peft.method=vpt", "peft.prompt_length=3", "peft.prompt_depth=shallow"],
    "bitfit": ["peft.method=bitfit"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_freezes_the_rest_and_reloads_to_the_same_logits(
    tmp_path, method, one_thread
):
    cfg = load_config(TINY_RECIPE, [*FAST, *METHODS[method]])
    result = train(cfg, tmp_path / "run", progress=False)
    trained = result.model.eval()
    with seeded_init(cfg.train.seed):  # the weights the run started from
        start = build_classifier(cfg.model, cfg.peft, 5)
    initial = dict(start.named_parameters())
    moved = []
    for name, p in trained.named_parameters():
        same = torch.equal(p.detach(), initial[name].detach())
        assert same or p.requires_grad, f"frozen {name} changed"
        moved += [name] if not same else []
    expected = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert sorted(moved) == sorted(expected)  # every trainable tensor moved, nothing else
    if method.startswith("vpt"):
        assert all("vpt_prompt" in n or ".head." in n for n in expected)
    else:
        assert all(n.endswith(".bias") or ".head." in n for n in expected)
    assert result.final["trainable_parameters"] == sum(
        p.numel() for p in trained.parameters() if p.requires_grad
    )

    reloaded = load_trained(cfg, 5, tmp_path / "run" / "adapter")  # what `caat-peft eval` runs
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained(x))


def test_the_trainers_attack_runs_through_the_prompts(tmp_path, monkeypatch, one_thread):
    """The model the trainer attacks carries the prompts: another prompt gives another x_adv."""
    cfg = load_config(TINY_RECIPE, [*FAST, *METHODS["vpt-deep"], "data.classes=[0, 1]"])
    real_step, seen = trainer_module.training_step, []

    def spy(model, *args, **kwargs):
        seen.append((model, args[4][0]))  # the model and the first micro-batch
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", spy)
    result = train(cfg, tmp_path / "run", progress=False)
    model, batch = seen[-1]
    assert model is result.model and prompt_names(model.net)
    attack = build_objective(cfg.objective, cfg.attack).attack

    def adversarial() -> torch.Tensor:
        return attack(model, batch.x, batch.y, init_delta=batch.init_delta)

    def input_gradient() -> torch.Tensor:
        x = batch.x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model.eval()(x), batch.y)
        return torch.autograd.grad(loss, x)[0]

    x_adv, grad = adversarial(), input_gradient()
    assert torch.equal(adversarial(), x_adv)  # deterministic given the start
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vpt_prompt" in name:
                p.add_(torch.randn_like(p))
    assert not torch.equal(adversarial(), x_adv)
    assert not torch.allclose(input_gradient(), grad)
