"""The fast path: low-precision autocast that stays fast on CPU, and compilation."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from caat_peft.config import AttackConfig, ModelConfig, PeftConfig, load_config
from caat_peft.errors import UserError
from caat_peft.models import build_classifier
from caat_peft.objectives import build_objective
from caat_peft.training import train
from caat_peft.training.conflict_aware import objective_losses
from caat_peft.training.fastpath import (
    autocast_for,
    check_can_compile,
    lora_merged,
    prepare_model,
)

from conftest import TINY_RECIPE

ARCH = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model_cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=ARCH)
    return build_classifier(model_cfg, PeftConfig(method=method, r=4, reduction=4), 5)


def _tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_low_precision_switches_off_the_adapter_input_cast_only(method):
    fp32 = prepare_model(_model(method), precision="fp32")
    bf16 = prepare_model(_model(method), precision="bf16")
    assert _tuner_layers(bf16)
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in _tuner_layers(fp32))
    assert not any(m.cast_input_dtype_enabled for m in _tuner_layers(bf16))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_bf16_fast_path_computes_the_same_function(method):
    """Without the cast the adapters still run (in bf16, under autocast): logits and the input
    gradient match the float32 model to bf16 accuracy."""
    reference, fast = _model(method).eval(), prepare_model(_model(method), precision="bf16").eval()
    # LoRA's B and the adapter's up-projection start at zero: give them weights to test.
    with torch.no_grad():
        for (_, p), (_, q) in zip(reference.named_parameters(), fast.named_parameters()):
            if p.requires_grad:
                p.normal_(0, 0.2)
                q.copy_(p)
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    logits = reference(x)
    (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x)
    with autocast_for("bf16", x.device):
        fast_logits = fast(x)
        (fast_grad,) = torch.autograd.grad(fast_logits.float().logsumexp(1).sum(), x)
    assert fast_logits.dtype == torch.bfloat16
    assert torch.allclose(fast_logits.float(), logits, atol=0.05, rtol=0.05)
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), fast_grad.flatten(), dim=0)
    assert cos > 0.99


def test_cpu_low_precision_routes_attention_to_the_math_kernel():
    """torch's CPU flash-attention kernel is slow in bf16 (its backward above all)."""
    flash = torch.backends.cuda.flash_sdp_enabled  # the flags are global, CPU included
    assert flash()
    with autocast_for("bf16", torch.device("cpu")):
        assert not flash() and torch.backends.cuda.math_sdp_enabled()
        assert torch.is_autocast_enabled("cpu")
    assert flash() and not torch.is_autocast_enabled("cpu")
    with autocast_for("fp32", torch.device("cpu")):
        assert flash() and not torch.is_autocast_enabled("cpu")


def test_compile_needs_a_cpp_compiler_on_cpu(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="train.compile"):
        check_can_compile(torch.device("cpu"))


def test_compiled_run_matches_the_eager_run(tmp_path):
    """``train.compile`` changes the speed, not the method: same adapter after one epoch."""
    sets = ["train.epochs=1", "eval.limit=32", "eval.steps=2", "train.plots=false"]
    eager = train(load_config(TINY_RECIPE, sets), tmp_path / "eager", progress=False)
    compiled = train(
        load_config(TINY_RECIPE, [*sets, "train.compile=true"]),
        tmp_path / "compiled",
        progress=False,
    )
    assert compiled.model._compiled_call_impl is not None  # it really ran compiled
    assert getattr(eager.model, "_compiled_call_impl", None) is None
    a = load_file(str(tmp_path / "eager" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()  # compiled in place: the saved names do not change
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key
    assert compiled.final["steps"] == eager.final["steps"]


def test_bf16_compiled_run_trains_and_resumes_eagerly(tmp_path):
    """The documented fast path end to end, then ``--resume`` without compilation (compile is
    speed only, so the config check lets it differ)."""
    sets = ["train.epochs=2", "eval.limit=32", "eval.steps=2", "train.plots=false"]
    fast = [*sets, "train.precision=bf16", "train.compile=true", "train.save_every=19"]
    cfg = load_config(TINY_RECIPE, fast)
    cfg.train.epochs = 1
    first = train(cfg, tmp_path / "run", progress=False)
    assert first.model._compiled_call_impl is not None
    resumed = load_config(TINY_RECIPE, [*fast[:-2], "train.save_every=19"])
    resumed.train.epochs = 1  # the same config, without compile
    result = train(resumed, tmp_path / "run", resume=True, progress=False)
    assert result.final["steps"] == first.final["steps"]
    assert 0.0 <= result.final["robust_acc"] <= 1.0


def test_cpu_bf16_attention_runs_the_math_kernel_and_fp32_keeps_the_fused_one():
    q = torch.randn(2, 2, 16, 8)

    def kernels(precision: str) -> set[str]:
        with torch.profiler.profile() as prof, autocast_for(precision, q.device):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return {e.name for e in prof.events() if "attention" in e.name}

    assert any("math" in k for k in kernels("bf16"))
    assert not any("flash" in k for k in kernels("bf16"))
    assert any("flash" in k for k in kernels("fp32"))


def test_without_the_cast_the_lora_matmul_sees_the_bf16_activation():
    """What the switch changes: the input dtype of LoRA's A projection under autocast."""

    def lora_input_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
        seen: set[torch.dtype] = set()
        hooks = [
            m.lora_A["default"].register_forward_pre_hook(lambda _, a: seen.add(a[0].dtype))
            for m in model.modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A
        ]
        with torch.no_grad(), autocast_for("bf16", torch.device("cpu")):
            model(torch.rand(2, 3, 16, 16))
        for h in hooks:
            h.remove()
        return seen

    assert lora_input_dtypes(_model("lora").eval()) == {torch.float32}  # peft's cast: a copy
    fast = prepare_model(_model("lora"), precision="bf16").eval()
    # fc2's input (GELU of a bf16 matmul) stays bf16; qkv / fc1 follow a layer norm, which
    # autocast runs in float32 anyway.
    assert torch.bfloat16 in lora_input_dtypes(fast)


# --- the attack's merged LoRA and the explicit attention path -------------------------------


def _trained_lora(dropout: float = 0.0, **peft_kwargs) -> torch.nn.Module:
    """A LoRA model whose B and head are non-zero (at init both are zero: no delta to merge,
    no gradient through the head)."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=ARCH)
    peft_cfg = PeftConfig(method="lora", r=4, dropout=dropout, **peft_kwargs)
    model = build_classifier(model_cfg, peft_cfg, 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (p.requires_grad and "lora_" not in name):
                p.normal_(0, 0.3)
    return model


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def test_merged_lora_computes_the_same_function_and_restores_the_weights_exactly():
    model = _trained_lora().eval()
    before = _base_weights(model)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x)
    with lora_merged(model):
        inside = _base_weights(model)
        assert any(not torch.equal(inside[n], before[n]) for n in before)  # really merged
        merged_logits = model(x)
        (merged_grad,) = torch.autograd.grad(merged_logits.logsumexp(1).sum(), x)
    torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_grad, grad, atol=1e-6, rtol=1e-4)
    after = _base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # bit for bit
    assert not any(m.merged for m in _tuner_layers(model))
    torch.testing.assert_close(model(x), logits, atol=0, rtol=0)


def test_merged_lora_restores_the_weights_when_the_block_raises():
    model = _trained_lora()
    before = _base_weights(model)
    with pytest.raises(RuntimeError, match="inside"), lora_merged(model):
        raise RuntimeError("inside")
    after = _base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not any(m.merged for m in _tuner_layers(model))


def test_merged_lora_leaves_layers_with_active_dropout_alone():
    model = _trained_lora(dropout=0.1)
    before = _base_weights(model)
    with lora_merged(model, dropout_active=True):
        inside = _base_weights(model)
    assert all(torch.equal(inside[n], before[n]) for n in before)
    with lora_merged(model, dropout_active=False):  # eval-mode attack: dropout is identity
        inside = _base_weights(model)
    assert any(not torch.equal(inside[n], before[n]) for n in before)


def test_inside_the_block_lora_is_a_constant_and_a_late_backward_fails_loudly():
    model = _trained_lora()
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with lora_merged(model):
        loss = model(x).sum()
        grads = torch.autograd.grad(loss, [x, *lora], allow_unused=True, retain_graph=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(loss, x)  # through the merged weights, restored since


def test_the_fast_path_losses_leave_the_backbone_untouched_and_train_lora():
    """objective_losses under bf16: the attack runs merged, the losses through peft's layers
    (gradients reach every LoRA matrix), and the frozen weights are unchanged afterwards."""
    model = _trained_lora().train()
    before = _base_weights(model)
    objective = build_objective("pgd-ce", AttackConfig(eps=8 / 255, alpha=2 / 255, steps=3))
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss_clean, loss_adv, _ = objective_losses(model, objective, x, y, precision="bf16")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(loss_clean + loss_adv, lora)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    after = _base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert model.training  # the attack's eval mode was undone


def test_the_fast_path_attack_matches_the_float32_attack_direction():
    """The merged bf16 attack's first step direction agrees with float32 peft's on nearly every
    pixel (sign steps differ only where the gradient is close to zero)."""
    model = _trained_lora().eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    delta = torch.zeros_like(x, requires_grad=True)
    (reference,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(x + delta), y), delta
    )
    with autocast_for("bf16", x.device, model), lora_merged(model):
        loss = torch.nn.functional.cross_entropy(model(x + delta).float(), y)
        (fast,) = torch.autograd.grad(loss, delta)
    agree = (fast.sign() == reference.sign()).float().mean()
    assert agree > 0.9, agree
    cos = torch.nn.functional.cosine_similarity(fast.flatten(), reference.flatten(), dim=0)
    assert cos > 0.99


def test_cpu_low_precision_runs_timm_attention_explicitly_in_bf16_for_the_block():
    """The math kernel would upcast bf16 attention to float32 on a CPU; timm's explicit path
    runs its matmuls in bf16. Only for the block: evaluation keeps the fused kernel."""
    model = _model("lora").eval()
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)
    x = torch.rand(2, 3, 16, 16)
    with torch.profiler.profile() as prof, torch.no_grad(), autocast_for("bf16", x.device, model):
        assert not any(m.fused_attn for m in attention)
        model(x)
    assert all(m.fused_attn for m in attention)
    names = {e.name for e in prof.events()}
    assert not any("scaled_dot_product" in n for n in names)
    with autocast_for("fp32", x.device, model):
        assert all(m.fused_attn for m in attention)
