"""The CLI on a user's data and model: --data (.npz, x.npy/y.npy, an image folder, CSV/Parquet), --model
package.module:factory with --model-option, a run folder written by the library's fit, and one-line errors that
leave --out as it was."""

import json
import textwrap

import numpy as np
import pytest
import torch

from darkknowledge import TrainConfig, fit
from darkknowledge.cli import main
from darkknowledge.data.files import load_files
from darkknowledge.models import build_model

FAST = ["--epochs", "2", "--batch-size", "32", "--no-progress"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(argv, capsys) -> str:
    code, _, err = run(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("darkknowledge: error: "), err
    return err


def rgb_npz(path, n=160, test=40):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n + test, 3, 8, 8), dtype=np.uint8)
    y = (x[:, 0].mean((1, 2)) > 127).astype(np.int64)
    np.savez(path, x=x[:n], y=y[:n], x_test=x[n:], y_test=y[n:], classes=np.array(["dark", "bright"]))
    return path


def test_an_npz_runs_through_every_verb(tmp_path, capsys):
    data = rgb_npz(tmp_path / "rgb.npz")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert run(["train", "--data", data, "--model", "cnn:tiny", *FAST, "--out", teacher], capsys)[0] == 0
    meta = json.loads((teacher / "model.json").read_text())
    assert meta["input_shape"] == [3, 8, 8] and meta["classes"] == ["dark", "bright"]
    assert meta["transfer_set"]["transform"] == {"name": "normalize", "divide": 255}
    code, out, _ = run(["evaluate", teacher], capsys)
    assert code == 0 and json.loads(out)["total"] == 40 and json.loads(out)["dataset"] == "data:rgb.npz"
    # distill reads the teacher's data by default
    assert run(["distill", "--teacher", teacher, "--student", "mlp:16", "-T", "3", *FAST, "--out", student],
               capsys)[0] == 0
    assert json.loads((student / "model.json").read_text())["data"]["path"] == str(data)


def test_a_memory_mapped_folder_and_its_validation_split(tmp_path, capsys):
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.save(folder / "x.npy", rng.normal(size=(120, 5)).astype(np.float32))
    np.save(folder / "y.npy", rng.integers(0, 3, size=120))
    (folder / "classes.txt").write_text("a\nb\nc\n")
    splits = load_files(folder)
    assert isinstance(splits.train.inputs, np.memmap) and splits.test is None
    assert run(["train", "--data", folder, "--model", "mlp:8", "--val-size", "20", *FAST, "--out",
                tmp_path / "run"], capsys)[0] == 0
    code, out, _ = run(["evaluate", tmp_path / "run", "--split", "val"], capsys)
    assert code == 0 and json.loads(out)["total"] == 20
    assert "no test split" in error_line(["evaluate", tmp_path / "run"], capsys)


def write_image_folder(root, colour=True, sizes=((8, 8),)):
    from PIL import Image
    rng = np.random.default_rng(2)
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8) + 100 * c
            image = Image.fromarray(pixels) if colour else Image.fromarray(pixels[..., 0])
            image.save(root / name / f"{i}.png")


def test_an_image_folder_colour_or_grey(tmp_path, capsys):
    write_image_folder(tmp_path / "pets")
    splits = load_files(tmp_path / "pets")
    assert splits.train.input_shape == (3, 8, 8) and splits.train.classes == ("cats", "dogs")
    write_image_folder(tmp_path / "grey", colour=False)
    assert load_files(tmp_path / "grey").train.input_shape == (8, 8)
    assert run(["train", "--data", tmp_path / "pets", "--model", "cnn:tiny", "--val-size", "4", *FAST, "--out",
                tmp_path / "run"], capsys)[0] == 0


def test_image_folder_mistakes_are_one_line(tmp_path, capsys):
    write_image_folder(tmp_path / "mixed", sizes=((8, 8), (10, 6)))
    err = error_line(["train", "--data", tmp_path / "mixed", "--out", tmp_path / "run"], capsys)
    assert "--image-size" in err and ".png" in err
    assert run(["train", "--data", tmp_path / "mixed", "--image-size", "6x5", "--model", "mlp:8", "--val-size",
                "4", *FAST, "--out", tmp_path / "run"], capsys)[0] == 0
    assert json.loads((tmp_path / "run" / "model.json").read_text())["input_shape"] == [3, 6, 5]
    (tmp_path / "mixed" / "birds").mkdir()
    assert "holds no images" in error_line(["train", "--data", tmp_path / "mixed", "--image-size", "6", "--out",
                                            tmp_path / "other"], capsys)


@pytest.fixture
def wine_csv(tmp_path):
    from sklearn.datasets import load_wine
    frame = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    frame.to_csv(tmp_path / "wine.csv", index=False)
    return tmp_path / "wine.csv"


def test_a_table_and_its_mistakes_leave_out_untouched(tmp_path, wine_csv, capsys):
    out = tmp_path / "run"
    assert run(["train", "--data", wine_csv, "--label-column", "cultivar", "--model", "mlp:16", "--epochs", "20",
                "--lr", "0.05", "--no-progress", "--out", out], capsys)[0] == 0
    meta = json.loads((out / "model.json").read_text())
    assert len(meta["transfer_set"]["transform"]["mean"]) == 13  # standardised per feature, recorded
    code, text, _ = run(["evaluate", out, "--split", "val"], capsys)
    assert code == 0 and json.loads(text)["errors"] <= 4  # of 18 validation wines: the MLP learned
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "--label-column" in error_line(["train", "--data", wine_csv, "--out", out, "--resume"], capsys)
    import pandas as pd
    frame = pd.read_csv(wine_csv)
    frame["colour"] = "red"
    frame.to_csv(tmp_path / "text.csv", index=False)
    assert "colour are not numeric" in error_line(["train", "--data", tmp_path / "text.csv", "--label-column",
                                                   "cultivar", "--out", out, "--resume"], capsys)
    frame.drop(columns=["colour"]).to_parquet(tmp_path / "wine.parquet")
    assert load_files(tmp_path / "wine.parquet", "cultivar").train.input_shape == (13,)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert "not both" in error_line(["train", "--data", wine_csv, "--dataset", "digits", "--out", out], capsys)


def test_npz_mistakes_name_the_file_and_the_fix(tmp_path, capsys):
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 2)))
    assert "no array y" in error_line(["train", "--data", tmp_path / "nolabels.npz", "--out", tmp_path / "r"],
                                      capsys)
    np.savez(tmp_path / "outside.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 2, 3]), classes=np.array(["a", "b"]))
    assert "outside the 2 classes" in error_line(["train", "--data", tmp_path / "outside.npz", "--out",
                                                  tmp_path / "r"], capsys)
    assert "unknown format" in error_line(["train", "--data", __file__, "--out", tmp_path / "r"], capsys)
    assert not (tmp_path / "r").exists()


FACTORY = '''
import torch
from torch import nn

def small_net(input_shape, num_classes, hidden=8, fail=False):
    if fail:
        raise ValueError("asked to fail")
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
'''


def test_a_user_factory_is_rebuilt_by_every_verb(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_nets.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = rgb_npz(tmp_path / "rgb.npz")
    out = tmp_path / "run"
    assert run(["train", "--data", data, "--model", "user_nets:small_net", "--model-option", "hidden=12", *FAST,
                "--out", out], capsys)[0] == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["spec"] == "user_nets:small_net" and meta["model_options"] == {"hidden": 12}
    code, text, _ = run(["evaluate", out], capsys)
    assert code == 0 and json.loads(text)["parameters"] == 192 * 12 + 12 + 12 * 2 + 2
    assert run(["distill", "--teacher", out, "--student", "user_nets:small_net", "--student-option", "hidden=4",
                "-T", "2", *FAST, "--out", tmp_path / "student"], capsys)[0] == 0
    err = error_line(["train", "--data", data, "--model", "user_nets:small_net", "--model-option", "fail=true",
                      "--out", tmp_path / "x"], capsys)
    assert "ValueError in the factory: asked to fail" in err
    code, _, err = run(["train", "--data", data, "--model", "user_nets:small_net", "--model-option", "fail=true",
                        "--out", tmp_path / "x", "--debug"], capsys)
    assert code == 1 and "Traceback" in err and 'raise ValueError("asked to fail")' in err
    assert "cannot import module no_such_nets" in error_line(
        ["train", "--data", data, "--model", "no_such_nets:net", "--out", tmp_path / "x"], capsys)


def test_a_folder_written_by_fit_alone_works_with_the_cli(tmp_path, capsys):
    data = rgb_npz(tmp_path / "rgb.npz")
    splits = load_files(data)
    torch.manual_seed(0)
    model = build_model("mlp:16", (3, 8, 8), 2)
    fit(model, splits.train, None, TrainConfig(epochs=1, progress=False), run_dir=tmp_path / "fitted",
        log=lambda _: None)
    code, text, _ = run(["evaluate", tmp_path / "fitted", "--data", data], capsys)
    assert code == 0 and json.loads(text)["total"] == 40
    assert "does not say which data" in error_line(["evaluate", tmp_path / "fitted"], capsys)
    assert run(["distill", "--teacher", tmp_path / "fitted", "--data", data, "--student", "mlp:4", "-T", "2",
                *FAST, "--out", tmp_path / "student"], capsys)[0] == 0


def test_device_and_optimizer_options(tmp_path, capsys):
    data = rgb_npz(tmp_path / "rgb.npz")
    assert run(["train", "--data", data, "--model", "mlp:8", "--optimizer", "adamw", "--lr", "0.01",
                "--grad-accumulation", "2", "--clip-grad-norm", "1", "--device", "cpu", *FAST, "--out",
                tmp_path / "run"], capsys)[0] == 0
    training = json.loads((tmp_path / "run" / "model.json").read_text())["training"]
    assert training["optimizer"] == "adamw" and training["grad_accumulation"] == 2
    assert "unknown device" in error_line(["train", "--data", data, "--device", "gpu0", "--out", tmp_path / "x"],
                                          capsys)
    if not torch.cuda.is_available():
        assert "no CUDA device" in error_line(["evaluate", tmp_path / "run", "--device", "cuda"], capsys)
    assert "fp16 training needs a CUDA device" in error_line(
        ["train", "--data", data, "--fp16", "--device", "cpu", "--out", tmp_path / "x"], capsys)


@pytest.mark.parametrize("shape", [(20,), (20, 0), (20, 1, 1, 2, 2, 2)])
def test_inputs_without_a_dimension_or_with_too_many_are_one_line(tmp_path, capsys, shape):
    np.savez(tmp_path / "x.npz", x=np.ones(shape, np.float32), y=np.arange(20) % 2)
    line = error_line(["train", "--data", tmp_path / "x.npz", "--out", tmp_path / "out", *FAST], capsys)
    assert f"inputs x have shape {list(shape)}" in line and "1 to 4 non-empty dimensions" in line


def test_a_stray_huge_label_is_refused_before_its_class_list_is_made(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", x=np.ones((20, 3), np.float32), y=np.array([0] * 19 + [10**9]))
    line = error_line(["train", "--data", tmp_path / "x.npz", "--out", tmp_path / "out", *FAST], capsys)
    assert "largest label is 1000000000" in line and "at most 1,000,000" in line


@pytest.mark.parametrize("value, needle", [("1000000000", "must be in [1, 1000000]"),
                                           ("33", "grad_accumulation must be at most batch_size")])
def test_more_micro_batches_than_cases_in_a_batch_are_refused(tmp_path, capsys, value, needle):
    rgb_npz(tmp_path / "x.npz")
    line = error_line(["train", "--data", tmp_path / "x.npz", "--out", tmp_path / "out", *FAST,
                       "--grad-accumulation", value], capsys)
    assert needle in line
