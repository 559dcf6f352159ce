"""SA–AA front sweeps: Pareto front and hypervolume by hand, value parsing, resumable sweeps
(with a fake trainer that counts its calls), and the real pipeline on the tiny recipe once for
PGD-20 and once for AutoAttack (fast budget)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caat_peft import front
from caat_peft.config import save_config
from caat_peft.errors import UserError
from caat_peft.evaluation.samples import write_samples
from caat_peft.front import (
    dominates,
    hypervolume,
    pareto_front,
    parse_seeds,
    parse_values,
    point_name,
    run_front,
)
from caat_peft.front_uncertainty import hypervolume_difference, point_images

from conftest import TINY_RECIPE

# Cheap runs: four classes (AutoAttack's DLR losses need 4), a one-step training attack,
# 16 held-out images.
TINY = [
    "train.epochs=1",
    "eval.limit=16",
    "train.plots=false",
    "data.classes=[0,1,2,3]",
    "attack.steps=1",
]
POINT_KEYS = {"method", "clean_acc", "robust_acc", "run_dir", "seeds"}
POINT_KEYS |= {"clean_acc_ci", "robust_acc_ci", "interval_method"}


# --------------------------------------------------------------------------------------------
# Pareto front and hypervolume, by hand


def test_dominated_points_are_excluded_and_front_is_sorted_by_sa():
    pts = [(0.5, 0.5), (0.4, 0.4), (0.6, 0.3), (0.5, 0.2), (0.2, 0.7)]
    assert pareto_front(pts) == [4, 0, 2]
    # staircase: 0.2·0.7 + (0.5−0.2)·0.5 + (0.6−0.5)·0.3
    assert hypervolume(pts) == pytest.approx(0.14 + 0.15 + 0.03)


def test_ties():
    # identical points do not dominate each other: both stay, the area counts once
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0, 1]
    assert hypervolume([(0.5, 0.5), (0.5, 0.5)]) == pytest.approx(0.25)
    # equal on one axis, worse on the other: dominated
    assert pareto_front([(0.5, 0.5), (0.5, 0.4)]) == [0]
    assert pareto_front([(0.3, 0.6), (0.5, 0.6)]) == [1]
    assert hypervolume([(0.3, 0.6), (0.5, 0.6)]) == pytest.approx(0.3)
    assert dominates((0.5, 0.6), (0.3, 0.6)) and not dominates((0.5, 0.5), (0.5, 0.5))


def test_single_point_and_empty_set():
    assert pareto_front([(0.8, 0.4)]) == [0]
    assert hypervolume([(0.8, 0.4)]) == pytest.approx(0.32)
    assert pareto_front([]) == []
    assert hypervolume([]) == 0.0


def test_hypervolume_stays_in_the_unit_square():
    assert hypervolume([(1.2, 0.5)]) == pytest.approx(0.5)  # clipped to SA = 1
    assert hypervolume([(-0.1, 0.5), (0.5, 0.0)]) == 0.0  # nothing beyond the reference
    assert hypervolume([(1.0, 1.0), (0.3, 0.2)]) == pytest.approx(1.0)
    assert hypervolume([(0.6, 0.5)], reference=(0.2, 0.1)) == pytest.approx(0.4 * 0.4)


_acc = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_acc, _acc), max_size=8), st.tuples(_acc, _acc))
def test_hypervolume_properties(points, extra):
    hv = hypervolume(points)
    assert 0.0 <= hv <= 1.0 + 1e-12
    assert hv == pytest.approx(hypervolume([points[i] for i in pareto_front(points)]))
    assert hypervolume([*points, extra]) >= hv - 1e-12  # adding a point never loses area
    for i in pareto_front(points):  # nothing on the front is dominated
        assert not any(dominates(q, points[i]) for q in points)


# --------------------------------------------------------------------------------------------
# Parsing


def test_parse_values():
    assert parse_values("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_values(" 0.8, 0.9 ,1", "--gammas") == [0.8, 0.9, 1.0]
    assert parse_values("0.5,0.50", "--lambdas") == [0.5]  # one point, not two runs
    assert parse_values("-0.5", "--gammas") == [-0.5]
    assert parse_seeds("0, 1,2") == [0, 1, 2]


@pytest.mark.parametrize(
    ("text", "option", "fragment"),
    [
        ("0,1.5", "--lambdas", "[0, 1]"),
        ("-0.1", "--lambdas", "[0, 1]"),
        ("-1", "--gammas", "(-1, 1]"),
        ("1.01", "--gammas", "(-1, 1]"),
        ("nan", "--lambdas", "[0, 1]"),
        ("", "--gammas", "at least one"),
        ("0,,1", "--lambdas", "not a number"),
        ("a", "--lambdas", "not a number"),
    ],
)
def test_bad_values_name_the_option_and_range(text, option, fragment):
    with pytest.raises(UserError) as info:
        parse_values(text, option)
    message = str(info.value)
    assert option in message and fragment in message and "\n" not in message


@pytest.mark.parametrize("text", ["-1", "x", "", "1.5"])
def test_bad_seeds(text):
    with pytest.raises(UserError, match="--seeds"):
        parse_seeds(text)


def test_point_names():
    assert point_name("vanilla", 0.5, 0, 0) == "vanilla-lam0.5"
    assert point_name("vanilla", 0.0, 0, 0) == "vanilla-lam0"
    assert point_name("caat", 1.0, 0, 0) == "caat-gamma1"
    assert point_name("caat", 0.9, 2, 0) == "caat-gamma0.9-seed2"
    assert point_name("caat", 0.1234567, 0, 0) != point_name("caat", 0.1234568, 0, 0)


# --------------------------------------------------------------------------------------------
# The sweep with a fake trainer: resumption, seeds, config checks, the CLI


class FakeTrain:
    """Stands in for caat_peft.training.train: writes what a run writes, counts its calls.

    SA = 0.9 − 0.4·λ (vanilla), 0.8 − 0.3·(1 − γ) (CA-AT); AA rises as SA falls; seed s adds
    0.01·s. ``fail_on`` names a run that dies after writing config.yaml (a killed run).
    """

    def __init__(self, fail_on: str | None = None, caat_bonus: float = 0.0) -> None:
        self.calls: list[tuple[str, bool, bool]] = []
        self.fail_on = fail_on
        self.caat_bonus = caat_bonus

    def __call__(self, cfg, output_dir, *, overwrite=False, resume=False, progress=True):
        run_dir = Path(output_dir)
        self.calls.append((run_dir.name, overwrite, resume))
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if run_dir.name == self.fail_on:
            raise RuntimeError("killed")
        c = cfg.combiner
        if c.kind == "vanilla":
            sa, aa = 0.9 - 0.4 * c.lam, 0.1 + 0.3 * c.lam
        else:
            sa, aa = 0.8 - 0.3 * (1 - c.gamma), 0.15 + 0.4 * (1 - c.gamma)
        bump = 0.01 * cfg.train.seed + self.caat_bonus * (c.kind == "caat")
        n, sa, aa = 100, round((sa + bump) * 100), round((aa + bump) * 100)
        final = {"clean_acc": sa / n, "robust_acc": aa / n, "eval_n": n, "seconds": 0.1}
        final.update(eval_attack="pgd20-linf", eval_eps=8 / 255)
        # per image: the first sa images clean-correct, the first aa of them robust too
        scored = {"clean": [1] * sa + [0] * (n - sa), "robust": [1] * aa + [0] * (n - aa)}
        write_samples(run_dir, final, {"last": scored}, [0] * n, None)
        (run_dir / "final.json").write_text(json.dumps(final))
        return SimpleNamespace(final=final, run_dir=run_dir, is_main_process=True)


def _sweep(out: Path, **kwargs) -> dict:
    options = {"lambdas": [0, 1], "gammas": [0.9, 1], "progress": False, "overrides": TINY}
    options.update(kwargs)
    return run_front(TINY_RECIPE, output_dir=out, **options)


def test_killed_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
    out = tmp_path / "front"
    first = FakeTrain(fail_on="caat-gamma0.9")
    monkeypatch.setattr(front, "train", first)
    with pytest.raises(RuntimeError, match="killed"):
        _sweep(out)
    assert [c[0] for c in first.calls] == ["vanilla-lam0", "vanilla-lam1", "caat-gamma0.9"]
    partial = json.loads((out / "front.json").read_text())
    assert partial["complete"] is False and len(partial["points"]) == 2
    # a second killed run, this one with a checkpoint to resume from
    (out / "caat-gamma1").mkdir()
    save_config(
        front.plan_sweep(TINY_RECIPE, lambdas=[], gammas=[1.0], overrides=TINY)[0].cfg,
        out / "caat-gamma1" / "config.yaml",
    )
    (out / "caat-gamma1" / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "caat-gamma1" / "checkpoints" / "step-3" / "state.pt").write_bytes(b"")

    second = FakeTrain()
    monkeypatch.setattr(front, "train", second)
    result = _sweep(out)
    # finished points reused; the killed one without checkpoints restarted, the other resumed
    assert second.calls == [("caat-gamma0.9", True, False), ("caat-gamma1", False, True)]
    assert result["complete"] is True and len(result["points"]) == 4

    third = FakeTrain()
    monkeypatch.setattr(front, "train", third)
    assert _sweep(out)["points"] == result["points"]
    assert third.calls == []


def test_front_json_layout_and_values(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "train", FakeTrain())
    result = _sweep(tmp_path / "f", lambdas=[0, 0.5, 1], gammas=[0.8, 0.9, 1])
    on_disk = json.loads((tmp_path / "f" / "front.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert {"points", "hypervolume", "pareto", "eval_attack", "seeds"} <= set(on_disk)
    assert set(on_disk["hypervolume"]) == {"vanilla", "caat"}
    for p in on_disk["points"]:
        knob = "lam" if p["method"] == "vanilla" else "gamma"
        assert set(p) == POINT_KEYS | {knob}
        assert (tmp_path / "f" / p["run_dir"] / "final.json").is_file()
    # the fake's vanilla points lie on a line: all on the front; HV by hand
    van = [(p["clean_acc"], p["robust_acc"]) for p in on_disk["points"] if p["method"] == "vanilla"]
    assert [v for xy in van for v in xy] == pytest.approx([0.9, 0.1, 0.7, 0.25, 0.5, 0.4])
    assert on_disk["pareto"]["vanilla"] == [1.0, 0.5, 0.0]
    assert on_disk["hypervolume"]["vanilla"] == pytest.approx(0.5 * 0.4 + 0.2 * 0.25 + 0.2 * 0.1)
    assert on_disk["eval_attack"] == "pgd20"
    difference = on_disk["hypervolume_difference"]
    hv = on_disk["hypervolume"]
    assert difference["caat_minus_vanilla"] == pytest.approx(hv["caat"] - hv["vanilla"])
    assert difference["ci"][0] <= difference["caat_minus_vanilla"] <= difference["ci"][1]
    assert (
        difference["n_images"] == 100
        and difference["interval_method"] == "paired bootstrap over images"
    )
    for p in on_disk["points"]:
        lo, hi = p["robust_acc_ci"]
        assert lo < p["robust_acc"] < hi and p["interval_method"].startswith("Wilson")
    table = (tmp_path / "f" / "front.md").read_text()
    assert difference["verdict"] in table
    assert "| vanilla AT | λ = 0.5 |" in table and "| CA-AT | γ = 0.8 |" in table
    assert (tmp_path / "f" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_verdict_says_which_front_is_above_only_when_the_interval_excludes_zero(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(front, "train", FakeTrain(caat_bonus=0.15))
    clear = _sweep(tmp_path / "clear", lambdas=[0, 1], gammas=[0.8, 1])["hypervolume_difference"]
    assert clear["ci"][0] > 0 and clear["verdict"].startswith("CA-AT's front is above")
    monkeypatch.setattr(front, "train", FakeTrain(caat_bonus=0.0))  # vanilla's HV 0.24 vs 0.18
    behind = _sweep(tmp_path / "behind", lambdas=[0, 1], gammas=[0.8, 1])
    assert behind["hypervolume_difference"]["ci"][1] < 0
    assert behind["hypervolume_difference"]["verdict"].startswith("Vanilla AT's front is above")
    # The same runs on both sides: a difference of exactly 0, with an interval [0, 0].
    images = {}
    for (method, value), per_seed in _images_of(tmp_path / "behind").items():
        if method == "vanilla":
            images[("vanilla", value)] = images[("caat", value)] = per_seed
    same = hypervolume_difference(images, [0], replicates=200)
    assert same["caat_minus_vanilla"] == 0 and same["ci"] == [0.0, 0.0]
    assert same["verdict"].startswith("The fronts are not distinguishable at this size")


def _images_of(out: Path) -> dict:
    result = json.loads((out / "front.json").read_text())
    return {
        (p["method"], p.get("lam", p.get("gamma"))): {
            0: point_images(out / p["run_dir"], "last", "pgd20")
        }
        for p in result["points"]
    }


def test_seeds_are_averaged_and_kept(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(front, "train", fake)
    result = _sweep(tmp_path / "s", lambdas=[0.5], gammas=[0.9], seeds=[0, 1])
    assert [c[0] for c in fake.calls] == [  # seed-major: whole fronts first
        "vanilla-lam0.5",
        "caat-gamma0.9",
        "vanilla-lam0.5-seed1",
        "caat-gamma0.9-seed1",
    ]
    van = result["points"][0]
    assert [s["seed"] for s in van["seeds"]] == [0, 1]
    assert van["clean_acc"] == pytest.approx(0.7 + 0.005)
    assert van["clean_acc_std"] == pytest.approx(0.01 / 2**0.5)
    assert len(result["hypervolume_per_seed"]["caat"]) == 2
    assert van["interval_method"] == "Student t interval over seeds"
    difference = result["hypervolume_difference"]
    assert difference["n_seeds"] == 2 and difference["interval_method"].endswith("images and seeds")


def test_validation_selected_model_is_used(tmp_path, monkeypatch):
    class WithBest(FakeTrain):
        def __call__(self, cfg, output_dir, **kwargs):
            result = super().__call__(cfg, output_dir, **kwargs)
            result.final["best"] = {"epoch": 1, "clean_acc": 0.42, "robust_acc": 0.21}
            return result

    monkeypatch.setattr(front, "train", WithBest())
    point = _sweep(tmp_path / "b", lambdas=[0.5], gammas=[])["points"][0]
    assert (point["clean_acc"], point["robust_acc"]) == (0.42, 0.21)
    assert point["seeds"][0]["model"] == "best"


def test_a_changed_config_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "train", FakeTrain())
    _sweep(tmp_path / "c", lambdas=[0.5], gammas=[])
    fake = FakeTrain()
    monkeypatch.setattr(front, "train", fake)
    with pytest.raises(UserError, match=r"vanilla-lam0\.5.*train\.lr"):
        _sweep(tmp_path / "c", lambdas=[0.5, 1], gammas=[], overrides=[*TINY, "train.lr=0.1"])
    assert fake.calls == []


def test_bad_arguments_fail_before_anything_runs(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(front, "train", fake)
    with pytest.raises(UserError, match="--lambdas"):
        _sweep(tmp_path / "x", lambdas=[2.0])
    with pytest.raises(UserError, match="no points"):
        _sweep(tmp_path / "x", lambdas=[], gammas=[])
    with pytest.raises(UserError, match="--eval-attack"):
        _sweep(tmp_path / "x", eval_attack="pgd7")
    with pytest.raises(UserError, match="budget"):
        _sweep(tmp_path / "x", eval_attack="autoattack", budget="huge")
    with pytest.raises(UserError, match="train.epochs"):
        _sweep(tmp_path / "x", overrides=["train.epochs=0"])
    with pytest.raises(UserError, match="at least 4 classes.*pgd20"):
        _sweep(tmp_path / "x", eval_attack="autoattack", overrides=[*TINY, "data.classes=[0,1]"])
    assert fake.calls == [] and not (tmp_path / "x").exists()


def test_cli_function(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(front, "train", FakeTrain())
    parser = argparse.ArgumentParser()
    front.add_front_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["front", str(TINY_RECIPE), "--lambdas", "0,1", "--gammas", "0.9,1", "--no-progress"]
        + ["--output-dir", str(out), *[a for o in TINY for a in ("--set", o)]]
    )
    assert front.cmd_front(args) == 0
    printed = capsys.readouterr().out
    assert "| CA-AT | γ = 0.9 |" in printed and "front.json" in printed
    bad = parser.parse_args(["front", str(TINY_RECIPE), "--gammas", "1.5"])
    with pytest.raises(UserError, match="--gammas"):
        front.cmd_front(bad)


# --------------------------------------------------------------------------------------------
# The real pipeline on the tiny recipe


@pytest.fixture(scope="module")
def tiny_front(tmp_path_factory, one_thread) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("front") / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAAT_PEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        result = _sweep(out)
    return out, result


def test_tiny_front_end_to_end(tiny_front):
    out, result = tiny_front
    data = json.loads((out / "front.json").read_text())
    assert {"points", "hypervolume"} <= set(data) and set(data["hypervolume"]) == {
        "vanilla",
        "caat",
    }
    assert [(p["method"], p.get("lam", p.get("gamma"))) for p in data["points"]] == [
        ("vanilla", 0.0),
        ("vanilla", 1.0),
        ("caat", 0.9),
        ("caat", 1.0),
    ]
    for p in data["points"]:
        knob = "lam" if p["method"] == "vanilla" else "gamma"
        assert set(p) == POINT_KEYS | {knob}
        final = json.loads((out / p["run_dir"] / "final.json").read_text())
        assert final["eval_attack"] == "pgd20-linf"  # the eval attack is pinned to PGD-20
        assert (p["clean_acc"], p["robust_acc"]) == (final["clean_acc"], final["robust_acc"])
    for method in ("vanilla", "caat"):
        xy = [(p["clean_acc"], p["robust_acc"]) for p in data["points"] if p["method"] == method]
        assert data["hypervolume"][method] == pytest.approx(hypervolume(xy))
    assert (out / "front.png").stat().st_size > 1000
    assert (out / "front.md").read_text().startswith("# SA–AA front")


def test_tiny_front_autoattack_reuses_the_runs(tiny_front, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "sweep"
    shutil.copytree(tiny_front[0], out)
    fake = FakeTrain()
    monkeypatch.setattr(front, "train", fake)
    result = _sweep(out, eval_attack="autoattack", budget="fast")
    assert fake.calls == []  # same configs as the PGD-20 sweep: nothing retrained
    assert result["eval_attack"] == "autoattack" and result["budget"] == "fast"
    for p in result["points"]:
        seed = p["seeds"][0]
        report = json.loads((out / seed["eval_json"]).read_text())
        assert report["protocol"] != "standard" and report["attacks"] == ["autoattack"]
        label = report["eps"][0]["label"]
        assert p["robust_acc"] == report["worst_case"][label] <= p["clean_acc"]
        assert 0.0 <= seed["pgd20_acc"] <= 1.0 and seed["sanity"] in ("PASS", "WARN")
