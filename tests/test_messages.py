"""What a new user reads: help texts, errors that suggest only options that exist, progress lines, plot labels."""

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from darkknowledge import checkpoint  # noqa: E402
from darkknowledge.cli import build_parser, main  # noqa: E402
from darkknowledge.errors import DarkKnowledgeError  # noqa: E402
from darkknowledge.html_report import build_page, detect_kind  # noqa: E402
from darkknowledge.jobs import DataChoice, train_run  # noqa: E402
from darkknowledge.plots import plain_log_axis  # noqa: E402
from darkknowledge.training import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def options(parser: argparse.ArgumentParser, name: str = "darkknowledge"):
    """(command, option, help) of every option of every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from options(sub, f"{name} {sub_name}")
        elif action.option_strings and action.dest != "help":
            yield name, action.option_strings[-1], action.help or ""


def test_every_option_says_what_it_does():
    bare = [(command, option) for command, option, text in options(build_parser())
            if not text.strip() or text.lstrip().startswith("(")]
    assert not bare, f"options without a description: {bare}"


def test_help_texts_say_what_the_command_does_with_them():
    helps = {(command, option): text for command, option, text in options(build_parser())}
    assert "evaluate on" in helps["darkknowledge evaluate", "--dataset"]
    assert "train on" in helps["darkknowledge train", "--dataset"]
    assert "onnx" in helps["darkknowledge export", "--format"]
    assert "few minutes" not in helps["darkknowledge reproduce", "--quick"]


def test_reproduce_without_data_suggests_an_option_reproduce_has(tmp_path, capsys):
    code = main(["reproduce", "mnist", "--quick", "--data-dir", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("darkknowledge: error: ") and len(err.strip().splitlines()) == 1
    suggested = {word.strip(",;.()") for word in err.split() if word.startswith("--")}
    reproduce = {o for command, o, _ in options(build_parser()) if command == "darkknowledge reproduce"}
    assert suggested and suggested <= reproduce | {"--data-dir"}, err


def test_under_torchrun_a_single_process_command_is_refused_once_by_rank_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["evaluate", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["evaluate", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without torchrun" in err[0]


def test_a_finished_run_is_reused_not_announced_as_resuming(tmp_path):
    config = TrainConfig(epochs=1, batch_size=256, progress=False)
    train_run("mlp:8", DataChoice("digits"), config, tmp_path, log=lambda _: None)
    lines = []
    train_run("mlp:8", DataChoice("digits"), config, tmp_path, resume=True, log=lines.append)
    assert any("already trained" in line for line in lines) and not any("resuming" in line for line in lines)


def test_a_refused_run_names_the_way_out_the_command_has(tmp_path):
    config = TrainConfig(epochs=1, batch_size=256, progress=False)
    model, _ = train_run("mlp:8", DataChoice("digits"), config, tmp_path, log=lambda _: None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DarkKnowledgeError, match="copy subsets.json"):
        checkpoint.resume_training_state(tmp_path, model, optimizer, "key", resume=False,
                                         elsewhere="train into another specialists folder (copy subsets.json)")


@pytest.mark.parametrize("folder,kind", [("mnist", "mnist"), ("ensemble", "ensemble"), ("ensemble-small", "ensemble"),
                                         ("regularizer", "regularizer"), ("specialists", "specialists")])
def test_report_knows_every_experiment_the_project_writes(folder, kind, tmp_path):
    results = json.loads((RESULTS / folder / "results.json").read_text())
    assert detect_kind(results) == kind
    if kind in ("ensemble", "regularizer"):  # their sections are new: build them from the committed numbers
        shutil.copy(RESULTS / folder / "results.json", tmp_path / "results.json")
        page = build_page([tmp_path])
        text = json.dumps([getattr(b, "text", "") for b in page.blocks])
        assert "An experiment this report does not know" not in text
        assert any(getattr(b, "png", None) for b in page.blocks)


@pytest.mark.parametrize("low,high,percent", [(1, 300, False), (0.01, 0.6, True), (150, 4000, False),
                                              (1800, 4200, False)])
def test_log_axes_are_labelled_with_plain_numbers(low, high, percent):
    fig, ax = plt.subplots()
    ax.plot([low, high], [low, high])
    ax.set_xscale("log")
    plain_log_axis(ax.xaxis, percent=percent)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.xaxis.get_ticklabels(which="both") if t.get_text()]
    plt.close(fig)
    assert labels
    for label in labels:
        float(label.rstrip("%"))  # '2', '0.5', '5%': never '$10^{0}$' or '$6\\times10^{-1}$'


def test_a_usage_error_names_the_program_once_and_the_sub_command_that_refused(capsys):
    assert main(["distil"]) == 2
    top = capsys.readouterr().err.strip()
    assert top.startswith("darkknowledge: error: argument COMMAND: invalid choice: 'distil'"), top
    assert main(["train", "--epochs", "x"]) == 2
    sub = capsys.readouterr().err.strip()
    assert sub.startswith("darkknowledge: error: darkknowledge train: argument --epochs"), sub
