"""The training loop: learning, determinism, early stopping on validation, distillation sources, resume."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import evaluate, predict_logits
from darkknowledge.jobs import DataChoice
from darkknowledge.models import build_model
from darkknowledge.training import Distillation, HardTargets, TrainConfig, fit


@pytest.fixture(scope="module")
def digits():
    return DataChoice("digits").load()


def quiet(**kwargs):
    return TrainConfig(progress=False, **kwargs)


def test_fit_learns_digits(digits):
    train, val, test = digits
    model = build_model("mlp:64", train.image_shape, train.num_classes)
    before = evaluate(model, test).errors
    result = fit(model, train, val, quiet(epochs=8, lr=0.1), log=lambda _: None)
    after = evaluate(model, test).errors
    assert before > 0.7 * len(test) and after < 0.1 * len(test)
    assert [r["epoch"] for r in result.history] == list(range(1, 9))


def test_same_seed_same_numbers_other_seed_other_numbers(digits):
    train, val, _ = digits
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(1234 + seed)  # the model's initialisation is the caller's: seed it like a user would
        model = build_model("mlp:32,dropout=0.3", train.image_shape, train.num_classes)
        result = fit(model, train, val, quiet(epochs=3, jitter=1, seed=seed), log=lambda _: None)
        runs.append((result.history, [p.detach().clone() for p in model.parameters()]))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(runs[0][0]) == strip(runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[2][1]))


def test_sgd_steps_fused_with_the_numbers_of_the_for_loop_step(digits):
    train, _, _ = digits
    runs = []
    for options in ({}, {"foreach": False}):  # the default (fused), then torch's CPU for-loop
        torch.manual_seed(0)
        model = build_model("mlp:64,dropout=0.2", train.image_shape, train.num_classes)
        config = quiet(epochs=2, lr=0.1, momentum=0.9, jitter=1, optimizer_options=options)
        result = fit(model, train, None, config, log=lambda _: None)
        runs.append((result.history, [p.detach().clone() for p in model.parameters()]))
    assert quiet().make_optimizer(model.parameters()).param_groups[0]["fused"]
    for fused, loop in zip(runs[0][0], runs[1][0]):
        assert fused["train_loss"] == pytest.approx(loop["train_loss"], rel=1e-5)
        assert fused["train_errors"] == loop["train_errors"]
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_early_stopping_uses_validation_and_restores_the_best_epoch(digits):
    train, val, _ = digits
    # A validation set with shuffled labels cannot keep improving: patience must stop the run.
    noisy_val = val.subset(torch.arange(len(val)))
    object.__setattr__(noisy_val, "labels", val.labels[torch.randperm(len(val), generator=torch.Generator().manual_seed(0))])
    model = build_model("mlp:64", train.image_shape, train.num_classes)
    result = fit(model, train, noisy_val, quiet(epochs=40, patience=2, lr=0.1), log=lambda _: None)
    assert result.stopped_early and len(result.history) < 40
    val_errors = [r["val_errors"] for r in result.history]
    assert result.best_val_errors == min(val_errors)
    assert result.best_epoch == val_errors.index(min(val_errors)) + 1
    assert evaluate(model, noisy_val).errors == result.best_val_errors  # best weights are the ones returned


def test_cached_teacher_logits_train_like_the_online_teacher(digits):
    train, val, _ = digits
    teacher = build_model("mlp:64", train.image_shape, train.num_classes)
    fit(teacher, train, None, quiet(epochs=3, lr=0.1), log=lambda _: None)
    students = []
    for online in (True, False):
        torch.manual_seed(0)
        student = build_model("mlp:16", train.image_shape, train.num_classes)
        cached = None if online else predict_logits(teacher, train.images)
        objective = Distillation(4.0, 1.0, 0.5, teacher=teacher if online else None, teacher_logits=cached)
        fit(student, train, val, quiet(epochs=2), objective, log=lambda _: None)
        students.append(student)
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        assert torch.allclose(a, b, atol=1e-4)


def test_the_logged_loss_is_the_kl_form_and_the_cross_entropy_form_is_loss_ce(digits):
    # The headline train_loss must read as other libraries' KLDivLoss * T^2 (+ the hard term): the cross-entropy
    # form counts the teacher's entropy too, tens higher at T = 4, and is kept under its own name.
    train, _, _ = digits
    teacher = build_model("mlp:64", train.image_shape, train.num_classes)
    fit(teacher, train, None, quiet(epochs=1, lr=0.1), log=lambda _: None)
    student = build_model("mlp:16", train.image_shape, train.num_classes)
    objective = Distillation(4.0, 1.0, 0.5, teacher_logits=predict_logits(teacher, train.images))
    record = fit(student, train, None, quiet(epochs=1), objective, log=lambda _: None).history[-1]
    assert record["train_loss"] == pytest.approx(record["train_soft_kl"] + 0.5 * record["train_hard"], rel=1e-5)
    assert record["train_loss_ce"] == pytest.approx(record["train_soft"] + 0.5 * record["train_hard"], rel=1e-5)
    assert record["train_loss_ce"] > record["train_loss"] + 1  # the teacher's entropy x T^2 between them


def test_cached_logits_with_jitter_are_refused(digits):
    train, val, _ = digits
    cached = torch.zeros(len(train), train.num_classes)
    student = build_model("mlp:16", train.image_shape, train.num_classes)
    with pytest.raises(DarkKnowledgeError, match="jitter"):
        fit(student, train, val, quiet(epochs=1, jitter=2), Distillation(2.0, teacher_logits=cached))
    with pytest.raises(DarkKnowledgeError, match="rows"):
        fit(student, train, val, quiet(epochs=1), Distillation(2.0, teacher_logits=cached[:-1]))


def test_bf16_training_keeps_accuracy(digits):
    train, val, test = digits
    errors = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model("mlp:128", train.image_shape, train.num_classes)
        fit(model, train, val, quiet(epochs=8, lr=0.1, bf16=bf16), log=lambda _: None)
        errors.append(evaluate(model, test).errors)
    assert errors[1] <= errors[0] + 0.01 * len(test)


@pytest.mark.parametrize("name,value", [("epochs", 0), ("lr", -1.0), ("batch_size", 0), ("schedule", "linear"),
                                        ("jitter", -1), ("momentum", 1.0), ("patience", 0)])
def test_bad_training_options_raise(name, value):
    with pytest.raises(DarkKnowledgeError, match=name):
        TrainConfig(**{name: value})


def test_one_cycle_schedule_warms_up_then_anneals_to_zero():
    config = TrainConfig(lr=1.0)
    lrs = [config.learning_rate(s, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.04) and max(lrs) == pytest.approx(1.0)
    assert lrs.index(max(lrs)) == 10 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert TrainConfig(lr=0.3, schedule="constant").learning_rate(50, 100) == 0.3


def test_a_step_schedule_with_step_epochs_follows_a_longer_runs_rates_to_its_end():
    # A 382-epoch retrain with halvings every 100 epochs has the rates of a 1000-epoch step run's first 382 epochs.
    steps_per_epoch = 7
    long_run = TrainConfig(lr=0.01, schedule="step", epochs=1000)
    short = TrainConfig(lr=0.01, schedule="step", epochs=382, step_epochs=100)
    for step in range(0, 382 * steps_per_epoch, 5):
        assert short.learning_rate(step, 382 * steps_per_epoch) == long_run.learning_rate(step, 1000 * steps_per_epoch)
    assert short.learning_rate(381 * steps_per_epoch, 382 * steps_per_epoch) == 0.01 / 8
    assert "step_epochs" not in TrainConfig().settings()  # unset, old runs' keys and sidecars are unchanged
    assert short.settings()["step_epochs"] == 100
    with pytest.raises(DarkKnowledgeError, match=r"step_epochs must be in \[1, "):
        TrainConfig(schedule="step", step_epochs=0)


def test_run_dir_refuses_to_overwrite_and_to_resume_other_settings(digits, tmp_path):
    train, val, _ = digits
    model = build_model("mlp:16", train.image_shape, train.num_classes)
    fit(model, train, val, quiet(epochs=1), run_dir=tmp_path, log=lambda _: None)
    with pytest.raises(DarkKnowledgeError, match="--resume"):
        fit(model, train, val, quiet(epochs=1), run_dir=tmp_path)
    with pytest.raises(DarkKnowledgeError, match="other settings"):
        fit(model, train, val, quiet(epochs=1, lr=0.2), run_dir=tmp_path, resume=True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from darkknowledge.jobs import DataChoice
    from darkknowledge.models import build_model
    from darkknowledge.training import TrainConfig, fit
    out, kill_at_step = sys.argv[1], int(sys.argv[2])
    train, val, _ = DataChoice("digits").load()
    torch.manual_seed(0)
    spec = "mlp:48,dropout=0.2,max_norm=2"
    model = build_model(spec, train.image_shape, train.num_classes)
    meta = {"spec": spec, "image_shape": list(train.image_shape), "classes": list(train.classes)}
    calls = 0
    def hook(module, inputs):
        global calls
        calls += module.training
        if calls == kill_at_step:  # die like a SIGKILLed process: mid-epoch, no clean-up
            os.kill(os.getpid(), signal.SIGKILL)
    model.register_forward_pre_hook(hook)
    fit(model, train, val, TrainConfig(epochs=5, batch_size=64, jitter=1, progress=False), run_dir=out,
        resume=True, meta=meta, log=lambda _: None)
""")


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(out, kill_at_step):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_at_step)], env=env,
                              capture_output=True, text=True, timeout=300)

    whole = run(tmp_path / "whole", 0)
    assert whole.returncode == 0, whole.stderr
    # digits: ~1222 training cases, batch 64 -> 20 steps an epoch; step 50 is in the middle of epoch 3.
    killed = run(tmp_path / "killed", 50)
    assert killed.returncode == -9
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["epoch"] == 2
    resumed = run(tmp_path / "killed", 0)
    assert resumed.returncode == 0, resumed.stderr

    final = [json.loads((tmp_path / d / "model.json").read_text()) for d in ("whole", "killed")]
    assert final[0]["metrics"]["val_errors"] == final[1]["metrics"]["val_errors"]
    assert final[0]["epoch"] == final[1]["epoch"]
    assert final[0]["weights_sha256"] == final[1]["weights_sha256"]  # bit-identical weights
    history = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]


def test_checkpoint_round_trip_and_corruption_detected(digits, tmp_path):
    train, val, test = digits
    model = build_model("mlp:16,max_norm=3", train.image_shape, train.num_classes)
    meta = {"spec": "mlp:16,max_norm=3", "image_shape": list(train.image_shape), "classes": list(train.classes)}
    checkpoint.save_model(tmp_path, model, meta)
    loaded, loaded_meta = checkpoint.load_model(tmp_path)
    assert torch.equal(predict_logits(model, test.images), predict_logits(loaded, test.images))
    assert loaded_meta["provenance"]["torch"] == torch.__version__

    weights = tmp_path / checkpoint.MODEL_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DarkKnowledgeError, match="checksum"):
        checkpoint.load_model(tmp_path)
    weights.unlink()
    with pytest.raises(DarkKnowledgeError, match="missing"):
        checkpoint.load_model(tmp_path)
    (tmp_path / checkpoint.MODEL_META).write_text("{not json")
    with pytest.raises(DarkKnowledgeError, match="not valid JSON"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(DarkKnowledgeError, match="not found"):
        checkpoint.load_model(tmp_path / "nowhere")


def test_training_state_restores_optimizer_momentum(digits, tmp_path):
    train, val, _ = digits
    model = build_model("mlp:16", train.image_shape, train.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint.save_training_state(tmp_path, 1, model, optimizer, {"note": "x"})
    fresh = build_model("mlp:16", train.image_shape, train.num_classes)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    state = checkpoint.load_training_state(tmp_path, fresh, fresh_opt)
    assert state["note"] == "x" and fresh_opt.param_groups[0]["lr"] == 0.1
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])


def test_divergence_is_named_and_says_lower_the_learning_rate(digits):
    from darkknowledge.errors import TrainingDiverged
    train, val, _ = digits
    teacher = build_model("mlp:32", train.image_shape, train.num_classes)
    soft = Distillation(temperature=10, teacher_logits=predict_logits(teacher, train.images))
    student = build_model("mlp:32", train.image_shape, train.num_classes)
    with torch.no_grad():  # outputs that overflow, as weights blown up by too high a rate give
        for p in student.parameters():
            p.fill_(1e30)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1: .* lower --lr"):
        fit(student, train, val, quiet(epochs=1), soft, log=lambda _: None)


def test_a_student_resumes_after_its_teacher_folder_moves_but_not_with_another_teacher(tmp_path):
    """The run key holds what the teacher is (weights' checksums), not where its files are."""
    import shutil

    from darkknowledge.jobs import distill_run, train_run
    data, config = DataChoice("digits"), quiet(epochs=1, batch_size=64)
    train_run("mlp:32", data, config, tmp_path / "teacher", log=lambda _: None)
    train_run("mlp:32", data, quiet(epochs=1, batch_size=64, seed=7), tmp_path / "other", log=lambda _: None)
    distill_run(tmp_path / "teacher", "mlp:16", data, config, 4, out=tmp_path / "student", log=lambda _: None)
    shutil.move(tmp_path / "teacher", tmp_path / "moved")
    lines = []
    distill_run(tmp_path / "moved", "mlp:16", data, config, 4, out=tmp_path / "student", resume=True,
                log=lines.append)
    assert any(line.startswith(("resuming", "reusing")) for line in lines)  # accepted, not refused
    assert checkpoint.read_model_meta(tmp_path / "student")["teacher"]["run"] == str(tmp_path / "teacher")
    with pytest.raises(DarkKnowledgeError, match="other settings"):
        distill_run(tmp_path / "other", "mlp:16", data, config, 4, out=tmp_path / "student", resume=True,
                    log=lambda _: None)


def test_arun_keyed_with_its_teachers_location_still_resumes(tmp_path):
    """Runs saved before locations left the key (their state holds the older key) are still recognised."""
    from darkknowledge.jobs import distill_run, train_run
    from darkknowledge.training import run_key
    data, config = DataChoice("digits"), quiet(epochs=1, batch_size=64)
    train_run("mlp:32", data, config, tmp_path / "teacher", log=lambda _: None)
    distill_run(tmp_path / "teacher", "mlp:16", data, config, 4, out=tmp_path / "student", log=lambda _: None)
    state_path = tmp_path / "student" / checkpoint.STATE_META
    state = json.loads(state_path.read_text())
    new_key = state["run_key"]
    train, val, _ = data.load()
    meta = {k: v for k, v in checkpoint.read_model_meta(tmp_path / "student").items()
            if k in ("spec", "image_shape", "classes", "dataset", "validation", "data_fingerprint", "subset",
                     "train_classes", "train_subset", "teacher")}
    objective = Distillation(4, 1.0, 0.0, teacher=checkpoint.load_model(tmp_path / "teacher")[0])
    assert run_key(meta, train, val, config, objective) == new_key  # the sidecar rebuilds the key
    state["run_key"] = run_key(meta, train, val, config, objective, locations=True)
    assert state["run_key"] != new_key
    state_path.write_text(json.dumps(state))
    lines = []
    distill_run(tmp_path / "teacher", "mlp:16", data, config, 4, out=tmp_path / "student", resume=True,
                log=lines.append)
    assert any(line.startswith(("resuming", "reusing")) for line in lines)  # accepted, not refused


def test_a_run_started_with_val_size_0_on_the_command_line_continues_from_python(tmp_path):
    """``--val-size 0`` (read as 0.0) and ``val_size=0`` are one run, and a run saved with the float in its key
    (as the command line wrote it before) still resumes."""
    from darkknowledge.cli import main
    from darkknowledge.jobs import train_run
    from darkknowledge.training import _legacy_keys, run_key
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp:16", "--epochs", "1", "--val-size", "0",
                 "--no-progress", "--out", str(run)]) == 0
    data, config = DataChoice("digits", val_size=0), TrainConfig(epochs=1, progress=False)
    assert checkpoint.read_model_meta(run)["validation"]["size"] == 0
    lines = []
    train_run("mlp:16", data, config, run, resume=True, log=lines.append)
    assert any(line.startswith(("resuming", "reusing")) for line in lines)  # accepted, not refused
    state_path = run / checkpoint.STATE_META
    state = json.loads(state_path.read_text())
    train, val, _ = data.load()
    meta = {k: v for k, v in checkpoint.read_model_meta(run).items()
            if k in ("spec", "image_shape", "classes", "dataset", "validation", "data_fingerprint")}
    assert run_key(meta, train, val, config, HardTargets()) == state["run_key"]  # the sidecar rebuilds the key
    state["run_key"] = _legacy_keys(meta, train, val, config, HardTargets())[1]  # size 0.0, as saved before
    assert state["run_key"] != run_key(meta, train, val, config, HardTargets())
    state_path.write_text(json.dumps(state))
    lines.clear()
    train_run("mlp:16", data, config, run, resume=True, log=lines.append)
    assert any(line.startswith(("resuming", "reusing")) for line in lines)


def test_warmup_rises_linearly_then_the_schedule_runs_over_the_remaining_steps():
    config = TrainConfig(lr=0.01, schedule="cosine", warmup=0.1)
    rates = [config.learning_rate(step, 100) for step in range(100)]
    assert rates[:10] == pytest.approx([0.01 * (s + 1) / 10 for s in range(10)])
    assert rates[10] == 0.01 and rates[55] == pytest.approx(0.005) and rates[99] < 0.01 * 1e-3
    # the language models' own loop computed exactly this (results/lm* were trained with it)
    assert rates[10:] == [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(10, 100)]
    assert TrainConfig(lr=0.01, schedule="constant", warmup=0.5).learning_rate(0, 10) == 0.002
    assert TrainConfig(lr=0.01, schedule="cosine").learning_rate(0, 10) == 0.01  # no warm-up by default
    for options, pattern in [({"warmup": 1.0}, "warmup must be in \\[0, 1\\)"),
                             ({"warmup": 0.1, "schedule": "onecycle"}, "onecycle schedule"),
                             ({"select_by": "accuracy"}, "select_by must be one of errors, log_loss"),
                             ({"epoch_order": "random"}, "epoch_order must be one of")]:
        with pytest.raises(DarkKnowledgeError, match=pattern) as raised:
            TrainConfig(**options)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("select_by, kept", [("errors", 2), ("log_loss", 3)])
def test_the_epoch_kept_is_the_best_by_the_named_validation_metric(digits, monkeypatch, select_by, kept):
    from darkknowledge import training
    from darkknowledge.evaluation import Evaluation
    train, val, _ = digits
    scores = iter([(5, 1.0), (3, 2.0), (4, 0.5)])  # epoch 2 has the fewest errors, epoch 3 the lowest log-loss
    weights = []

    def scripted(model, data, precision, workers):
        weights.append(next(model.parameters()).detach().clone())
        errors, loss = next(scores)
        return Evaluation(errors, len(data), [0] * 10, loss)

    monkeypatch.setattr(training, "_evaluate", scripted)
    model = build_model("mlp:16", train.image_shape, train.num_classes)
    result = fit(model, train, val, quiet(epochs=3, select_by=select_by), log=lambda _: None)
    assert result.best_epoch == kept and torch.equal(next(model.parameters()), weights[kept - 1])
    assert [r["val_loss"] for r in result.history] == [1.0, 2.0, 0.5]


class _Rows:
    """A sampler of fixed batches: rows of 10 indices among the first 30 cases, in a seeded order."""

    steps = 3

    def seed(self, seed, epoch):
        return 1000 + 10 * seed + epoch

    def epoch(self, generator):
        return torch.arange(30)[torch.randperm(30, generator=generator)].view(3, 10)


def test_a_sampler_chooses_each_epochs_batches_and_seeds_them(digits):
    train, _, _ = digits
    seen = []

    class Recording(HardTargets):
        def loss(self, logits, batch):
            seen.append(batch.indices.clone())
            return super().loss(logits, batch)

    model = build_model("mlp:16", train.image_shape, train.num_classes)
    result = fit(model, train, None, quiet(epochs=2, batch_size=10, schedule="cosine"), Recording(),
                 sampler=_Rows(), log=lambda _: None)
    expected = [row for epoch in range(2) for row in _Rows().epoch(torch.Generator().manual_seed(1000 + epoch))]
    assert len(seen) == 6 and all(torch.equal(a, b) for a, b in zip(seen, expected))
    # The schedule runs over the sampler's steps: 6 in all, the last epoch ending at its last step's rate.
    assert result.history[-1]["lr"] == pytest.approx(TrainConfig(schedule="cosine", epochs=2).learning_rate(5, 6))


def test_validate_keep_and_score_start_choose_save_and_return_the_kept_model(digits, tmp_path):
    train, val, _ = digits
    torch.manual_seed(0)
    start = build_model("mlp:16", train.image_shape, train.num_classes)
    epochs_validated, trained = [], {}

    def run(losses, run_dir, resume=False):
        model = build_model("mlp:16", train.image_shape, train.num_classes)
        model.load_state_dict(start.state_dict())
        scores = iter(losses)

        def validate(m, epoch):
            epochs_validated.append(epoch)
            trained[epoch] = {k: v.clone() for k, v in m.state_dict().items()}
            return {"errors": 1, "loss": next(scores)}

        def keep(m, epoch):  # a copy whose last bias carries the epoch: what was kept is visible
            kept = build_model("mlp:16", train.image_shape, train.num_classes)
            kept.load_state_dict(m.state_dict())
            with torch.no_grad():
                list(kept.parameters())[-1].add_(epoch)
            return kept

        result = fit(model, train, val, quiet(epochs=3, select_by="log_loss"), run_dir=run_dir, resume=resume,
                     log=lambda _: None, validate=validate, keep=keep, score_start=True)
        return model, result

    model, result = run([1.0, 2.0, 0.5, 0.7], tmp_path / "a")
    assert epochs_validated == [0, 1, 2, 3] and [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert result.best_epoch == 2 and result.history[0]["val_loss"] == 1.0
    bias = list(model.parameters())[-1]
    assert torch.equal(bias, list(trained[2].values())[-1] + 2)
    saved, _ = checkpoint.load_model(tmp_path / "a")
    assert torch.equal(list(saved.parameters())[-1], bias)
    # A finished run resumed returns the kept model again, not the last epoch's weights.
    again, _ = run([], tmp_path / "a", resume=True)
    assert torch.equal(list(again.parameters())[-1], bias)
    # No trained epoch beats the untrained start: the start is kept.
    model, result = run([0.1, 1.0, 2.0, 3.0], tmp_path / "b")
    assert result.best_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))


def test_a_run_saved_with_a_legacy_key_resumes_only_when_that_key_is_given(digits, tmp_path):
    train, val, _ = digits
    model = build_model("mlp:16", train.image_shape, train.num_classes)
    fit(model, train, val, quiet(epochs=1), run_dir=tmp_path, log=lambda _: None)
    state = json.loads((tmp_path / checkpoint.STATE_META).read_text())
    checkpoint.write_json(tmp_path / checkpoint.STATE_META, {**state, "run_key": "an older loop's key"})
    with pytest.raises(DarkKnowledgeError, match="other settings"):
        fit(model, train, val, quiet(epochs=1), run_dir=tmp_path, resume=True, log=lambda _: None)
    result = fit(model, train, val, quiet(epochs=1), run_dir=tmp_path, resume=True, log=lambda _: None,
                 legacy_keys=["an older loop's key"])
    assert [r["epoch"] for r in result.history] == [1]
