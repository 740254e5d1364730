"""Any data through the one transfer-set interface: tensors, NumPy (memory-mapped too), any torch Dataset, inputs
of any shape and dtype, labels per token position with ignored ones; the trainer's options on such data."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from darkknowledge import (ArrayTransferSet, DatasetTransferSet, Distillation, SoftTargets, TrainConfig, Transform,
                           as_transfer_set, distill, fit)
from darkknowledge.data import transfer
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import evaluate, predict_logits
from darkknowledge.models import build_model

QUIET = dict(log=lambda _: None)


def features(n=96, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp(max=classes - 1)


def config(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.1, "progress": False, **kw})


def mlp(shape=(6,), classes=3, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp:16", shape, classes)


def test_fit_and_store_take_a_tensor_dataset():
    x, y = features()
    data = TensorDataset(x, y)
    teacher = mlp()
    fit(teacher, data, TensorDataset(*features(32, seed=1)), config(), **QUIET)
    store = SoftTargets.compute(teacher, data)
    assert len(store) == len(x) and store.num_classes == 3
    torch.testing.assert_close(store.member_logits(torch.arange(5))[:, 0], predict_logits(teacher, x[:5]))
    student = mlp(seed=1)
    result = fit(student, data, None, config(), Distillation(4.0, store=store), **QUIET)
    assert result.history[-1]["train_soft"] > 0
    # the same data as an (inputs, labels) pair has the same fingerprint, so the store serves it too
    assert as_transfer_set((x, y)).fingerprint() == as_transfer_set(data).fingerprint()


def test_a_store_refuses_other_data():
    x, y = features()
    store = SoftTargets.compute(mlp(), (x, y))
    other = y.clone()
    other[0] = (other[0] + 1) % 3
    with pytest.raises(DarkKnowledgeError, match="another transfer set"):
        fit(mlp(), (x, other), None, config(epochs=1), Distillation(2.0, store=store), **QUIET)


class PairsDataset(Dataset):
    """A plain map-style dataset yielding (uint8 RGB image as NumPy, int label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].numpy(), int(self.labels[i])


def rgb(n=40):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def test_a_dataset_streams_the_same_batches_as_arrays_in_memory():
    images, labels = rgb()
    streamed = DatasetTransferSet(PairsDataset(images, labels), num_workers=1)
    held = ArrayTransferSet(images, labels)
    assert streamed.classes == held.classes == ("0", "1", "2", "3")
    assert streamed.describe()["transform"] == held.describe()["transform"] == {"name": "normalize", "divide": 255}
    order = [torch.tensor([5, 1, 9]), torch.tensor([0, 39])]
    for (a, la, ia), (b, lb, ib) in zip(transfer.batches(streamed, order), transfer.batches(held, order)):
        assert a.dtype == torch.float32 and a.shape[1:] == (3, 8, 8)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(la, lb) and torch.equal(ia, ib)
    # a cnn on RGB inputs trains to the same weights from either path
    models = []
    for data in (streamed, held):
        torch.manual_seed(0)
        model = build_model("cnn:tiny", (3, 8, 8), 4)
        fit(model, data, None, config(epochs=1), **QUIET)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q)


def test_a_memory_mapped_npy_trains(tmp_path):
    x, y = features(64)
    np.save(tmp_path / "x.npy", x.numpy())
    mapped = ArrayTransferSet(np.load(tmp_path / "x.npy", mmap_mode="r"), y.numpy(), name="mapped")
    model = mlp()
    fit(model, mapped, mapped.subset(np.arange(16)), config(epochs=1), **QUIET)
    assert evaluate(model, mapped).total == 64
    assert mapped.fingerprint() == ArrayTransferSet(x, y).fingerprint()


def test_a_large_memory_map_is_read_with_pread_and_maps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "FILE_READ_BYTES", 1000)
    x = np.random.default_rng(0).integers(0, 256, size=(300, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    data = ArrayTransferSet(np.load(tmp_path / "x.npy", mmap_mode="r"), np.arange(300) % 3)
    assert isinstance(data.inputs, transfer._FileRows)
    rows = torch.tensor([299, 0, 17, 17])
    assert np.array_equal(data.raw(rows).numpy(), x[rows.numpy()])
    part = data.subset(np.arange(100, 200))
    assert np.array_equal(part.raw(torch.tensor([5, 0])).numpy(), x[[105, 100]])
    assert data.fingerprint() == ArrayTransferSet(x, np.arange(300) % 3).fingerprint()
    streamed = list(transfer.batches(DatasetTransferSet(TensorDataset(torch.from_numpy(x), torch.arange(300) % 3),
                                                        num_workers=1), [rows]))
    torch.testing.assert_close(streamed[0][0], data.batch(rows)[0])


def test_large_inputs_are_fingerprinted_by_a_seeded_sample(monkeypatch):
    monkeypatch.setattr(transfer, "FULL_HASH_BYTES", 100)
    monkeypatch.setattr(transfer, "SAMPLE_ITEMS", 4)
    x, y = features(50)
    base = ArrayTransferSet(x, y).fingerprint()
    sampled = int(transfer._sample(50)[0])
    changed = x.clone()
    changed[sampled] += 1
    assert ArrayTransferSet(changed, y).fingerprint() != base
    unsampled = next(i for i in range(50) if i not in set(transfer._sample(50).tolist()))
    changed = x.clone()
    changed[unsampled] += 1
    assert ArrayTransferSet(changed, y).fingerprint() == base  # the stated rule: a sample, not every byte


class TokenTagger(nn.Module):
    """Token ids [B, T] -> logits [B, T, C]: one case per token position."""

    def __init__(self, vocab=12, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, classes)

    def forward(self, ids):
        return self.out(self.embed(ids))


def test_token_positions_are_cases_and_ignored_labels_count_for_nothing():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (20, 6), generator=g)
    labels = ids % 5
    labels[:, :2] = transfer.IGNORE_INDEX  # e.g. a prompt: no target there
    data = ArrayTransferSet(ids, labels, classes=[str(c) for c in range(5)], ignore_index=transfer.IGNORE_INDEX)
    assert data.transform.identity and data.cases_per_item == 6
    torch.manual_seed(0)
    teacher = TokenTagger()
    fit(teacher, data, None, config(epochs=3, batch_size=4), **QUIET)
    result = evaluate(teacher, data)
    assert result.total == 20 * 4  # ignored positions left out
    store = SoftTargets.compute(teacher, data)
    assert len(store) == 20 * 6
    torch.testing.assert_close(store.member_logits(torch.arange(6))[:, 0], predict_logits(teacher, ids[:1])[0])
    torch.manual_seed(1)
    student = TokenTagger()
    history = fit(student, data, None, config(epochs=1, batch_size=4), Distillation(2.0, store=store), **QUIET).history
    assert history[0]["train_errors"] <= 80
    # the store and the teacher run online give the same loss
    online = fit(TokenTagger(), data, None, config(epochs=1, batch_size=4, jitter=0),
                 Distillation(2.0, teacher=teacher), **QUIET)
    assert online.history[0]["train_soft"] > 0


def test_gradient_accumulation_takes_the_same_steps():
    x, y = features()
    weights = []
    for k in (1, 3):
        model = mlp()
        fit(model, (x, y), None, config(grad_accumulation=k), **QUIET)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_adamw_resumes_exactly_and_callbacks_see_each_epoch(tmp_path):
    x, y = features()
    whole = mlp()
    fit(whole, (x, y), None, config(epochs=2, optimizer="adamw", lr=0.01), **QUIET)
    seen = []
    part = mlp()
    fit(part, (x, y), None, config(epochs=2, optimizer="adamw", lr=0.01), run_dir=tmp_path,
        callbacks=[lambda record: seen.append(record["epoch"]) or True], **QUIET)
    assert seen == [1]  # a callback that returns True stops after that epoch
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    resumed = mlp()
    fit(resumed, (x, y), None, config(epochs=2, optimizer="adamw", lr=0.01), run_dir=tmp_path, resume=True, **QUIET)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)
    described = json.loads((tmp_path / "model.json").read_text())
    assert described["training"]["optimizer"] == "adamw" and described["transfer_set"]["kind"] == "arrays"


def test_any_optimizer_class_and_clipping():
    x, y = features()
    plain, clipped = mlp(), mlp()
    fit(plain, (x, y), None, config(optimizer=torch.optim.RMSprop, lr=0.01), **QUIET)
    fit(clipped, (x, y), None, config(optimizer=torch.optim.RMSprop, lr=0.01, clip_grad_norm=1e-3), **QUIET)
    assert not torch.allclose(plain.net[-1].weight, clipped.net[-1].weight)
    with pytest.raises(DarkKnowledgeError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_device_and_precision_mistakes_are_one_line():
    x, y = features()
    with pytest.raises(DarkKnowledgeError, match="fp16 training needs a CUDA device"):
        fit(mlp(), (x, y), None, config(fp16=True), device="cpu", **QUIET)
    with pytest.raises(DarkKnowledgeError, match="unknown device"):
        fit(mlp(), (x, y), None, config(), device="tpu:3", **QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(DarkKnowledgeError, match="no CUDA device"):
            fit(mlp(), (x, y), None, config(), device="cuda", **QUIET)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_training_with_a_teacher_on_another_device(precision):
    x, y = features()
    teacher = mlp()
    fit(teacher, (x, y), None, config(), device="cpu", **QUIET)
    student = mlp(seed=1)
    objective = Distillation(2.0, teacher=teacher, teacher_device="cpu")
    result = fit(student, (x, y), (x, y), config(**{precision: True}), objective, device="cuda", **QUIET)
    assert next(student.parameters()).device.type == "cuda" and result.history[-1]["train_loss"] > 0
    store = SoftTargets.compute(teacher.cuda(), DatasetTransferSet(TensorDataset(x, y), pin_memory=True))
    fit(student, (x, y), None, config(**{precision: True}), Distillation(2.0, store=store), device="cuda", **QUIET)


def test_distill_in_one_call():
    x, y = features()
    teacher = mlp()
    fit(teacher, (x, y), None, config(), **QUIET)
    student = distill(mlp(seed=1), (x, y), teacher, temperature=3.0, config=config(), log=lambda _: None)
    assert evaluate(student, (x, y)).errors < len(y)


def test_transforms_are_declared_and_round_trip():
    t = Transform(divide=255, mean=(0.5, 0.25, 0.1), std=(0.2, 0.2, 0.3))
    assert Transform.from_description(json.loads(json.dumps(t.describe()))) == t
    x = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(t(x)[:, 1], torch.full((2, 2, 2), 3.75))
    assert Transform().identity and Transform.from_description({"name": "identity"}).identity
    with pytest.raises(DarkKnowledgeError, match="labels must lie in"):
        ArrayTransferSet(torch.zeros(3, 2), torch.tensor([0, 1, 5]), classes=["a", "b"])
    with pytest.raises(DarkKnowledgeError, match="cannot use a str"):
        as_transfer_set("data.csv")


def test_micro_batches_without_cases_still_step_through_a_dataloader():
    images, labels = rgb(10)
    streamed = DatasetTransferSet(PairsDataset(images, labels))
    weights = []
    for data in (streamed, ArrayTransferSet(images, labels)):
        torch.manual_seed(0)
        model = build_model("mlp:4", (3, 8, 8), 4)
        # 4 parts of 4 cases, and of the last step's 2 (10 cases): two parts hold none
        fit(model, data, None, config(batch_size=4, grad_accumulation=4), **QUIET)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1])


class NoisyDataset(PairsDataset):
    """Augments in __getitem__: every read of an item gives other pixels (a random flip-like noise)."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return np.clip(image.astype(np.int16) + np.random.randint(-8, 9, image.shape), 0, 255).astype(np.uint8), label


def test_a_datasets_fingerprint_never_depends_on_random_augmentation(tmp_path):
    images, labels = rgb()
    # two wrappers of one augmenting Dataset (two processes) name the same data: a resume or a store is not refused
    assert DatasetTransferSet(NoisyDataset(images, labels)).fingerprint() == \
        DatasetTransferSet(NoisyDataset(images, labels)).fingerprint()
    data = DatasetTransferSet(NoisyDataset(images, labels))
    # what it declares tells data apart: its name, length, labels (targets), the rows of a subset, its files
    named = DatasetTransferSet(NoisyDataset(images, labels), name="other")
    shorter = DatasetTransferSet(NoisyDataset(images[:30], labels[:30]))
    labelled = NoisyDataset(images, labels)
    labelled.targets = (labels + 1) % 4
    rows = [data.subset(torch.arange(10)), data.subset(torch.arange(10, 20))]
    files = []
    for text in ("a", "b"):
        (tmp_path / text).write_text(text)
        listed = NoisyDataset(images, labels)
        listed.files = [tmp_path / text]
        files.append(DatasetTransferSet(listed))
    prints = {d.fingerprint() for d in (data, named, shorter, DatasetTransferSet(labelled), *rows, *files)}
    assert len(prints) == 8
    assert data.subset(torch.arange(10)).fingerprint() == rows[0].fingerprint()


def test_a_store_over_items_that_change_between_reads_warns_and_points_to_the_online_teacher():
    images, labels = rgb()
    lines = []
    SoftTargets.compute(build_model("mlp:4", (3, 8, 8), 4), DatasetTransferSet(NoisyDataset(images, labels)),
                        log=lines.append)
    assert any("change between two reads" in line and "online" in line for line in lines), lines
    lines.clear()
    SoftTargets.compute(build_model("mlp:4", (3, 8, 8), 4), DatasetTransferSet(PairsDataset(images, labels)),
                        log=lines.append)
    assert not any("change between" in line for line in lines)
