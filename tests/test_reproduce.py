"""``darkknowledge reproduce mnist --quick``: every stage runs, the files are written, the numbers come from the
evaluation code, and a rerun reuses finished stages."""

import json
import os
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.experiments.mnist import QUICK
from darkknowledge.jobs import DataChoice, evaluate_run

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="MNIST files not found; set DARKKNOWLEDGE_DATA")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "mnist", "--quick", "--out", str(out), "--data-dir", str(DATA), "--no-progress"]) == 0
    return out


def test_writes_results_report_and_plots(quick_run):
    for name in ("results.json", "report.md", "temperature.png", "bias.png"):
        assert (quick_run / name).stat().st_size > 0
    assert (quick_run / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((quick_run / "results.json").read_text())
    assert results["quick"] is True and "reproduce mnist --quick" in results["command"]
    assert set(results["table1"]) == {"teacher", "small", "distilled"}
    for spec, seeds in QUICK.sweep.items():
        rows = results["temperature_sweep"][spec]["rows"]
        assert [r["temperature"] for r in rows] == list(QUICK.temperatures)
        assert all(len(r["test_errors"]) == len(seeds) for r in rows)
    assert set(results["stage_seconds"]) >= {"teacher", "small", "distilled", "no-threes", "only-7-8"}
    report = (quick_run / "report.md").read_text()
    teacher = results["table1"]["teacher"]
    low, high = teacher["test_errors_95"]
    assert low <= teacher["test_errors"] <= high and teacher["test_total"] == 10000
    assert f"| {teacher['test_errors']} | {low} to {high} | 67 |" in report
    assert "chosen on test (the paper's protocol)" in report


def test_numbers_come_from_the_evaluation_code(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    runs = quick_run / "runs"
    for name in ("teacher", "small", "distilled"):
        assert results["table1"][name]["test_errors"] == evaluate_run(runs / name)["errors"]
        assert results["jittered_test"]["errors"][name] == evaluate_run(runs / name, jitter=2)["errors"]
    row = results["temperature_sweep"]["mlp:8x2"]["rows"][2]
    assert row["test_errors"][1] == evaluate_run(runs / f"sweep-mlp:8x2-T{row['temperature']:g}-seed1")["errors"]
    assert results["no_threes"]["before"]["errors"] == evaluate_run(runs / "no-threes")["errors"]


def test_restricted_transfer_sets_never_saw_the_left_out_classes(quick_run):
    meta = checkpoint.read_model_meta(quick_run / "runs" / "no-threes")
    assert meta["train_classes"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    train, val, _ = DataChoice("mnist", str(DATA), val_size=QUICK.val_size, subset=QUICK.subset,
                               train_classes=(7, 8)).load()
    assert set(train.labels.tolist()) == {7, 8}
    assert len(set(val.labels.tolist())) == 10  # offsets are chosen on a validation set with every class
    results = json.loads((quick_run / "results.json").read_text())
    assert results["only_7_8"]["transfer_cases"] == len(train)
    study = results["no_threes"]
    assert study["chosen_on_validation"]["offset"] == study["offsets"][
        min(range(len(study["offsets"])), key=lambda i: (study["val_errors_by_offset"][i], abs(study["offsets"][i])))]


def test_a_rerun_reuses_every_finished_stage(quick_run, capsys):
    weights = sorted((quick_run / "runs").glob("*/model.safetensors"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    before = json.loads((quick_run / "results.json").read_text())
    assert main(["reproduce", "mnist", "--quick", "--out", str(quick_run), "--data-dir", str(DATA),
                 "--no-progress"]) == 0
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    after = json.loads((quick_run / "results.json").read_text())
    assert after["table1"] == before["table1"] and after["stage_seconds"] == before["stage_seconds"]
