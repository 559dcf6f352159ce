"""Visual prompt tuning (VPT, Jia et al. 2022): learnable tokens inside a frozen transformer.

``prompt_length`` tokens are inserted after the class token (and any register / distillation
tokens) of a ViT, before its first block. ``shallow`` keeps those tokens through every block;
``deep`` replaces the prompt tokens the previous block produced with a fresh set at every block.
The prompt outputs of the last block are dropped before the final norm and the head, so that
the pooling (class token or average over image tokens) sees what it would without prompts.

The prompts live *inside* the backbone: each prompted block owns a parameter ``vpt_prompt``
(``blocks.3.vpt_prompt``) and a forward pre-hook that inserts or replaces the tokens, so every
forward of the model, the attack's included, runs through the prompts. The backbone keeps its
class and its parameter names, and what was trained is saved like a head-only run
(``trainable.safetensors``) plus ``vpt_config.json`` saying how to attach the prompts again.

Swin has no global token sequence: attention runs inside local windows and patch merging changes
the width between stages. Following the VPT paper's Swin variant, every block gets its own
prompts (of that stage's width), shared by all windows and prepended to each window's tokens as
extra keys and values (they are LayerNorm-ed by the block's ``norm1`` like the window tokens;
the relative-position bias and the shift mask cover the window tokens only, prompts are visible
to all of them). Under ``deep`` the block's prompt outputs would be replaced before the next
block anyway, so only the window tokens are computed as queries: the image tokens come out
exactly as if the prompts had travelled through the block. ``shallow`` (prompts only at the
input, carried through windows and merges) has no such reading for Swin and is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from caat_peft.errors import UserError
from caat_peft.models.targets import is_transformers_model

PROMPT_PARAM = "vpt_prompt"
CONFIG_FILE = "vpt_config.json"
DEPTHS = ("shallow", "deep")
_HF_TYPES = ("vit", "deit")


def _init_prompt(length: int, dim: int, patch_size: Any, like: Tensor) -> nn.Parameter:
    """Xavier-uniform over the patch embedding's fan-in and the width, as in the VPT paper."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    bound = math.sqrt(6.0 / float(3 * ph * pw + dim))
    values = torch.empty(length, dim, dtype=like.dtype, device=like.device).uniform_(-bound, bound)
    return nn.Parameter(values)


def _prompt_tokens(module: nn.Module, x: Tensor) -> Tensor:
    """The module's prompt broadcast over the batch of ``x`` (dropout per image, in training)."""
    prompt = module.vpt_prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    if module.vpt_dropout > 0 and module.training:
        prompt = F.dropout(prompt, module.vpt_dropout, training=True)
    return prompt


def _hidden_states(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_states(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _insert_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before a prompted block: put its prompts after the prefix tokens, either inserted (the
    first block) or in place of the previous block's prompt outputs (deep, later blocks)."""
    x = _hidden_states(args, kwargs)
    start, length = module.vpt_start, module.vpt_prompt.shape[0]
    resume_at = start if module.vpt_insert else start + length
    x = torch.cat([x[:, :start], _prompt_tokens(module, x), x[:, resume_at:]], dim=1)
    return _with_hidden_states(args, kwargs, x)


def _strip_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before the final norm: drop the prompt tokens, so that pooling sees the usual tokens."""
    x = _hidden_states(args, kwargs)
    start, length = module.vpt_span
    return _with_hidden_states(args, kwargs, torch.cat([x[:, :start], x[:, start + length :]], 1))


def _prompt_blocks(
    blocks: list[nn.Module], final_norm: nn.Module, start: int, dim: int, patch: Any, spec: dict
) -> None:
    like = next(blocks[0].parameters())
    prompted = blocks if spec["prompt_depth"] == "deep" else blocks[:1]
    for i, block in enumerate(prompted):
        block.vpt_prompt = _init_prompt(spec["prompt_length"], dim, patch, like)
        block.vpt_start, block.vpt_insert, block.vpt_dropout = start, i == 0, spec["dropout"]
        block.register_forward_pre_hook(_insert_hook, with_kwargs=True)
    final_norm.vpt_span = (start, spec["prompt_length"])
    final_norm.register_forward_pre_hook(_strip_hook, with_kwargs=True)


class PromptedWindowAttention(WindowAttention):
    """timm's window attention with the block's prompts prepended to every window as keys and
    values (queries: the window tokens only; see the module doc)."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        windows, n, _ = x.shape
        prompts = self._vpt_norm(_prompt_tokens(self, x))
        length = prompts.shape[1]
        qkv = self.qkv(torch.cat([prompts, x], dim=1))
        qkv = qkv.reshape(windows, length + n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._get_rel_pos_bias()  # (1, heads, n, n)
        if mask is not None:  # (num_win, n, n), the same for every image of the batch
            num_win = mask.shape[0]
            bias = bias.unsqueeze(1) + mask.view(1, num_win, 1, n, n)
            bias = bias.expand(windows // num_win, -1, -1, -1, -1).reshape(windows, -1, n, n)
        bias = F.pad(bias, (length, 0)).to(q.dtype)  # prompts: visible to every window token
        out = F.scaled_dot_product_attention(
            q[:, :, length:],
            k,
            v,
            attn_mask=bias,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(windows, n, -1)))


def _prompt_swin(model: SwinTransformer, spec: dict) -> None:
    if spec["prompt_depth"] != "deep":
        raise UserError(
            "peft.prompt_depth = shallow is not available for Swin (window attention keeps no "
            "prompt tokens between blocks and stages); use peft.prompt_depth=deep"
        )
    like = next(model.parameters())
    for stage in model.layers:
        for block in stage.blocks:
            attn = block.attn
            if type(attn) is not WindowAttention:
                raise UserError(f"peft.method = vpt: unsupported Swin attention {type(attn)}")
            attn.vpt_prompt = _init_prompt(
                spec["prompt_length"], attn.qkv.in_features, model.patch_embed.patch_size, like
            )
            attn.vpt_dropout = spec["dropout"]
            # A plain reference, not a submodule: norm1 stays registered (and saved) once, on
            # its block; deepcopy maps it to the copy's norm1.
            object.__setattr__(attn, "_vpt_norm", block.norm1)
            attn.__class__ = PromptedWindowAttention


def _prompt_hf(model: nn.Module, spec: dict) -> None:
    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None)
    if layers is None:  # transformers v4 layout
        layers = base.encoder.layer
    start = 1 + int(getattr(base.embeddings, "distillation_token", None) is not None)
    config = model.config
    _prompt_blocks(list(layers), base.layernorm, start, config.hidden_size, config.patch_size, spec)


def attach_prompts(model: nn.Module, length: int, depth: str, dropout: float = 0.0) -> list[str]:
    """Add VPT prompts to ``model`` in place; return the prompt parameters' names.

    Supported: timm VisionTransformer (ViT, DeiT, ConvStem ViTs), timm SwinTransformer (deep
    only), transformers ViT / DeiT. Anything else is a UserError naming the alternatives.
    """
    if depth not in DEPTHS:
        raise UserError(f"peft.prompt_depth = {depth!r} is not allowed (use one of: shallow, deep)")
    if length < 1:
        raise UserError(f"peft.prompt_length = {length} must be >= 1")
    spec = {"prompt_length": int(length), "prompt_depth": depth, "dropout": float(dropout)}
    if getattr(model, "vpt_config", None) is not None:
        raise UserError("peft.method = vpt: the model already has prompts attached")
    if isinstance(model, VisionTransformer):
        patch = model.patch_embed.patch_size
        blocks = list(model.blocks)
        _prompt_blocks(blocks, model.norm, model.num_prefix_tokens, model.embed_dim, patch, spec)
    elif isinstance(model, SwinTransformer):
        _prompt_swin(model, spec)
    elif is_transformers_model(model) and model.config.model_type in _HF_TYPES:
        _prompt_hf(model, spec)
    else:
        kind = model.config.model_type if is_transformers_model(model) else type(model).__name__
        raise UserError(
            f"peft.method = vpt does not support {kind} (it supports timm ViT / DeiT / Swin and "
            "transformers vit / deit); choose another peft.method or a supported model.name"
        )
    model.vpt_config = {"method": "vpt", **spec}
    return prompt_names(model)


def prompt_names(model: nn.Module) -> list[str]:
    """Names of the VPT prompt parameters of ``model`` (empty when it has none)."""
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == PROMPT_PARAM]


def has_prompts(model: nn.Module) -> bool:
    return getattr(model, "vpt_config", None) is not None


def write_prompt_config(model: nn.Module, directory: Path) -> None:
    """``vpt_config.json`` beside the saved tensors: how to attach the prompts again."""
    text = json.dumps(model.vpt_config, indent=2) + "\n"
    (directory / CONFIG_FILE).write_text(text)


def read_prompt_config(directory: Path) -> dict[str, Any]:
    """The prompt settings of a saved VPT folder; a tampered or foreign file is refused."""
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable VPT config ({exc})") from None
    keys = {"method", "prompt_length", "prompt_depth", "dropout"}
    if not isinstance(data, dict) or set(data) != keys or data.get("method") != "vpt":
        raise UserError(f"{path}: expected the keys {sorted(keys)} of a VPT run (save it again)")
    if not isinstance(data["prompt_length"], int) or data["prompt_depth"] not in DEPTHS:
        raise UserError(f"{path}: prompt_length must be an integer, prompt_depth shallow or deep")
    return data
