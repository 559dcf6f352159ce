"""Config loading: defaults, YAML, overrides, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from caat_peft.config import Config, ConfigError, from_dict, load_config, save_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_defaults_are_valid_and_follow_the_paper():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.steps == 10
    assert cfg.combiner.lam == 0.5


def test_tiny_recipe_loads():
    cfg = load_config(RECIPES / "tiny.yaml")
    assert cfg.data.name == "digits" and cfg.combiner.kind == "caat"


def test_fractions_and_yaml_exponents_are_numbers():
    cfg = from_dict({"attack": {"eps": "8/255", "alpha": "2 / 255"}, "train": {"lr": "1e-3"}})
    assert cfg.attack.eps == pytest.approx(8 / 255)
    assert cfg.attack.alpha == pytest.approx(2 / 255)
    assert cfg.train.lr == pytest.approx(1e-3)


def test_overrides_apply_and_parse_values(tmp_path):
    cfg = load_config(
        RECIPES / "tiny.yaml",
        ["combiner.kind=vanilla", "combiner.lam=0.25", "data.classes=[1, 2]", "eval.limit=null"],
    )
    assert cfg.combiner.kind == "vanilla" and cfg.combiner.lam == 0.25
    assert cfg.data.classes == [1, 2] and cfg.eval.limit is None


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(RECIPES / "tiny.yaml", ["combiner.gamma=0.9"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"train": {"lrr": 1}}, "unknown config key 'train.lrr'"),
        ({"bogus": {}}, "unknown config key 'bogus'"),
        ({"combiner": {"lam": 1.5}}, "combiner.lam = 1.5 must be in [0, 1]"),
        ({"combiner": {"lam": -0.1}}, "combiner.lam"),
        ({"combiner": {"gamma": -1}}, "combiner.gamma = -1.0 must be in (-1, 1]"),
        ({"combiner": {"gamma": 1.01}}, "combiner.gamma"),
        ({"attack": {"eps": -0.1}}, "attack.eps = -0.1 must be >= 0"),
        ({"attack": {"steps": -1}}, "attack.steps = -1 must be >= 0"),
        ({"attack": {"steps": 2.5}}, "attack.steps: expected an integer"),
        ({"attack": {"norm": "l1"}}, "attack.norm = 'l1' is not allowed"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer"),
        ({"train": {"batch_size": True}}, "train.batch_size: expected an integer"),
        ({"train": "fast"}, "train: expected a mapping"),
        ({"combiner": {"kind": "pcgrad"}}, "combiner.kind = 'pcgrad' is not allowed"),
        ({"attack": {"eps": "8/0"}}, "attack.eps: expected a number"),
        ({"attack": {"eps": "nan"}}, "attack.eps: expected a finite number"),
        ({"data": {"classes": [1, 1]}}, "data.classes"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", "train.lr.x=1"])
def test_bad_overrides(item):
    with pytest.raises(ConfigError):
        load_config(None, [item])


def test_a_recipe_extends_its_base(tmp_path):
    """``base:`` merges the named recipe underneath, section by section; overrides apply last."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "data: {name: digits, image_size: 16}\ntrain: {epochs: 3, lr: 1.0e-3}\n"
    )
    (tmp_path / "sub" / "variant.yaml").write_text(
        "base: ../base.yaml\ntrain: {lr: 0.05, optimizer: sgd, nesterov: true}\n"
    )
    cfg = load_config(tmp_path / "sub" / "variant.yaml", ["train.epochs=4"])
    assert cfg.data.image_size == 16 and cfg.train.epochs == 4
    assert (cfg.train.lr, cfg.train.optimizer, cfg.train.nesterov) == (0.05, "sgd", True)


@pytest.mark.parametrize(
    "files,message",
    [
        (
            {"a.yaml": "base: missing.yaml\n"},
            r"config file not found: .*missing.yaml \(the base of",
        ),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "extends itself in a cycle"),
        ({"a.yaml": "base: a.yaml\n"}, "extends itself in a cycle"),
        ({"a.yaml": "base: [b.yaml]\n"}, "must be the path of a recipe"),
    ],
)
def test_bad_bases_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    "objective,expected",
    [
        ("{kind: mart}", ("mart", 6.0)),  # the default was Wang et al.'s β = 6
        ("{kind: mart, beta: 2.0}", ("mart", 2.0)),
        ("{kind: clp}", ("alp", None)),  # the old clp was Kannan et al.'s logit pairing
        ("{kind: trades}", ("trades", None)),
    ],
)
def test_runs_saved_before_the_authors_objectives_keep_their_objective(
    tmp_path, objective, expected
):
    """A run saved before ``train.nesterov`` existed trained mart with β = 6 and 'clp' with CE +
    logit pairing: read back as what it was, so a resume or a front names the difference."""
    from caat_peft.config import config_yaml, load_run_config

    old = tmp_path / "old.yaml"
    old.write_text(f"objective: {objective}\ntrain: {{epochs: 2}}\n")
    cfg = load_run_config(old)
    assert (cfg.objective.kind, cfg.objective.beta) == expected
    new = tmp_path / "new.yaml"
    new.write_text(config_yaml(load_config(old)))  # saved now: every key, nesterov included
    assert load_run_config(new).objective == load_config(old).objective
