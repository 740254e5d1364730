"""The models behind results/mnist/results.json's Table 1, committed in results/mnist/runs: ``darkknowledge
evaluate`` on each reprints the test errors results.json records; and results/mnist/publish.py, which puts them
there."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.jobs import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "results" / "mnist"
DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", ROOT.parent / "shared" / "data"))
spec = importlib.util.spec_from_file_location("publish", MNIST / "publish.py")
publish = importlib.util.module_from_spec(spec)
spec.loader.exec_module(publish)


@pytest.mark.parametrize("name", publish.NAMES)
def test_a_committed_model_reprints_the_test_errors_results_json_records(name, capsys):
    run = MNIST / "runs" / name
    if not (run / checkpoint.MODEL_META).is_file():
        pytest.skip(f"{run.relative_to(ROOT)} is not committed yet (results/mnist/publish.py puts it there)")
    if not (DATA / "mnist").is_dir():
        pytest.skip("MNIST files not found; set DARKKNOWLEDGE_DATA")
    recorded = json.loads((MNIST / "results.json").read_text())["table1"][name]
    meta = checkpoint.read_model_meta(run)
    assert (meta["spec"], meta["epoch"]) == (recorded["spec"], recorded["epoch"]), \
        f"results.json's table1.{name} describes another model than {run}"
    assert main(["evaluate", str(run), "--data-dir", str(DATA)]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == recorded["test_errors"]


def test_the_committed_models_stay_small():
    weights = list((MNIST / "runs").glob(f"*/{checkpoint.MODEL_WEIGHTS}"))
    assert sum(f.stat().st_size for f in weights) < 30e6  # the budget for the repository


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("results") / "runs" / "small"
    assert main(["train", "--model", "mlp:16", "--epochs", "2", "--batch-size", "256", "--no-progress",
                 "--out", str(run)]) == 0
    return run


def write_results(into: Path, **errors):
    into.mkdir(parents=True, exist_ok=True)
    (into / "results.json").write_text(json.dumps({"table1": {k: {"test_errors": v} for k, v in errors.items()}}))


def test_publish_copies_only_the_model_and_checks_it_against_results_json(finished_run, tmp_path, capsys):
    measured = evaluate_run(finished_run)["errors"]
    write_results(tmp_path, small=measured)
    assert publish.main([f"small={finished_run}", "--into", str(tmp_path)]) == 0
    published = tmp_path / "runs" / "small"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["small"]  # nothing staged is left
    assert sorted(p.name for p in published.iterdir()) == [checkpoint.MODEL_META, checkpoint.MODEL_WEIGHTS]
    assert checkpoint.read_model_meta(published)["weights_sha256"] == \
        checkpoint.read_model_meta(finished_run)["weights_sha256"]
    assert f"{measured} test errors; results.json records {measured}" in capsys.readouterr().out

    write_results(tmp_path, small=measured + 1)  # results.json of other weights: published, but flagged
    assert publish.main([f"small={finished_run}", "--into", str(tmp_path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert checkpoint.load_model(published)


def test_publish_puts_back_the_old_model_a_crash_left_aside(finished_run, tmp_path, capsys):
    write_results(tmp_path, small=evaluate_run(finished_run)["errors"])
    assert publish.main([f"small={finished_run}", "--into", str(tmp_path)]) == 0
    runs = tmp_path / "runs"
    (runs / "small").rename(runs / ".small.old")  # as a crash between the two renames leaves it
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished_run, corrupt)
    (corrupt / checkpoint.MODEL_WEIGHTS).write_bytes(b"not the weights")
    assert publish.main([f"small={corrupt}", "--into", str(tmp_path)]) == 2
    assert "checksum" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["small"]  # the old model back, the bad copy gone
    assert checkpoint.load_model(runs / "small")


def test_publish_refuses_an_unfinished_run_a_bad_name_and_its_own_target(finished_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    assert main(["train", "--model", "mlp:16", "--epochs", "2", "--batch-size", "256", "--no-progress",
                 "--out", str(unfinished)]) == 0
    state = json.loads((unfinished / checkpoint.STATE_META).read_text())
    checkpoint.write_json(unfinished / checkpoint.STATE_META, {**state, "done": False})
    capsys.readouterr()
    assert publish.main([f"teacher={unfinished}", "--into", str(tmp_path)]) == 2
    assert "has not finished training" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "teacher").exists()
    assert publish.main([f"student={finished_run}", "--into", str(tmp_path)]) == 2
    assert "NAME one of teacher, small, distilled" in capsys.readouterr().err
    assert publish.main([f"small={finished_run}", "--into", str(finished_run.parents[1])]) == 2
    assert "already" in capsys.readouterr().err
