"""``darkknowledge reproduce regularizer --quick`` (§6): every stage runs on both datasets, the files are written,
the numbers come from the evaluation code, the 3% runs see 3% of the training split (soft targets from the model
trained on all of it), and a rerun reuses finished stages."""

import json
import os
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.experiments.regularizer import QUICK
from darkknowledge.jobs import evaluate_run

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not all((DATA / d).is_dir() for d in ("mnist", "fashion-mnist")),
                                reason="MNIST or Fashion-MNIST files not found; set DARKKNOWLEDGE_DATA")
SYSTEMS = ("full", "hard_3pct", "soft_3pct")


def _run(out):
    return main(["reproduce", "regularizer", "--quick", "--out", str(out), "--data-dir", str(DATA),
                 "--no-progress"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-regularizer")
    assert _run(out) == 0
    return out


def test_writes_results_report_and_plot(quick_run):
    for name in ("results.json", "report.md", "curves.png"):
        assert (quick_run / name).stat().st_size > 0
    assert (quick_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((quick_run / "results.json").read_text())
    assert r["quick"] is True and "reproduce regularizer --quick" in r["command"]
    assert list(r["datasets"]) == ["mnist", "fashion-mnist"]
    for d in r["datasets"].values():
        assert [s["temperature"] for s in d["soft_3pct_by_temperature"]] == list(QUICK.temperatures)
        for key in SYSTEMS:
            curves = d[key]["curves"]
            assert curves["epoch"] == list(range(1, d[key]["epochs"] + 1))
            assert len(curves["train_accuracy"]) == len(curves["test_accuracy"]) == d[key]["epochs"]
        assert d["hard_3pct"]["epochs"] == QUICK.small_training.epochs
    report = (quick_run / "report.md").read_text()
    assert report.count("| 3%, hard targets |") == 2 and "## fashion-mnist" in report


def test_numbers_come_from_the_evaluation_code(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    for dataset, d in r["datasets"].items():
        runs = quick_run / "runs" / dataset
        for key in SYSTEMS:
            s = d[key]
            test, train = evaluate_run(runs / s["run"]), evaluate_run(runs / s["run"], split="train")
            assert (s["test_errors"], s["test_accuracy"], s["train_accuracy"]) == \
                (test["errors"], test["accuracy"], train["accuracy"])
            # the curve logged during training agrees with the saved model at the chosen epoch
            i = s["epoch"] - 1
            assert s["curves"]["test_accuracy"][i] == pytest.approx(test["accuracy"], abs=1e-12)
            assert s["curves"]["train_accuracy"][i] == pytest.approx(train["accuracy"], abs=1e-12)
            assert s["drop_after_peak"] == pytest.approx(s["peak_test_accuracy"] - s["last_epoch_test_accuracy"])
        assert d["soft_3pct"]["val_errors"] == min(s["val_errors"] for s in d["soft_3pct_by_temperature"])


def test_three_percent_of_the_training_split_and_soft_targets_from_the_full_model(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    d = r["datasets"]["mnist"]
    runs = quick_run / "runs" / "mnist"
    assert d["training_cases"]["small"] == round(0.03 * d["training_cases"]["full"])
    full, hard = checkpoint.read_model_meta(runs / "full"), checkpoint.read_model_meta(runs / "hard-3pct")
    soft = checkpoint.read_model_meta(runs / d["soft_3pct"]["run"])
    assert "train_subset" not in full and hard["train_subset"] == soft["train_subset"] == d["training_cases"]["small"]
    assert hard["data_fingerprint"] == soft["data_fingerprint"] != full["data_fingerprint"]
    assert evaluate_run(runs / "hard-3pct", split="train")["total"] == d["training_cases"]["small"]
    assert soft["teacher"]["weights_sha256"] == full["weights_sha256"]
    assert soft["hard_weight"] == 0.0 and hard["objective"] == "hard"
    assert hard["spec"] == soft["spec"] == full["spec"]


def test_a_rerun_reuses_every_finished_stage(quick_run):
    weights = sorted((quick_run / "runs").rglob("model.safetensors"))
    assert len(weights) == 2 * (2 + len(QUICK.temperatures))
    stamps = [w.stat().st_mtime_ns for w in weights]
    before = json.loads((quick_run / "results.json").read_text())
    assert _run(quick_run) == 0
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    after = json.loads((quick_run / "results.json").read_text())
    assert after["datasets"] == before["datasets"] and after["stage_seconds"] == before["stage_seconds"]
