"""``darkknowledge specialists cluster|train|evaluate`` on digits, and ``reproduce specialists --quick``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.specialists.jobs import evaluate_specialists, parse_indices
from darkknowledge.errors import DarkKnowledgeError

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
FAST = ["--epochs", "2", "--batch-size", "32", "--no-progress"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def generalist(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "generalist"
    assert main(["train", "--model", "mlp:32", "--out", str(out), "--epochs", "3", "--no-progress"]) == 0
    return out


def test_cluster_train_evaluate(generalist, tmp_path, capsys):
    folder = tmp_path / "specialists"
    code, out, _ = run_cli(capsys, "specialists", "cluster", "--generalist", generalist, "--out", folder,
                           "--clusters", "3")
    assert code == 0 and "wrote" in out
    subsets = json.loads((folder / "subsets.json").read_text())
    assert subsets["source"]["generalist"] == str(generalist) and subsets["method"] == "covariance"
    count = len(subsets["subsets"])

    code, out, err = run_cli(capsys, "specialists", "evaluate", folder)
    assert code == 1 and "not trained yet" in err and "--index" in err
    code, out, _ = run_cli(capsys, "specialists", "train", folder, "--index", "0", *FAST)
    assert code == 0 and out.count("specialist 0") == 1 and (folder / "specialist-00" / "model.json").exists()
    code, out, err = run_cli(capsys, "specialists", "train", folder, "--index", "0", *FAST)
    assert code == 1 and "--resume" in err  # a finished specialist is not overwritten by accident
    code, out, _ = run_cli(capsys, "specialists", "train", folder, "--resume", *FAST)
    assert code == 0 and len(out.strip().splitlines()) == count

    code, out, _ = run_cli(capsys, "specialists", "evaluate", folder, "--json", tmp_path / "eval.json")
    result = json.loads(out)
    assert code == 0 and result == json.loads((tmp_path / "eval.json").read_text())
    assert result["overall"]["cases"] == 449 and result["max_gradient_norm"] <= 1e-6
    assert sum(row["cases"] for row in result["by_coverage"].values()) == 449
    assert [s["index"] for s in result["specialists"]] == list(range(count))


def test_separate_processes_train_different_specialists(generalist, tmp_path, capsys):
    """Two processes at once, each with its own --index, give the same specialists as one process doing all."""
    apart, together = tmp_path / "apart", tmp_path / "together"
    for folder in (apart, together):
        assert run_cli(capsys, "specialists", "cluster", "--generalist", generalist, "--out", folder,
                       "--clusters", "3", "--min-size", "1")[0] == 0
    count = len(json.loads((apart / "subsets.json").read_text())["subsets"])
    assert count >= 2
    # Every run (the reference too) in its own process with one thread: bitwise equality needs the same
    # reduction order in the matmuls, which depends on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(folder, *index):
        return subprocess.Popen([sys.executable, "-m", "darkknowledge", "specialists", "train", str(folder),
                                 *index, *FAST], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = [start(apart, "--index", index) for index in ("0", f"1-{count - 1}")]
    procs.append(start(together))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
    for index in range(count):
        a = checkpoint.load_model(apart / f"specialist-{index:02d}")[0].state_dict()
        b = checkpoint.load_model(together / f"specialist-{index:02d}")[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_soft_targets_and_user_errors(generalist, tmp_path, capsys):
    folder = tmp_path / "soft"
    assert run_cli(capsys, "specialists", "cluster", "--generalist", generalist, "--out", folder, "--clusters", "3",
                   "--method", "confusion", "--raw-columns")[0] == 0
    assert json.loads((folder / "subsets.json").read_text())["params"]["normalize"] is False
    code, _, _ = run_cli(capsys, "specialists", "train", folder, "--index", "0", "-T", "2", "--device", "cpu", *FAST)
    assert code == 0
    meta = checkpoint.read_model_meta(folder / "specialist-00")
    assert meta["specialist"]["targets"] == "soft" and meta["specialist"]["temperature"] == 2
    for argv, needle in ((("train", folder, "--index", "7"), "not in 0.."),
                         (("train", tmp_path / "nowhere"), "subsets.json not found"),
                         (("cluster", "--generalist", tmp_path / "none", "--out", folder, "--clusters", "3"),
                          "not found"),
                         (("train", folder, "--index", "1", "--device", "tpu"), "unknown device 'tpu'")):
        code, _, err = run_cli(capsys, "specialists", *argv)
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1
    assert parse_indices("0,2,4-5", 6) == [0, 2, 4, 5] and parse_indices("all", 3) == [0, 1, 2]
    with pytest.raises(DarkKnowledgeError):
        parse_indices("x", 3)


@pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "fashion-mnist").is_dir(),
                    reason="MNIST files not found; set DARKKNOWLEDGE_DATA")
def test_reproduce_specialists_quick(tmp_path, capsys):
    out = tmp_path / "reproduce"
    argv = ["reproduce", "specialists", "--quick", "--out", out, "--data-dir", DATA, "--no-progress"]
    code, printed, _ = run_cli(capsys, *argv)
    assert code == 0
    assert "[mnist-100: generalist]" in printed  # --no-progress drops the bars, not the stage lines
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["quick"] is True and set(results["datasets"]) == {"mnist-100", "fashion-mnist"}
    assert "### Table 3" in report and "### Table 4" in report and "### Clusters" in report
    for name, d in results["datasets"].items():
        assert set(d["variants"]) == {"hard", "soft"} and d["clusters"]["subsets"]
        for variant in ("hard", "soft"):
            test = d["variants"][variant]["test"]
            assert all(s["training_seconds"] is not None for s in test["specialists"])
            assert sum(r["cases"] for r in test["by_coverage"].values()) == 10000
        folder = out / "runs" / name / "specialists-hard"
        assert d["variants"]["hard"]["test"]["overall"] == evaluate_specialists(folder, data_dir=str(DATA))["overall"]
    stamps = sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/model.safetensors"))
    stamps += sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/*/model.safetensors"))
    assert run_cli(capsys, *argv)[0] == 0  # a rerun reuses every finished stage
    again = sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/model.safetensors"))
    again += sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/*/*/model.safetensors"))
    assert again == stamps
