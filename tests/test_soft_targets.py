"""The soft-target store: keyed by teacher, data and settings; corrupt or truncated stores rebuilt; memory-mapped;
top-k mode against full logits; training from it equal to training from cached logits; online teacher with jitter."""

import json
import mmap

import numpy as np
import pytest
import torch

from darkknowledge.ensemble import Ensemble
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import as_inputs, evaluate
from darkknowledge.jobs import DataChoice
from darkknowledge.losses import (TopKTargets, distillation_loss, soft_cross_entropy, topk_soft_target_cross_entropy,
                                  topk_targets)
from darkknowledge.models import build_model
from darkknowledge.soft_targets import SoftTargets, module_sha256
from darkknowledge.training import Distillation, TrainConfig, cache_teacher_logits, fit


def quiet(**kwargs):
    return TrainConfig(progress=False, **kwargs)


@pytest.fixture(scope="module")
def digits():
    return DataChoice("digits").load()


@pytest.fixture(scope="module")
def teachers(digits):
    """Three small trained teachers (different seeds)."""
    train, _, _ = digits
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("mlp:32", train.image_shape, train.num_classes)
        fit(model, train, None, quiet(epochs=6, lr=0.1, seed=seed), log=lambda _: None)
        models.append(model.eval())
    return models


def logged(call, *args, **kwargs):
    lines = []
    result = call(*args, log=lines.append, **kwargs)
    return result, " | ".join(lines)


def test_a_store_is_computed_once_then_reused_and_is_memory_mapped(digits, teachers, tmp_path):
    train, _, _ = digits
    store, log = logged(SoftTargets.compute, teachers[0], train, tmp_path)
    assert "computed 1146 cases" in log
    assert len(store) == len(train) and store.layout == "full" and store.num_members == 1
    again, log = logged(SoftTargets.compute, teachers[0], train, tmp_path)
    assert "reusing" in log and again.key == store.key
    assert len(list(tmp_path.glob("*.json"))) == len(list(tmp_path.glob("*.bin"))) == 1
    # The arrays are views of a read-only memory map of the file, not copies.
    array = again._arrays["logits"]
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    assert not array.flags.owndata and not array.flags.writeable and isinstance(base, mmap.mmap)
    torch.testing.assert_close(again.member_logits(torch.arange(10))[:, 0],
                               cache_teacher_logits(teachers[0], train)[:10], rtol=0, atol=0)
    rows = torch.cat([batch["logits"] for _, batch in again.iter_batches(batch_size=100)])
    assert torch.equal(rows, again.member_logits(slice(None)))


def test_a_changed_teacher_weight_or_transfer_set_changes_the_key_and_is_computed_anew(digits, teachers, tmp_path):
    train, _, _ = digits
    teacher = build_model("mlp:32", train.image_shape, train.num_classes)
    teacher.load_state_dict(teachers[0].state_dict())
    first = SoftTargets.compute(teacher, train, tmp_path)
    with torch.no_grad():
        teacher.net[-1].bias[0] += 1e-3  # one weight, changed in memory
    assert module_sha256(teacher) != module_sha256(teachers[0])
    changed, log = logged(SoftTargets.compute, teacher, train, tmp_path)
    assert changed.key != first.key and "computed" in log and "reusing" not in log
    assert not torch.equal(changed.member_logits([0, 1]), first.member_logits([0, 1]))
    smaller = train.subset(torch.arange(1000))
    assert SoftTargets.compute(teacher, smaller, tmp_path).key != changed.key
    assert len(list(tmp_path.glob("*.json"))) == 3  # older stores are kept, never reused for the wrong teacher
    # The key also covers the layout, k, storage dtype, preprocessing (bf16) and, for ensembles, the members.
    keys = {first.key, SoftTargets.compute(teachers[0], train, None, top_k=3).key,
            SoftTargets.compute(teachers[0], train, None, top_k=4).key,
            SoftTargets.compute(teachers[0], train, None, dtype="float16").key,
            SoftTargets.compute(teachers[0], train, None, bf16=True).key,
            SoftTargets.compute(Ensemble(teachers[:2]), train, None).key}
    assert len(keys) == 6


def test_corrupt_truncated_or_half_written_stores_are_detected_and_rebuilt(digits, teachers, tmp_path):
    train, _, _ = digits
    store = SoftTargets.compute(teachers[1], train, tmp_path)
    header, data = store.path, store.path.with_suffix(".bin")
    expected = store.member_logits(slice(None)).clone()
    del store
    pristine = data.read_bytes()

    def damaged(damage, message):
        data.write_bytes(pristine)
        damage()
        with pytest.raises(DarkKnowledgeError, match=message) as raised:
            SoftTargets.open(header)
        assert "\n" not in str(raised.value)
        rebuilt, log = logged(SoftTargets.compute, teachers[1], train, tmp_path)
        assert "not using" in log and "computing it again" in log and "computed" in log
        assert torch.equal(rebuilt.member_logits(slice(None)), expected)
        assert data.read_bytes() == pristine

    def flip_a_byte():
        raw = bytearray(pristine)
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))

    damaged(flip_a_byte, "checksum")
    damaged(lambda: data.write_bytes(pristine[:-100]), "truncated")
    damaged(lambda: data.unlink(), "missing")
    damaged(lambda: header.write_text('{"format": '), "not valid JSON")
    damaged(lambda: header.unlink(), "header .* is missing")  # crash between the data's rename and the header


def test_full_store_gives_every_combine_rule_and_temperature_exactly(digits, teachers, tmp_path):
    train, _, _ = digits
    ensemble = Ensemble(teachers)
    store = SoftTargets.compute(ensemble, train, tmp_path)
    assert store.num_members == 3 and store._arrays["logits"].shape == (len(train), 3, 10)
    inputs = as_inputs(train.images[:50])
    for rule in ("arithmetic", "geometric", "logits"):
        for temperature in (1.0, 2.0, 10.0):
            torch.testing.assert_close(store.with_combine(rule).probabilities(torch.arange(50), temperature),
                                       ensemble.with_combine(rule).soft_targets(inputs, temperature).detach())
    # geometric reuses the arithmetic ensemble's store: the stored numbers do not depend on the rule.
    assert SoftTargets.compute(ensemble.with_combine("geometric"), train, tmp_path).key == store.key


def test_computing_an_ensembles_store_is_one_batched_pass_of_each_member(digits, teachers):
    train, _, _ = digits
    calls = [0] * 3
    hooks = [m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, m in enumerate(teachers)]
    try:
        SoftTargets.compute(Ensemble(teachers), train, None, batch_size=500)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [3, 3, 3]  # ceil(1146 / 500) batches, once per member: not once per epoch


def test_topk_loss_equals_the_full_loss_when_k_is_the_number_of_classes():
    torch.manual_seed(0)
    student = torch.randn(16, 10, requires_grad=True)
    teacher = torch.randn(16, 10) * 4
    for temperature in (1.0, 2.5, 20.0):
        full = soft_cross_entropy(student, teacher, temperature)
        topk = topk_soft_target_cross_entropy(student, topk_targets(teacher, 10), temperature)
        torch.testing.assert_close(topk, full)
        torch.testing.assert_close(torch.autograd.grad(topk, student)[0], torch.autograd.grad(full, student)[0])
    # With a member axis, the targets are the arithmetic mean of the members' distributions.
    members = torch.randn(16, 3, 10) * 4
    mean_probs = torch.softmax(members / 2.0, -1).mean(1)
    torch.testing.assert_close(topk_soft_target_cross_entropy(student, topk_targets(members, 10), 2.0),
                               distillation_loss(student, temperature=2.0, soft_targets=mean_probs).soft)


def dense_topk_targets(teacher_logits, k, temperature):
    store = SoftTargets.write([teacher_logits.unsqueeze(1)], None, num_cases=len(teacher_logits), num_members=1,
                              num_classes=teacher_logits.shape[1],
                              key_parts={"layout": "topk", "top_k": k, "dtype": "float32", "transfer_set": "x"})
    return store.probabilities(slice(None), temperature)


def test_topk_error_against_full_logits_is_small_and_exact_at_t1_for_the_kept_classes(digits, teachers):
    """The numbers quoted in topk_soft_target_cross_entropy's docstring: a trained digits teacher, 10 classes."""
    train, _, _ = digits
    teacher_logits = cache_teacher_logits(teachers[0], train)
    torch.manual_seed(0)
    student_logits = cache_teacher_logits(build_model("mlp:16", train.image_shape, 10), train).requires_grad_(True)
    worst = {}
    for k in (3, 5):
        for temperature in (1.0, 2.0, 4.0, 20.0):
            full_p = torch.softmax(teacher_logits / temperature, -1)
            approx_p = dense_topk_targets(teacher_logits, k, temperature)
            total_variation = 0.5 * (approx_p - full_p).abs().sum(-1).mean().item()
            full = soft_cross_entropy(student_logits, teacher_logits, temperature)
            approx = topk_soft_target_cross_entropy(student_logits, topk_targets(teacher_logits, k), temperature)
            g_full, = torch.autograd.grad(full, student_logits)
            g_approx, = torch.autograd.grad(approx, student_logits)
            cosine = torch.nn.functional.cosine_similarity(g_full.flatten(), g_approx.flatten(), dim=0).item()
            worst[k] = (max(worst.get(k, (0, 1))[0], total_variation), min(worst.get(k, (0, 1))[1], cosine))
            if temperature == 1.0:  # the kept classes' probabilities are exact at T = 1
                top = teacher_logits.topk(k, -1).indices
                torch.testing.assert_close(approx_p.gather(-1, top), full_p.gather(-1, top))
    print("worst over T in 1, 2, 4, 20 (mean total variation of the targets, gradient cosine):", worst)
    assert worst[3][0] < 0.10 and worst[3][1] > 0.80
    assert worst[5][0] < 0.05 and worst[5][1] > 0.90


def test_a_student_distilled_from_a_topk_store_learns_like_one_from_full_logits(digits, teachers):
    train, val, test = digits
    errors = {}
    for top_k in (None, 5):
        torch.manual_seed(0)
        student = build_model("mlp:16", train.image_shape, 10)
        store = SoftTargets.compute(teachers[0], train, None, top_k=top_k)
        fit(student, train, val, quiet(epochs=8, lr=0.1), Distillation(2.0, store=store), log=lambda _: None)
        errors[top_k] = evaluate(student, test).errors
    print("test errors of mlp:16 students (of 449), full vs top-5 store:", errors)
    assert errors[5] <= errors[None] + 8  # no worse than from full logits, beyond noise


def test_topk_store_of_an_ensemble_per_member_for_arithmetic_and_of_mean_logits_otherwise(digits, teachers):
    train, _, _ = digits
    ensemble = Ensemble(teachers)
    arithmetic = SoftTargets.compute(ensemble, train, None, top_k=10)
    geometric = SoftTargets.compute(ensemble.with_combine("geometric"), train, None, top_k=10)
    assert arithmetic.num_members == 3 and geometric.num_members == 1 and arithmetic.key != geometric.key
    full = SoftTargets.compute(ensemble, train, None)
    rows = torch.arange(40)
    for rule, store in (("arithmetic", arithmetic), ("geometric", geometric)):
        torch.testing.assert_close(store.probabilities(rows, 3.0), full.with_combine(rule).probabilities(rows, 3.0))
    with pytest.raises(DarkKnowledgeError, match="cannot give 'geometric'"):
        arithmetic.with_combine("geometric")


def test_sampled_store_holds_draws_of_the_mixture_the_same_however_computed(digits, teachers, tmp_path):
    train, val, _ = digits
    ensemble = Ensemble(teachers[:2])
    store = SoftTargets.compute(ensemble, train, tmp_path, samples=4, head=2)
    assert (store.layout, store.top_k, store.num_members, store.describe()["head"]) == ("sampled", 6, 1, 2)
    assert SoftTargets.open(store.path).key == store.key  # its header fits the schema and its checksums
    # seeded by the key and the case's row: the same draws in other batches, or written on the way to memory
    again = SoftTargets.compute(ensemble, train, None, samples=4, head=2, batch_size=77)
    rows = torch.arange(len(store))
    a, b = store.topk(rows), again.topk(rows)
    assert a.logits.shape == (len(train), 1, 6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)
    # each row a distribution at T = 1 whose two head classes hold the mixture's exact probabilities
    mixture = SoftTargets.compute(ensemble, train, None).probabilities(rows, 1.0)
    dense = store.probabilities(rows, 1.0)
    torch.testing.assert_close(dense.sum(-1), torch.ones(len(train)), atol=1e-5, rtol=0)
    head = mixture.topk(2).indices
    torch.testing.assert_close(dense.gather(-1, head), mixture.gather(-1, head), atol=1e-5, rtol=1e-5)
    assert store.key != SoftTargets.compute(ensemble, train, None, samples=4, head=1).key
    assert store.key != SoftTargets.compute(ensemble.with_combine("geometric"), train, None, samples=4, head=2).key
    with pytest.raises(DarkKnowledgeError, match="temperature 1 only") as raised:
        store.targets(rows[:4], 2.0)
    assert "\n" not in str(raised.value)
    student = build_model("mlp:8", train.image_shape, train.num_classes)
    fit(student, train, val, quiet(epochs=1, lr=0.1), Distillation(1.0, store=store), log=lambda _: None)
    for kwargs, message in (({"samples": 4, "top_k": 3}, "not both"), ({"head": 2}, "head is for a sampled"),
                            ({"samples": 0}, "samples must be an integer >= 1"),
                            ({"samples": 9, "head": 2}, "head \\+ samples\\) must be at most")):
        with pytest.raises(DarkKnowledgeError, match=message):
            SoftTargets.compute(teachers[0], train, None, **kwargs)


def test_training_from_the_store_equals_training_from_cached_logits(digits, teachers, tmp_path):
    train, val, _ = digits
    store = SoftTargets.compute(teachers[2], train, tmp_path)
    weights = []
    for source in ({"teacher_logits": cache_teacher_logits(teachers[2], train)}, {"store": store}):
        torch.manual_seed(0)
        student = build_model("mlp:16", train.image_shape, train.num_classes)
        fit(student, train, val, quiet(epochs=2, lr=0.1), Distillation(4.0, 1.0, 0.5, **source), log=lambda _: None)
        weights.append([p.detach().clone() for p in student.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_ensemble_from_the_store_equals_the_ensemble_run_online(digits, teachers):
    train, val, _ = digits
    ensemble = Ensemble(teachers)
    weights = []
    for source in ({"teacher": ensemble}, {"store": SoftTargets.compute(ensemble, train, None)}):
        torch.manual_seed(0)
        student = build_model("mlp:16", train.image_shape, train.num_classes)
        fit(student, train, val, quiet(epochs=2, lr=0.1), Distillation(3.0, **source), log=lambda _: None)
        weights.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_with_jitter_the_teacher_runs_online_and_the_loop_says_so(digits, teachers):
    train, _, _ = digits
    store = SoftTargets.compute(teachers[0], train, None)
    lines = []
    student = build_model("mlp:8", train.image_shape, train.num_classes)
    objective = Distillation(2.0, teacher=teachers[0], store=store)
    fit(student, train, None, quiet(epochs=1, jitter=1), objective, log=lines.append)
    assert objective.store is None
    assert "soft targets from the teacher run on every batch (jitter 1: the teacher must see the jittered " \
           "inputs" in lines[0]
    with pytest.raises(DarkKnowledgeError, match="un-jittered"):
        fit(student, train, None, quiet(epochs=1, jitter=1), Distillation(2.0, store=store), log=lambda _: None)


def test_a_store_of_another_transfer_set_is_refused(digits, teachers):
    train, _, _ = digits
    store = SoftTargets.compute(teachers[0], train.subset(torch.arange(len(train) - 1, -1, -1)), None)  # reversed
    with pytest.raises(DarkKnowledgeError, match="another transfer set"):
        fit(build_model("mlp:8", train.image_shape, 10), train, None, quiet(epochs=1),
            Distillation(2.0, store=store), log=lambda _: None)


def test_bad_store_options_are_one_line_errors(digits, teachers, tmp_path):
    train, _, _ = digits
    for kwargs, message in (({"top_k": 0}, "top_k must be an integer >= 1"), ({"top_k": 11}, "at most the number"),
                            ({"dtype": "int8"}, "dtype must be one of"), ({"combine": "max"}, "combine must be")):
        with pytest.raises(DarkKnowledgeError, match=message) as raised:
            SoftTargets.compute(teachers[0], train, tmp_path, **kwargs)
        assert "\n" not in str(raised.value)
    with pytest.raises(DarkKnowledgeError, match="not a darkknowledge/soft-targets-1"):
        (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
        SoftTargets.open(tmp_path / "other.json")


def test_topk_targets_are_validated():
    student = torch.randn(4, 10)
    good = topk_targets(torch.randn(4, 10), 3)
    bad_indices = TopKTargets(good.logits, good.indices + 20, good.tail_logsumexp, good.tail_mean)
    with pytest.raises(DarkKnowledgeError, match="indices must be integer class indices"):
        topk_soft_target_cross_entropy(student, bad_indices, 2.0)
    with pytest.raises(DarkKnowledgeError, match="must both be"):
        topk_soft_target_cross_entropy(student[:2], good, 2.0)
    with pytest.raises(DarkKnowledgeError, match="top_k must be an integer in"):
        topk_targets(torch.randn(4, 10), 11)
