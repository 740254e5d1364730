"""Bench: every number present and positive, FLOPs as counted by hand, the table and JSON, one-line errors."""

import json

import pytest
import torch

from darkknowledge.bench import BenchConfig, bench_runs, flops_per_example, format_table, torch_threads
from darkknowledge.cli import main
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.jobs import DataChoice, train_run
from darkknowledge.models import build_model
from darkknowledge.training import TrainConfig

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SMALL = BenchConfig(latency_calls=30, throughput_calls=3, warmup=2, batch_size=256, max_seconds=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A bigger and a smaller model on digits (a teacher/student pair in miniature)."""
    root = tmp_path_factory.mktemp("bench")
    config = TrainConfig(epochs=3, batch_size=64, progress=False)
    for name, spec in (("big", "mlp:128x2"), ("small", "mlp:16")):
        train_run(spec, DataChoice("digits"), config, root / name, log=lambda _: None)
    return root / "big", root / "small"


def test_flops_per_example_counts_multiply_adds_twice():
    assert flops_per_example(build_model("mlp:30x2", (8, 8), 10), (8, 8)) == 2 * (64 * 30 + 30 * 30 + 30 * 10)
    # cnn:tiny on 8x8: conv 1->8 at 8x8, conv 8->16 at 4x4 (3x3 kernels), dense 16*2*2 -> 32 -> 10
    convs = 8 * 8 * 8 * 1 * 9 + 4 * 4 * 16 * 8 * 9
    assert flops_per_example(build_model("cnn:tiny", (8, 8), 10), (8, 8)) == 2 * (convs + 64 * 32 + 32 * 10)


def test_bench_fields_are_present_and_positive(runs):
    result = bench_runs(list(runs), SMALL)
    assert result["config"]["threads"] == 1 and result["machine"]["onnxruntime"]
    big, small = result["models"]
    for m in (big, small):
        for key in ("parameters", "weights_bytes", "onnx_bytes", "flops_per_example", "test_total"):
            assert m[key] > 0, key
        assert 0 < m["test_accuracy"] <= 1 and m["test_errors"] >= 0
        for runtime in ("pytorch", "onnxruntime"):
            s = m[runtime]
            assert 0 < s["latency_ms_median"] <= s["latency_ms_p99"]
            assert s["throughput_per_s"] > 0 and s["batch_size"] == 256
            assert 20 <= s["latency_calls"] <= 30 and 3 <= s["throughput_calls"] <= 3
        assert m["onnxruntime"]["max_abs_diff"] <= 1e-4
        assert m["onnxruntime"]["test_errors"] == m["test_errors"]
    assert big["parameters"] > small["parameters"] and big["flops_per_example"] > small["flops_per_example"]
    assert big["weights_bytes"] > small["weights_bytes"]
    table = format_table(result)
    assert "ORT cases/s" in table and "1.00x" in table and "mlp:128-128" in table and table.count("\n| ") == 3


def test_bench_cli_prints_the_table_and_saves_json(runs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", *map(str, runs), "--json", str(out), "--calls", "20", "--batch-size", "128",
                 "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "| mlp:16 |" in printed.replace(str(runs[1]) + " ", "")
    saved = json.loads(out.read_text())
    assert [m["run"] for m in saved["models"]] == [str(r) for r in runs]
    assert saved["config"]["batch_size"] == 128 and saved["command"].startswith("darkknowledge bench")
    assert all(m["pytorch"]["throughput_per_s"] > 0 and m["onnxruntime"]["latency_ms_p99"] > 0
               for m in saved["models"])


def test_pytorch_only(runs):
    result = bench_runs([runs[1]], BenchConfig(latency_calls=20, throughput_calls=3, warmup=0, onnx=False))
    assert "onnxruntime" not in result["models"][0] and "ORT" not in format_table(result)


def test_threads_are_set_for_the_measurement_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_settings_and_runs_are_one_line_errors(runs, tmp_path, capsys):
    with pytest.raises(DarkKnowledgeError, match="threads must be at least 1"):
        BenchConfig(threads=0)
    for argv, needle in ((["bench", str(tmp_path / "missing")], "does not exist"),
                         (["bench", str(runs[1]), "--threads", "0"], "--threads must be in [1,"),
                         (["bench", str(runs[1]), "--batch-size", "0"], "--batch-size must be in [1,")):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and needle in err[0], err
