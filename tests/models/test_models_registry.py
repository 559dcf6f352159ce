"""The backbone registry and checkpoint loading: every format users bring, and clear failures."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from models_testlib import (
    CONVNEXT,
    HF_VIT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SWIN,
    VIT,
    hf_v4_names,
    model_cfg,
    old_timm_swin_layout,
    robustbench_file,
    timm_hub_folder,
    timm_model,
)
from safetensors.torch import save_file

from caat_peft.errors import UserError
from caat_peft.models import (
    build_backbone,
    get_spec,
    list_backbones,
    load_state_dict_file,
    preprocessing_for_config,
    preprocessing_of,
)
from caat_peft.models.convstem import convnext_conv_stem, vit_conv_stem

REQUIRED = [
    *(f"ares_swin_{s}" for s in ("small", "base", "large")),
    *(f"ares_vit_{s}" for s in ("small", "base")),
    *(f"ares_convnext_{s}" for s in ("small", "base", "large")),
    "rb_liu2023_swin_base",
    "rb_liu2023_swin_large",
    "rb_liu2023_convnext_base",
    "rb_liu2023_convnext_large",
    "rb_singh2023_vit_base_convstem",
]


def test_registry_lists_the_published_robust_checkpoints():
    names = {spec.name for spec in list_backbones()}
    assert set(REQUIRED) <= names
    for name in REQUIRED:
        spec = get_spec(name)
        assert spec.threat_model == "ImageNet L∞, ε = 4/255" and spec.source and spec.page
        assert (spec.input_size, spec.interpolation, spec.crop_pct) == (224, "bicubic", 0.875)
    assert get_spec("ares_vit_base").mean == IMAGENET_MEAN  # not timm's 0.5 / 0.5 for ViTs
    assert get_spec("ares_swin_base").url.endswith("ARES_Swin_base_patch4_window7_224_AT.pth")
    singh = get_spec("Singh2023Revisiting_ViT-B-ConvStem")  # RobustBench ids are aliases
    assert singh.name == "rb_singh2023_vit_base_convstem"
    assert (singh.mean, singh.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert get_spec("liu2023comprehensive_swin-l").arch == "swin_large_patch4_window7_224"


def test_ares_vit_uses_imagenet_statistics_where_timm_says_half():
    ares = preprocessing_for_config(model_cfg("ares_vit_small", VIT))
    plain = preprocessing_for_config(model_cfg("vit_small_patch16_224", VIT))
    assert ares["mean"] == IMAGENET_MEAN and ares["std"] == IMAGENET_STD
    assert plain["mean"] == (0.5, 0.5, 0.5)
    assert ares["input_size"] == (3, 16, 16)  # the resolution the model is built at
    override = preprocessing_for_config(model_cfg("ares_vit_small", VIT, mean=[0.1] * 3))
    assert override["mean"] == (0.1, 0.1, 0.1)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "head") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items() if not k.startswith(skip))


def test_ares_raw_swin_file_of_an_older_timm_loads(tmp_path):
    source = timm_model("swin_small_patch4_window7_224", SWIN)
    path = tmp_path / "ARES_Swin_small_patch4_window7_224_AT.pth"
    torch.save(old_timm_swin_layout(source.state_dict()), path)
    cfg = model_cfg("ares_swin_small", SWIN, path)
    model = build_backbone(cfg, num_classes=1000).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x))  # head kept: same classes
    assert preprocessing_of(model, cfg)["mean"] == IMAGENET_MEAN


def test_robustbench_prefixed_file_loads_and_head_is_replaced(tmp_path):
    source = timm_model("swin_base_patch4_window7_224", SWIN)
    path = robustbench_file(source.state_dict(), tmp_path / "rb.pt", IMAGENET_MEAN, IMAGENET_STD)
    cfg = model_cfg("Liu2023Comprehensive_Swin-B", SWIN, path)
    model = build_backbone(cfg, num_classes=7)
    assert _same_weights(model, source) and model.head.fc.out_features == 7
    pre = preprocessing_of(model, cfg)
    assert (pre["mean"], pre["interpolation"], pre["crop_pct"]) == (IMAGENET_MEAN, "bicubic", 0.875)


def test_robustbench_normaliser_that_disagrees_is_refused(tmp_path):
    source = timm_model("swin_base_patch4_window7_224", SWIN)
    path = robustbench_file(source.state_dict(), tmp_path / "rb.pt", (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(UserError, match="normalises with mean .* set model.mean"):
        build_backbone(model_cfg("rb_liu2023_swin_base", SWIN, path), 5)
    # an explicit model.mean / model.std is the user's decision
    build_backbone(model_cfg("rb_liu2023_swin_base", SWIN, path, mean=[0.0] * 3, std=[1.0] * 3), 5)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_convstem_checkpoints_load_into_the_conv_stem_architecture(tmp_path, kind):
    if kind == "vit":
        name, arch = "rb_singh2023_vit_base_convstem", "vit_base_patch16_224"
        kwargs = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
        source = vit_conv_stem(timm_model(arch, kwargs))
        assert "patch_embed.proj.stem.12.weight" in source.state_dict()  # 4 × 3 + final 1×1
    else:
        name, kwargs = "rb_singh2023_convnext_tiny_convstem", CONVNEXT
        source = convnext_conv_stem(timm_model("convnext_tiny", kwargs), planes=48, depth=2)
        assert "stem.stem.3.weight" in source.state_dict()
    path = tmp_path / "singh.pt"
    torch.save({"model": source.state_dict()}, path)
    cfg = model_cfg(name, kwargs, path)
    model = build_backbone(cfg, num_classes=1000).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source.eval()(x))
    pre = preprocessing_of(model, cfg)
    assert pre["mean"] == (0.0, 0.0, 0.0) and pre["std"] == (1.0, 1.0, 1.0)


def test_timm_hub_folder_brings_weights_and_preprocessing(tmp_path):
    source = timm_model("vit_tiny_patch16_224", VIT)
    hub = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear"}
    folder = timm_hub_folder(source, tmp_path / "hub", {**hub, "crop_pct": 0.95})
    cfg = model_cfg("vit_tiny_patch16_224", VIT, folder)
    pre = preprocessing_for_config(cfg)
    assert pre["mean"] == (0.1, 0.2, 0.3) and pre["interpolation"] == "bilinear"
    assert pre["crop_pct"] == 0.95 and pre["input_size"] == (3, 16, 16)
    assert _same_weights(build_backbone(cfg, num_classes=1000), source, skip="-")


def test_plain_safetensors_file_loads(tmp_path):
    source = timm_model("convnext_small", CONVNEXT)
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model = build_backbone(model_cfg("ares_convnext_small", CONVNEXT, path), num_classes=3)
    assert _same_weights(model, source) and model.head.fc.out_features == 3


def test_transformers_vit_file_with_v4_names_loads(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    source = ViTForImageClassification(ViTConfig(num_labels=10, **HF_VIT)).eval()
    path = tmp_path / "hf_vit.safetensors"
    save_file(hf_v4_names(source.state_dict()), path)
    cfg = model_cfg("hf:vit", HF_VIT, path)
    model = build_backbone(cfg, num_classes=10).eval()
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model(x).logits, source(x).logits)
    assert preprocessing_for_config(cfg)["input_size"] == (3, 16, 16)
    with pytest.raises(UserError, match="missing keys"):
        build_backbone(model_cfg("hf:vit", {**HF_VIT, "num_hidden_layers": 3}, path), 10)
    # a model folder (save_pretrained layout) brings its processor's preprocessing
    source.save_pretrained(tmp_path / "folder")
    processor = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.3, 0.3], "resample": 3}
    (tmp_path / "folder" / "preprocessor_config.json").write_text(json.dumps(processor))
    folder_cfg = model_cfg(f"hf:{tmp_path / 'folder'}", {}, pretrained=True)
    pre = preprocessing_for_config(folder_cfg)
    assert (pre["mean"], pre["std"], pre["interpolation"]) == (
        (0.1, 0.2, 0.3),
        (0.3,) * 3,
        "bicubic",
    )
    torch.testing.assert_close(build_backbone(folder_cfg, 10).eval()(x).logits, source(x).logits)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm_model("vit_small_patch16_224", VIT).state_dict(), path)
    with pytest.raises(UserError) as info:
        build_backbone(model_cfg("ares_swin_base", SWIN, path), 5)
    message = str(info.value)
    assert str(path) in message and "missing keys [" in message and "'layers.0.blocks" in message
    assert "unexpected keys ['cls_token'" in message and "\n" not in message
    with pytest.raises(UserError, match="other shapes .*cls_token"):
        build_backbone(model_cfg("ares_vit_small", {**VIT, "embed_dim": 64}, path), 5)


def test_unknown_names_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a timm model, a registry entry or hf:"):
        build_backbone(model_cfg("no_such_net", {}), 5)
    with pytest.raises(UserError, match="checkpoint not found"):
        build_backbone(model_cfg("ares_vit_small", VIT, tmp_path / "missing.pth"), 5)
    with pytest.raises(UserError, match="no direct download"):
        build_backbone(model_cfg("rb_liu2023_swin_base", SWIN, pretrained=True), 5)


class _RunsCode:
    """Unpickling this object runs code that leaves a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, path)
    with open(path, "rb") as fh:  # the file really is armed
        assert fh.read(2) == b"PK"
    with pytest.raises(UserError) as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    with pytest.raises(UserError, match="refused"):
        build_backbone(model_cfg("ares_vit_small", VIT, path), 5)
    assert not marker.exists()
    # a legacy (non-zip) pickle is refused too
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=2))
    with pytest.raises(UserError, match="legacy.pth"):
        load_state_dict_file(legacy)
    assert not marker.exists()
