"""The fast training path: low-precision autocast that stays fast on CPU, optional compilation.

``train.precision: bf16`` (or ``fp16``) runs the attack and both losses under autocast while the
trainable parameters and their gradients stay float32. Two details decide whether that is faster
at all on a CPU (measured in ``benchmarks/``, figures in ``docs/benchmarks.md``):

* torch's CPU flash-attention kernel is slow in bf16, its *backward* above all, and both the
  attack (an input gradient per step) and the two parameter-gradient passes run it backwards.
  Under low-precision autocast on a CPU, scaled-dot-product attention is therefore routed to
  the math backend (two matmuls and a softmax, which autocast runs in bf16 / fp32). This is a
  context around the step, not a change to the model: evaluation in float32 keeps the fused
  kernel.
* peft's tuner layers cast their input to the adapter's (float32) weight dtype before the
  adapter matmul; under autocast that matmul runs in bf16 anyway, so the cast only adds two
  copies of every adapted activation per pass. The cast is switched off for low precision
  (with float32 inputs and weights it is a no-op either way).
* The math backend itself upcasts bf16 attention to float32 on a CPU (its matmuls then run at
  the float32 rate). Given the model, :func:`autocast_for` also switches timm's attention
  modules to their explicit path (``fused_attn = False``: ``q @ kᵀ``, softmax, ``@ v``), which
  autocast runs in bf16, for the block only; evaluation keeps the fused kernel.
* PGD's steps need no parameter gradient, so during the attack a LoRA layer's ``W + s·B A`` is
  one matrix: :func:`lora_merged` adds the delta into the frozen base weight for the attack and
  restores the saved weight bit for bit after it, which removes LoRA's two thin rank-r matmuls
  (and their input-gradient matmuls) from every attack step.

``train.compile: true`` compiles the classifier in place (``nn.Module.compile``: state-dict keys
and saved adapters are unchanged); the first steps pay the compilation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _math_attention() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no backend choice on CPU, the default kernel runs
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention modules on their explicit (unfused) path for the block."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    fused = [m.fused_attn for m in modules]
    for module in modules:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, was_fused in zip(modules, fused):
            module.fused_attn = was_fused


@contextlib.contextmanager
def autocast_for(
    precision: str, device: torch.device, model: nn.Module | None = None
) -> Iterator[None]:
    """bf16 / fp16 autocast for the attack and the losses; parameters stay fp32. On a CPU,
    attention runs in the low precision too (timm's explicit path for ``model``, the math
    kernel for any other ``scaled_dot_product_attention`` call)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(_math_attention())
            if model is not None:
                stack.enter_context(_explicit_attention(model))
        yield


_CLASS_LIST = object()  # marks a layer whose merged_adapters was peft's class-level default


def _mergeable_lora(model: nn.Module, dropout_active: bool) -> list[tuple[nn.Module, str]]:
    """(layer, adapter) of every plain LoRA linear layer whose delta is one matrix here."""
    from peft.tuners.lora import Linear as LoraLinear

    found = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.merged or module.disable_adapters:
            continue
        if len(module.active_adapters) != 1:
            continue
        (name,) = module.active_adapters
        if name not in module.lora_A or module.use_dora.get(name, False):
            continue
        if module.get_base_layer().weight.dtype not in (torch.float32, torch.float64):
            continue  # quantised or half-precision base weights: no exact restore
        dropout = module.lora_dropout[name]
        if dropout_active and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            continue  # dropout acts on the adapter's input only: not a merged matrix
        found.append((module, name))
    return found


@contextlib.contextmanager
def lora_merged(model: nn.Module, *, dropout_active: bool = False) -> Iterator[None]:
    """For the block, every plain LoRA linear layer of ``model`` computes ``x (W + s·B A)ᵀ`` as
    one matmul (peft's merged branch); the base weights are restored exactly afterwards.

    For code that needs no gradient of the LoRA parameters (the attack): inside the block the
    merged weight is a constant, so a loss computed there gives A and B no gradient.
    ``dropout_active``: whether the block runs LoRA dropout (train mode); layers with an active
    dropout are left unmerged. Back-propagating a graph built inside the block through a
    merged layer after it fails loudly (autograd's in-place check).
    """
    layers = _mergeable_lora(model, dropout_active)
    saved: list[tuple[nn.Module, Tensor, Tensor, object]] = []
    try:
        with torch.no_grad():
            for module, name in layers:
                weight = module.get_base_layer().weight
                own_list = module.__dict__.get("merged_adapters", _CLASS_LIST)
                saved.append((module, weight, weight.detach().clone(), own_list))
                weight.add_(module.get_delta_weight(name).to(weight.dtype))
                module.merged_adapters = [name]  # peft's flag: the merged branch runs
        yield
    finally:
        with torch.no_grad():
            for module, weight, original, own_list in reversed(saved):
                weight.copy_(original)
                if own_list is _CLASS_LIST:
                    del module.merged_adapters
                else:
                    module.merged_adapters = own_list


def check_can_compile(device: torch.device) -> None:
    """Refuse ``train.compile`` up front where inductor would fail at the first step."""
    from caat_peft.errors import UserError

    if not hasattr(nn.Module, "compile"):
        raise UserError(
            "train.compile needs torch >= 2.2; upgrade torch or set train.compile=false"
        )
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(
            "train.compile: torch.compile does not support this Python / platform; "
            "set train.compile=false"
        )
    if device.type == "cpu" and not (
        os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    ):
        raise UserError(
            "train.compile on a CPU needs a C++ compiler (none found: c++, g++, clang++ or $CXX);"
            " install one or set train.compile=false"
        )


def prepare_model(model: nn.Module, *, precision: str, compile: bool = False) -> nn.Module:
    """Set ``model`` up for its training precision (and compile it); returns the same module."""
    if precision != "fp32":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if compile:
        # Both gradients come from one clean forward (the first backward retains the graph),
        # which AOTAutograd's donated buffers forbid; they only save memory.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        model.compile()
    return model
