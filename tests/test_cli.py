"""The ``darkknowledge`` command: train, distill, evaluate, demo, TOML configs, and one-line errors."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.experiments import demo

FAST = ["--epochs", "2", "--batch-size", "64", "--no-progress"]
DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir() or not (DATA / "fashion-mnist").is_dir(),
                                 reason="MNIST files not found; set DARKKNOWLEDGE_DATA")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("darkknowledge: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", "--model", "mlp:64", "--out", str(out), *FAST]) == 0
    return out


def test_train_then_evaluate_prints_errors_accuracy_and_per_class_errors(teacher_run, capsys):
    code, out, _ = run_cli(capsys, "evaluate", teacher_run)
    assert code == 0
    result = json.loads(out)
    assert result["total"] == 449 and result["split"] == "test" and result["dataset"] == "digits"
    assert sum(result["per_class_errors"].values()) == result["errors"]
    assert result["accuracy"] == pytest.approx(1 - result["errors"] / 449)
    assert result["errors"] < 100  # two epochs on digits learn something


def test_distill_records_its_teacher_and_learns(teacher_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "4",
                             "--hard-weight", "0.5", "--out", tmp_path / "student", *FAST, "--epochs", "6")
    assert code == 0, err
    assert "saved" in out
    meta = checkpoint.read_model_meta(tmp_path / "student")
    assert meta["teacher"]["weights_sha256"] == checkpoint.read_model_meta(teacher_run)["weights_sha256"]
    assert meta["temperature"] == 4 and meta["hard_weight"] == 0.5 and meta["dataset"] == "digits"
    _, out, _ = run_cli(capsys, "evaluate", tmp_path / "student", "--split", "val")
    assert json.loads(out)["errors"] < 120  # of 202; chance is ~182


def test_distill_from_a_sampled_store_on_the_command_line(teacher_run, tmp_path, capsys):
    """--samples K --head H: the sampled layout of the one store, for images as for tokens; at T = 1 only."""
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "1",
                           "--samples", "3", "--head", "2", "--out", tmp_path / "sampled", *FAST)
    assert code == 0, err
    header = json.loads(next((tmp_path / "soft-targets").glob("*.json")).read_text())
    assert (header["layout"], header["top_k"], header["key_parts"]["head"]) == ("sampled", 5, 2)
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "2",
                           "--samples", "3", "--out", tmp_path / "hot", *FAST)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "T = 1" in err, err
    assert not (tmp_path / "hot").exists()


def test_distill_from_a_compact_store_on_the_command_line(teacher_run, tmp_path, capsys):
    """--quant packs the sampled draws (issue 31's compact layout for images too): a smaller store that trains."""
    sizes = {}
    for quant in (None, "log8"):
        store_dir = tmp_path / f"store-{quant}"
        code, _, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "1",
                               "--samples", "8", "--head", "2", *(("--quant", quant) if quant else ()),
                               "--store-dir", store_dir, "--out", tmp_path / f"student-{quant}", *FAST)
        assert code == 0, err
        header = json.loads(next(store_dir.glob("*.json")).read_text())
        assert header["layout"] == ("compact" if quant else "sampled")
        assert header["key_parts"].get("quant") == quant
        sizes[quant] = sum(f.stat().st_size for f in store_dir.iterdir() if f.suffix != ".json")
    assert sizes["log8"] < sizes[None] / 4, sizes
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "1",
                           "--quant", "log8", "--out", tmp_path / "unsampled", *FAST)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--samples" in err, err
    assert not (tmp_path / "unsampled").exists()


def test_toml_config_gives_defaults_and_the_command_line_overrides_them(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('model = "mlp:8"\nepochs = 2\nbatch-size = 256\nno_progress = true\n')
    assert run_cli(capsys, "train", "--config", config, "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, "train", "--config", config, "--epochs", "1", "--out", tmp_path / "b")[0] == 0
    a, b = (checkpoint.read_model_meta(tmp_path / d) for d in ("a", "b"))
    assert a["spec"] == b["spec"] == "mlp:8"
    assert (a["training"]["epochs"], b["training"]["epochs"]) == (2, 1)
    assert a["training"]["batch_size"] == 256


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("epoch = 2\n")
    assert_one_line_error(*run_cli(capsys, "train", "--config", config, "--out", tmp_path / "x")[::2],
                          "unknown option(s) epoch")
    config.write_text("epochs = [\n")
    assert_one_line_error(*run_cli(capsys, "train", "--config", config, "--out", tmp_path / "x")[::2],
                          "not valid TOML")
    assert_one_line_error(*run_cli(capsys, "train", "--config", tmp_path / "nope.toml")[::2], "not found")


def test_bad_model_spec_and_options_are_one_line_errors(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--model", "mlp:12x", "--out", tmp_path / "x")[::2], "mlp:12x")
    assert_one_line_error(*run_cli(capsys, "train", "--model", "resnet", "--out", tmp_path / "x")[::2], "resnet")
    assert_one_line_error(*run_cli(capsys, "train", "--out", tmp_path / "x", "--lr", "-1")[::2], "lr")
    assert_one_line_error(*run_cli(capsys, "train")[::2], "--out")
    assert_one_line_error(*run_cli(capsys, "distill", "--teacher", tmp_path, "--out", tmp_path / "s")[::2],
                          "--temperature")


def test_missing_and_corrupt_model_files_are_one_line_errors(teacher_run, tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "evaluate", tmp_path / "nothing-here")[::2], "nothing-here")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (checkpoint.MODEL_WEIGHTS, checkpoint.MODEL_META):
        (broken / name).write_bytes((teacher_run / name).read_bytes())
    data = bytearray((broken / checkpoint.MODEL_WEIGHTS).read_bytes())
    data[-3] ^= 0x55
    (broken / checkpoint.MODEL_WEIGHTS).write_bytes(bytes(data))
    assert_one_line_error(*run_cli(capsys, "evaluate", broken)[::2], "checksum")
    assert_one_line_error(*run_cli(capsys, "distill", "--teacher", broken, "-T", "2",
                                   "--out", tmp_path / "s")[::2], "checksum")


def test_distill_validates_on_the_teachers_split_unless_given_another_and_says_which(tmp_path, capsys):
    # A teacher trained with --val-size 0.3: a student on the default split would train on teacher validation cases
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", "mlp:16", "--val-size", "0.3", "--val-seed", "5", "--out", str(teacher), *FAST,
                 "--epochs", "1"]) == 0
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher, "--student", "mlp:16", "-T", "4", "--out",
                           tmp_path / "student", *FAST, "--epochs", "1")
    assert code == 0 and "validation split: the teacher's (size 0.3, seed 5)" in err
    assert checkpoint.read_model_meta(tmp_path / "student")["validation"] == {"size": 0.3, "seed": 5}
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher, "--student", "mlp:16", "-T", "4", "--val-size",
                           "100", "--out", tmp_path / "other", *FAST, "--epochs", "1")
    assert code == 0 and "the teacher's was size 0.3, seed 5" in err
    assert checkpoint.read_model_meta(tmp_path / "other")["validation"] == {"size": 100, "seed": 0}


def test_a_refused_run_leaves_no_folder_behind(teacher_run, tmp_path, capsys):
    # --fp16 on the CPU is refused; neither the run folder (nor the folders made for it) nor a store is left
    code, _, err = run_cli(capsys, "train", "--model", "mlp:16", "--fp16", "--device", "cpu", "--out",
                           tmp_path / "new" / "run", *FAST)
    assert_one_line_error(code, err, "fp16 training needs a CUDA device")
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher_run, "--student", "mlp:16", "-T", "4", "--fp16",
                           "--device", "cpu", "--out", tmp_path / "student", *FAST)
    assert_one_line_error(code, err, "fp16 training needs a CUDA device")
    assert not list(tmp_path.iterdir())
    # a folder that was there before is kept, with what it held
    (tmp_path / "kept").mkdir()
    code, _, err = run_cli(capsys, "train", "--model", "mlp:16", "--fp16", "--device", "cpu", "--out",
                           tmp_path / "kept", *FAST)
    assert code == 1 and (tmp_path / "kept").is_dir()


def test_rerunning_into_a_finished_run_needs_resume(teacher_run, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--model", "mlp:64", "--out", teacher_run, *FAST)[::2],
                          "--resume")


def test_missing_dataset_files_say_where_to_put_them(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "x")
    assert_one_line_error(code, err, str(tmp_path / "mnist"), "train-images-idx3-ubyte.gz", "--download")


@needs_mnist
def test_a_teacher_with_other_classes_is_refused(tmp_path, capsys):
    teacher = tmp_path / "fashion"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(DATA), "--model", "mlp:8",
                 "--epochs", "1", "--batch-size", "1024", "--no-progress", "--out", str(teacher)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "distill", "--teacher", teacher, "--dataset", "mnist", "--data-dir", DATA,
                           "-T", "2", "--out", tmp_path / "s", *FAST)
    assert_one_line_error(code, err, "classes", "use a model trained on this dataset")
    code, _, err = run_cli(capsys, "evaluate", teacher, "--dataset", "mnist", "--data-dir", DATA)
    assert_one_line_error(code, err, "classes")


def test_evaluating_a_digits_model_on_mnist_names_the_image_size(teacher_run, capsys):
    if not (DATA / "mnist").is_dir():
        pytest.skip("MNIST files not found")
    code, _, err = run_cli(capsys, "evaluate", teacher_run, "--dataset", "mnist", "--data-dir", DATA)
    assert_one_line_error(code, err, "(8, 8)", "(28, 28)")


def test_module_entry_point_and_help():
    for argv in (["--help"], ["distill", "--help"]):
        done = subprocess.run([sys.executable, "-m", "darkknowledge", *argv], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("usage: darkknowledge")
    done = subprocess.run([sys.executable, "-m", "darkknowledge", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("darkknowledge ")


def test_demo_prints_three_models_and_reuses_finished_runs(tmp_path, capsys, monkeypatch):
    # the command's flow on the demo's tiny plan (seconds); the real recipe's numbers are measured in the README
    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, plan=demo.TINY))
    code, out, _ = run_cli(capsys, "demo", "--out", tmp_path, "--no-progress")
    assert code == 0
    rows = {line.split("  ")[0]: line for line in out.splitlines() if line.startswith(("teacher", "small"))}
    assert len(rows) == 3
    errors = [int(line.split()[-2]) for line in rows.values()]
    assert all(0 <= e < 449 for e in errors)
    teacher_errors, baseline_errors, student_errors = errors
    assert teacher_errors < baseline_errors  # the big net is the better one: there is something to distil
    assert student_errors < 40
    stamp = (tmp_path / "teacher" / checkpoint.MODEL_WEIGHTS).stat().st_mtime_ns
    code, again, _ = run_cli(capsys, "demo", "--out", tmp_path, "--no-progress")
    assert code == 0 and again.splitlines()[-3:] == out.splitlines()[-3:]
    assert (tmp_path / "teacher" / checkpoint.MODEL_WEIGHTS).stat().st_mtime_ns == stamp
