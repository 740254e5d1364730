"""Ensembles (§4): the three combine rules against hand-computed values, refusing members that disagree, training
members that differ only in seed, resuming a half-finished ensemble, and distilling one with the CLI."""

import json
import math

import pytest
import torch
from torch import nn

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.ensemble import MANIFEST, Ensemble, combined_logits, soft_targets
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.evaluation import predict_logits
from darkknowledge.jobs import DataChoice, train_ensemble
from darkknowledge.models import build_model
from darkknowledge.training import TrainConfig


class Fixed(nn.Module):
    """A member that predicts the same distribution ``probs`` for every input (logits = log probs + shift)."""

    def __init__(self, probs, shift=0.0):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs, dtype=torch.float64).log() + shift)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


P1, P2 = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
X = torch.zeros(2, 4, 4, dtype=torch.float64)


def softened(p, temperature):
    """softmax(log p / T) by hand: p_i^(1/T) / sum_j p_j^(1/T)."""
    powered = [q ** (1 / temperature) for q in p]
    return [q / sum(powered) for q in powered]


def normalized(values):
    return [v / sum(values) for v in values]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_each_combine_rule_matches_hand_computed_soft_targets(temperature):
    # Shifts make the members' logits differ from log-probabilities: no rule may depend on them.
    members = [Fixed(P1, shift=3.0), Fixed(P2, shift=-1.0)]
    s1, s2 = softened(P1, temperature), softened(P2, temperature)
    expected = {
        "arithmetic": [(a + b) / 2 for a, b in zip(s1, s2)],
        "geometric": normalized([math.sqrt(a * b) for a, b in zip(s1, s2)]),
        "logits": softened(normalized([math.sqrt(a * b) for a, b in zip(P1, P2)]), temperature),
    }
    if temperature == 1.0:  # spelled out once: (0.5 + 0.25) / 2 and sqrt(0.5 * 0.25) = 0.35355
        assert expected["arithmetic"] == pytest.approx([0.375, 0.25, 0.375])
        assert expected["geometric"] == pytest.approx([0.353553 / 0.957107, 0.25 / 0.957107, 0.353553 / 0.957107],
                                                      abs=1e-6)
    for rule, probs in expected.items():
        got = Ensemble(members, rule).soft_targets(X, temperature)
        assert got.shape == (2, 3)
        torch.testing.assert_close(got[0], torch.tensor(probs, dtype=torch.float64), rtol=0, atol=1e-12)


def test_forward_returns_the_combined_distribution_at_t1_as_logits():
    members = [Fixed(P1, shift=3.0), Fixed(P2, shift=-1.0)]
    arithmetic = Ensemble(members, "arithmetic")(X)[0]
    torch.testing.assert_close(arithmetic, torch.tensor([0.375, 0.25, 0.375], dtype=torch.float64).log())
    geometric = Ensemble(members, "geometric")(X)[0]  # normalized log-probabilities
    torch.testing.assert_close(geometric.exp(), torch.tensor(normalized([math.sqrt(a * b) for a, b in zip(P1, P2)]),
                                                             dtype=torch.float64))
    mean_logits = Ensemble(members, "logits")(X)[0]  # plain mean of the members' logits, not normalized
    torch.testing.assert_close(mean_logits, (members[0].logits + members[1].logits) / 2)


def test_geometric_and_logits_agree_at_every_temperature_and_arithmetic_does_not_commute_with_t():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 7, dtype=torch.float64) * 3
    for temperature in (1.0, 2.0, 20.0):
        torch.testing.assert_close(soft_targets(logits, "geometric", temperature),
                                   soft_targets(logits, "logits", temperature))
        # The forward output divided by T gives geometric/logits targets exactly ...
        for rule in ("geometric", "logits"):
            torch.testing.assert_close(torch.softmax(combined_logits(logits, rule) / temperature, -1),
                                       soft_targets(logits, rule, temperature))
    # ... but softening the arithmetic ensemble's T=1 output is not the mean of the softened members.
    softened_ensemble = torch.softmax(combined_logits(logits, "arithmetic") / 4.0, -1)
    assert (softened_ensemble - soft_targets(logits, "arithmetic", 4.0)).abs().max() > 1e-3


def test_one_member_is_the_member_under_every_rule():
    logits = torch.randn(3, 1, 5)
    for rule in ("arithmetic", "geometric", "logits"):
        assert torch.equal(combined_logits(logits, rule), logits[:, 0])
        torch.testing.assert_close(soft_targets(logits, rule, 3.0), torch.softmax(logits[:, 0] / 3.0, -1))


def test_bad_rules_and_members_are_one_line_errors():
    with pytest.raises(DarkKnowledgeError, match="combine must be one of arithmetic, geometric, logits"):
        Ensemble([Fixed(P1)], "median")
    with pytest.raises(DarkKnowledgeError, match="at least one member"):
        Ensemble([])
    with pytest.raises(DarkKnowledgeError, match="different shapes"):
        Ensemble([Fixed(P1), Fixed([0.5, 0.5])])(X)


def fake_run(run_dir, classes, image_shape=(8, 8), spec="mlp:4"):
    """A saved run without training: the sidecar is what from_runs checks."""
    model = build_model(spec, image_shape, len(classes))
    checkpoint.save_model(run_dir, model, {"spec": spec, "image_shape": list(image_shape), "classes": classes,
                                           "dataset": "digits"})
    return run_dir


def test_members_with_other_classes_or_image_sizes_are_refused_naming_both_runs(tmp_path):
    digits = [str(i) for i in range(10)]
    a = fake_run(tmp_path / "a", digits)
    b = fake_run(tmp_path / "b", [str(i) for i in range(9)])
    c = fake_run(tmp_path / "c", digits, image_shape=(28, 28))
    with pytest.raises(DarkKnowledgeError) as raised:
        Ensemble.from_runs([a, b])
    message = str(raised.value)
    assert "disagree" in message and str(a) in message and str(b) in message and "9 classes" in message
    assert "\n" not in message
    with pytest.raises(DarkKnowledgeError, match=r"\(28, 28\) images") as raised:
        Ensemble.from_runs([a, c])
    assert str(c) in str(raised.value) and str(a) in str(raised.value)
    ensemble = Ensemble.from_runs([a, fake_run(tmp_path / "d", digits)], "geometric")
    assert len(ensemble) == 2 and ensemble.combine == "geometric" and ensemble.classes == digits
    assert not any(m.training for m in ensemble.members)


FAST = TrainConfig(epochs=2, batch_size=128, lr=0.1, progress=False)


def stamps(folder):
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(folder.glob("member-*/model.safetensors"))}


def test_members_differ_only_in_seed_and_a_grown_ensemble_trains_only_the_new_member(tmp_path):
    out = tmp_path / "ens"
    first = train_ensemble("mlp:8", DataChoice("digits"), FAST, out, 2)
    assert first.trained == [0, 1] and first.skipped == []
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and [m["seed"] for m in manifest["members"]] == [0, 1]
    metas = [checkpoint.read_model_meta(out / f"member-0{i}") for i in range(2)]
    assert [m["training"]["seed"] for m in metas] == [0, 1]
    assert {m["spec"] for m in metas} == {"mlp:8"} and metas[0]["weights_sha256"] != metas[1]["weights_sha256"]
    before = stamps(out)

    with pytest.raises(DarkKnowledgeError, match="--resume"):
        train_ensemble("mlp:8", DataChoice("digits"), FAST, out, 3)
    lines = []
    grown = train_ensemble("mlp:8", DataChoice("digits"), FAST, out, 3, resume=True, log=lines.append)
    assert grown.trained == [2] and grown.skipped == [0, 1]
    assert {k: v for k, v in stamps(out).items() if k != "member-02"} == before  # untouched
    assert sum("finished, skipped" in line for line in lines) == 2
    ensemble = Ensemble.from_dir(out)
    assert len(ensemble) == 3 and ensemble.combine == "arithmetic"

    # Member 0 retrained alone in a fresh folder with the same seed gives the same weights: only the seed differs.
    again = train_ensemble("mlp:8", DataChoice("digits"), FAST, tmp_path / "again", 1)
    assert again.trained == [0]
    assert checkpoint.read_model_meta(tmp_path / "again" / "member-00")["weights_sha256"] == \
        metas[0]["weights_sha256"]

    with pytest.raises(DarkKnowledgeError, match="other settings"):
        train_ensemble("mlp:8", DataChoice("digits"), TrainConfig(**{**FAST.__dict__, "lr": 0.2}), out, 3,
                       resume=True)
    with pytest.raises(DarkKnowledgeError, match="--members 3 or more"):
        train_ensemble("mlp:8", DataChoice("digits"), FAST, out, 2, resume=True)


class Interrupt(Exception):
    pass


def test_a_half_finished_ensemble_resumes_the_interrupted_member_and_skips_finished_ones(tmp_path):
    out = tmp_path / "ens"
    config = TrainConfig(**{**FAST.__dict__, "epochs": 3})

    def kill_after_member_1_epoch_1(line):
        if line.startswith("epoch 1/3") and (out / "member-01" / "state.json").exists():
            raise Interrupt  # like a SIGKILL right after member-01 saved its first epoch

    with pytest.raises(Interrupt):
        train_ensemble("mlp:8", DataChoice("digits"), config, out, 3, log=kill_after_member_1_epoch_1)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [m["done"] for m in manifest["members"]] == [True, False, False] and not manifest["complete"]
    with pytest.raises(DarkKnowledgeError, match="half-finished: 1 of 3 members"):
        Ensemble.from_dir(out)
    before = stamps(out)["member-00"]

    lines = []
    resumed = train_ensemble("mlp:8", DataChoice("digits"), config, out, 3, resume=True, log=lines.append)
    assert resumed.skipped == [0] and resumed.trained == [1, 2]
    assert any("resuming" in line and "member-01" in line and "after epoch 1" in line for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 2 + 3  # member-01's last two epochs, member-02's 3
    assert stamps(out)["member-00"] == before
    assert json.loads((out / MANIFEST).read_text())["complete"]

    # A member whose model was deleted is trained again, and only that one.
    (out / "member-02" / checkpoint.MODEL_META).unlink()
    lines = []
    again = train_ensemble("mlp:8", DataChoice("digits"), config, out, 3, resume=True, log=lines.append)
    assert again.trained == [2] and again.skipped == [0, 1]
    assert any("model missing" in line for line in lines)
    assert len(Ensemble.from_dir(out)) == 3


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_an_ensemble_and_distils_it_through_the_store(tmp_path, capsys):
    fast = ["--epochs", "2", "--batch-size", "128", "--lr", "0.1", "--no-progress"]
    ens = tmp_path / "ens"
    code, out, err = run_cli(capsys, "train", "--model", "mlp:16", "--members", "2", "--out", ens, *fast)
    assert code == 0, err
    assert "ensemble of 2 members" in out and "2 trained now" in out
    code, out, err = run_cli(capsys, "train", "--model", "mlp:16", "--members", "3", "--resume", "--out", ens, *fast)
    assert code == 0 and "1 trained now, 2 already finished" in out, err

    # evaluate takes the folder: the members' test probabilities averaged (the default rule), or --combine's.
    code, out, err = run_cli(capsys, "evaluate", ens)
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "ensemble of 3 x mlp:16 (arithmetic)"
    test = DataChoice("digits").load()[2]
    probs = sum(predict_logits(checkpoint.load_model(ens / f"member-0{i}")[0], test.images).softmax(1)
                for i in range(3))
    assert result["errors"] == int((probs.argmax(1) != test.labels).sum())
    code, out, err = run_cli(capsys, "evaluate", ens, "--combine", "geometric", "--split", "val")
    assert code == 0 and json.loads(out)["model"].endswith("(geometric)") and json.loads(out)["split"] == "val"
    code, _, err = run_cli(capsys, "evaluate", ens / "member-00", "--combine", "logits")
    assert code == 1 and err.count("\n") == 1 and "not an ensemble folder" in err

    student = ["--student", "mlp:8", "-T", "3", "--hard-weight", "0.5", *fast]
    code, out, err = run_cli(capsys, "distill", "--ensemble", ens, "--out", tmp_path / "s1", *student)
    assert code == 0, err
    assert "soft targets: computed" in err and "soft-target store" in err
    stores = sorted((tmp_path / "soft-targets").glob("*.json"))  # default: OUT/../soft-targets
    assert len(stores) == 1
    meta = checkpoint.read_model_meta(tmp_path / "s1")
    assert meta["teacher"]["combine"] == "arithmetic" and len(meta["teacher"]["members"]) == 3
    assert meta["soft_targets"]["key"].startswith(stores[0].stem)

    # Another rule and another T reuse the same full store: it keeps every member's logits.
    members = [ens / f"member-0{i}" for i in range(3)]
    code, _, err = run_cli(capsys, "distill", *sum((["--teacher", m] for m in members), []), "--combine",
                           "geometric", "--out", tmp_path / "s2", *student)
    assert code == 0 and "soft targets: reusing" in err, err
    assert checkpoint.read_model_meta(tmp_path / "s2")["soft_targets"]["combine"] == "geometric"

    code, _, err = run_cli(capsys, "distill", "--ensemble", ens, "--teacher", members[0], "-T", "2",
                           "--out", tmp_path / "s3")
    assert code == 1 and err.count("\n") == 1 and "not both" in err
    code, _, err = run_cli(capsys, "distill", "-T", "2", "--out", tmp_path / "s3")
    assert code == 1 and err.count("\n") == 1 and "--ensemble" in err


def test_cli_refuses_a_half_finished_ensemble_in_one_line(tmp_path, capsys):
    ens = tmp_path / "ens"
    train_ensemble("mlp:8", DataChoice("digits"), FAST, ens, 1, log=lambda _: None)
    manifest = json.loads((ens / MANIFEST).read_text())
    manifest["members"].append({"run": "member-01", "seed": 1, "done": False})
    (ens / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "distill", "--ensemble", ens, "-T", "2", "--out", tmp_path / "s")
    assert code == 1 and err.count("\n") == 1 and "half-finished" in err and "--resume" in err
    code, _, err = run_cli(capsys, "export", ens, "--out", tmp_path / "ens.onnx", "--no-card")
    assert code == 1 and err.count("\n") == 1 and "half-finished" in err


def test_teachers_from_a_config_file_are_replaced_not_extended_by_the_command_line(tmp_path):
    from darkknowledge.cli import _apply_config_file, _teachers, build_parser
    config = tmp_path / "distill.toml"
    config.write_text('teacher = ["runs/a", "runs/b"]\ncombine = "geometric"\n')
    args = _apply_config_file(build_parser(), ["distill", "--config", str(config)])
    assert [str(t) for t in _teachers(args)] == ["runs/a", "runs/b"] and args.combine == "geometric"
    args = _apply_config_file(build_parser(), ["distill", "--config", str(config), "--teacher", "runs/c"])
    assert [str(t) for t in _teachers(args)] == ["runs/c"]
    config.write_text('teacher = "runs/a"\n')
    args = _apply_config_file(build_parser(), ["distill", "--config", str(config)])
    assert [str(t) for t in _teachers(args)] == ["runs/a"]
