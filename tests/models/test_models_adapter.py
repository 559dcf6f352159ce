"""The bottleneck adapter as a peft method, and what every PEFT method trains."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from models_testlib import CONVNEXT, HF_SWIN, HF_VIT, SWIN, VIT, model_cfg, sgd_steps
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from caat_peft.config import PeftConfig
from caat_peft.errors import UserError
from caat_peft.models import (
    BottleneckAdapterConfig,
    BottleneckAdapterLayer,
    BottleneckAdapterModel,
    apply_peft,
    build_backbone,
    build_model,
    head_names,
    save_adapter,
    trainable_summary,
)

ARCHS = {  # name, kwargs, input size
    "timm_vit": ("vit_tiny_patch16_224", VIT, 16),
    "timm_swin": ("swin_tiny_patch4_window7_224", SWIN, 32),
    "timm_convnext": ("convnext_tiny", CONVNEXT, 32),
    "hf_vit": ("hf:vit", HF_VIT, 16),
    "hf_swin": ("hf:swin", HF_SWIN, 32),
}


def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_registered_with_peft():
    assert PeftType("CAAT_BOTTLENECK") is PeftType.CAAT_BOTTLENECK
    assert PEFT_TYPE_TO_CONFIG_MAPPING["CAAT_BOTTLENECK"] is BottleneckAdapterConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.CAAT_BOTTLENECK] is BottleneckAdapterModel
    assert BottleneckAdapterConfig().peft_type == "CAAT_BOTTLENECK"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_after_each_mlp_block_starts_as_the_backbone(arch):
    name, kwargs, size = ARCHS[arch]
    torch.manual_seed(0)
    backbone = build_backbone(model_cfg(name, kwargs), num_classes=5).eval()
    x = torch.rand(2, 3, size, size)
    before = _logits(backbone, x)
    net = apply_peft(backbone, PeftConfig(method="adapter")).eval()
    layers = {n: m for n, m in net.named_modules() if isinstance(m, BottleneckAdapterLayer)}
    assert layers and all(n.endswith(("mlp.fc2", "output.dense")) for n in layers)
    for layer in layers.values():  # reduction factor 8, zero-initialised up-projection
        down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
        assert down.out_features == layer.out_features // 8
        assert not up.weight.any() and not up.bias.any()
    # equal up to float reassociation (transformers' Swin takes other kernels on a new tensor)
    torch.testing.assert_close(_logits(net, x), before, rtol=0, atol=1e-6)


def test_plain_peft_builds_the_adapter_without_targets():
    """peft alone (get_peft_model) finds the MLP output projections of a timm ViT."""
    backbone = build_backbone(model_cfg("vit_tiny_patch16_224", VIT), 5)
    net = get_peft_model(backbone, BottleneckAdapterConfig(reduction=4, modules_to_save=["head"]))
    layers = [m for m in net.modules() if isinstance(m, BottleneckAdapterLayer)]
    assert len(layers) == VIT["depth"]
    assert layers[0].bottleneck_down["default"].out_features == VIT["embed_dim"] // 4


METHODS = ["adapter", "lora", "ia3", "loha", "lokr", "vera", "head", "full"]


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_the_selected_parameters(method):
    torch.manual_seed(0)
    options = {"learnable_scaling": True} if method == "adapter" else {}
    model = build_model("vit_tiny_patch16_224", peft=method, num_classes=5, **VIT, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head" in n for n in trainable)  # the new head trains in every method
    assert not any("patch_embed" in n for n in trainable) or method == "full"
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    sgd_steps(model, x, y, steps=2)
    after = dict(model.named_parameters())
    frozen_changed = [
        n for n in before if n not in trainable and not torch.equal(before[n], after[n])
    ]
    assert not frozen_changed
    changed = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert changed and any("head" in n for n in changed)
    if method not in ("head", "full"):
        assert any("head" not in n for n in changed)  # the PEFT modules themselves learned
    summary = trainable_summary(model)
    assert summary.trainable == sum(after[n].numel() for n in trainable)
    assert 0 < summary.share <= 1 and "trainable parameters" in str(summary)


def test_adapter_refuses_to_merge(tmp_path):
    from caat_peft.models import export_merged

    model = build_model("vit_tiny_patch16_224", peft="adapter", num_classes=5, **VIT)
    with pytest.raises(ValueError, match="non-linear"):
        model.net.merge_and_unload()
    with pytest.raises(UserError, match="non-linear"):
        export_merged(model, tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()


def test_bad_adapter_settings_are_user_errors():
    with pytest.raises(UserError, match="peft.target_modules .* matches no layer"):
        build_model(
            "vit_tiny_patch16_224", peft="adapter", num_classes=5, target_modules="x", **VIT
        )
    with pytest.raises(UserError, match="peft.targets"):
        build_model("vit_tiny_patch16_224", peft="adapter", num_classes=5, targets="ffn", **VIT)
    with pytest.raises(UserError, match="peft.options"):
        build_model("vit_tiny_patch16_224", peft="lora", num_classes=5, options={"rank": 3}, **VIT)


@pytest.mark.parametrize("arch", ["timm_swin", "hf_vit"])
def test_saved_adapter_reloads_with_plain_peft(tmp_path, arch):
    name, kwargs, size = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(name, peft="adapter", num_classes=5, **kwargs)
    x, y = torch.rand(4, 3, size, size), torch.randint(0, 5, (4,))
    sgd_steps(model, x, y)
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    torch.manual_seed(0)  # the same backbone (the checkpoint users would load)...
    base = build_backbone(model_cfg(name, kwargs), num_classes=5)
    for head in head_names(base):  # ...with a blank head: the saved head must replace it
        torch.nn.init.zeros_(base.get_submodule(head).weight)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    normalised = (x - model.mean) / model.std
    assert torch.equal(_logits(reloaded, normalised), model.eval()(x))


def test_adapter_loads_in_a_fresh_process_once_caat_peft_is_imported(tmp_path):
    """LoRA needs peft alone; the bottleneck adapter needs ``import caat_peft`` first."""
    build = "vit_tiny_patch16_224"
    x = torch.rand(2, 3, 16, 16)
    expected = {}
    for method in ("lora", "adapter"):
        torch.manual_seed(0)
        model = build_model(build, peft=method, num_classes=5, **VIT)
        sgd_steps(model, x, torch.tensor([0, 1]))
        save_adapter(model, tmp_path / method)
        expected[method] = model.eval()(x)
    torch.save({"x": x, **expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, timm, torch
        from peft import PeftModel
        data = torch.load({str(tmp_path / "expected.pt")!r})
        mean = std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
        def base():  # the backbone the adapters were trained on (same seed, random init:
            torch.manual_seed(0)  # model.init = auto builds it with timm's jax mode)
            return timm.create_model({build!r}, num_classes=5, weight_init="jax", **{VIT!r})
        def logits(method):
            net = PeftModel.from_pretrained(base(), {str(tmp_path)!r} + "/" + method).eval()
            return net((data["x"] - mean) / std)
        assert torch.equal(logits("lora"), data["lora"])
        assert "caat_peft" not in sys.modules
        try:
            logits("adapter")
            raise SystemExit("the adapter loaded before caat_peft was imported")
        except KeyError:
            pass
        import caat_peft
        assert torch.equal(logits("adapter"), data["adapter"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
