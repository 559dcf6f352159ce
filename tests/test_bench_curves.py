"""The cost-curve benchmark's smoke mode: its JSON, tables and figure (never its timings)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_curves  # noqa: E402
from benchmarks.bench_common import Ratio  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """One ``--tiny`` run of every axis (memory processes included), shared by the tests."""
    out = tmp_path_factory.mktemp("curves")
    json_path, png_path = out / "curves.json", out / "curves.png"
    argv = ["--tiny", "--out", str(json_path), "--plot", str(png_path)]
    assert bench_curves.main(argv) == 0
    return json.loads(json_path.read_text()), png_path


def test_tiny_json_has_every_axis_and_point_fields(tiny_run):
    report, _ = tiny_run
    assert report["mode"] == "tiny"
    assert list(report["axes"]) == list(bench_curves.AXES)
    assert "cores" in report["machine"] and len(report["loadavg_start"]) == 3
    assert "VmHWM" in report["memory_method"]
    for name, axis in report["axes"].items():
        assert axis["points"], name
        for p in axis["points"]:
            assert "error" not in p, p.get("error")
            assert set(p["seconds_per_step"]) == {"vanilla", "caat"}
            assert all(v > 0 for v in p["seconds_per_step"].values())
            assert set(p["images_per_second"]) == {"vanilla", "caat"}
            ratio = p["caat_over_vanilla"]
            assert set(ratio) == {"value", "spread", "rounds", "stable"}
            assert ratio["rounds"] == 2 and ratio["stable"] is False  # 2 rounds: never a figure
            assert p["verdict"] == "noisy"  # ... so never judged against the goal
            assert p["trainable_parameters"] > 0
            assert set(p["load"]) == {"before", "after"} and "cpu" in p["machine"]
            mib = p["memory"]["peak_rss_mib"]
            assert mib["vanilla"] > 0 and mib["caat"] > 0
            assert p["config"]["image_size"] in (32, 48) and p["config"]["pgd_steps"] == 1


def test_tiny_axes_vary_what_they_say(tiny_run):
    report, _ = tiny_run
    axes = report["axes"]
    assert [p["config"]["batch"] for p in axes["batch"]["points"]] == [2, 4]
    assert [p["config"]["image_size"] for p in axes["image"]["points"]] == [32, 48]
    params = {p["config"]["peft"]: p for p in axes["params"]["points"]}
    assert set(params) == {"lora", "adapter", "full"}
    # x of the params axis is the trainable-parameter count; full fine-tuning has the most
    assert all(p["x"] == p["trainable_parameters"] for p in params.values())
    assert params["full"]["x"] > params["lora"]["x"] > params["adapter"]["x"]
    # the ViT-Ti 32 px batch 2 LoRA r 8 configuration recurs: measured once, shared
    shared = [p for a in axes.values() for p in a["points"] if "shared_with" in p]
    assert shared and all(p["shared_with"] == "batch" for p in shared)


def test_tiny_plot_is_written(tiny_run):
    _, png_path = tiny_run
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_from_the_json_says_noisy(tiny_run):
    report, _ = tiny_run
    text = bench_curves.markdown(report)  # a report read back from JSON renders the same
    assert text.count("## ") == len(bench_curves.AXES)
    assert "noisy (2 rounds: too few to tell)" in text and "CA-AT / vanilla" in text


def test_verdict_judges_only_stable_ratios():
    assert bench_curves.verdict(Ratio(1.01, 0.01, 5, True)) == "met"
    assert bench_curves.verdict(Ratio(1.05, 0.01, 5, True)) == "not met"
    assert bench_curves.verdict(Ratio(0.9, 0.2, 10, False)) == "noisy"


def test_grids_cover_the_issue_axes():
    full = bench_curves.grid(bench_curves.MODES["full"])
    assert [p.batch for _, _, p in full["batch"].points] == [4, 8, 16, 32]
    assert [p.image_size for _, _, p in full["image"].points] == [64, 112, 160, 224]
    assert {p.model for _, _, p in full["model"].points} == {
        bench_curves.VIT_TI,
        bench_curves.VIT_S,
        bench_curves.VIT_B,
        bench_curves.SWIN_T,
    }
    params = [p for _, _, p in full["params"].points]
    assert [p.r for p in params if p.peft == "lora"] == [4, 8, 16, 32, 64]
    assert {p.peft for p in params} == {"lora", "adapter", "full"}
    assert {p.model for p in params} == {bench_curves.VIT_S}
    quick = bench_curves.grid(bench_curves.MODES["quick"], ("params",))
    assert list(quick) == ["params"]
    assert all(p.image_size == 112 and p.pgd_steps == 3 for _, _, p in quick["params"].points)


def test_unknown_axis_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_curves.main(["--tiny", "--axes", "batch,colour"])
    assert exc.value.code == 2
    assert "unknown axes ['colour']" in capsys.readouterr().err
