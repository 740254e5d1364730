"""Settings flow once: one table of bounds for the command line, TOML files and TrainConfig; one default device;
the run's precision reaches the teacher's cached outputs."""

import dataclasses
import json
import inspect

import pytest
import torch

from darkknowledge import jobs, options, training
from darkknowledge.cli import build_parser, main
from darkknowledge.constraints import RANGES
from darkknowledge.devices import DEFAULT_DEVICE
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.training import TrainConfig

INTEGER_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if "int" in str(f.type)}
BOUNDED = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name in RANGES)


def cli_refuses(name: str, value) -> bool:
    parser = build_parser()
    options.install(parser)
    args = parser.parse_args(["train", "--out", "x"])
    setattr(args, name, value)  # as a --config file's value arrives
    try:
        options.check(parser, args)
    except DarkKnowledgeError:
        return True
    return False


def library_refuses(name: str, value) -> bool:
    # Settings that other settings also bound, given the others that leave only the table: grad_accumulation is at
    # most the batch size; a warm-up is for the schedules that have none of their own.
    others = {"grad_accumulation": {"batch_size": int(RANGES["batch_size"][1])},
              "warmup": {"schedule": "cosine"}}.get(name, {})
    try:
        TrainConfig(**{**others, name: value})
    except DarkKnowledgeError:
        return True
    return False


def edges(name: str):
    """Values at and just past each bound of ``name``'s range."""
    low, high, _, _ = RANGES[name]
    step = 1 if name in INTEGER_FIELDS else 1e-6
    return [low - step, low, low + step, high - step, high, high + step]


def test_every_bounded_training_setting_of_the_table_is_one_the_command_line_has():
    assert {"epochs", "lr", "momentum", "weight_decay", "grad_accumulation", "clip_grad_norm"} <= set(BOUNDED)
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert set(BOUNDED) <= flags


@pytest.mark.parametrize("name", BOUNDED)
def test_the_command_line_and_the_library_accept_and_refuse_the_same_values(name):
    for value in edges(name):
        value = int(value) if name in INTEGER_FIELDS and float(value).is_integer() else value
        assert cli_refuses(name, value) == library_refuses(name, value), (name, value)


def test_weight_decay_above_one_is_refused_from_python_the_command_line_and_a_config_file(tmp_path, capsys):
    with pytest.raises(DarkKnowledgeError, match=r"training option weight_decay must be in \[0, 1\], got 2"):
        TrainConfig(weight_decay=2)
    config = tmp_path / "run.toml"
    config.write_text("weight-decay = 2.0\n")
    for argv in (["--weight-decay", "2"], ["--config", str(config)]):
        assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 1
        assert "weight-decay must be in [0, 1], got 2" in capsys.readouterr().err


def test_every_job_and_command_defaults_to_the_one_default_device():
    for job in (jobs.train_run, jobs.distill_run, jobs.train_ensemble, jobs.evaluate_run):
        assert inspect.signature(job).parameters["device"].default is None, job.__name__
    assert inspect.signature(training.fit).parameters["device"].default in (None, DEFAULT_DEVICE)
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("train", "distill", "evaluate"):
        device = next(a for a in commands[command]._actions if a.dest == "device")
        assert device.default is None and DEFAULT_DEVICE in device.help, command


def test_an_fp16_run_caches_its_teacher_under_fp16(monkeypatch, tmp_path):
    """jobs.distill_run once passed config.bf16 (False) where the run's precision was fp16."""
    assert main(["train", "--model", "mlp:8", "--out", str(tmp_path / "t"), "--epochs", "1", "--no-progress"]) == 0
    seen = {}

    class Stop(Exception):
        pass

    def cache(teacher, train, bf16=False):
        seen["cache"] = bf16
        raise Stop

    def compute(teacher, train, store_dir=None, **options):
        seen["store"] = options["bf16"]
        raise Stop
    monkeypatch.setattr(jobs, "cache_teacher_logits", cache)
    monkeypatch.setattr(SoftTargets, "compute", compute)
    monkeypatch.setattr(jobs, "check_precision", lambda config, device: None)  # fp16 on this CPU, to see the cache
    config = TrainConfig(fp16=True, progress=False)
    for store_dir in (None, tmp_path / "store"):
        with pytest.raises(Stop):
            jobs.distill_run(tmp_path / "t", "mlp:8", jobs.DataChoice(), config, 2.0, store_dir=store_dir,
                             device="cpu")
    assert seen == {"cache": "fp16", "store": "fp16"}


def test_a_store_keys_fp16_apart_and_keeps_the_older_keys_of_fp32_and_bf16():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    data = jobs.DataChoice(val_size=0, subset=64).load()[0]

    def preprocessing(precision):
        return SoftTargets.compute(teacher, data, bf16=precision).header["key_parts"]["preprocessing"]
    # "fp32" is a true string: read as bf16 it would have keyed (and computed) a bf16 store.
    assert preprocessing("fp32") == preprocessing(False) and preprocessing("fp32")["bf16"] is False
    assert preprocessing("bf16") == preprocessing(True) and preprocessing("bf16")["bf16"] is True
    assert preprocessing("fp16") != preprocessing("fp32")


def test_warmup_and_the_selection_metric_reach_the_loop_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp:8", "--out", str(out), "--epochs", "3", "--batch-size", "256",
                 "--schedule", "cosine", "--warmup", "0.2", "--select-by", "log_loss", "--no-progress"]) == 0
    model = json.loads((out / "model.json").read_text())
    assert model["training"]["warmup"] == 0.2 and model["training"]["select_by"] == "log_loss"
    losses = {r["epoch"]: r["val_loss"] for r in json.loads((out / "state.json").read_text())["history"]}
    assert losses[model["epoch"]] == min(losses.values())
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "other"), "--schedule", "onecycle", "--warmup", "0.1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warmup must be 0 with the onecycle schedule" in err[0]
    assert main(["train", "--out", str(tmp_path / "other"), "--warmup", "1"]) == 1
    assert "warmup must be in [0, 1)" in capsys.readouterr().err


def test_the_strategy_is_checked_and_stays_out_of_the_run_key():
    with pytest.raises(DarkKnowledgeError, match="training option strategy must be one of ddp, fsdp, got 'zero'"):
        TrainConfig(strategy="zero")
    # how the ranks share a run is not what it learns: a run keeps its key (and resumes) under either strategy
    assert TrainConfig(strategy="fsdp").settings() == TrainConfig().settings()
    assert "strategy" not in TrainConfig(strategy="fsdp").settings()
    parser = build_parser()
    assert parser.parse_args(["train", "--strategy", "fsdp"]).strategy == "fsdp"
    assert parser.parse_args(["distill", "--teacher", "t", "--strategy", "fsdp"]).strategy == "fsdp"
