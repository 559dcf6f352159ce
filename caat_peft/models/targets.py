"""Which layers a PEFT method adapts: anchored-regex presets per model family, and the head.

peft reads a ``target_modules`` *list* as name suffixes, so ``["proj"]`` also adapts
``patch_embed.proj``; a *string* is a full-match regex. Presets are therefore built as regexes
anchored on a transformer block (``blocks.<i>.`` in timm, ``layers.<i>.`` in ``transformers``),
from four parts:

====== ============================== ============================================
part   timm (ViT, Swin, ConvNeXt, …)  ``transformers`` ViT / Swin (v5 and v4 names)
====== ============================== ============================================
qkv    ``attn.qkv``                   ``attention.{q,k,v}_proj`` (``…query/key/value``)
proj   ``attn.proj``                  ``attention.o_proj`` (``attention.output.dense``)
fc1    ``mlp.fc1``                    ``mlp.fc1`` (``intermediate.dense``)
fc2    ``mlp.fc2``                    ``mlp.fc2`` (``output.dense``)
====== ============================== ============================================

Preset names (``peft.targets``) are below; parts may also be joined with ``+`` (``qkv+fc2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from caat_peft.errors import UserError


@dataclass(frozen=True)
class Family:
    """Where the blocks of a model family are, and how its four Linear parts are named."""

    name: str
    block: str  # regex of a block's module path, without the trailing dot
    parts: dict[str, str]  # part name -> regex of the Linear's path inside the block


_TIMM = Family(
    "timm",
    r"blocks\.\d+",
    {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"},
)
_HF_VIT = Family(
    "hf_vit",
    r"(layers|encoder\.layer)\.\d+",
    {
        "qkv": r"attention\.(q_proj|k_proj|v_proj)|attention\.attention\.(query|key|value)",
        "proj": r"attention\.o_proj|attention\.output\.dense",
        "fc1": r"mlp\.fc1|intermediate\.dense",
        "fc2": r"mlp\.fc2|output\.dense",
    },
)
_HF_SWIN = Family(
    "hf_swin",
    r"layers\.\d+\.blocks\.\d+",
    {
        "qkv": r"attention\.(q_proj|k_proj|v_proj)|attention\.self\.(query|key|value)",
        "proj": r"attention\.o_proj|attention\.output\.dense",
        "fc1": r"mlp\.fc1|intermediate\.dense",
        "fc2": r"mlp\.fc2|output\.dense",
    },
)
_HF_FAMILIES = {"vit": _HF_VIT, "deit": _HF_VIT, "swin": _HF_SWIN}

PARTS = ("qkv", "proj", "fc1", "fc2")
PRESETS: dict[str, tuple[str, ...]] = {
    "qkv": ("qkv",),
    "attn": ("qkv", "proj"),
    "mlp": ("fc1", "fc2"),
    "mlp_out": ("fc2",),  # the bottleneck adapter's place: after each MLP block
    "qkv_mlp": ("qkv", "fc1", "fc2"),  # LoRA's default (the demo's measured setting)
    "attn_mlp": ("qkv", "proj", "fc1", "fc2"),
}
# ``peft.targets: auto`` picks per method: the adapter goes after the MLP, the others adapt
# attention and MLP inputs as LoRA usually does.
AUTO_PRESET = {"adapter": "mlp_out"}
DEFAULT_PRESET = "qkv_mlp"


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone under a PixelClassifier and/or a peft wrapper."""
    model = getattr(model, "net", model) if not hasattr(model, "peft_config") else model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_transformers_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "model_type")


def family_of(model: nn.Module) -> Family | None:
    """The model's family: ``transformers`` ViT/DeiT/Swin by ``config.model_type``, else timm
    (whose ViT, Swin, ConvNeXt, DeiT, BEiT, EVA… share the block layout); None if unknown."""
    model = unwrap(model)
    if is_transformers_model(model):
        return _HF_FAMILIES.get(model.config.model_type)
    return _TIMM


def parts_of(targets: str) -> tuple[str, ...]:
    """The parts of a preset name or of a ``+``-joined list of parts; UserError if unknown."""
    if targets in PRESETS:
        return PRESETS[targets]
    parts = tuple(p.strip() for p in re.split(r"[+,]", targets) if p.strip())
    if parts and all(p in PARTS for p in parts):
        return parts
    raise UserError(
        f"peft.targets = {targets!r} is not a preset (use one of: auto, {', '.join(PRESETS)}, "
        f"or parts joined with '+' from {', '.join(PARTS)})"
    )


def preset_regex(model: nn.Module, targets: str) -> str:
    """The anchored full-match regex of preset ``targets`` for ``model``'s family."""
    family = family_of(model)
    if family is None:
        model_type = getattr(getattr(unwrap(model), "config", None), "model_type", "?")
        raise UserError(
            f"no target presets for transformers model_type {model_type!r} (presets exist for "
            "timm models and transformers vit/deit/swin); set peft.target_modules to a regex"
        )
    alternatives = "|".join(family.parts[p] for p in parts_of(targets))
    return rf"(.*\.)?{family.block}\.({alternatives})"


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in unwrap(model).named_modules() if n and isinstance(m, nn.Linear)]


def matching_modules(model: nn.Module, target: str | list[str]) -> list[str]:
    """Linear layers peft will adapt: a string is a full-match regex, a list matches name
    suffixes (so ``["proj"]`` also hits ``patch_embed.proj``: prefer an anchored regex)."""
    names = [
        n
        for n, m in unwrap(model).named_modules()
        if n and isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))
    ]
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as exc:
            raise UserError(
                f"peft.target_modules = {target!r} is not a valid regex ({exc})"
            ) from None
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target)]


def head_names(model: nn.Module) -> list[str]:
    """The classification head(s) that a new ``num_classes`` re-initialises."""
    model = unwrap(model)
    if is_transformers_model(model):
        return ["classifier"]
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return [n for n in names if _has_submodule(model, n)] or ["head"]


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
