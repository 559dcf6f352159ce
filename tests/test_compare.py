"""`caat-peft compare`: paired differences on the same images, refused on different ones."""

from __future__ import annotations

import json

import pytest

from caat_peft.cli import main
from caat_peft.compare import compare
from caat_peft.config import load_config
from caat_peft.training import train
from tests.conftest import TINY_RECIPE

FAST = ["train.epochs=1", "eval.limit=24", "eval.steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """vanilla and CA-AT, seeds 0 and 1, plus a run scored on other images."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {
        "vanilla0": ["combiner.kind=vanilla", "train.seed=0"],
        "vanilla1": ["combiner.kind=vanilla", "train.seed=1"],
        "caat0": ["combiner.kind=caat", "train.seed=0"],
        "caat1": ["combiner.kind=caat", "train.seed=1"],
        "other_images": ["combiner.kind=caat", "train.seed=0", "eval.limit=20"],
    }.items():
        train(load_config(TINY_RECIPE, [*FAST, *extra]), root / name, progress=False)
        made[name] = root / name
    return made


def test_a_run_against_itself_differs_by_exactly_zero(runs):
    result = compare([runs["caat0"]], [runs["caat0"]])
    assert {r["attack"] for r in result["rows"]} == {"clean", "pgd1 (trainer)"}
    for row in result["rows"]:
        assert row["difference"] == 0 and row["ci"] == [0.0, 0.0] and row["p_value"] == 1.0
        assert row["verdict"] == "not distinguishable at 24 images"


def test_compare_writes_its_files_and_pairs_by_seed(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(runs["caat1"]), str(runs["caat0"]), "--vs"]
    args += [str(runs["vanilla0"]), str(runs["vanilla1"]), "--output-dir", str(out)]
    assert main(args) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["seeds"] == [[1, 1], [0, 0]] and data["n_images"] == 24
    clean = next(r for r in data["rows"] if r["attack"] == "clean")
    finals = [json.loads((runs[n] / "final.json").read_text()) for n in ("caat0", "caat1")]
    assert clean["a"]["value"] == pytest.approx(sum(f["clean_acc"] for f in finals) / 2)
    assert clean["a"]["method"].startswith("Student t") and clean["n_seeds"] == 2
    assert clean["ci"][0] <= clean["difference"] <= clean["ci"][1]
    md = (out / "compare.md").read_text()
    assert "| clean |" in md and "A − B" in md and "verdict" in capsys.readouterr().out


def test_compare_of_different_images_is_refused_in_one_line(runs, tmp_path, capsys):
    args = ["compare", str(runs["caat0"]), str(runs["other_images"]), "--output-dir"]
    assert main([*args, str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different images" in err[0] and "24 vs 20 images" in err[0]
    assert not (tmp_path / "cmp").exists()  # nothing half-written


def test_compare_reads_eval_json_of_the_suite(runs, tmp_path):
    for name in ("caat0", "vanilla0"):
        args = ["eval", str(runs[name]), "--attacks", "fgsm,pgd20", "--eps", "8/255"]
        assert main([*args, "--limit", "24", "--no-progress", "--budget", "fast"]) == 0
    result = compare([runs["caat0"]], [runs["vanilla0"]])  # reads RUN/eval/eval.json
    keys = {(r["attack"], r["eps"]) for r in result["rows"]}
    assert {("clean", None), ("fgsm", "8/255"), ("pgd20", "8/255"), ("worst case", "8/255")} <= keys
    # The suite's stratified subset of 24 is the trainer's: its clean results agree image by image.
    trainer = compare([runs["caat0"] / "eval_samples.json"], [runs["caat0"]])
    clean = next(r for r in trainer["rows"] if r["attack"] == "clean")
    assert clean["only_a"] == clean["only_b"] == 0


def test_unequal_sides_and_unknown_paths_are_user_errors(runs, tmp_path, capsys):
    assert (
        main(["compare", str(runs["caat0"]), "--vs", str(runs["vanilla0"]), str(runs["vanilla1"])])
        == 2
    )
    assert "1 run(s) on side A but 2 on side B" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing"), str(runs["caat0"])]) == 2
    assert "neither a run directory nor an eval.json" in capsys.readouterr().err


def test_report_lays_runs_out_like_table_1(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    names = ("vanilla0", "vanilla1", "caat0", "caat1")
    assert (
        main(["report", *(str(runs[n]) for n in names), "--output-dir", str(out), "--latex"]) == 0
    )
    data = json.loads((out / "report.json").read_text())
    assert data["columns"][0] == "clean"
    rows = {r["method"]: r for r in data["rows"]}
    assert len(rows) == 2  # seeds share a row
    caat = next(r for m, r in rows.items() if m.startswith("CA-AT"))
    assert caat["seeds"] == [0, 1] and caat["train_eps"] == "0.06"  # tests/tiny_lora.yaml
    cell = caat["cells"]["clean"]
    assert cell["method"].startswith("Student t") and cell["runs"] == 2
    md = (out / "report.md").read_text()
    assert "| method | training ε | runs | Clean |" in md
    csv_head = (out / "report.csv").read_text().splitlines()[0]
    assert csv_head.startswith("method,train_eps,runs,clean,clean ci_low,clean ci_high")
    assert "\\toprule" in (out / "report.tex").read_text()
    assert main(["report", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
