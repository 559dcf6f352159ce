"""model.init: a narrow timm ViT built from random weights gets a width-aware initialisation.

With timm's default (every Linear weight from N(0, 0.02²)) a width-32 ViT's class token is an
almost input-independent mix at initialisation, and short runs sat at the chance loss until float
noise let them escape (tests/test_tiny_recipe.py, docs/models.md). These tests pin the mechanism
and the rule that picks the init.
"""

from __future__ import annotations

import pytest
import timm
import torch

from caat_peft.config import ConfigError, ModelConfig, from_dict
from caat_peft.errors import UserError
from caat_peft.models.backbone import build_backbone, weight_init_for

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(init: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(
        ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(TINY), init=init, **kw), 5
    )


def _token_signal(model: torch.nn.Module) -> float:
    """Across-input spread of the head's input feature relative to its mean size."""
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return float(feats.std(0).mean() / feats.mean(0).abs().mean())


def test_auto_uses_the_jax_init_for_random_weights_and_it_carries_the_input():
    auto, timm_init = _model("auto"), _model("timm")
    assert torch.count_nonzero(auto.head.weight) == 0  # jax mode: zero head
    assert torch.count_nonzero(timm_init.head.weight) > 0
    # measured over init seeds 0-4: 1.76-2.70 (jax) vs 0.22-0.31 (timm), a factor 7.8-8.7
    assert _token_signal(auto) > 2 * _token_signal(timm_init)


def test_loaded_weights_keep_timms_init_for_the_fresh_head(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **TINY)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = _model("auto", checkpoint=str(path))
    assert torch.count_nonzero(model.head.weight) > 0  # not the jax zero head
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_the_rule():
    assert weight_init_for(ModelConfig(), loads_weights=False) == "jax"
    assert weight_init_for(ModelConfig(), loads_weights=True) is None
    assert weight_init_for(ModelConfig(init="timm"), loads_weights=False) is None
    assert weight_init_for(ModelConfig(init="jax"), loads_weights=True) == "jax"
    own = ModelConfig(kwargs={"weight_init": "moco"})
    assert weight_init_for(own, loads_weights=False) is None  # the user's timm argument wins


def test_architectures_without_init_modes():
    cfg = ModelConfig(name="resnet10t", kwargs={})
    assert build_backbone(cfg, 3) is not None  # auto: the architecture's own init
    with pytest.raises(UserError, match="model.init = jax is not supported by resnet10t"):
        build_backbone(ModelConfig(name="resnet10t", init="jax"), 3)


def test_config_choices():
    with pytest.raises(ConfigError, match="model.init = 'xavier' is not allowed"):
        from_dict({"model": {"init": "xavier"}})
    with pytest.raises(ConfigError, match="both set the initialisation"):
        from_dict({"model": {"init": "jax", "kwargs": {"weight_init": "moco"}}})


def test_runs_saved_before_model_init_existed_are_rebuilt_with_timms_init(tmp_path):
    from caat_peft.config import config_yaml, load_config, load_run_config

    old = tmp_path / "old.yaml"
    old.write_text("model:\n  name: vit_tiny_patch16_224\n")
    assert load_config(old).model.init == "auto"
    assert load_run_config(old).model.init == "timm"  # how that run built its random weights
    assert load_run_config(old, ["model.init=jax"]).model.init == "jax"
    new = tmp_path / "new.yaml"
    new.write_text(config_yaml(load_config(old)))
    assert load_run_config(new).model.init == "auto"
