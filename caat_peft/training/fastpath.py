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

``train.compile: true`` compiles the classifier in place (``nn.Module.compile``: state-dict keys
and saved adapters are unchanged); the first steps pay the compilation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch
from torch import nn


def _math_attention() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no backend choice on CPU, the default kernel runs
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def autocast_for(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 / fp16 autocast for the attack and the losses; parameters stay fp32."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        if device.type == "cpu":
            stack.enter_context(_math_attention())
        yield


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
