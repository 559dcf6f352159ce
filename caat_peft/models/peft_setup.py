"""Which parameters train: LoRA through ``peft``, the head only, or everything.

Everything not selected is frozen, so ``trainable_parameters`` is exactly θ of the method.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from caat_peft.config import PeftConfig
from caat_peft.errors import UserError


def apply_peft(model: nn.Module, cfg: PeftConfig, head_name: str) -> nn.Module:
    """Attach the PEFT method of ``cfg`` and freeze the rest; return the model to train."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.method == "head":
        model.requires_grad_(False)
        model.get_submodule(head_name).requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if not matching_modules(model, cfg.target_modules):
        raise UserError(
            f"peft.target_modules = {cfg.target_modules!r} matches no layer of the model; "
            "give a regex over module names such as "
            r"'(.*\.)?blocks\.\d+\.(attn\.qkv|mlp\.fc1|mlp\.fc2)'"
        )
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=[head_name] if cfg.train_head else None,
    )
    return get_peft_model(model, lora)


def matching_modules(model: nn.Module, target: str | list[str]) -> list[str]:
    """Module names peft will adapt: a string is a full-match regex, a list matches name
    suffixes (so ``["proj"]`` also hits ``patch_embed.proj``: prefer an anchored regex)."""
    names = [name for name, module in model.named_modules() if name and _is_leaf_linear(module)]
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as exc:
            raise UserError(
                f"peft.target_modules = {target!r} is not a valid regex ({exc})"
            ) from None
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target)]


def _is_leaf_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires a gradient, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_trainable(net: nn.Module, directory: str | Path) -> None:
    """Save what was trained: a peft adapter (``save_pretrained``) or the trainable tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(net, "save_pretrained") and hasattr(net, "peft_config"):
        net.save_pretrained(str(directory))
        return
    from safetensors.torch import save_file

    tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(net)}
    save_file(tensors, str(directory / "trainable.safetensors"))


def unwrap_base(net: nn.Module) -> nn.Module:
    """The plain timm model under a peft wrapper (or ``net`` itself)."""
    get_base = getattr(net, "get_base_model", None)
    return get_base() if callable(get_base) else net


@torch.no_grad()
def merged_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """A plain timm state dict with LoRA merged in (the format robust checkpoints come in)."""
    if hasattr(net, "merge_and_unload"):
        import copy

        net = copy.deepcopy(net).merge_and_unload()
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
