"""Devices (issue 30): what decides where things run, exercised on the CPU as far as it goes (a fake free-memory
number, a fake GPU count), and the CUDA tests a machine with a GPU runs (skipped here): fit, distill, the store,
ensembles, specialists and language models on cuda in fp16 and bf16, with the teacher on another device."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from darkknowledge import distributed, feeding
from darkknowledge.cli import main
from darkknowledge.data.transfer import ArrayTransferSet, DatasetTransferSet, as_transfer_set
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import device_of, predict_logits
from darkknowledge.losses import CHUNK_ELEMENTS, CUDA_CHUNK_BYTES, chunk_rows_for, distillation_loss
from darkknowledge.models import build_model
from darkknowledge.training import Distillation, TrainConfig, fit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = dict(log=lambda _: None)
LLAMA_VOCABULARY = 128_256


def features(n=96, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp(max=classes - 1)


def mlp(seed=0, shape=(6,), classes=3):
    torch.manual_seed(seed)
    return build_model("mlp:16", shape, classes)


def config(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.1, "progress": False, **kw})


# -- the loss sized for the device --------------------------------------------------------------------------------

def test_cpu_chunks_stay_cache_sized():
    assert chunk_rows_for(10) == CHUNK_ELEMENTS // 10
    assert chunk_rows_for(LLAMA_VOCABULARY, "cpu") == 4  # what the CPU wants; on CUDA it was the slowdown


def test_cuda_chunks_are_a_share_of_free_memory_within_bounds_never_a_handful_of_rows():
    least, most = CUDA_CHUNK_BYTES
    rows_at = {free: chunk_rows_for(LLAMA_VOCABULARY, "cuda", free_bytes=free) for free in (0, 1 << 30, 4 << 30,
                                                                                            140 << 30)}
    per_row = 5 * 4 * LLAMA_VOCABULARY  # CHUNK_TEMPORARIES float32 rows
    assert rows_at[0] == rows_at[1 << 30] == least // per_row >= 100  # the floor: a few hundred MB
    assert rows_at[4 << 30] == (4 << 30) // 8 // per_row  # a share of what is free
    assert rows_at[140 << 30] == most // per_row  # the ceiling: an H200's free memory does not make 9 GB chunks
    assert min(rows_at.values()) > 25 * chunk_rows_for(LLAMA_VOCABULARY, "cpu")


def test_the_users_chunk_budget_wins_on_any_device_and_bad_ones_are_one_line():
    assert chunk_rows_for(1000, "cpu", chunk_mb=2) == (2 << 20) // (5 * 4 * 1000)
    assert chunk_rows_for(1000, "cuda", chunk_mb=2, free_bytes=1 << 40) == (2 << 20) // (5 * 4 * 1000)
    assert chunk_rows_for(10**9, "cpu", chunk_mb=1) == 1
    for bad in (0, -1, float("nan")):
        with pytest.raises(DarkKnowledgeError, match="loss_chunk_mb"):
            chunk_rows_for(10, chunk_mb=bad)
        with pytest.raises(DarkKnowledgeError, match="loss_chunk_mb"):
            Distillation(2.0, chunk_mb=bad)


def test_the_chunk_budget_changes_nothing_but_speed():
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 37, 300, generator=g, dtype=torch.float64), torch.randn(2, 37, 300, generator=g)
    labels = torch.randint(0, 300, (2, 37), generator=g)
    losses = []
    for chunk_mb in (None, 0.01, 100):
        student = z.clone().requires_grad_(True)
        out = distillation_loss(student, v.double(), labels, temperature=2.0, hard_weight=0.5, chunk_mb=chunk_mb)
        out.total.backward()
        losses.append((out.total.detach(), student.grad))
    for total, grad in losses[1:]:
        torch.testing.assert_close(total, losses[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, losses[0][1], rtol=0, atol=1e-12)


def test_distill_refuses_a_bad_loss_chunk_in_one_line(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path / "t"), "-T", "2", "--out", str(tmp_path / "s"),
                 "--loss-chunk-mb", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--loss-chunk-mb must be in (0, 1000000]" in err


# -- one key for the same tensors, however wrapped ----------------------------------------------------------------

def test_a_tensor_dataset_has_the_fingerprint_of_its_tensors_however_it_is_wrapped():
    x, y = features()
    pair = as_transfer_set((x, y)).fingerprint()
    assert DatasetTransferSet(TensorDataset(x, y), pin_memory=False).fingerprint() == pair
    assert DatasetTransferSet(TensorDataset(x, y), num_workers=0, name="mine").fingerprint() == pair
    assert ArrayTransferSet(x.numpy(), y.numpy()).fingerprint() == pair
    other = y.clone()
    other[0] = (other[0] + 1) % 3
    assert DatasetTransferSet(TensorDataset(x, other)).fingerprint() != pair


def test_a_store_over_a_wrapped_tensor_dataset_serves_the_same_tensors_as_arrays():
    from darkknowledge.soft_targets import SoftTargets
    x, y = features()
    teacher = mlp()
    store = SoftTargets.compute(teacher, DatasetTransferSet(TensorDataset(x, y), pin_memory=False))
    result = fit(mlp(seed=1), (x, y), None, config(), Distillation(2.0, store=store), device="cpu", **QUIET)
    assert result.history[-1]["train_soft"] > 0


# -- torchrun: nccl only for a job on CUDA, never more ranks than GPUs ---------------------------------------------

@pytest.fixture
def one_fake_gpu(monkeypatch):
    """A machine that says it has one CUDA device (nothing may actually use it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device must not be reached"))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("no process group may form"))


def test_torchrun_with_more_ranks_than_gpus_is_refused_in_one_line(one_fake_gpu, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DarkKnowledgeError, match=r"local rank 1, 1 GPU\(s\)") as raised:
        distributed.init_from_env()
    assert "--nproc-per-node 1" in str(raised.value) and "--device cpu" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_torchrun_on_the_cpu_takes_gloo_even_where_cuda_is_present(one_fake_gpu):
    assert distributed.backend("cpu") == "gloo"
    assert distributed.backend("auto") == distributed.backend("cuda") == "nccl"


def test_a_rank_beyond_the_gpus_is_refused_by_the_command_line_in_one_line(one_fake_gpu, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", "--out", "never-written", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more processes on this node than it has GPUs" in err


# -- inputs follow the model --------------------------------------------------------------------------------------

def test_generate_feeds_the_model_on_its_own_device():
    from darkknowledge.language_model import generate
    from darkknowledge.transformer import build_language_model

    class Chars:
        end_of_document, vocab_size = 0, 16

        def encode(self, text):
            return [ord(c) % 16 for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    seen = []
    model = build_language_model("gpt:layers=1,dim=8,heads=2,context=8", 16)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    assert len(generate(model, Chars(), "ab", tokens=3)) == 3
    assert set(seen) == {device_of(model)}


# -- on CUDA (a machine with a GPU runs these) --------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_fit_distill_store_and_ensemble_with_the_teacher_on_the_cpu(precision):
    from darkknowledge import Ensemble, SoftTargets, distill
    x, y = features()
    teacher = mlp()
    fit(teacher, (x, y), None, config(), device="cpu", **QUIET)
    student = mlp(seed=1)
    fit(student, (x, y), (x, y), config(**{precision: True}),
        Distillation(2.0, teacher=teacher, teacher_device="cpu"), device="cuda", **QUIET)
    assert device_of(student).type == "cuda" and device_of(teacher).type == "cpu"
    store = SoftTargets.compute(teacher, DatasetTransferSet(TensorDataset(x, y), pin_memory=True))
    fit(student, (x, y), None, config(**{precision: True}), Distillation(2.0, store=store), device="cuda", **QUIET)
    ensemble = Ensemble([teacher, mlp(seed=2)])
    distill(mlp(seed=3), (x, y), ensemble, 3.0, config=config(**{precision: True, "jitter": 0}), device="cuda",
            **QUIET)
    torch.testing.assert_close(predict_logits(student, x), predict_logits(student.cpu(), x), rtol=1e-4, atol=1e-4)


@CUDA
def test_cuda_specialist_from_a_generalist_on_cuda():
    from darkknowledge.data import load_dataset
    from darkknowledge.specialists.specialist import SpecialistConfig, train_specialist
    splits = load_dataset("digits")
    train, val = splits.train.subset(torch.arange(300)), splits.train.subset(torch.arange(300, 400))
    generalist = build_model("mlp:32", train.image_shape, 10)
    fit(generalist, train, val, config(batch_size=32), device="cuda", **QUIET)
    specialist, result = train_specialist(generalist, [3, 5, 8], train, val,
                                          SpecialistConfig(TrainConfig(epochs=1, batch_size=32, progress=False)),
                                          log=lambda _: None)
    assert predict_logits(specialist, val).shape == (len(val), 4)


@CUDA
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_language_model_from_a_token_store(tmp_path, precision):
    from darkknowledge.data.text import TokenWindows
    from darkknowledge.soft_targets import SoftTargets
    from darkknowledge.transformer import build_language_model
    windows = TokenWindows(np.random.default_rng(0).integers(0, 32, 24 * 8 + 1), 8, "train", 32)
    teacher = build_language_model("gpt:layers=1,dim=16,heads=2,context=8", 32).cuda()
    store = SoftTargets.build(teacher, windows, tmp_path / "store", tokenizer_sha256="0" * 64, top_k=4,
                               log=lambda _: None)
    student = build_language_model("gpt:layers=1,dim=16,heads=2,context=8", 32)
    result = fit(student, windows, None, config(batch_size=4, **{precision: True}),
                 Distillation(1.0, store=store, hard_weight=0.5), device="cuda", **QUIET)
    assert device_of(student).type == "cuda" and result.history[-1]["train_soft"] > 0


# -- feeding the device ahead (run here on the CPU, without pinning) ----------------------------------------------

def test_one_ahead_makes_each_item_before_the_previous_is_handed_over():
    made = []

    def items():
        for i in range(3):
            made.append(i)
            yield i

    seen = [(item, list(made)) for item in feeding.one_ahead(items())]
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
    assert list(feeding.one_ahead([])) == [] and list(feeding.one_ahead([7])) == [7]


def test_resident_targets_are_the_stores_rows(tmp_path):
    from darkknowledge import Ensemble, SoftTargets
    x, y = features()
    rows = torch.tensor([5, 0, 95, 5])
    for store in (SoftTargets.compute(Ensemble([mlp(), mlp(seed=1)]), (x, y)),
                  SoftTargets.compute(mlp(), (x, y), top_k=2)):
        resident = feeding.ResidentTargets(store, 3.0, torch.device("cpu"), rows_per_read=7)
        for got, want in zip(feeding.tensors_of(resident.targets(rows)), feeding.tensors_of(store.targets(rows, 3.0))):
            assert torch.equal(got, want)


@pytest.fixture
def fed_on_the_cpu(monkeypatch):
    """fit's CUDA feeding path, on the CPU: ``free`` bytes said free (0: nothing resident, pinned-ahead path)."""
    monkeypatch.setattr(feeding, "AHEAD_DEVICES", ("cuda", "cpu"))

    def free(amount):
        monkeypatch.setattr(feeding, "free_bytes", lambda device: amount)
    return free


@pytest.mark.parametrize("free", [0, 1 << 30])
def test_fit_fed_ahead_trains_the_model_it_trains_as_read(fed_on_the_cpu, free):
    from darkknowledge import SoftTargets
    from darkknowledge.data import load_dataset
    train = load_dataset("digits").train.subset(torch.arange(400))
    store = SoftTargets.compute(build_model("mlp:16", (8, 8), 10), train, top_k=3)
    models = []
    for ahead in (False, True):
        if ahead:
            fed_on_the_cpu(free)
        torch.manual_seed(0)
        student = build_model("mlp:16", (8, 8), 10)
        fit(student, train, None, config(batch_size=32, grad_accumulation=2), Distillation(2.0, store=store,
                                                                                           hard_weight=0.5),
            device="cpu", **QUIET)
        models.append(student.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_token_positions_fed_ahead_leave_out_the_ignored_ones_as_read(fed_on_the_cpu):
    from darkknowledge import SoftTargets
    from darkknowledge.transformer import build_language_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (24, 8), generator=g)
    labels = torch.randint(0, 32, (24, 8), generator=g)
    labels[:, :3] = -100  # e.g. a prompt: no target there
    data = ArrayTransferSet(ids, labels, classes=[str(c) for c in range(32)], ignore_index=-100)
    torch.manual_seed(0)
    store = SoftTargets.compute(build_language_model("gpt:layers=1,dim=16,heads=2,context=8", 32), data, top_k=4)
    models = []
    for ahead in (False, True):
        if ahead:
            fed_on_the_cpu(0)
        torch.manual_seed(1)
        student = build_language_model("gpt:layers=1,dim=16,heads=2,context=8", 32)
        fit(student, data, None, config(batch_size=4), Distillation(1.0, store=store, hard_weight=0.5),
            device="cpu", **QUIET)
        models.append(student.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


# -- benchmarks/gpu.py --------------------------------------------------------------------------------------------

def test_the_gpu_benchmark_runs_small_and_writes_every_field(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["size"] == "small" and result["command"].startswith("python benchmarks/gpu.py")
    for variant in ("naive", "dense", "topk", "sampled"):
        assert result["loss"][variant]["seconds"] > 0 and "peak_mb" in result["loss"][variant]
    for field in ("labels", "online", "store", "online_naive", "store_build"):
        assert result["llm"][f"{field}_tokens_per_s"] > 0
    assert {"store_vs_labels_time", "store_vs_online_naive_speed", "store_bytes_per_token",
            "compact_store_vs_labels_time"} <= set(result["llm"])
    for field in ("hand_loop", "fit", "store", "online_teacher"):
        assert result["images"][f"{field}_seconds"] > 0
    assert {"fit_vs_hand_loop", "store_vs_fit"} <= set(result["images"])
