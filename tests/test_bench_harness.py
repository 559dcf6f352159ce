"""The benchmark harness: rounds until a ratio settles, noisy figures never judged, the GPU
script's budget guard and CPU smoke mode. Timing is faked throughout (an injected clock):
nothing here asserts on real elapsed time."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pytest

from conftest import ROOT

if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import gpu  # noqa: E402
from benchmarks.bench_common import (  # noqa: E402
    Ratio,
    interleaved,
    interleaved_until_stable,
    make_ratio,
    table,
    to_jsonable,
)


class FakeClock:
    """A clock that moves only when a fake timed function says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def costs(self, seconds: list[float]):
        """A function whose n-th call takes ``seconds[n % len]`` fake seconds; counts calls."""

        def fn() -> None:
            self.t += seconds[fn.calls % len(seconds)]
            fn.calls += 1

        fn.calls = 0
        return fn


def test_constant_ratio_stops_at_min_repeats_and_is_stable():
    clock = FakeClock()
    a, b = clock.costs([2.0]), clock.costs([1.0])
    run = interleaved_until_stable(
        {"a": a, "b": b}, ("a", "b"), min_repeats=4, max_repeats=20, warmup=1, clock=clock
    )
    assert run.rounds == 4 and run.stable
    assert a.calls == b.calls == 1 + 4  # warm-up + the rounds, no more
    r = run.ratio()
    assert r == Ratio(2.0, 0.0, 4, True)
    assert run.times["a"] == [2.0] * 4 and run.ratios("a", "b") == [2.0] * 4


def test_alternating_noise_runs_to_max_repeats_and_is_noisy():
    clock = FakeClock()
    a, b = clock.costs([1.0, 3.0]), clock.costs([1.0])
    run = interleaved_until_stable(
        {"a": a, "b": b}, ("a", "b"), min_repeats=3, max_repeats=12, warmup=0, clock=clock
    )
    assert run.rounds == 12 and not run.stable
    r = run.ratio("a", "b")
    assert not r.stable and r.rounds == 12 and r.spread > 0.03
    assert r.text().startswith("noisy (spread ") and r.text().endswith(" %)")


def test_noisy_at_first_then_settling_stops_early():
    # rounds 1-2 are disturbed, then the ratio is constant: stops once the quartiles agree
    clock = FakeClock()
    a, b = clock.costs([5.0, 4.0] + [2.0] * 50), clock.costs([1.0])
    run = interleaved_until_stable(
        {"a": a, "b": b}, ("a", "b"), min_repeats=3, max_repeats=30, warmup=0, clock=clock
    )
    assert run.stable and 3 < run.rounds < 30 and run.value == 2.0


def test_every_watched_pair_must_settle_and_unknown_names_are_refused():
    clock = FakeClock()
    fns = {"a": clock.costs([2.0]), "b": clock.costs([1.0]), "c": clock.costs([1.0, 2.0])}
    run = interleaved_until_stable(
        fns, [("a", "b"), ("c", "b")], min_repeats=3, max_repeats=6, warmup=0, clock=clock
    )
    assert run.rounds == 6 and not run.stable
    assert run.ratio("a", "b").stable and not run.ratio("c", "b").stable
    with pytest.raises(ValueError, match="x/b"):
        interleaved_until_stable(fns, ("x", "b"), clock=clock)


def test_sync_is_waited_for_around_each_timing():
    # asynchronous work (a GPU queue): the call returns at once, the work ends at sync()
    clock, pending = FakeClock(), []

    def launch(seconds: float):
        return lambda: pending.append(seconds)

    def sync() -> None:
        clock.t += sum(pending)
        pending.clear()

    fns = {"a": launch(3.0), "b": launch(1.5)}
    run = interleaved_until_stable(
        fns, ("a", "b"), min_repeats=3, max_repeats=3, warmup=1, clock=clock, sync=sync
    )
    assert run.times["a"] == [3.0] * 3 and run.value == 2.0
    assert interleaved(fns, 2, warmup=0, inner=2, clock=clock, sync=sync)["b"] == [1.5, 1.5]


def test_too_few_rounds_are_never_stable():
    assert not make_ratio([1.0, 1.0]).stable  # a spread needs 3 rounds to mean anything
    assert make_ratio([1.0, 1.0, 1.0]).stable
    assert "too few" in make_ratio([1.0, 1.0]).text()


# --------------------------------------------------------------------------------------------
# Reporting: noisy figures are printed as such and never judged


def test_verdicts_noisy_never_judged_stable_judged_against_goal():
    noisy_high = Ratio(3.18, 0.12, 10, False)  # would be "not met" if judged
    noisy_low = Ratio(0.98, 0.12, 10, False)  # would be "met" if judged
    figures: dict[str, Any] = {
        "caat_over_vanilla_step": noisy_high,
        "caat_over_vanilla_update": noisy_low,
        "fast_over_reference_step": Ratio(3.2, 0.01, 5, True),
        "attack_over_torchattacks": Ratio(0.97, 0.01, 5, True),
        "fast_over_fp32_step": Ratio(1.7, 0.01, 5, True),
        "bf16_minus_fp32_robust_points": 0.5,
    }
    goals = bench_main._goals(figures, {})
    assert goals["caat_over_vanilla_step"] == {"goal": "≤ 1.02", "verdict": "noisy", "met": None}
    assert goals["caat_over_vanilla_update"]["verdict"] == "noisy"
    assert goals["fast_over_reference_step"]["verdict"] == "met"
    below = bench_main._goals({"fast_over_reference_step": Ratio(2.4, 0.01, 5, True)}, {})
    assert below["fast_over_reference_step"]["verdict"] == "not met"  # the goal is 2.5
    assert goals["attack_over_torchattacks"]["verdict"] == "not met"
    assert goals["bf16_minus_fp32_robust_points"]["met"] is True
    entry = bench_main.figure_entry("caat_over_vanilla_step", noisy_high, goals)
    assert entry == {
        "value": 3.18,
        "spread": 0.12,
        "rounds": 10,
        "stable": False,
        "verdict": "noisy",
    }
    assert (
        bench_main.figure_entry("fast_over_fp32_step", figures["fast_over_fp32_step"], goals)[
            "verdict"
        ]
        == "no goal"
    )

    rows = bench_main.summary_rows(figures, goals)
    text = table(["figure", "value", "goal", "verdict"], rows)
    by_name = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    noisy_line = by_name["caat_over_vanilla_step"]
    assert "noisy (spread 12 %)" in noisy_line and "3.18" not in noisy_line
    assert noisy_line.rstrip(" |").endswith("noisy") and "met" not in noisy_line
    assert "met" not in by_name["caat_over_vanilla_update"]
    assert by_name["fast_over_reference_step"].endswith("| met |")
    assert by_name["attack_over_torchattacks"].endswith("| not met |")
    # the JSON keeps a noisy figure's value, spread and rounds
    assert json.loads(json.dumps(noisy_high, default=to_jsonable))["spread"] == 0.12


def _fake_step_section(work, repeats, **rounds) -> dict[str, Any]:
    seconds = dict.fromkeys(
        ("step_vanilla", "step_caat", "step0_vanilla", "step0_caat", "update_vanilla",
         "update_caat", "update_caat_no_projection"), 1.0,
    )  # fmt: skip
    return {
        "caat_over_vanilla_step": Ratio(3.18, 0.12, 2 * repeats, False),
        "caat_over_vanilla_step_noattack": Ratio(1.0, 0.01, repeats, True),
        "caat_over_vanilla_update": Ratio(1.01, 0.01, repeats, True),
        "caat_noproj_over_vanilla_update": Ratio(0.9, 0.01, repeats, True),
        "seconds": seconds,
        "caat_projected_fraction": 1.0,
        "trainable_parameters": 1,
        "trainable_tensors": 1,
        "load1": [0.0, 0.0],
        "rounds_seen": rounds,
    }


def test_suite_prints_noisy_and_records_load_and_machine(monkeypatch, capsys):
    import benchmarks.bench_step as bench_step

    monkeypatch.setattr(bench_step, "caat_vs_vanilla", _fake_step_section)
    rc = bench_main.main(["--quick", "--only", "step", "--target-spread", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = out[out.index("## Summary") :]
    line = next(s for s in summary.splitlines() if s.startswith("| caat_over_vanilla_step |"))
    assert "noisy (spread 12 %)" in line and "met" not in line
    report = json.loads(out.strip().splitlines()[-1])
    assert report["figures"]["caat_over_vanilla_step"]["verdict"] == "noisy"
    assert report["figures"]["caat_over_vanilla_update"]["verdict"] == "met"
    assert report["goals"]["caat_over_vanilla_step"]["met"] is None
    step = report["sections"]["step"]
    assert step["rounds_seen"] == {"max_repeats": None, "target_spread": 0.05}
    for when in ("before", "after"):
        assert len(step["load"][when]["loadavg"]) == 3 and "load1" in step["load"][when]
    assert step["machine"]["cpu"] and len(report["loadavg_start"]) == 3


# --------------------------------------------------------------------------------------------
# The GPU script


def test_peak_table_lookup():
    assert gpu.peak_tflops("NVIDIA H200")["bf16"] == pytest.approx(989.4)
    assert gpu.peak_tflops("NVIDIA H100 PCIe")["tf32"] == pytest.approx(378.0)
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3")["bf16"] == pytest.approx(989.4)
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB")["bf16"] == pytest.approx(312.0)
    assert gpu.peak_tflops("Tesla T4") is None and gpu.peak_tflops(None) is None


def test_refuses_without_cuda(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", "unused.json"]) == 2
    assert gpu.main(["--device", "cpu"]) == 2  # only the tiny smoke mode runs on a CPU
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no CUDA" in err[0]


def test_budget_guard_skips_what_would_overrun(monkeypatch, tmp_path):
    clock = FakeClock()

    def fake_measure(setup, model_name, peft, device, peaks):
        clock.t += 100.0
        return {"modes": {}}

    monkeypatch.setattr(gpu, "measure_config", fake_measure)
    setup = gpu.Setup(32, 2, 1, ("m1", "m2"), ("adapter", "lora"), 2, 2, 0.03, "eager")
    args = argparse.Namespace(budget_s=250.0, out=str(tmp_path / "g.json"), argv=[])
    import torch

    report = gpu.run_all(setup, args, torch.device("cpu"), clock=clock)
    configs = report["configs"]
    assert list(configs) == ["m1 + adapter", "m2 + adapter", "m1 + lora", "m2 + lora"]
    assert "modes" in configs["m1 + adapter"] and "modes" in configs["m2 + adapter"]
    assert configs["m1 + lora"]["skipped"] == "time budget"
    assert configs["m1 + lora"]["estimate_s"] == 100.0
    assert configs["m2 + lora"]["skipped"] == "time budget"
    assert "skipped: time budget" in gpu.markdown(report).splitlines()[-1]


def test_gpu_script_smoke_mode_on_cpu(tmp_path, one_thread, capsys):
    out = tmp_path / "gpu_bench.json"
    assert gpu.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device_name", "peak_tflops", "setup", "machine", "load_start", "load_end"):
        assert key in report
    assert report["setup"]["batch"] == 2 and report["setup"]["pgd_steps"] == 1
    assert len(report["configs"]) == 2
    for cfg in report["configs"].values():
        assert "error" not in cfg and "compile_error" not in cfg, cfg
        assert cfg["step_gflop"] > 0 and set(cfg["modes"]) == {"fp32", "fast", "reference"}
        for mode in cfg["modes"].values():
            assert mode["images_per_s_caat"] > 0 and mode["mfu_caat"] is None  # CPU: no peak
        for mode in ("fp32", "fast"):
            ratio = cfg["modes"][mode]["caat_over_vanilla_step"]
            assert set(ratio) == {"value", "spread", "rounds", "stable"}
            assert "speedup_over_reference" in cfg["modes"][mode]
    table_out = capsys.readouterr().out
    assert "| model + PEFT | mode |" in table_out and "reference" in table_out
