"""``darkknowledge reproduce ensemble --quick`` (§4): every stage runs, the files are written, the numbers come from
the evaluation code, one soft-target store serves every student, and a rerun reuses finished stages."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.ensemble import COMBINE_RULES, Ensemble
from darkknowledge.evaluation import evaluate
from darkknowledge.experiments.ensemble import QUICK, _share, _share_interval, reproduce_ensemble
from darkknowledge.jobs import DataChoice, evaluate_run

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "fashion-mnist").is_dir(),
                                reason="Fashion-MNIST files not found; set DARKKNOWLEDGE_DATA")


def _run(out):
    return main(["reproduce", "ensemble", "--quick", "--out", str(out), "--data-dir", str(DATA), "--no-progress"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-ensemble")
    assert _run(out) == 0
    return out


def test_writes_results_report_and_plot(quick_run):
    for name in ("results.json", "report.md", "ensemble.png"):
        assert (quick_run / name).stat().st_size > 0
    assert (quick_run / "ensemble.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((quick_run / "results.json").read_text())
    assert r["quick"] is True and r["plan_name"] == "quick" and "reproduce ensemble --quick" in r["command"]
    assert [(s["combine"], s["temperature"]) for s in r["students"]] == \
        [(rule, t) for rule in COMBINE_RULES for t in (1, 2, 5, 10)]
    assert set(r["ensemble"]) == set(COMBINE_RULES) and len(r["members"]) == QUICK.members
    assert set(r["stage_seconds"]) == {"baseline", "ensemble", "students"}
    report = (quick_run / "report.md").read_text()
    assert "identical soft targets" in report and "share of the ensemble's gain transferred" in report
    assert "(2,000 cases: 3,000 of the training set, less validation)" in report  # QUICK's subset, stated
    assert report.count("| geometric |") == 5 and report.count("| logits |") == 5  # 4 students + the ensemble


def test_one_store_serves_every_student(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    assert r["store"]["students_using_it"] == len(r["students"]) == 12
    assert r["store"]["members"] == QUICK.members
    assert len(list((quick_run / "runs" / "soft-targets").glob("*.bin"))) == 1


def test_numbers_come_from_the_evaluation_code(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    runs = quick_run / "runs"
    assert r["baseline"]["test_errors"] == evaluate_run(runs / "baseline")["errors"]
    assert r["members"][1]["test_errors"] == evaluate_run(runs / "ensemble" / "member-01")["errors"]
    student = r["students"][5]
    assert student["test_errors"] == evaluate_run(runs / student["run"])["errors"]
    assert student["val_errors"] == evaluate_run(runs / student["run"], split="val")["errors"]
    _, _, test = DataChoice("fashion-mnist", str(DATA), val_size=QUICK.val_size, subset=QUICK.subset).load()
    for rule in COMBINE_RULES:
        assert r["ensemble"][rule]["test"]["errors"] == evaluate(Ensemble.from_dir(runs / "ensemble", rule),
                                                                 test).errors
    assert r["ensemble"]["geometric"]["test"]["errors"] == r["ensemble"]["logits"]["test"]["errors"]
    chosen = r["chosen_on_validation"]
    assert min(s["val_errors"] for s in r["students"]) == \
        next(s["val_errors"] for s in r["students"] if s["run"] == chosen["run"])
    assert chosen["share_transferred"] == _share(chosen["test_accuracy"], r["baseline"]["test_accuracy"],
                                                 r["ensemble"][chosen["combine"]]["test"]["accuracy"])
    assert chosen["share_over_members_mean"] == _share(
        chosen["test_accuracy"], sum(m["test_accuracy"] for m in r["members"]) / len(r["members"]),
        r["ensemble"][chosen["combine"]]["test"]["accuracy"])
    meta = checkpoint.read_model_meta(runs / chosen["run"])
    assert meta["hard_weight"] == 0.5 and meta["temperature"] == chosen["temperature"]
    assert meta["spec"] == r["baseline"]["spec"]  # a single model of the same size


def test_share_of_the_gain():
    assert _share(0.608, 0.589, 0.611) == pytest.approx(19 / 22)
    assert _share(0.6, 0.6, 0.6) is None and _share(0.6, 0.7, 0.65) is None


def test_a_rerun_reuses_every_finished_stage(quick_run):
    weights = sorted((quick_run / "runs").rglob("model.safetensors")) + \
        sorted(p for p in (quick_run / "runs" / "soft-targets").glob("*") if p.suffix != ".lock")  # a lock names
    # its last holder, so each run that opens a store writes its lock file, not the store
    assert len(weights) >= 1 + QUICK.members + 12
    stamps = [w.stat().st_mtime_ns for w in weights]
    before = json.loads((quick_run / "results.json").read_text())
    assert _run(quick_run) == 0
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    after = json.loads((quick_run / "results.json").read_text())
    for key in ("baseline", "members", "ensemble", "students", "stage_seconds", "store"):
        assert after[key] == before[key]


def test_a_diverged_student_is_reported_and_never_chosen(quick_run, monkeypatch, capsys):
    from darkknowledge.errors import TrainingDiverged
    from darkknowledge.experiments import ensemble as experiment

    real = experiment.distill_run

    def diverging(*args, out, **kwargs):
        if out.name == "student-arithmetic-T10":
            raise TrainingDiverged("training diverged in epoch 2: stand-in")
        return real(*args, out=out, **kwargs)

    monkeypatch.setattr(experiment, "distill_run", diverging)
    assert _run(quick_run) == 0  # the other stages are reused
    printed = capsys.readouterr().out  # --no-progress drops the bars, not the stage lines
    assert "[student-arithmetic-T10]" in printed and "training diverged in epoch 2: stand-in" in printed
    r = json.loads((quick_run / "results.json").read_text())
    assert [d["run"] for d in r["diverged"]] == ["student-arithmetic-T10"]
    assert len(r["students"]) == 11 and all(s["run"] != "student-arithmetic-T10" for s in r["students"])
    assert r["chosen_on_validation"]["run"] != "student-arithmetic-T10"
    assert "so not a candidate: arithmetic, T = 10: training diverged in epoch 2" in \
        (quick_run / "report.md").read_text()
    monkeypatch.undo()
    assert _run(quick_run) == 0 and json.loads((quick_run / "results.json").read_text())["diverged"] == []


def test_share_interval_is_reported(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    chosen = r["chosen_on_validation"]
    assert chosen["bootstrap_draws"] == 2000 and "share_interval_95" in chosen
    if chosen["share_transferred"] is None:  # the tiny QUICK ensemble is no better than its baseline: no share
        assert chosen["share_interval_95"] is None
    else:
        low, high = chosen["share_interval_95"]
        assert low <= chosen["share_transferred"] <= high


def test_share_interval_by_hand():
    n = 1000
    baseline = torch.zeros(n, dtype=torch.bool)
    baseline[:800] = True
    ensemble = baseline.clone()
    ensemble[800:900] = True  # +100 cases
    student = baseline.clone()
    student[800:850] = True  # half of them
    assert _share_interval(ensemble, baseline, ensemble) == [1.0, 1.0]  # a student as good as the ensemble
    assert _share_interval(baseline, baseline, ensemble) == [0.0, 0.0]
    low, high = _share_interval(student, baseline, ensemble)
    assert 0.35 < low < 0.5 < high < 0.65  # binomial spread of 50 of 100: sd 0.05
    assert _share_interval(student, baseline, baseline) is None  # no gain to share


def test_a_plan_replaces_the_default(tmp_path):
    """The same experiment with another plan (results/ensemble-small: the FULL recipe on fewer cases)."""
    plan = replace(QUICK, members=2, temperatures=(2,), rules=("arithmetic",))
    r = reproduce_ensemble(tmp_path, data_dir=str(DATA), progress=False, log=lambda _: None, plan=plan)
    assert r["plan"]["members"] == 2 and len(r["members"]) == 2 and r["plan_name"] is None  # built in code
    assert [(s["combine"], s["temperature"]) for s in r["students"]] == [("arithmetic", 2)]
