"""The trainer end to end on tiny CPU runs, and the training step against a hand computation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from peft import LoraConfig, PeftModel, get_peft_model

from caat_peft.config import ModelConfig, from_dict, load_config, to_dict
from caat_peft.gradients import make_combiner
from caat_peft.models import PixelClassifier, build_backbone, build_classifier
from caat_peft.objectives import build_objective
from caat_peft.training import train, training_step
from caat_peft.training.step import MicroBatch

from conftest import TINY_RECIPE

STEP_KEYS = {
    "loss_clean",
    "loss_adv",
    "cos",
    "mu",
    "lambda_star",
    "adv_share",
    "norm_clean",
    "norm_adv",
}


@pytest.mark.parametrize("combiner", [["combiner.kind=caat"], ["combiner.kind=vanilla"]])
def test_run_directory_contents(tmp_path, tiny_cfg, combiner):
    cfg = load_config(TINY_RECIPE, ["train.epochs=2", "eval.limit=32", "eval.steps=2", *combiner])
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert load_config(run / "config.yaml") == cfg  # the resolved config, loadable as is
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert len(epochs) == 2 and len(steps) == result.final["steps"]
    assert all(r.keys() >= STEP_KEYS and isinstance(r["projected"], bool) for r in steps)
    assert all(math.isfinite(r["cos"]) and -1 <= r["cos"] <= 1 for r in steps)
    if cfg.combiner.kind == "vanilla":
        assert all(r["adv_share"] == 0.5 and not r["projected"] for r in steps)
        assert all(r["lambda_star"] == 1.0 for r in steps)  # (1 − λ)/λ
    else:
        assert all((r["adv_share"] > 0) == r["projected"] for r in steps)
        assert all((r["lambda_star"] is not None) == r["projected"] for r in steps)
    final = json.loads((run / "final.json").read_text())
    assert final["clean_acc"] == epochs[-1]["clean_acc"]
    assert final["robust_acc"] == epochs[-1]["robust_acc"]
    assert final["robust_acc"] <= final["clean_acc"] + 1e-9 or final["eval_n"] < 40
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_adapter_reloads_with_plain_peft(tmp_path, tiny_checkpoint):
    cfg = load_config(
        TINY_RECIPE,
        ["train.epochs=1", "eval.limit=16", "eval.steps=1", f"model.checkpoint={tiny_checkpoint}"],
    )
    result = train(cfg, tmp_path / "run", progress=False)
    trained = result.model.eval()

    base = build_backbone(cfg.model, num_classes=5)  # same checkpoint, a fresh random head
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    wrapped = PixelClassifier(
        reloaded, trained.mean.flatten().tolist(), trained.std.flatten().tolist()
    )
    x = torch.rand(8, 3, 16, 16)
    torch.testing.assert_close(wrapped(x), trained(x))


def test_only_peft_parameters_change(tmp_path, tiny_checkpoint):
    cfg = load_config(
        TINY_RECIPE,
        ["train.epochs=1", "eval.limit=16", "eval.steps=1", f"model.checkpoint={tiny_checkpoint}"],
    )
    before = torch.load(tiny_checkpoint, weights_only=True)
    model = train(cfg, tmp_path / "run", progress=False).model
    base = model.net.get_base_model()
    after = {
        k.replace(".base_layer", ""): v
        for k, v in base.state_dict().items()
        if "lora_" not in k and "modules_to_save" not in k and not k.startswith("head")
    }
    changed = [k for k, v in after.items() if k in before and not torch.equal(v, before[k])]
    assert not changed
    lora = [p for n, p in base.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # B starts at zero: it has trained


def _plain_peft_model(seed: int = 0):
    """The tiny ViT with LoRA set up by plain peft, independently of caat_peft.models."""
    import timm

    torch.manual_seed(seed)
    cfg = load_config(TINY_RECIPE)
    net = timm.create_model(cfg.model.name, num_classes=5, **cfg.model.kwargs)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc1", "fc2"], modules_to_save=["head"]
    )
    net = get_peft_model(net, lora)
    for module in net.modules():  # LoRA B starts at zero; make the test see both factors
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return PixelClassifier(net, [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize("kind,gamma", [("caat", 0.9), ("caat", -0.5), ("vanilla", None)])
def test_training_step_equals_the_method_by_hand(kind, gamma):
    torch.manual_seed(0)
    model = _plain_peft_model()
    reference = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.rand(16, 3, 16, 16)
    y = torch.randint(0, 5, (16,))
    cfg = from_dict({"attack": {"eps": 0.05, "alpha": 0.02, "steps": 3, "random_start": False}})
    optimizer = torch.optim.SGD(params, lr=1.0)
    combiner = make_combiner(kind, lam=0.5, gamma=gamma if gamma is not None else 0.8)
    identity = lambda g_c, g_a, scalars: (g_c, g_a, scalars)  # noqa: E731
    result = training_step(
        model,
        params,
        build_objective("pgd-ce", cfg.attack),
        combiner,
        optimizer,
        [MicroBatch(x, y)],
        reduce=identity,
    )
    assert not result.skipped

    # By hand: torchattacks for x_adv, .backward() for each gradient, Eq. (3) on flat vectors.
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    x_adv = torchattacks.PGD(reference.eval(), eps=0.05, alpha=0.02, steps=3, random_start=False)(
        x, y
    )
    reference.train()

    def flat_grad(inputs):
        reference.zero_grad()
        F.cross_entropy(reference(inputs), y).backward()
        return torch.cat([p.grad.reshape(-1).clone() for p in ref_params]).double()

    g_c, g_a = flat_grad(x), flat_grad(x_adv)
    phi = float(torch.dot(g_a, g_c) / (g_a.norm() * g_c.norm()))
    if kind == "vanilla":
        expected = 0.5 * g_c + 0.5 * g_a
    elif phi >= gamma:
        expected = g_c
    else:
        k = g_a.norm() * (gamma * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - gamma**2))
        expected = g_a + k / (g_c.norm() * math.sqrt(1 - gamma**2)) * g_c
    moved = torch.cat([(r - p).reshape(-1) for p, r in zip(params, ref_params)]).double()
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-4)
    assert result.stats["cos"] == pytest.approx(phi, abs=1e-5)


def test_non_finite_loss_skips_the_step_and_keeps_weights():
    model = _plain_peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = torch.rand(8, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    y = torch.randint(0, 5, (8,))
    cfg = from_dict({})
    for kind, clean_only in (("caat", False), ("vanilla", True)):
        result = training_step(
            model,
            params,
            build_objective("pgd-ce", cfg.attack),
            make_combiner(kind),
            optimizer,
            [MicroBatch(x, y)],
            reduce=lambda g_c, g_a, s: (g_c, g_a, s),
            clean_only=clean_only,
        )
        assert result.skipped
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert not optimizer.state  # AdamW never stepped: no moments, no weight decay applied


def test_standard_training_skips_the_attack(tmp_path, monkeypatch):
    from caat_peft import objectives

    def no_attack(*args, **kwargs):
        raise AssertionError("the attack must not run when g_a is unused")

    monkeypatch.setattr(objectives.PgdCE, "attack", no_attack)
    for setting in (["combiner.kind=vanilla", "combiner.lam=0"], ["combiner.gamma=1"]):
        cfg = load_config(
            TINY_RECIPE, ["train.epochs=1", "eval.limit=16", "eval.steps=1", *setting]
        )
        final = train(cfg, tmp_path / setting[-1], progress=False).final
        assert final["steps"] > 0


def test_seeded_runs_are_reproducible(tmp_path):
    cfg = load_config(TINY_RECIPE, ["train.epochs=1", "eval.limit=32", "eval.steps=2"])
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), na
    assert a.final["robust_acc"] == b.final["robust_acc"]


def test_build_classifier_freezes_everything_but_lora_and_head():
    cfg = load_config(TINY_RECIPE)
    model = build_classifier(cfg.model, cfg.peft, num_classes=5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert not any("patch_embed" in n for n in trainable)  # anchored regex: no patch_embed.proj
    head_model = build_classifier(cfg.model, from_dict({"peft": {"method": "head"}}).peft, 5)
    assert {n for n, p in head_model.named_parameters() if p.requires_grad} == {
        "net.head.weight",
        "net.head.bias",
    }


def test_checkpoint_with_prefixes_and_container_loads(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    cfg = ModelConfig(**{**to_dict(load_config(TINY_RECIPE))["model"], "checkpoint": str(wrapped)})
    model = build_backbone(cfg, num_classes=5)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert model.head.weight.shape[0] == 5  # the 1000-class head was replaced


@pytest.mark.parametrize("source", ["cub", "dogs"])
def test_trains_on_official_layout_fixtures(tmp_path, source):
    from caat_peft.data.fixtures import make_cub_fixture, make_dogs_fixture

    make = make_cub_fixture if source == "cub" else make_dogs_fixture
    root = make(tmp_path / "data", n_classes=3, per_class=6)
    cfg = load_config(
        TINY_RECIPE,
        [
            f"data.name={source}",
            f"data.root={root}",
            "data.classes=null",
            "data.val_fraction=0.25",
            "train.batch_size=4",
            "train.epochs=1",
            "eval.steps=1",
        ],
    )
    final = train(cfg, tmp_path / "run", progress=False).final
    assert final["steps"] >= 1 and 0 <= final["clean_acc"] <= 1


def test_a_reloaded_run_is_the_trained_model_even_without_a_checkpoint(tmp_path, tiny_cfg):
    """The tiny recipe's backbone comes from no file: `caat-peft eval` must rebuild the same
    frozen weights (seeded by train.seed), whatever the global RNG state is."""
    from caat_peft.data import build_splits
    from caat_peft.data.subset import limited
    from caat_peft.models import preprocessing_for_config
    from caat_peft.models.loading import load_trained

    result = train(tiny_cfg, tmp_path / "run", progress=False)
    trained = {k: v.clone() for k, v in result.model.state_dict().items()}
    splits = build_splits(tiny_cfg.data, preprocessing_for_config(tiny_cfg.model))
    for noise in (1, 2):
        torch.manual_seed(noise)
        torch.rand(noise * 7)  # a different global RNG state each time
        model = load_trained(tiny_cfg, splits.num_classes, tmp_path / "run" / "adapter")
        state = model.state_dict()
        assert state.keys() == trained.keys()
        for key, value in trained.items():
            assert torch.equal(state[key], value), key
    test_set, subset = limited(splits.test, tiny_cfg.eval.limit)  # the trainer's images
    assert subset == result.final["eval_subset"] and len(test_set) == 32
    x = torch.stack([test_set[i][0] for i in range(32)])
    y = torch.tensor([test_set[i][1] for i in range(32)])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(result.final["clean_acc"], abs=1e-9)


def test_evaluating_during_training_does_not_change_the_training(tmp_path):
    """Per-epoch evaluation draws nothing from the RNG that training uses next (dropout here)."""
    from safetensors.torch import load_file

    arch = "{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2"
    sets = [
        f"model.kwargs={arch}, drop_rate: 0.2, proj_drop_rate: 0.2}}",
        "train.epochs=2",
        "eval.limit=32",
        "eval.steps=2",
        "train.plots=false",
    ]
    every = train(load_config(TINY_RECIPE, [*sets, "eval.every=1"]), tmp_path / "a", progress=False)
    end = train(load_config(TINY_RECIPE, [*sets, "eval.every=0"]), tmp_path / "b", progress=False)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert every.final["robust_acc"] == end.final["robust_acc"]
