"""Visual prompt tuning and BitFit as models: where the prompts go, what trains, artefacts."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from models_testlib import HF_SWIN, HF_VIT, SWIN, VIT, model_cfg, sgd_steps, timm_model
from safetensors.torch import load_file, save_file
from torch import nn

from caat_peft.errors import UserError
from caat_peft.models import (
    PixelClassifier,
    build_backbone,
    build_model,
    export_merged,
    load_adapter,
    merged_net,
    save_adapter,
)
from caat_peft.models.prompts import CONFIG_FILE, attach_prompts, prompt_names

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend

VIT_ARCH, SWIN_ARCH = "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"
# (model.name, architecture kwargs, image size, prefix tokens before the prompts)
FAMILIES = {
    "timm-vit": (VIT_ARCH, VIT, 16, 1),
    "hf-vit": ("hf:vit", HF_VIT, 16, 1),
    "hf-deit": ("hf:deit", HF_VIT, 16, 2),  # class + distillation token
}


def _blocks_and_norm(net: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    if hasattr(net, "blocks"):
        return list(net.blocks), net.norm
    base = getattr(net, net.base_model_prefix)
    return list(base.layers), base.layernorm


def _random_head(model: nn.Module) -> None:
    """build_model's jax init zeroes the head; logits that vary show more."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".head." in name or ".classifier." in name:
                p.normal_()


def _seen_inputs(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The token sequences each block and the final norm receive (after the prompt hooks)."""
    blocks, norm = _blocks_and_norm(net)
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in [*blocks, norm]]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return seen[:-1], seen[-1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_prompts_follow_the_prefix_tokens_and_leave_before_the_head(family, depth):
    name, kwargs, size, start = FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(
        name,
        peft={"method": "vpt", "prompt_length": 3, "prompt_depth": depth},
        num_classes=4,
        **kwargs,
    ).eval()
    net, length = model.net, 3
    blocks, _ = _blocks_and_norm(net)
    plain_tokens = (size // 4) ** 2 + start
    inputs, final = _seen_inputs(net, torch.rand(2, 3, size, size))
    for i, (block, seen) in enumerate(zip(blocks, inputs)):
        assert seen.shape[1] == plain_tokens + length
        span = seen[:, start : start + length]
        if i == 0 or depth == "deep":  # a fresh prompt, the same for every image
            assert torch.equal(span, block.vpt_prompt.detach().expand(2, -1, -1))
        else:  # shallow: the previous block's outputs at the prompt positions
            assert not torch.equal(span[0], blocks[0].vpt_prompt.detach())
    assert final.shape[1] == plain_tokens  # the head pools the usual tokens
    expected = len(blocks) if depth == "deep" else 1
    assert len(prompt_names(net)) == expected


def test_swin_window_attention_with_no_prompt_tokens_is_timms_own():
    """The prompted window attention is a reimplementation: with zero-length prompts it must
    give timm's output (relative-position bias, shifted-window mask, padding)."""
    plain = timm_model(SWIN_ARCH, SWIN, num_classes=5)
    prompted = copy.deepcopy(plain)
    attach_prompts(prompted, 2, "deep")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        changed = prompted(x)
        for module in prompted.modules():
            if hasattr(module, "vpt_prompt"):
                module.vpt_prompt = nn.Parameter(module.vpt_prompt[:0])
        # the same math; only the attention kernel's summation order may differ
        torch.testing.assert_close(prompted(x), plain(x), rtol=0, atol=1e-6)
    assert not torch.allclose(changed, plain(x))
    assert len(prompt_names(prompted)) == 4  # one prompt set per block, every stage


def test_vpt_refuses_what_it_cannot_do_properly():
    with pytest.raises(UserError, match="shallow is not available for Swin"):
        build_model(
            SWIN_ARCH, peft={"method": "vpt", "prompt_depth": "shallow"}, num_classes=3, **SWIN
        )
    with pytest.raises(UserError, match="does not support swin"):
        build_model("hf:swin", peft="vpt", num_classes=3, **HF_SWIN)
    with pytest.raises(UserError, match="does not support ConvNeXt"):
        build_model("convnext_atto", peft="vpt", num_classes=3)


@pytest.mark.parametrize("train_head", [True, False])
def test_only_prompts_or_biases_and_the_head_train(train_head):
    vpt = build_model(
        VIT_ARCH, peft={"method": "vpt", "train_head": train_head}, num_classes=3, **VIT
    )
    trainable = [n for n, p in vpt.named_parameters() if p.requires_grad]
    head = ["net.head.weight", "net.head.bias"] if train_head else []
    assert trainable == ["net.blocks.0.vpt_prompt", "net.blocks.1.vpt_prompt", *head]

    bitfit = build_model(
        SWIN_ARCH, peft={"method": "bitfit", "train_head": train_head}, num_classes=3, **SWIN
    )
    trainable = {n for n, p in bitfit.named_parameters() if p.requires_grad}
    biases = {n for n, _ in bitfit.named_parameters() if n.endswith(".bias")}
    head = {"net.head.fc.weight", "net.head.fc.bias"}
    assert trainable == (biases | head if train_head else biases - head)
    assert "net.layers.0.blocks.0.attn.qkv.bias" in trainable  # attention, MLP, norms, embed
    assert "net.patch_embed.norm.bias" in trainable


CASES = {
    "vit-deep": (VIT_ARCH, VIT, 16, {"method": "vpt", "prompt_depth": "deep"}),
    "vit-shallow": (VIT_ARCH, VIT, 16, {"method": "vpt", "prompt_depth": "shallow"}),
    "swin-deep": (SWIN_ARCH, SWIN, 32, {"method": "vpt"}),
    "hf-vit-shallow": ("hf:vit", HF_VIT, 16, {"method": "vpt", "prompt_depth": "shallow"}),
    "vit-bitfit": (VIT_ARCH, VIT, 16, {"method": "bitfit"}),
    "hf-vit-bitfit": ("hf:vit", HF_VIT, 16, {"method": "bitfit"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_folder_reloads_to_the_same_logits_and_frozen_weights_stay(tmp_path, case):
    name, kwargs, size, peft = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, peft={**peft, "prompt_length": 2}, num_classes=4, **kwargs)
    _random_head(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.rand(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    sgd_steps(model, x, y)
    for n, p in model.named_parameters():  # frozen: bit for bit; trained: moved
        assert torch.equal(p, before[n]) != p.requires_grad, n

    save_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "trainable.safetensors")
    assert sorted(saved) == sorted(n[4:] for n, p in model.named_parameters() if p.requires_grad)
    assert (tmp_path / "adapter" / CONFIG_FILE).is_file() == (peft["method"] == "vpt")
    torch.manual_seed(0)  # the same frozen backbone, as load_trained rebuilds it
    base = build_backbone(model_cfg(name, kwargs), 4)
    reloaded = load_adapter(base, tmp_path / "adapter").eval()
    wrapped = PixelClassifier(reloaded, model.mean.flatten().tolist(), model.std.flatten().tolist())
    with torch.no_grad():
        assert torch.equal(wrapped(x), model.eval()(x))


def test_a_vpt_folder_that_lost_its_prompts_or_config_is_refused(tmp_path):
    torch.manual_seed(0)
    model = build_model(VIT_ARCH, peft="vpt", num_classes=3, **VIT)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    tensors = load_file(folder / "trainable.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "vpt_prompt" not in k},
        folder / "trainable.safetensors",
    )
    with pytest.raises(UserError, match="do not fit the model"):
        load_adapter(build_backbone(model_cfg(VIT_ARCH, VIT), 3), folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "extra": 1}))
    with pytest.raises(UserError, match="expected the keys"):
        load_adapter(build_backbone(model_cfg(VIT_ARCH, VIT), 3), folder)


def test_prompts_survive_deepcopy_and_cannot_be_merged(tmp_path):
    torch.manual_seed(0)
    model = build_model(SWIN_ARCH, peft="vpt", num_classes=3, **SWIN).eval()
    _random_head(model)
    copied = copy.deepcopy(model)  # EMA, merged copies and front points deep-copy models
    x = torch.rand(2, 3, 32, 32)
    reference = model(x)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vpt_prompt" in n:
                p.add_(torch.randn_like(p))
    assert torch.equal(copied(x), reference)  # the copy uses its own prompts and norms
    assert not torch.allclose(model(x), reference)
    with pytest.raises(UserError, match="cannot be merged"):
        merged_net(model)


def test_bitfit_export_is_the_plain_timm_architecture(tmp_path):
    torch.manual_seed(0)
    model = build_model(VIT_ARCH, peft="bitfit", num_classes=3, **VIT)
    sgd_steps(model, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    path = export_merged(model, tmp_path / "merged.safetensors")
    plain = timm.create_model(VIT_ARCH, num_classes=3, **VIT).eval()
    plain.load_state_dict(load_file(path))  # strict
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(plain((x - 0.5) / 0.5), model.eval()(x), rtol=0, atol=1e-6)
