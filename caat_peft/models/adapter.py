"""A bottleneck adapter after each MLP block, registered with ``peft`` as a PEFT method.

The adapter wraps the MLP's output projection (timm ``mlp.fc2``, ``transformers`` ``mlp.fc2`` /
``output.dense``) and adds a residual bottleneck on its output::

    h = fc2(x)
    h = h + s · up(dropout(act(down(h))))

``down`` reduces the width by ``reduction`` (8 by default, as in the paper), ``up`` starts at
zero, so at initialisation the model computes exactly what the backbone did. The bottleneck is
non-linear: it cannot be merged into the base weights (``merge_and_unload`` refuses).

No public library offers this for timm models (``peft`` has no bottleneck adapter and AdapterHub
supports only ``transformers`` models), so it is implemented here as a regular peft method: a
config class, a tuner layer and a tuner model, registered under ``peft_type = "CAAT_BOTTLENECK"``.
After ``import caat_peft`` (or ``caat_peft.models``), ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle it like LoRA.

peft 0.21's ``register_peft_method`` accepts only names that are members of ``peft.PeftType``, a
closed enum; :func:`register` therefore adds one member to that enum first (the only step outside
peft's public API) and then calls ``register_peft_method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

METHOD_NAME = "caat_bottleneck"  # the name given to peft.register_peft_method
PEFT_TYPE_NAME = METHOD_NAME.upper()  # what adapter_config.json stores as "peft_type"
PREFIX = "bottleneck_"  # the prefix of every adapter parameter name

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` enum (a ``str`` enum) unless it is there already.

    ``register_peft_method`` checks ``name.upper() in list(PeftType)`` and then reads
    ``PeftType.<NAME>``; configs are looked up by the string stored in ``adapter_config.json``,
    which hashes and compares equal to a ``str``-enum member of the same value.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


_add_peft_type_member(PEFT_TYPE_NAME)


@dataclass
class BottleneckAdapterConfig(PeftConfig):
    """Configuration of the bottleneck adapter (``peft_type = "CAAT_BOTTLENECK"``).

    ``target_modules`` names the Linear layers whose *output* gets an adapter: for an adapter
    after each MLP block, the MLP's output projection. ``None`` picks it for timm ViT / Swin /
    ConvNeXt and ``transformers`` ViT / Swin models (see ``caat_peft.models.targets``).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Linear layers to put an adapter after: a full-match regex or suffixes"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    reduction: int = field(default=8, metadata={"help": "width / bottleneck width"})
    bottleneck_dim: Optional[int] = field(
        default=None, metadata={"help": "bottleneck width; overrides reduction when set"}
    )
    activation: str = field(default="gelu", metadata={"help": "gelu | relu | silu | tanh"})
    scaling: float = field(default=1.0, metadata={"help": "s in h + s·up(act(down(h)))"})
    learnable_scaling: bool = field(default=False, metadata={"help": "train s (starts at scaling)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the bottleneck"})
    init_weights: bool = field(
        default=True,
        metadata={"help": "zero-initialise the up-projection (identity at init); False: random"},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained and saved in full, e.g. a new head"}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType[PEFT_TYPE_NAME]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.reduction < 1:
            raise ValueError(f"reduction = {self.reduction} must be >= 1")
        if self.bottleneck_dim is not None and self.bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim = {self.bottleneck_dim} must be >= 1")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation = {self.activation!r}: use one of {sorted(_ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout} must be in [0, 1)")


class BottleneckAdapterLayer(nn.Module, BaseTunerLayer):
    """A Linear layer followed by residual bottleneck adapters (one per adapter name)."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_scale")
    other_param_names = ("bottleneck_act", "bottleneck_dropout", "bottleneck_fixed_scale")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BottleneckAdapterConfig
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"the bottleneck adapter wraps nn.Linear layers (an MLP's output projection), "
                f"got {type(base_layer).__name__}; check target_modules"
            )
        self.base_layer = base_layer
        self.out_features = base_layer.out_features
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_scale = nn.ParameterDict()  # learnable s, when asked for
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self.bottleneck_fixed_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckAdapterConfig) -> None:
        width = self.out_features
        hidden = config.bottleneck_dim or max(1, width // config.reduction)
        self.bottleneck_down[adapter_name] = nn.Linear(width, hidden)
        self.bottleneck_up[adapter_name] = nn.Linear(hidden, width)
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.activation]()
        self.bottleneck_dropout[adapter_name] = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        if config.learnable_scaling:
            self.bottleneck_scale[adapter_name] = nn.Parameter(torch.tensor(float(config.scaling)))
        else:
            self.bottleneck_fixed_scale[adapter_name] = float(config.scaling)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, zero_up: bool = True) -> None:
        """Kaiming-uniform down-projection (nn.Linear's default); zero up-projection, so that
        the adapted model starts as the backbone."""
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        down.reset_parameters()
        if zero_up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        else:
            up.reset_parameters()

    def _scale(self, adapter_name: str) -> torch.Tensor | float:
        if adapter_name in self.bottleneck_scale:
            return self.bottleneck_scale[adapter_name]
        return self.bottleneck_fixed_scale.get(adapter_name, 1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            # peft's switch for its own layers; the fast path turns it off under autocast
            # (training/fastpath.py), where the cast is only a copy.
            cast = getattr(self, "cast_input_dtype_enabled", True)
            z = down(h.to(down.weight.dtype) if cast else h)
            z = self.bottleneck_up[name](
                self.bottleneck_dropout[name](self.bottleneck_act[name](z))
            )
            h = h + (self._scale(name) * z).to(h.dtype)
        return h

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(
            "the bottleneck adapter is non-linear and cannot be merged into the base weights; "
            "save the adapter and load it with PeftModel.from_pretrained instead"
        )

    def unmerge(self) -> None:  # nothing is ever merged
        return None

    def __repr__(self) -> str:
        return "bottleneck_adapter." + super().__repr__()


class BottleneckAdapterModel(BaseTuner):
    """The peft tuner that puts :class:`BottleneckAdapterLayer` on the targeted Linear layers."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:
            from caat_peft.models.targets import preset_regex

            peft_config.target_modules = preset_regex(self.model, "mlp_out")
        return peft_config

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, BottleneckAdapterLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckAdapterLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "the bottleneck adapter is non-linear and cannot be merged into the base weights; "
            "save the adapter and load it with PeftModel.from_pretrained instead"
        )


_registered = False


def register() -> None:
    """Register the bottleneck adapter with peft (idempotent); done on import of this module."""
    global _registered
    if _registered:
        return
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = PeftType[PEFT_TYPE_NAME]
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is BottleneckAdapterModel:
        _registered = True
        return
    register_peft_method(
        name=METHOD_NAME,
        config_cls=BottleneckAdapterConfig,
        model_cls=BottleneckAdapterModel,
        prefix=PREFIX,
    )
    _registered = True


register()
