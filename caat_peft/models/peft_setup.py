"""Which parameters train, and the artefacts a run leaves: adapters, merged models.

One generic path covers every peft method that adapts Linear layers (LoRA, IA³, LoHa, LoKr,
VeRA) and the bottleneck adapter: the method's peft config is built from ``PeftConfig``, the
targets come from an anchored-regex preset of the model family (or ``peft.target_modules``), and
the new head is a ``modules_to_save`` module, trainable in every method. ``vpt`` (visual prompt
tuning, :mod:`caat_peft.models.prompts`) and ``bitfit`` (every bias) change no layer and need no
peft wrapper: they unfreeze their own tensors and the head in place. ``head`` (linear probe) and
``full`` (full fine-tuning) are the baselines. Everything not selected is frozen, so
:func:`trainable_parameters` is exactly θ of the method.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caat_peft.config import PeftConfig
from caat_peft.errors import UserError
from caat_peft.models.targets import (
    AUTO_PRESET,
    DEFAULT_PRESET,
    family_of,
    head_names,
    matching_modules,
    preset_regex,
    unwrap,
)

LINEAR_METHODS = ("lora", "ia3", "loha", "lokr", "vera", "adapter")
MERGEABLE_METHODS = ("lora", "ia3", "loha", "lokr", "vera")


def resolve_target_modules(model: nn.Module, cfg: PeftConfig) -> str | list[str]:
    """``peft.target_modules`` when given, else the regex of preset ``peft.targets``."""
    if cfg.target_modules is not None:
        return cfg.target_modules
    preset = AUTO_PRESET.get(cfg.method, DEFAULT_PRESET) if cfg.targets == "auto" else cfg.targets
    return preset_regex(model, preset)


def peft_config_for(model: nn.Module, cfg: PeftConfig, heads: list[str]) -> Any:
    """The peft config object of ``cfg.method`` for ``model`` (targets checked, head saved)."""
    import peft

    from caat_peft.models.adapter import BottleneckAdapterConfig

    targets = resolve_target_modules(model, cfg)
    if not matching_modules(model, targets):
        where = "peft.target_modules" if cfg.target_modules is not None else "peft.targets"
        raise UserError(
            f"{where} = {cfg.target_modules if cfg.target_modules is not None else cfg.targets!r}"
            f" matches no layer of the model (peft.target_modules takes a regex over module "
            r"names such as '(.*\.)?blocks\.\d+\.(attn\.qkv|mlp\.fc1|mlp\.fc2)')"
        )
    common: dict[str, Any] = {
        "target_modules": targets,
        "modules_to_save": list(heads) if cfg.train_head else None,
    }
    method = cfg.method
    if method == "lora":
        config_cls, kwargs = peft.LoraConfig, {"r": cfg.r, "lora_alpha": cfg.alpha}
        kwargs["lora_dropout"] = cfg.dropout
    elif method in ("loha", "lokr"):
        config_cls = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
        kwargs = {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.dropout}
    elif method == "vera":
        config_cls, kwargs = peft.VeraConfig, {"r": cfg.r, "vera_dropout": cfg.dropout}
    elif method == "ia3":
        # IA³ scales the *input* of feed-forward layers (the MLP's second projection) and the
        # output of the others; peft needs to know which are which.
        config_cls, kwargs = peft.IA3Config, {"feedforward_modules": _ia3_feedforward(model)}
    elif method == "adapter":
        config_cls = BottleneckAdapterConfig
        kwargs = {
            "reduction": cfg.reduction,
            "bottleneck_dim": cfg.bottleneck_dim,
            "activation": cfg.activation,
            "scaling": cfg.scaling,
            "learnable_scaling": cfg.learnable_scaling,
            "dropout": cfg.dropout,
        }
    else:
        raise UserError(f"peft.method = {method!r} does not use peft (use one of {LINEAR_METHODS})")
    kwargs = {**common, **kwargs, **cfg.options}
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"peft.options / peft settings not accepted by {config_cls.__name__}: {exc}"
        ) from None


def _ia3_feedforward(model: nn.Module) -> str:
    if family_of(model) is None:
        return r"$^"  # matches nothing: every target scales its output
    return preset_regex(model, "fc2")


def apply_peft(model: nn.Module, cfg: PeftConfig, head_name: str | None = None) -> nn.Module:
    """Attach the PEFT method of ``cfg`` and freeze the rest; return the model to train.

    ``head_name`` (kept for callers of the first version) defaults to the model's own head(s).
    """
    heads = [head_name] if head_name else head_names(model)
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    if cfg.method == "head":
        model.requires_grad_(False)
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
        return model
    if cfg.method in ("vpt", "bitfit"):
        return _unfreeze_in_place(model, cfg, heads)
    from peft import get_peft_model

    import caat_peft.models.adapter  # noqa: F401  (registers the bottleneck adapter)

    config = peft_config_for(model, cfg, heads)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft's own checks of the config against the model
        raise UserError(f"peft.method = {cfg.method}: {str(exc).splitlines()[0][:200]}") from None


def bias_names(model: nn.Module) -> list[str]:
    """Every bias of ``model`` (BitFit's θ): parameters named ``bias`` or ``*_bias`` (BEiT-style
    ``q_bias``), not tables such as Swin's ``relative_position_bias_table``."""
    names = []
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or leaf.endswith("_bias"):
            names.append(name)
    return names


def _unfreeze_in_place(model: nn.Module, cfg: PeftConfig, heads: list[str]) -> nn.Module:
    """VPT (prompts attached, then trainable) or BitFit (every bias), plus the head when
    ``peft.train_head``; everything else frozen. The head's own bias follows ``train_head``."""
    from caat_peft.models.prompts import attach_prompts

    if cfg.method == "vpt":
        chosen = attach_prompts(model, cfg.prompt_length, cfg.prompt_depth, cfg.dropout)
    else:
        chosen = bias_names(model)
    head_params = {f"{h}.{n}" for h in heads for n, _ in model.get_submodule(h).named_parameters()}
    chosen = [n for n in chosen if n not in head_params]
    if not chosen:
        raise UserError(
            "peft.method = bitfit: the model has no bias parameters (choose another peft.method)"
        )
    model.requires_grad_(False)
    named = dict(model.named_parameters())
    for name in chosen + (sorted(head_params) if cfg.train_head else []):
        named[name].requires_grad_(True)
    return model


@torch.no_grad()
def set_head(backbone: nn.Module, head_state: dict[str, torch.Tensor]) -> None:
    """Copy ``head_state`` (a head-only run's ``trainable.safetensors``) into the head(s) of a
    plain backbone, before a PEFT method wraps it: every head tensor, nothing else."""
    own = dict(backbone.named_parameters())
    expected = {
        f"{h}.{n}"
        for h in head_names(backbone)
        for n, _ in backbone.get_submodule(h).named_parameters()
    }
    if set(head_state) != expected or any(own[k].shape != v.shape for k, v in head_state.items()):
        shapes = {k: tuple(v.shape) for k, v in head_state.items()}
        raise UserError(
            f"the initial head {shapes} does not fit this model's head {sorted(expected)}; "
            "was train.init_head's first stage run with another model or data?"
        )
    for name, value in head_state.items():
        own[name].copy_(value)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires a gradient, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class TrainableSummary:
    """What trains: parameter names, their count, and their share of all parameters."""

    names: list[str]
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.share:.3f}%) in {len(self.names)} tensors"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Names, count and share of the trainable parameters (PEFT modules + head)."""
    named = trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    return TrainableSummary([n for n, _ in named], sum(p.numel() for _, p in named), total)


# --------------------------------------------------------------------------------------------
# Artefacts


def _net(model: nn.Module) -> nn.Module:
    """The network inside a PixelClassifier (or ``model`` itself)."""
    from caat_peft.models.wrapper import PixelClassifier

    return model.net if isinstance(model, PixelClassifier) else model


def save_trainable(net: nn.Module, directory: str | Path) -> None:
    """Save what was trained: a peft adapter (``save_pretrained``) or the trainable tensors.

    A peft adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (the PEFT
    modules and the new head only: megabytes); it loads with ``PeftModel.from_pretrained``.
    """
    net = _net(net)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(net, "save_pretrained") and hasattr(net, "peft_config"):
        net.save_pretrained(str(directory))
        return
    from safetensors.torch import save_file

    from caat_peft.models.prompts import has_prompts, write_prompt_config

    tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(net)}
    save_file(tensors, str(directory / "trainable.safetensors"))
    if has_prompts(net):  # the prompts are no layer of the backbone: say how to attach them
        write_prompt_config(net, directory)


save_adapter = save_trainable


def load_adapter(base: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
    """``base`` with the trained modules of ``directory`` (a run's ``adapter/``) attached.

    A peft folder goes through ``PeftModel.from_pretrained`` (any registered method, the
    bottleneck adapter included); ``trainable.safetensors`` (head / full / bitfit / vpt runs) is
    loaded in place, after the prompts of ``vpt_config.json`` (a VPT run) are attached.
    """
    directory = Path(directory)
    base = _net(base)
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        import caat_peft.models.adapter  # noqa: F401  (registers the bottleneck adapter)

        _check_adapter_config_fields(directory / "adapter_config.json")
        try:
            net = PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
            _check_adapter_keys(net, directory)
        except UserError:
            raise
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"{directory}: adapter does not fit the model ({str(exc).splitlines()[0][:160]}); "
                "was it trained with another model.name?"
            ) from None
        except Exception as exc:  # pickled code, truncated safetensors: refuse, never crash
            weights = sorted(p.name for p in directory.glob("adapter_model.*")) or ["weights"]
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise UserError(
                f"{directory / weights[0]}: unreadable adapter weights ({type(exc).__name__}: "
                f"{reason}); save the adapter again as safetensors"
            ) from None
        return net
    if (directory / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(directory / "trainable.safetensors"))
        prompts = _attach_saved_prompts(base, directory)
        own = base.state_dict()
        wrong = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
        wrong += [k for k in prompts if k not in tensors]  # prompts left at their random init
        if wrong:
            raise UserError(
                f"{directory}: tensors do not fit the model ({wrong[:5]}); "
                "was it trained with another model.name?"
            )
        base.load_state_dict(tensors, strict=False)
        return base
    raise UserError(
        f"{directory}: no adapter_config.json or trainable.safetensors "
        "(point --adapter at a run's adapter/ folder)"
    )


def _attach_saved_prompts(base: nn.Module, directory: Path) -> list[str]:
    """Attach the prompts a VPT folder describes (none for other folders); their names."""
    from caat_peft.models.prompts import CONFIG_FILE, attach_prompts, read_prompt_config

    if not (directory / CONFIG_FILE).is_file():
        return []
    spec = read_prompt_config(directory)
    return attach_prompts(base, spec["prompt_length"], spec["prompt_depth"], spec["dropout"])


def _check_adapter_config_fields(path: Path) -> None:
    """peft ignores unknown fields of adapter_config.json with a warning, so a tampered or
    foreign config would load as something else than what was saved: refuse it instead."""
    import dataclasses
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable adapter config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object (save the adapter again)")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import caat_peft.models.adapter  # noqa: F401  (registers the bottleneck adapter)

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(data.get("peft_type")))
    if config_cls is None:
        raise UserError(
            f"{path}: unknown adapter peft_type {data.get('peft_type')!r} (not a peft method "
            "that caat-peft knows)"
        )
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"{path}: unknown adapter config fields {unknown} for {data['peft_type']}; refusing "
            "a config that would not load as saved"
        )


def _check_adapter_keys(net: nn.Module, directory: Path) -> None:
    """peft loads adapter files with ``strict=False``: an adapter saved for another architecture
    would leave the PEFT modules at their initialisation without a word. Compare the keys."""
    from peft.utils import get_peft_model_state_dict

    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        saved = set(fh.keys())
    expected = set(get_peft_model_state_dict(net))
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise UserError(
            f"{directory}: adapter does not fit the model ({len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}); was it trained "
            "with another model.name or model.kwargs?"
        )


def unwrap_base(net: nn.Module) -> nn.Module:
    """The plain backbone under a peft wrapper (or ``net`` itself)."""
    return unwrap(_net(net))


def _peft_types(net: nn.Module) -> list[str]:
    configs = getattr(net, "peft_config", {}) or {}
    return [getattr(getattr(c, "peft_type", None), "value", "") for c in configs.values()]


def merged_net(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with LoRA-like modules merged into the base weights and the head
    unwrapped: the plain backbone architecture. The bottleneck adapter cannot be merged."""
    from caat_peft.models.adapter import PEFT_TYPE_NAME
    from caat_peft.models.prompts import has_prompts

    net = _net(net)
    if has_prompts(net):
        raise UserError(
            "visual prompts are extra tokens, not weights: a vpt model cannot be merged into the "
            "backbone; keep its adapter folder (load_adapter attaches the prompts again)"
        )
    if not hasattr(net, "merge_and_unload"):
        return copy.deepcopy(net)
    if PEFT_TYPE_NAME in _peft_types(net):
        raise UserError(
            "the bottleneck adapter is non-linear and cannot be merged into the backbone; "
            "keep the adapter folder and load it with PeftModel.from_pretrained"
        )
    return copy.deepcopy(net).merge_and_unload()


@torch.no_grad()
def merged_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """A plain backbone state dict with LoRA-like modules merged in (the format robust
    checkpoints come in)."""
    merged = merged_net(net)
    return {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}


def export_merged(model: nn.Module, path: str | Path) -> Path:
    """Write the merged model as a safetensors state dict that timm (or transformers) loads.

    The file's metadata records the preprocessing of a PixelClassifier (JSON values of mean, std,
    input_size, interpolation, crop_pct), so the export carries what is needed to feed it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: export_merged writes safetensors; name it *.safetensors")
    state = merged_state_dict(model)
    # Tied / shared tensors (e.g. none in timm ViTs) must be distinct for safetensors.
    state = {k: v.clone() for k, v in state.items()}
    metadata = {"format": "pt"}
    info = getattr(model, "info", {}) or {}
    pre = info.get("preprocessing")
    if pre:
        metadata.update({k: json.dumps(v) for k, v in pre.items() if k in _METADATA_KEYS})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


_METADATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
