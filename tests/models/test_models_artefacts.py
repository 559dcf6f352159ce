"""Artefacts (adapter folders, merged exports) and the target presets."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from models_testlib import HF_VIT, SWIN, VIT, model_cfg, sgd_steps, timm_model
from safetensors import safe_open
from safetensors.torch import load_file

from caat_peft.config import Config, PeftConfig
from caat_peft.errors import UserError
from caat_peft.models import (
    PixelClassifier,
    build_backbone,
    build_model,
    export_merged,
    load_adapter,
    preset_regex,
    save_adapter,
)
from caat_peft.models.loading import load_trained
from caat_peft.models.targets import matching_modules


@pytest.mark.parametrize(
    "method,arch",
    [
        ("lora", "swin_tiny_patch4_window7_224"),
        ("ia3", "vit_tiny_patch16_224"),
        ("loha", "vit_tiny_patch16_224"),
        ("lokr", "vit_tiny_patch16_224"),
        ("vera", "vit_tiny_patch16_224"),
    ],
)
def test_merged_export_is_timm_loadable_and_gives_the_adapter_logits(tmp_path, method, arch):
    kwargs, size = (SWIN, 32) if arch.startswith("swin") else (VIT, 16)
    torch.manual_seed(0)
    model = build_model(arch, peft=method, num_classes=5, **kwargs)
    x, y = torch.rand(4, 3, size, size), torch.randint(0, 5, (4,))
    sgd_steps(model, x, y)
    path = export_merged(model, tmp_path / "merged.safetensors")
    plain = timm.create_model(arch, num_classes=5, **kwargs).eval()
    plain.load_state_dict(load_file(path))  # strict: exactly the timm architecture's keys
    merged = PixelClassifier(plain, model.mean.flatten().tolist(), model.std.flatten().tolist())
    torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    with safe_open(str(path), "pt") as fh:  # the export says how to feed it
        assert json.loads(fh.metadata()["mean"]) == list(model.info["preprocessing"]["mean"])


def test_lora_adapter_folder_is_small_and_reloads_with_peft_alone(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", peft="lora", num_classes=5, r=2, **VIT)
    sgd_steps(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k or ".head." in k for k in saved)  # no backbone weights
    torch.manual_seed(0)
    base = build_backbone(model_cfg("vit_tiny_patch16_224", VIT), 5)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(reloaded((x - 0.5) / 0.5), model.eval()(x))


def test_transformers_lora_export_loads_back_into_transformers(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = build_model("hf:vit", peft="lora", num_classes=4, targets="attn_mlp", **HF_VIT)
    sgd_steps(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    path = export_merged(model, tmp_path / "hf.safetensors")
    plain = ViTForImageClassification(ViTConfig(num_labels=4, **HF_VIT)).eval()
    plain.load_state_dict(load_file(path))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(plain((x - 0.5) / 0.5).logits, model.eval()(x), atol=1e-5, rtol=1e-5)


def test_load_trained_rebuilds_an_adapter_run(tmp_path):
    checkpoint = tmp_path / "backbone.pth"
    torch.save(timm_model("vit_tiny_patch16_224", VIT).state_dict(), checkpoint)
    cfg = Config(model=model_cfg("vit_tiny_patch16_224", VIT, checkpoint, mean=[0.3] * 3))
    model = build_model(
        "vit_tiny_patch16_224", peft="adapter", num_classes=5, checkpoint=str(checkpoint),
        mean=[0.3] * 3, **VIT,
    )  # fmt: skip
    sgd_steps(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    save_adapter(model, tmp_path / "adapter")
    loaded = load_trained(cfg, 5, tmp_path / "adapter")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.info["preprocessing"]["mean"] == (0.3, 0.3, 0.3)
    other = build_backbone(model_cfg("swin_tiny_patch4_window7_224", SWIN), 5)
    with pytest.raises(UserError, match="adapter does not fit the model"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(other, tmp_path)


def test_head_and_full_runs_save_their_tensors(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", peft="head", num_classes=5, **VIT)
    sgd_steps(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    save_adapter(model, tmp_path / "head")
    assert set(load_file(tmp_path / "head" / "trainable.safetensors")) == {
        "head.weight",
        "head.bias",
    }
    torch.manual_seed(0)
    base = build_backbone(model_cfg("vit_tiny_patch16_224", VIT), 5)
    net = load_adapter(base, tmp_path / "head").eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(net((x - 0.5) / 0.5), model.eval()(x))
    path = export_merged(model, tmp_path / "head.safetensors")
    assert "head.weight" in load_file(path)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_tiny_patch16_224", VIT),
        ("swin_tiny_patch4_window7_224", SWIN),
        (
            "rb_singh2023_vit_base_convstem",
            {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2},
        ),
        ("hf:vit", HF_VIT),
    ],
)
def test_presets_are_anchored_on_blocks(name, kwargs):
    backbone = build_backbone(model_cfg(name, kwargs), 5)
    everything = matching_modules(backbone, preset_regex(backbone, "attn_mlp"))
    assert everything and not any("patch_embed" in n or "embeddings" in n for n in everything)
    assert not any("downsample" in n or "head" in n or "classifier" in n for n in everything)
    out = matching_modules(backbone, preset_regex(backbone, "mlp_out"))
    assert out and all(n.endswith(("mlp.fc2", "output.dense")) for n in out)
    combined = matching_modules(backbone, preset_regex(backbone, "qkv+fc2"))
    assert set(out) < set(combined) < set(everything)
    # the suffix list that this replaces would have adapted the patch embedding as well
    if name.startswith("vit"):
        assert "patch_embed.proj" in matching_modules(backbone, ["proj"])


def test_explicit_target_modules_override_the_preset():
    model = build_model(
        "vit_tiny_patch16_224",
        peft=PeftConfig(method="lora", targets="attn_mlp", target_modules=r"blocks\.0\.attn\.qkv"),
        num_classes=5,
        **VIT,
    )
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"net.base_model.model.blocks.0.attn.qkv"}
