"""fit's ``monitor`` (extra sets whose errors are logged per epoch, never used for selection) and DataChoice's
``train_subset`` (a part of the training split, the validation split unchanged): what §6's curves need."""

import json

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import evaluate
from darkknowledge.jobs import DataChoice, evaluate_run, train_run
from darkknowledge.models import build_model
from darkknowledge.training import TrainConfig, fit


@pytest.fixture(scope="module")
def digits():
    return DataChoice("digits").load()


def _fit(digits, seed=0, **kw):
    train, val, _ = digits
    torch.manual_seed(seed)
    model = build_model("mlp:32", train.image_shape, train.num_classes)
    result = fit(model, train, val, TrainConfig(epochs=5, lr=0.1, progress=False, patience=2), log=lambda _: None,
                 **kw)
    return model, result


def test_monitor_logs_errors_and_changes_nothing_else(digits):
    train, val, test = digits
    plain_model, plain = _fit(digits)
    model, watched = _fit(digits, monitor={"test": test, "train_eval": train})
    for a, b in zip(plain_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert (plain.best_epoch, plain.stopped_early) == (watched.best_epoch, watched.stopped_early)
    for p, w in zip(plain.history, watched.history):
        extra = {"test_errors", "test_error_rate", "train_eval_errors", "train_eval_error_rate", "seconds"}
        assert {k: v for k, v in w.items() if k not in extra} == {k: v for k, v in p.items() if k != "seconds"}
        assert 0 <= w["test_errors"] <= len(test) and w["test_error_rate"] == pytest.approx(w["test_errors"] / len(test))
    with pytest.raises(DarkKnowledgeError, match="taken"):
        _fit(digits, monitor={"train": train})
    # the best epoch's logged test errors are the returned model's
    assert watched.history[watched.best_epoch - 1]["test_errors"] == evaluate(model, test).errors


def test_monitor_single_set_is_named_monitor(digits):
    _, _, test = digits
    _, result = _fit(digits, monitor=test)
    assert all("monitor_errors" in r and "monitor_error_rate" in r for r in result.history)


def test_train_subset_keeps_the_validation_split(tmp_path):
    full = DataChoice("digits")
    part = DataChoice("digits", train_subset=100)
    train, val, test = full.load()
    train_p, val_p, test_p = part.load()
    assert len(train_p) == 100 and val_p.fingerprint() == val.fingerprint()
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in train_p.images)
    assert part.load()[0].fingerprint() == train_p.fingerprint()  # seeded
    _, result = train_run("mlp:16", part, TrainConfig(epochs=2, progress=False), tmp_path / "run",
                          log=lambda _: None, monitor=lambda tr, va, te: {"train_eval": tr, "test": te})
    meta = checkpoint.read_model_meta(tmp_path / "run")
    assert meta["train_subset"] == 100
    assert evaluate_run(tmp_path / "run", split="train")["total"] == 100  # reconstructed from the sidecar
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[result.best_epoch - 1]["test_errors"] == evaluate_run(tmp_path / "run")["errors"]
    assert logged[result.best_epoch - 1]["train_eval_errors"] == evaluate_run(tmp_path / "run", split="train")["errors"]
