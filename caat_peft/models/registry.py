"""Named robust checkpoints: architecture, preprocessing, threat model and where they come from.

A registry entry is chosen with ``model.name`` (e.g. ``ares_swin_base``, or RobustBench's own id
``Liu2023Comprehensive_Swin-B``); it fixes the timm architecture and the preprocessing the
checkpoint was trained with. The weights are the user's file (``model.checkpoint``), or, for
entries with a direct URL, a download when ``model.pretrained: true`` and the network is there.

Sources of every fact (see docs/models.md for the table):

- ARES 2.0 (thu-ml/ares): ``ares/model/imagenet_model_zoo.py`` (timm name, mean/std of the
  ``*_at`` entries: ImageNet mean/std for all of them, ViTs included),
  ``ares/model/imagenet_cls.py`` (files are raw timm state dicts loaded with
  ``load_state_dict``), ``robust_training/train_configs/*.yaml`` (224 px, crop_pct 0.875,
  bicubic), ``robust_training/README.md`` (L∞, ε = 4/255; download URLs).
- RobustBench: ``robustbench/model_zoo/imagenet.py`` (architectures, ``normalize_model`` with
  ImageNet mean/std, preprocessing ``BicubicRes256Crop224`` = bicubic resize to 256, centre
  crop 224), ``robustbench/model_zoo/architectures/convstem_models.py`` (ConvStem models; only
  the ViT-S one is wrapped in ``normalize_model``), ``robustbench/utils.py`` (``module.`` /
  ``model.`` prefixes, ``normalize.*`` buffers, timm's Swin ``checkpoint_filter_fn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from caat_peft.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
LINF_4 = "ImageNet L∞, ε = 4/255"

_ARES_URL = "https://ml.cs.tsinghua.edu.cn/~xiaoyang/aresbench/ckpt-imagenet/"
_ARES_PAGE = "https://github.com/thu-ml/ares/tree/main/robust_training"
_RB_PAGE = "https://github.com/RobustBench/robustbench (model_zoo/imagenet.py, Linf)"
_GDRIVE = "https://drive.google.com/uc?id="


@dataclass(frozen=True)
class BackboneSpec:
    """A robust checkpoint the toolkit knows: how to build it and how to feed it."""

    name: str  # registry key, used as model.name
    arch: str  # timm model name
    source: str  # who published it
    threat_model: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    checkpoint_format: str = "raw timm state dict"
    url: str | None = None  # a direct download, when the publisher gives one
    page: str = ""  # where a person gets the file
    stem: str | None = None  # a key of convstem.STEMS, for ConvStem models
    stem_kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def preprocessing(self) -> dict[str, Any]:
        """A timm-style data config (what ``timm.data.resolve_data_config`` returns)."""
        return {
            "input_size": (3, self.input_size, self.input_size),
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
        }


REGISTRY: dict[str, BackboneSpec] = {}
_ALIASES: dict[str, str] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` under its name and aliases (case-insensitive); names must be unique."""
    for key in (spec.name, *spec.aliases):
        folded = key.lower()
        if folded in _ALIASES and _ALIASES[folded] != spec.name:
            raise ValueError(f"backbone name {key!r} is already registered")
        _ALIASES[folded] = spec.name
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec | None:
    """The entry for ``name`` or one of its aliases (case-insensitive), else None."""
    key = _ALIASES.get(name.lower())
    return REGISTRY[key] if key is not None else None


def list_backbones() -> list[BackboneSpec]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


def require_spec(name: str) -> BackboneSpec:
    spec = get_spec(name)
    if spec is None:
        known = ", ".join(sorted(REGISTRY))
        raise UserError(f"model.name = {name!r} is not a registry entry (known: {known})")
    return spec


# --------------------------------------------------------------------------------------------
# ARES 2.0: adversarially trained with timm, raw timm state dicts.

_ARES = [
    ("swin_small", "swin_small_patch4_window7_224", "ARES_Swin_small_patch4_window7_224_AT.pth"),
    ("swin_base", "swin_base_patch4_window7_224", "ARES_Swin_base_patch4_window7_224_AT.pth"),
    ("swin_large", "swin_large_patch4_window7_224", "ARES_Swin_large_patch4_window7_224_AT.pth"),
    ("vit_small", "vit_small_patch16_224", "ARES_ViT_small_patch16_224_AT.pth"),
    ("vit_base", "vit_base_patch16_224", "ARES_ViT_base_patch16_224_AT.pth"),
    ("convnext_small", "convnext_small", "ARES_ConvNext_Small_AT.pth"),
    ("convnext_base", "convnext_base", "ARES_ConvNext_Base_AT.pth"),
    ("convnext_large", "convnext_large", "ARES_ConvNext_Large_AT.pth"),
]
for _short, _arch, _file in _ARES:
    register_backbone(
        BackboneSpec(
            name=f"ares_{_short}",
            arch=_arch,
            source="ARES 2.0 (thu-ml/ares), Liu et al. 2023",
            threat_model=LINF_4,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            url=_ARES_URL + _file,
            page=_ARES_PAGE,
            aliases=(_file.removesuffix(".pth"),),
            notes=(
                "ImageNet mean/std although timm's ViT default is 0.5/0.5"
                if _short.startswith("vit")
                else ""
            ),
        )
    )

# --------------------------------------------------------------------------------------------
# RobustBench ImageNet L∞ (ε = 4/255) transformer / ConvNeXt entries.

_RB_FORMAT = "RobustBench: 'state_dict' container, 'module.'/'model.' prefixes, 'normalize.*'"
_LIU = [
    ("swin_base", "Swin-B", "swin_base_patch4_window7_224", "1-4mtxQCkThJUVdS3wvQ6NnmMZuySqR3c"),
    ("swin_large", "Swin-L", "swin_large_patch4_window7_224", "1-57sQfcrsDsslfDR18nRD7FnpQmsSBk7"),
    ("convnext_base", "ConvNeXt-B", "convnext_base", "10-nSm-qUftvfKXHeOAakBQl8rxm-jCbk"),
    ("convnext_large", "ConvNeXt-L", "convnext_large", "1dIPLNfdQtAnqZrKPyuy3_zDI-FVgJ2FH"),
]
for _short, _rb, _arch, _gid in _LIU:
    register_backbone(
        BackboneSpec(
            name=f"rb_liu2023_{_short}",
            arch=_arch,
            source="RobustBench Liu2023Comprehensive (the ARES 2.0 models)",
            threat_model=LINF_4,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            checkpoint_format=_RB_FORMAT,
            page=f"{_RB_PAGE}; file {_GDRIVE}{_gid}",
            aliases=(f"Liu2023Comprehensive_{_rb}",),
        )
    )

_SINGH = [
    # (short, RobustBench id, timm arch, stem, stem kwargs, normalised?, gdrive id)
    ("vit_small_convstem", "ViT-S-ConvStem", "deit_small_patch16_224", "vit_convstem",
     {"planes": 48}, True, "1-1sUYXnj6bDXacIKI3KKqn4rlkmL-ZI2"),
    ("vit_base_convstem", "ViT-B-ConvStem", "vit_base_patch16_224", "vit_convstem",
     {"planes": 48}, False, "1-JBbfi_eH3tKMXObvPPHprrZae0RiQGT"),
    ("convnext_tiny_convstem", "ConvNeXt-T-ConvStem", "convnext_tiny", "convnext_convstem",
     {"planes": 48, "depth": 2}, False, "1-FjtOF6LJ3-bf4VezsmWwncCxYSx-USP"),
    ("convnext_small_convstem", "ConvNeXt-S-ConvStem", "convnext_small", "convnext_convstem",
     {"planes": 48, "depth": 2}, False, "1-ZrMYajCCnrtV4oT0wa3qJJoQy1nUSnL"),
    ("convnext_base_convstem", "ConvNeXt-B-ConvStem", "convnext_base", "convnext_convstem",
     {"planes": 64, "depth": 3}, False, "1-lE-waaVvfL7lgBrydmZIM9UJimmHnVe"),
    ("convnext_large_convstem", "ConvNeXt-L-ConvStem", "convnext_large", "convnext_convstem",
     {"planes": 96, "depth": 3}, False, "10-YOVdM2EQjHemSi9x2H44qKRSOXVQmh"),
]  # fmt: skip
for _short, _rb, _arch, _stem, _kw, _normalised, _gid in _SINGH:
    _mean, _std = (IMAGENET_MEAN, IMAGENET_STD) if _normalised else NO_NORMALISATION
    register_backbone(
        BackboneSpec(
            name=f"rb_singh2023_{_short}",
            arch=_arch,
            source="RobustBench Singh2023Revisiting (Singh, Croce & Hein 2023)",
            threat_model=LINF_4,
            mean=_mean,
            std=_std,
            checkpoint_format=_RB_FORMAT,
            page=f"{_RB_PAGE}; file {_GDRIVE}{_gid}",
            stem=_stem,
            stem_kwargs=_kw,
            aliases=(f"Singh2023Revisiting_{_rb}",),
            notes="" if _normalised else "no input normalisation: the model sees pixels in [0, 1]",
        )
    )
