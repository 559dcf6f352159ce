"""Config fuzzing through the command line: a wrong type, an out-of-range value or an unknown key,
given with ``--set`` or inside a YAML file, always ends in exit code 2 and one stderr line that
names the key; never a traceback, never a run directory."""

from __future__ import annotations

import itertools
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_lib import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    assert_one_line_error,
    one_torch_thread,
    run_cli,
    train_args,
)

from caat_peft.config import Config

from conftest import TINY_RECIPE

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SECTIONS = typing.get_type_hints(Config)  # section name -> its dataclass
_SECTION_HINTS = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
_counter = itertools.count()


# --------------------------------------------------------------------------------------------
# What is wrong for each key


def _plain(text: str) -> bool:
    """Text that YAML reads back as that very string (not null, a bool or a number)."""
    return yaml.safe_load(text) == text


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzXYZ_", min_size=1, max_size=12).filter(_plain)
non_integer_floats = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
non_integer_floats = non_integer_floats.filter(lambda v: not float(v).is_integer())
lists = st.lists(st.integers(-3, 3), min_size=1, max_size=3)
mappings = st.dictionaries(words, st.integers(0, 3), min_size=1, max_size=2)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def _wrong_for(tp) -> st.SearchStrategy | None:
    """Values that are not of type ``tp`` (None is allowed where ``tp`` is Optional)."""
    args = set(typing.get_args(tp)) - {type(None)}
    base = next(iter(args)) if len(args) == 1 else tp
    origin = typing.get_origin(base)
    if base is int:
        return st.one_of(words, non_integer_floats, lists, mappings, st.booleans())
    if base is float:
        return st.one_of(words, lists, mappings, st.booleans(), non_finite)
    if base is bool:
        return st.one_of(words, st.integers(), st.floats(allow_nan=False), lists, mappings)
    if base is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), lists, mappings, st.booleans())
    if origin is list:
        (inner,) = typing.get_args(base)
        bad_inner = words if inner in (int, float) else st.integers()
        return st.one_of(words, mappings, st.lists(bad_inner, min_size=1, max_size=3))
    if origin is dict:
        return st.one_of(words, lists, st.integers(), st.booleans())
    return None  # str | list[str] and the like: covered by hand below


WRONG_TYPE = {
    f"{section}.{name}": strategy
    for section, hints in _SECTION_HINTS.items()
    for name, tp in hints.items()
    if (strategy := _wrong_for(tp)) is not None
}
WRONG_TYPE["peft.target_modules"] = st.one_of(st.integers(), mappings, st.booleans())


def _below(limit: float, strict: bool = False, integer: bool = False) -> st.SearchStrategy:
    if integer:
        return st.integers(max_value=int(limit) - (1 if strict else 0), min_value=-(10**6))
    return st.floats(max_value=limit, exclude_max=strict, min_value=-1e6, allow_nan=False)


def _above(limit: float, strict: bool = False, integer: bool = False) -> st.SearchStrategy:
    if integer:
        return st.integers(min_value=int(limit) + (1 if strict else 0), max_value=10**6)
    return st.floats(min_value=limit, exclude_min=strict, max_value=1e6, allow_nan=False)


def _ints_below(minimum: int) -> st.SearchStrategy:
    return _below(minimum, strict=True, integer=True)


OUT_OF_RANGE = {
    "train.epochs": _ints_below(1),
    "train.batch_size": _ints_below(1),
    "train.lr": _below(0),
    "train.weight_decay": _below(0, strict=True),
    "train.momentum": st.one_of(_below(0, strict=True), _above(1)),
    "train.grad_clip": _below(0),
    "train.warmup_epochs": st.one_of(_below(0, strict=True), _above(2, strict=True)),  # epochs: 2
    "train.log_every": _ints_below(1),
    "train.grad_accum_steps": _ints_below(1),
    "train.ema_decay": st.one_of(_below(0), _above(1)),
    "train.early_stop_patience": _ints_below(1),
    "train.max_nonfinite_steps": _ints_below(1),
    "train.save_every": _ints_below(0),
    "train.keep_checkpoints": _ints_below(1),
    "train.layer_conflict_every": _ints_below(0),
    "train.init_head_epochs": _ints_below(1),
    "train.init_head_lr": _below(0),
    "peft.prompt_length": _ints_below(1),
    "combiner.lam": st.one_of(_below(0, strict=True), _above(1, strict=True)),
    "combiner.gamma": st.one_of(_below(-1), _above(1, strict=True)),
    "attack.eps": _below(0, strict=True),
    "attack.alpha": _below(0, strict=True),
    "attack.steps": _ints_below(0),
    "attack.fgsm_alpha": _below(0, strict=True),
    "peft.r": _ints_below(1),
    "peft.alpha": _below(0),
    "peft.dropout": st.one_of(_below(0, strict=True), _above(1)),
    "peft.reduction": _ints_below(1),
    "peft.bottleneck_dim": _ints_below(1),
    "model.num_classes": _ints_below(2),
    "model.mean": st.lists(st.floats(0, 1), min_size=0, max_size=6).filter(lambda v: len(v) != 3),
    "model.std": st.lists(_below(0), min_size=3, max_size=3),
    "data.val_fraction": st.one_of(_below(0, strict=True), _above(1)),
    "data.test_fraction": st.one_of(_below(0), _above(1)),
    "data.image_size": _ints_below(4),
    "data.num_workers": _ints_below(0),
    "data.classes": st.one_of(
        st.lists(st.integers(0, 9), min_size=0, max_size=1),  # fewer than two
        st.lists(st.integers(10, 99), min_size=2, max_size=3),  # not a digit
        st.integers(0, 9).map(lambda d: [d, d]),  # repeated
    ),
    "eval.steps": _ints_below(0),
    "eval.eps": _below(0, strict=True),
    "eval.alpha": _below(0, strict=True),
    "eval.batch_size": _ints_below(1),
    "eval.every": _ints_below(0),
    "eval.limit": _ints_below(1),
    "eval.select_steps": _ints_below(0),
}

CHOICES = {
    "peft.method": (
        "lora",
        "ia3",
        "loha",
        "lokr",
        "vera",
        "adapter",
        "vpt",
        "bitfit",
        "head",
        "full",
    ),
    "peft.prompt_depth": ("shallow", "deep"),
    "train.init_head": ("none", "robust-linear-probe"),
    "peft.activation": ("gelu", "relu", "silu", "tanh"),
    "data.name": ("digits", "cub", "dogs", "folder", "hf"),
    "data.bad_files": ("error", "skip"),
    "attack.kind": ("pgd", "fgsm"),
    "attack.norm": ("linf", "l2"),
    "objective.kind": ("pgd-ce", "trades", "mart", "clp"),
    "combiner.kind": ("vanilla", "caat"),
    "combiner.granularity": ("global", "tensor"),
    "train.optimizer": ("adamw", "sgd"),
    "train.schedule": ("constant", "cosine", "onecycle"),
    "train.precision": ("fp32", "bf16", "fp16"),
}


@st.composite
def bad_setting(draw) -> tuple[list[str], object, str]:
    """(key path, value, text the error line must contain)."""
    kind = draw(st.sampled_from(["type", "range", "choice", "unknown", "unknown-section"]))
    if kind == "type":
        key = draw(st.sampled_from(sorted(WRONG_TYPE)))
        return key.split("."), draw(WRONG_TYPE[key]), key
    if kind == "range":
        key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        return key.split("."), draw(OUT_OF_RANGE[key]), key
    if kind == "choice":
        key = draw(st.sampled_from(sorted(CHOICES)))
        return key.split("."), draw(words.filter(lambda w: w not in CHOICES[key])), key
    if kind == "unknown":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        name = draw(words.filter(lambda w: w not in _SECTION_HINTS[section]))
        value = draw(st.one_of(st.integers(), words, st.booleans()))
        return [section, name], value, f"'{section}.{name}'"
    name = draw(words.filter(lambda w: w not in SECTIONS))
    return [name, draw(words)], draw(st.integers()), f"'{name}'"


def _yaml_text(value: object) -> str:
    """``value`` as ``--set`` takes it (one line of flow-style YAML)."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()
    )


def _fresh_output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "fuzz" / f"run-{next(_counter)}"


def _assert_refused(code: int, err: str, needle: str, out: Path) -> None:
    assert_one_line_error(code, err, needle)
    assert not out.exists(), "a run directory was created for a bad config"


# --------------------------------------------------------------------------------------------
# The properties


@FUZZ
@given(setting=bad_setting())
def test_bad_set_override_is_one_line_naming_the_key(tmp_path_factory, setting):
    path, value, needle = setting
    out = _fresh_output_dir(tmp_path_factory)
    item = f"{'.'.join(path)}={_yaml_text(value)}"
    args = ["train", str(TINY_RECIPE), "--output-dir", str(out), "--no-progress", "--set", item]
    code, _, err = run_cli(args)
    _assert_refused(code, err, needle, out)


@FUZZ
@given(setting=bad_setting())
def test_bad_yaml_recipe_is_one_line_naming_the_key(tmp_path_factory, setting):
    path, value, needle = setting
    data = yaml.safe_load(TINY_RECIPE.read_text())
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    recipe = tmp_path_factory.getbasetemp() / "fuzz" / f"recipe-{next(_counter)}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(data))
    out = _fresh_output_dir(tmp_path_factory)
    code, _, err = run_cli(train_args(out, recipe=recipe))
    _assert_refused(code, err, needle, out)


@settings(max_examples=25, deadline=None, database=None)
@given(
    section=st.sampled_from(sorted(SECTIONS)),
    value=st.one_of(st.integers(), words, lists, st.booleans()),
)
def test_a_section_that_is_not_a_mapping_is_refused(tmp_path_factory, section, value):
    out = _fresh_output_dir(tmp_path_factory)
    code, _, err = run_cli(train_args(out, f"{section}={_yaml_text(value)}"))
    _assert_refused(code, err, section, out)


@pytest.mark.parametrize(
    "item,needle",
    [
        ("train.lr", "train.lr"),  # no '='
        ("=3", "'=3'"),  # no key
        ("train..lr=3", "train..lr"),  # empty part
        ("train.lr.x=1", "train.lr.x"),  # below a value
        ("train.epochs=[1, 2", "train.epochs"),  # broken YAML: taken as a string
        ("train.epochs=!!python/object/apply:os.system ['true']", "train.epochs"),
    ],
)
def test_malformed_set_items(tmp_path, item, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", str(TINY_RECIPE), "--output-dir", str(out), "--no-progress", "--set", item]
    )
    _assert_refused(code, err, needle, out)


def test_a_recipe_with_python_tags_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        TINY_RECIPE.read_text() + f"extra: !!python/object/apply:os.mkdir ['{marker}']\n"
    )
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(out, recipe=recipe))
    _assert_refused(code, err, str(recipe), out)
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.image_size=8"], "data.image_size"),  # the ViT is built for 16 px
        (["model.num_classes=3"], "model.num_classes"),  # the digits here have 5 classes
    ],
    ids=["image-size-vs-model", "num-classes-below-the-data"],
)
def test_settings_that_do_not_fit_the_model_are_refused_before_the_run(tmp_path, overrides, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(out, "train.epochs=1", "eval.limit=8", *overrides))
    _assert_refused(code, err, needle, out)
