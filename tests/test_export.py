"""Export: ONNX that onnxruntime runs like PyTorch on real test inputs at any batch size, TorchScript that
loads back, a model card with what a user needs, and one-line errors for bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.evaluation import as_inputs, predict_logits
from darkknowledge.deploy import card_path, export_run
from darkknowledge.export import (DEFAULT_ATOL, Parity, check_parity, export_model, load_deployable, load_test_split,
                                  onnx_session, run_onnx)
from darkknowledge.jobs import DataChoice, distill_run, train_run
from darkknowledge.models import build_model
from darkknowledge.training import TrainConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
HAVE_MNIST = (DATA / "mnist").is_dir()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A tiny model trained on MNIST when its files are here (one epoch, batch 1024: seconds), else on digits."""
    out = tmp_path_factory.mktemp("runs") / "mlp16"
    if HAVE_MNIST:
        data, config = DataChoice("mnist", str(DATA)), TrainConfig(epochs=1, batch_size=1024, progress=False)
    else:
        data, config = DataChoice("digits"), TrainConfig(epochs=5, batch_size=64, progress=False)
    train_run("mlp:16", data, config, out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """A teacher and a student distilled from it at T = 4 on digits, for the model card's teacher fields."""
    root = tmp_path_factory.mktemp("distill")
    config = TrainConfig(epochs=3, batch_size=64, progress=False)
    train_run("mlp:32", DataChoice("digits"), config, root / "teacher", log=lambda _: None)
    distill_run(root / "teacher", "mlp:16", DataChoice("digits"), config, temperature=4, hard_weight=0.5,
                out=root / "student", log=lambda _: None)
    return root / "student"


def _data_dir():
    return str(DATA) if HAVE_MNIST else None


def test_onnx_matches_pytorch_on_every_test_input(real_run, tmp_path):
    result = export_run(real_run, "onnx", tmp_path / "model.onnx", _data_dir(), speed=False)
    test = load_test_split(checkpoint.read_model_meta(real_run)["dataset"], _data_dir())
    assert result.parity.passed and result.parity.cases == len(test)
    assert result.parity.max_abs_diff <= DEFAULT_ATOL and result.parity.argmax_mismatches == 0
    # Independently of check_parity: the whole test set through onnxruntime against the PyTorch model.
    model, _ = checkpoint.load_model(real_run)
    expected = predict_logits(model, test.images).numpy()
    got = run_onnx(onnx_session(result.out), as_inputs(test.images.clone()).numpy(), batch_size=500)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert (got.argmax(1) != test.labels.numpy()).sum() == result.accuracy["errors"]
    if HAVE_MNIST:
        assert len(test) == 10000 and result.accuracy["errors"] < 5000  # one epoch learns something


def test_onnx_batch_size_is_dynamic_and_the_file_documents_its_inputs(real_run, tmp_path):
    out = export_run(real_run, "onnx", tmp_path / "model.onnx", _data_dir(), card=False, speed=False).out
    proto = onnx.load(str(out))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic, not fixed
    meta = {p.key: p.value for p in proto.metadata_props}
    assert "[0, 1]" in meta["preprocessing"] and "255" in meta["preprocessing"]
    assert json.loads(meta["classes"]) == checkpoint.read_model_meta(real_run)["classes"]
    session = onnx_session(out)
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_outputs()[0].name == "logits"
    model, meta_ = checkpoint.load_model(real_run)
    images = load_test_split(meta_["dataset"], _data_dir()).images
    for batch in (1, 333):  # two batch sizes through the same session
        x = as_inputs(images[:batch].clone())
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, len(meta_["classes"]))
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_round_trip(real_run, tmp_path):
    result = export_run(real_run, "torchscript", tmp_path / "model.pt", _data_dir(), card=False, speed=False)
    assert result.parity.passed and result.parity.format == "torchscript"
    loaded = torch.jit.load(str(result.out))  # our own file, just written
    model, meta = checkpoint.load_model(real_run)
    images = load_test_split(meta["dataset"], _data_dir()).images
    for batch in (1, 50):
        x = as_inputs(images[:batch].clone())
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_any_module_exports_as_one_graph(tmp_path):
    """An ensemble is any nn.Module over the members: it exports as one graph and passes the same check."""
    class MeanOfProbs(nn.Module):
        def __init__(self, members):
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, x):
            probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)
            return probs.log()

    torch.manual_seed(0)
    ensemble = MeanOfProbs([build_model("mlp:8", (8, 8), 10), build_model("cnn:tiny", (8, 8), 10)]).eval()
    images = load_test_split("digits").images
    for fmt, name in (("onnx", "e.onnx"), ("torchscript", "e.pt")):
        path = export_model(ensemble, tmp_path / name, fmt, (8, 8), example=images)
        parity = check_parity(path, fmt, ensemble, images)
        assert parity.passed, parity.describe()


def test_model_card_has_data_teacher_temperature_accuracy_speed_command_commit(distilled_run, tmp_path, capsys):
    out = tmp_path / "deploy" / "student.onnx"
    assert main(["export", str(distilled_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    card_file = card_path(out)
    assert card_file == tmp_path / "deploy" / "student.onnx.model_card.md" and str(card_file) in printed
    card = card_file.read_text()
    meta = checkpoint.read_model_meta(distilled_run)
    evaluation = json.loads(_evaluate(distilled_run, capsys))
    assert "Dataset: digits" in card and meta["data_fingerprint"] in card
    assert meta["teacher"]["run"] in card and meta["teacher"]["spec"] in card
    assert "Temperature T: 4" in card and "Hard-label weight: 0.5" in card
    assert f"{evaluation['errors']} errors in 449 cases" in card
    assert "latency ms" in card and "onnxruntime" in card and "PyTorch" in card
    assert f"darkknowledge export {distilled_run} --format onnx --out {out}" in card
    assert checkpoint.provenance()["git_commit"] in card
    assert "[0, 1]" in card and "uint8 / 255" in card  # the preprocessing a caller must do
    assert "max |logit difference|" in card


def _evaluate(run, capsys):
    assert main(["evaluate", str(run)]) == 0
    return capsys.readouterr().out


def test_teacher_card_says_not_distilled(real_run, tmp_path):
    result = export_run(real_run, "torchscript", tmp_path / "t.pt", _data_dir(), speed=False)
    card = result.card.read_text()
    assert "Not distilled" in card and "Not measured" in card and "torch.jit.load" in card


def test_card_says_which_epoch_was_kept_and_why(real_run, tmp_path):
    card = export_run(real_run, "torchscript", tmp_path / "t.pt", _data_dir(), speed=False).card.read_text()
    assert "Validation split (model selection only)" in card and "best validation epoch" in card
    # Trained on every training case: no validation chose the epoch, the last one is kept.
    train_run("mlp:8", DataChoice("digits", val_size=0), TrainConfig(epochs=2, progress=False), tmp_path / "all",
              log=lambda _: None)
    card = export_run(tmp_path / "all", "torchscript", tmp_path / "all.pt", speed=False).card.read_text()
    assert "Validation split: none; trained on every training case" in card and "last epoch kept (2)" in card
    assert "best validation epoch" not in card


def test_a_failed_parity_check_writes_nothing(real_run, tmp_path, monkeypatch):
    import darkknowledge.deploy as deploy
    monkeypatch.setattr(deploy, "check_parity", lambda *a, **k: Parity("onnx", 10, [1], 0.5, 3, DEFAULT_ATOL))
    with pytest.raises(deploy.DarkKnowledgeError, match="does not reproduce PyTorch"):
        export_run(real_run, "onnx", tmp_path / "bad.onnx", _data_dir(), speed=False)
    assert list(tmp_path.iterdir()) == []


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("darkknowledge: error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_inputs_are_one_line_errors(real_run, tmp_path, capsys):
    cases = [
        (["export", real_run, "--format", "tflite", "--out", tmp_path / "m"], "unknown export format 'tflite'"),
        (["export", tmp_path / "missing", "--out", tmp_path / "m.onnx"], "does not exist"),
        (["export", tmp_path, "--out", tmp_path / "m.onnx"], "not a run directory"),
        (["export", real_run], "needs --out"),
        (["export", real_run, "--out", tmp_path], "is a folder"),
        (["export", real_run, "--out", tmp_path / "m.onnx", "--atol", "0"], "--atol must be in (0"),
    ]
    for argv, needle in cases:
        code = main([str(a) for a in argv])
        assert_one_line_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "m.onnx").exists()


def test_load_deployable_reads_a_run(real_run):
    deployable = load_deployable(real_run / "model.json")
    assert deployable.kind == "model" and deployable.spec == "mlp:16" and deployable.weight_bytes > 0


def test_an_ensemble_folder_exports_as_one_graph_or_says_what_is_missing(tmp_path, capsys):
    """Member runs in sub-folders (no manifest): one graph through darkknowledge.ensemble."""
    config = TrainConfig(epochs=1, batch_size=64, progress=False)
    for i in range(2):
        train_run("mlp:8", DataChoice("digits"), TrainConfig(**{**config.__dict__, "seed": i}),
                  tmp_path / "ens" / f"member-{i}", log=lambda _: None)
    code = main(["export", str(tmp_path / "ens"), "--out", str(tmp_path / "ens.onnx"), "--no-card"])
    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "ens.onnx").exists(), captured.err
    deployable = load_deployable(tmp_path / "ens")
    assert deployable.kind == "ensemble" and len(deployable.weight_files) == 2


def test_ensemble_export_card_and_bench(tmp_path):
    """The ensemble path end to end: an ensemble folder exports with its card and benches as one model."""
    config = TrainConfig(epochs=1, batch_size=64, progress=False)
    for i in range(3):
        train_run("mlp:8", DataChoice("digits"), config, tmp_path / "ens" / f"member-{i}", log=lambda _: None)
    result = export_run(tmp_path / "ens", "onnx", tmp_path / "ens.onnx")
    assert result.parity.passed
    card = result.card.read_text()
    assert "An ensemble" in card and "ensemble of 3 x mlp:8" in card and "member-2" in card
    from darkknowledge.bench import BenchConfig, bench_runs
    entry = bench_runs([tmp_path / "ens"], BenchConfig(latency_calls=20, throughput_calls=3, warmup=1))["models"][0]
    assert entry["kind"] == "ensemble" and entry["parameters"] == 3 * (64 * 8 + 8 + 8 * 10 + 10)
    assert entry["flops_per_example"] == 3 * 2 * (64 * 8 + 8 * 10)
