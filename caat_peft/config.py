"""Typed run configuration: dataclasses, YAML loading, ``--set a.b=c`` overrides, validation.

A config is a tree of small dataclasses, one per section of the YAML file. Loading is strict:
unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with one line that
names the key and what is allowed, so that the CLI can exit with code 2 before anything is written.
Fractions such as ``8/255`` are accepted wherever a float is expected (ε is usually written so).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from caat_peft.errors import UserError


class ConfigError(UserError):
    """A configuration value the user can fix."""


# LoRA targets for timm ViT / Swin blocks (the `qkv_mlp` preset of caat_peft.models.targets,
# which peft.targets: auto now resolves per model family). An anchored regex (peft full-matches a
# string) rather than a list of suffixes: the suffix "proj" would also hit ``patch_embed.proj``.
DEFAULT_TARGET_MODULES = r"(.*\.)?blocks\.\d+\.(attn\.qkv|mlp\.fc1|mlp\.fc2)"


@dataclass
class ModelConfig:
    # a registry entry (ares_swin_base, Liu2023Comprehensive_Swin-B, …), a timm model name, or
    # hf:<repo id | folder | vit | swin> for transformers models; see docs/models.md
    name: str = "vit_tiny_patch16_224"
    # weights: a file (safetensors or a plain / RobustBench state dict), a timm or HF model
    # folder, or an http(s) URL (downloaded into the cache once)
    checkpoint: str | None = None
    pretrained: bool = False  # timm / HF hub weights, or a registry entry's URL (needs network)
    num_classes: int | None = None  # None: taken from the data set
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # random initialisation of a timm ViT / Swin built from config: auto = jax where no weights
    # are loaded (timm's fixed std 0.02 is far below 1/sqrt(width) on narrow models: their
    # class token reads an input-independent mix and short runs sit at chance; docs/models.md),
    # timm = the architecture's own default; jax = timm's weight_init='jax' (Xavier, zero head)
    init: str = "auto"
    mean: list[float] | None = None  # None: the checkpoint's / architecture's own preprocessing
    std: list[float] | None = None


@dataclass
class PeftConfig:
    method: str = "lora"  # lora | ia3 | loha | lokr | vera | adapter | vpt | bitfit | head | full
    # which layers: a preset (auto, qkv, attn, mlp, mlp_out, qkv_mlp, attn_mlp) or parts joined
    # with '+' (qkv+fc2); auto = mlp_out for the adapter, qkv_mlp otherwise
    targets: str = "auto"
    target_modules: str | list[str] | None = None  # explicit override: an anchored regex
    r: int = 8  # lora / loha / lokr / vera rank
    alpha: float = 16.0  # lora / loha / lokr scaling numerator
    dropout: float = 0.0  # lora_dropout, loha / lokr rank_dropout, vera_dropout, adapter dropout
    reduction: int = 8  # adapter: width / bottleneck width
    bottleneck_dim: int | None = None  # adapter: bottleneck width (overrides reduction)
    activation: str = "gelu"  # adapter: gelu | relu | silu | tanh
    scaling: float = 1.0  # adapter: s in h + s·up(act(down(h)))
    learnable_scaling: bool = False  # adapter: train s
    prompt_length: int = 10  # vpt: prompt tokens per prompted block
    # vpt: shallow = prompts inserted before the first block only; deep = a fresh set replaces
    # the previous block's prompt tokens at every block (Swin: deep only)
    prompt_depth: str = "deep"
    options: dict[str, Any] = field(default_factory=dict)  # extra peft config arguments
    train_head: bool = True  # a new classification head is always trainable by default


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cub | dogs | folder | hf
    root: str | None = None  # data folder (for hf: the cache folder)
    hub_id: str | None = None  # hf: the data set id on the Hugging Face hub
    classes: list[int] | None = None  # digits: which digits to keep (relabelled 0..n-1)
    image_size: int | None = None  # None: the model's input size
    test_fraction: float = 0.3  # digits only: the held-out part of the bundled data
    val_fraction: float = 0.0  # carved from train (seeded, stratified) for model selection
    split_seed: int = 0  # the validation split's seed, independent of the training seed
    bbox_crop: bool = False  # cub: crop to the bounding box
    random_resized_crop: bool = False  # train augmentation: RRC instead of resize+crop+flip
    bad_files: str = "error"  # error | skip (skip, count and report unreadable entries)
    num_workers: int = 0


@dataclass
class AttackConfig:
    kind: str = "pgd"  # pgd | fgsm (objective.kind = trades runs its own KL attack, PGD-style)
    norm: str = "linf"  # linf | l2
    eps: float = 8 / 255
    alpha: float = 2 / 255  # pgd / trades step size
    steps: int = 10  # pgd / trades steps
    random_start: bool = True
    eval_mode: bool = True  # run the attack with the model in eval mode
    fgsm_alpha: float | None = None  # fgsm step size; None: 1.25·eps (Wong et al., 2020)


@dataclass
class ObjectiveConfig:
    kind: str = "pgd-ce"  # pgd-ce | trades | mart | clp | alp (docs/method.md, "Objectives")
    # mart: weight of its KL term; None: 1.0, the CA-AT authors' (Wang et al. use 6.0)
    beta: float | None = None
    pairing_weight: float | None = None  # alp: weight of the logit-pairing term; None: 0.5


@dataclass
class CombinerConfig:
    kind: str = "caat"  # vanilla | caat
    lam: float = 0.5  # vanilla: weight of the adversarial gradient, in [0, 1]
    gamma: float = 0.8  # caat: cosine threshold, in (-1, 1]
    granularity: str = "global"  # global | tensor
    normalize: bool = False  # scale both whole gradients to unit norm first (the authors')


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # the global batch, over all processes
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only: Nesterov momentum (the CA-AT authors' optimiser)
    grad_clip: float | None = None  # max global norm of the combined update
    schedule: str = "constant"  # constant | cosine (after the linear warm-up) | onecycle
    warmup_epochs: float = 0.0
    grad_accum_steps: int = 1  # micro-batches per optimiser step (g_c, g_a accumulated apart)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for attack and losses)
    compile: bool = False  # torch.compile the model (the first steps pay the compilation)
    ema_decay: float | None = None  # EMA of the trainable parameters (evaluated and saved)
    early_stop_patience: int | None = None  # epochs without a better val robust accuracy
    max_nonfinite_steps: int = 20  # consecutive skipped (NaN/Inf) steps before the run stops
    save_every: int = 0  # steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    seed: int = 0
    log_every: int = 1  # steps between metrics.jsonl rows
    log_with: list[str] = field(default_factory=list)  # accelerate trackers, e.g. [tensorboard]
    layer_conflict_every: int = 0  # steps between per-tensor cos(g_a, g_c) rows; 0: never
    plots: bool = True  # conflict.png (φ, μ, λ* over training) at the end
    # robust linear initialisation: first train the head alone adversarially (same attack,
    # objective and combiner) in RUN/head_init/, then start peft.method from that head
    init_head: str = "none"  # none | robust-linear-probe
    init_head_epochs: int = 5  # epochs of that first stage
    init_head_lr: float | None = None  # its learning rate; None: train.lr


@dataclass
class EvalConfig:
    steps: int = 20  # PGD steps of the end-of-epoch robust accuracy
    eps: float | None = None  # None: the training attack's ε
    alpha: float | None = None  # None: ε / 4
    batch_size: int = 128
    every: int = 1  # evaluate every N epochs (the last epoch always); 0: only at the end
    limit: int | None = None  # a class-stratified subset of N held-out images (fixed seed)
    select_steps: int = 10  # PGD steps of the per-epoch validation robust accuracy (selection)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks


_FRACTION = re.compile(r"^\s*([-+]?[0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def _parse_number(text: str) -> float | None:
    """'1e-3' (which YAML 1.1 reads as a string) or a fraction such as '8/255'; else None."""
    try:
        return float(text)
    except ValueError:
        pass
    match = _FRACTION.match(text)
    if match is None:
        return None
    try:
        return float(match.group(1)) / float(match.group(2))
    except (ValueError, ZeroDivisionError):
        return None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
        tp.__name__, tp.__name__
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and (number := _parse_number(value)) is not None:
            pass
        else:
            raise ConfigError(f"{key}: expected a number such as 0.03 or 8/255, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug, not a user error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{where}' (allowed: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Validation of ranges and choices


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key} = {value!r} is not allowed (use one of: {', '.join(allowed)})")


def validate(cfg: Config) -> Config:
    """Check ranges and choices; return ``cfg`` unchanged or raise ConfigError."""
    _one_of(
        "peft.method",
        cfg.peft.method,
        ("lora", "ia3", "loha", "lokr", "vera", "adapter", "vpt", "bitfit", "head", "full"),
    )
    _check(
        cfg.peft.prompt_length >= 1,
        f"peft.prompt_length = {cfg.peft.prompt_length} must be a positive integer",
    )
    _one_of("peft.prompt_depth", cfg.peft.prompt_depth, ("shallow", "deep"))
    _check(cfg.peft.r >= 1, f"peft.r = {cfg.peft.r} must be a positive integer")
    _check(cfg.peft.alpha > 0, f"peft.alpha = {cfg.peft.alpha} must be > 0")
    _check(0 <= cfg.peft.dropout < 1, f"peft.dropout = {cfg.peft.dropout} must be in [0, 1)")
    _check(cfg.peft.reduction >= 1, f"peft.reduction = {cfg.peft.reduction} must be >= 1")
    _check(
        cfg.peft.bottleneck_dim is None or cfg.peft.bottleneck_dim >= 1,
        f"peft.bottleneck_dim = {cfg.peft.bottleneck_dim} must be >= 1 (or null)",
    )
    _one_of("peft.activation", cfg.peft.activation, ("gelu", "relu", "silu", "tanh"))
    _one_of("model.init", cfg.model.init, ("auto", "timm", "jax"))
    _check(
        cfg.model.init == "auto" or "weight_init" not in cfg.model.kwargs,
        f"model.init = {cfg.model.init} and model.kwargs.weight_init both set the "
        "initialisation (keep one)",
    )
    _check(
        cfg.model.num_classes is None or cfg.model.num_classes >= 2,
        f"model.num_classes = {cfg.model.num_classes} must be at least 2",
    )
    for key, stats in (("model.mean", cfg.model.mean), ("model.std", cfg.model.std)):
        _check(stats is None or len(stats) == 3, f"{key} must list 3 values (R, G, B)")
    _check(
        cfg.model.std is None or all(s > 0 for s in cfg.model.std), "model.std values must be > 0"
    )

    _one_of("data.name", cfg.data.name, ("digits", "cub", "dogs", "folder", "hf"))
    if cfg.data.name in ("cub", "dogs", "folder"):
        _check(
            cfg.data.root is not None,
            f"data.root is required for data.name = {cfg.data.name} (the extracted data folder)",
        )
    if cfg.data.name == "hf":
        _check(cfg.data.hub_id is not None, "data.hub_id is required for data.name = hf")
    _check(
        0 <= cfg.data.val_fraction < 1,
        f"data.val_fraction = {cfg.data.val_fraction} must be in [0, 1)",
    )
    _one_of("data.bad_files", cfg.data.bad_files, ("error", "skip"))
    _check(
        cfg.data.image_size is None or cfg.data.image_size >= 4,
        f"data.image_size = {cfg.data.image_size} must be at least 4",
    )
    _check(
        0 < cfg.data.test_fraction < 1,
        f"data.test_fraction = {cfg.data.test_fraction} must be in (0, 1)",
    )
    _check(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    if cfg.data.name == "digits" and cfg.data.classes is not None:
        _check(
            len(cfg.data.classes) >= 2
            and len(set(cfg.data.classes)) == len(cfg.data.classes)
            and all(0 <= c <= 9 for c in cfg.data.classes),
            f"data.classes = {cfg.data.classes} must list at least 2 distinct digits in 0..9",
        )

    _one_of("attack.kind", cfg.attack.kind, ("pgd", "fgsm"))
    _one_of("attack.norm", cfg.attack.norm, ("linf", "l2"))
    _check(cfg.attack.eps >= 0, f"attack.eps = {cfg.attack.eps} must be >= 0")
    _check(cfg.attack.alpha >= 0, f"attack.alpha = {cfg.attack.alpha} must be >= 0")
    _check(cfg.attack.steps >= 0, f"attack.steps = {cfg.attack.steps} must be >= 0")
    _check(
        cfg.attack.fgsm_alpha is None or cfg.attack.fgsm_alpha >= 0,
        f"attack.fgsm_alpha = {cfg.attack.fgsm_alpha} must be >= 0 (or null for 1.25·eps)",
    )

    obj = cfg.objective
    _one_of("objective.kind", obj.kind, ("pgd-ce", "trades", "mart", "clp", "alp"))
    _check(
        not (obj.kind == "trades" and cfg.attack.kind == "fgsm"),
        "attack.kind = fgsm does not apply to objective.kind = trades, which runs its own KL "
        "attack with attack.steps and attack.alpha (set attack.kind = pgd)",
    )
    _check(
        obj.beta is None or obj.kind == "mart",
        f"objective.beta is used by objective.kind = mart only (remove it; for {obj.kind} the "
        "combiner weighs L_clean against L_adv: vanilla combiner.lam = β/(1+β) is TRADES' β)",
    )
    _check(obj.beta is None or obj.beta >= 0, f"objective.beta = {obj.beta} must be >= 0")
    _check(
        obj.pairing_weight is None or obj.kind == "alp",
        f"objective.pairing_weight is used by objective.kind = alp only (remove it for "
        f"{obj.kind}; the authors' clp has no weight of its own)",
    )
    _check(
        obj.pairing_weight is None or obj.pairing_weight >= 0,
        f"objective.pairing_weight = {obj.pairing_weight} must be >= 0",
    )

    _one_of("combiner.kind", cfg.combiner.kind, ("vanilla", "caat"))
    _check(0 <= cfg.combiner.lam <= 1, f"combiner.lam = {cfg.combiner.lam} must be in [0, 1]")
    _check(
        -1 < cfg.combiner.gamma <= 1, f"combiner.gamma = {cfg.combiner.gamma} must be in (-1, 1]"
    )
    _one_of("combiner.granularity", cfg.combiner.granularity, ("global", "tensor"))

    _check(cfg.train.epochs >= 1, f"train.epochs = {cfg.train.epochs} must be >= 1")
    _check(cfg.train.batch_size >= 1, f"train.batch_size = {cfg.train.batch_size} must be >= 1")
    _check(cfg.train.lr > 0, f"train.lr = {cfg.train.lr} must be > 0")
    _check(cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0")
    _one_of("train.optimizer", cfg.train.optimizer, ("adamw", "sgd"))
    _check(0 <= cfg.train.momentum < 1, "train.momentum must be in [0, 1)")
    _check(
        not cfg.train.nesterov or (cfg.train.optimizer == "sgd" and cfg.train.momentum > 0),
        "train.nesterov = true needs train.optimizer = sgd and train.momentum > 0",
    )
    _check(
        cfg.train.grad_clip is None or cfg.train.grad_clip > 0,
        "train.grad_clip must be > 0 (or null for no clipping)",
    )
    _one_of("train.schedule", cfg.train.schedule, ("constant", "cosine", "onecycle"))
    _check(
        0 <= cfg.train.warmup_epochs <= cfg.train.epochs,
        f"train.warmup_epochs = {cfg.train.warmup_epochs} must be in [0, train.epochs]",
    )
    _check(cfg.train.log_every >= 1, "train.log_every must be >= 1")
    _check(cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
    _check(
        cfg.train.batch_size % cfg.train.grad_accum_steps == 0,
        f"train.batch_size = {cfg.train.batch_size} must be divisible by "
        f"train.grad_accum_steps = {cfg.train.grad_accum_steps}",
    )
    _one_of("train.precision", cfg.train.precision, ("fp32", "bf16", "fp16"))
    _check(
        cfg.train.ema_decay is None or 0 < cfg.train.ema_decay < 1,
        f"train.ema_decay = {cfg.train.ema_decay} must be in (0, 1) (or null for no EMA)",
    )
    _check(
        cfg.train.early_stop_patience is None or cfg.train.early_stop_patience >= 1,
        "train.early_stop_patience must be >= 1 (or null)",
    )
    _check(cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
    _check(cfg.train.save_every >= 0, "train.save_every must be >= 0 (0: no checkpoints)")
    _check(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    _check(cfg.train.layer_conflict_every >= 0, "train.layer_conflict_every must be >= 0")
    _one_of("train.init_head", cfg.train.init_head, ("none", "robust-linear-probe"))
    _check(
        cfg.train.init_head_epochs >= 1,
        f"train.init_head_epochs = {cfg.train.init_head_epochs} must be >= 1",
    )
    _check(
        cfg.train.init_head_lr is None or cfg.train.init_head_lr > 0,
        f"train.init_head_lr = {cfg.train.init_head_lr} must be > 0 (or null for train.lr)",
    )
    _check(
        cfg.train.init_head == "none" or cfg.peft.train_head,
        "train.init_head = robust-linear-probe needs peft.train_head = true (a frozen head "
        "would not be saved with the run; set peft.train_head=true or train.init_head=none)",
    )
    for tracker in cfg.train.log_with:
        _one_of("train.log_with", tracker, ("tensorboard", "wandb", "mlflow", "comet_ml", "aim"))

    _check(cfg.eval.steps >= 0, f"eval.steps = {cfg.eval.steps} must be >= 0")
    _check(cfg.eval.eps is None or cfg.eval.eps >= 0, f"eval.eps = {cfg.eval.eps} must be >= 0")
    _check(
        cfg.eval.alpha is None or cfg.eval.alpha >= 0, f"eval.alpha = {cfg.eval.alpha} must be >= 0"
    )
    _check(cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1")
    _check(cfg.eval.every >= 0, "eval.every must be >= 0")
    _check(cfg.eval.limit is None or cfg.eval.limit >= 1, "eval.limit must be >= 1 (or null)")
    _check(cfg.eval.select_steps >= 0, "eval.select_steps must be >= 0")
    return cfg


# --------------------------------------------------------------------------------------------
# Public entry points


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    return validate(_build(Config, data, ""))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to nested plain data."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example train.lr=1e-3")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: the key must look like section.key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe as nested dicts, with its ``base:`` (a recipe it extends, its path relative
    to this file) merged underneath: a variant states only what it changes."""
    if not path.is_file():
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where} (pass the path of a YAML recipe)")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} (fix the syntax)") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = dict(loaded or {})
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base = {base!r} must be the path of a recipe (a string)")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise ConfigError(f"{path}: base = {base!r} extends itself in a cycle (remove one base)")
    return _merge(_read_recipe(base_path, (*chain, path.resolve())), data)


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``under``: sections merge key by key, any other value is replaced."""
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (or the defaults when ``path`` is None) and apply overrides."""
    data = _read_recipe(Path(path)) if path is not None else {}
    return from_dict(apply_overrides(data, list(overrides)))


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run directory's saved ``config.yaml``, read as the run was made.

    Defaults that changed are pinned to what an older run used, so that evaluation rebuilds the
    same model and a resume or a front names the difference instead of silently mixing two
    settings: runs saved before ``model.init`` existed built their random weights with timm's
    init; runs saved before ``train.nesterov`` existed trained ``mart`` with β = 6 and called
    Kannan et al.'s logit pairing ``clp`` (now ``alp``).
    """
    cfg = load_config(path, overrides)
    saved = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(saved, dict):
        return cfg
    overridden = lambda key: any(o.strip().startswith(f"{key}=") for o in overrides)  # noqa: E731
    model, train, objective = (saved.get(k) or {} for k in ("model", "train", "objective"))
    if isinstance(model, dict) and model and "init" not in model and not overridden("model.init"):
        cfg.model.init = "timm"
    if isinstance(train, dict) and train and "nesterov" not in train:
        kind = objective.get("kind") if isinstance(objective, dict) else None
        if kind == "mart" and objective.get("beta") is None and not overridden("objective.beta"):
            cfg.objective.beta = 6.0
        if kind == "clp" and not overridden("objective.kind"):
            cfg.objective.kind = "alp"
    return cfg


def first_difference(now: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two nested config dicts, described
    as ``key: <saved> in the run, <now> now``; None when they are equal."""
    for key in sorted(set(now) | set(saved)):
        a, b = now.get(key), saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {b!r} in the run, {a!r} now"
    return None


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
