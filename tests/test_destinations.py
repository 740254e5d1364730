"""Nothing written over another job's folder (issue 28): a command's output inside a run, store or experiment
folder it does not write is refused in one line before any work; an experiment folder holds one experiment and
one ``reproduce`` at a time; a second ``distill`` of a run is refused before it computes the teacher's outputs."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from darkknowledge import locks
from darkknowledge.cli import main
from darkknowledge.data import load_dataset
from darkknowledge.destinations import EXPERIMENT, RUN, refuse_foreign_destination
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.experiments.folder import EXPERIMENT_FILE, hold_experiment
from darkknowledge.soft_targets import SoftTargets
from test_reliability import fork

RESULTS = Path(__file__).parents[1] / "results"  # committed experiment folders (results.json only: older layout)
DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
FAST = ["--epochs", "1", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A run, a soft-target store and two experiment folders as ``reproduce`` made them before experiment.json."""
    root = tmp_path_factory.mktemp("destinations")
    assert main(["train", "--model", "mlp:16", "--out", str(root / "run"), *FAST]) == 0
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    SoftTargets.compute(teacher, load_dataset("digits").train, root / "store")
    for name, source in (("mnist", "mnist"), ("lm", "lm-small")):
        (root / name).mkdir()
        for file in ("results.json", "report.md"):
            shutil.copyfile(RESULTS / source / file, root / name / file)
    return {"root": root, "run": root / "run", "store": root / "store", "mnist": root / "mnist", "lm": root / "lm"}


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv) -> str:
    """The one error line of a command that must be refused."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("darkknowledge: error: "), err
    return lines[0]


# What the fault campaign found (each exited 0 and broke the run), and every other command that writes a path.
OUTPUTS = {
    "export over the weights": lambda f: ["export", f["run"], "--out", f["run"] / "model.safetensors", "--no-card"],
    "export over the sidecar": lambda f: ["export", f["run"], "--out", f["run"] / "model.json", "--format",
                                          "torchscript"],
    "bench over the sidecar": lambda f: ["bench", f["run"], "--no-onnx", "--json", f["run"] / "model.json"],
    "export deeper in a run": lambda f: ["export", f["run"], "--out", f["run"] / "deploy" / "m.onnx"],
    "export through a link": lambda f: ["export", f["run"], "--out", f["root"] / "link" / "m.onnx"],
    "export into a store": lambda f: ["export", f["run"], "--out", f["store"] / "m.onnx"],
    "export into an experiment": lambda f: ["export", f["run"], "--out", f["mnist"] / "m.onnx"],
    "report into an experiment": lambda f: ["report", f["mnist"], "--out", f["mnist"] / "report.html"],
    "specialists evaluate --json": lambda f: ["specialists", "evaluate", f["run"], "--json", f["run"] / "e.json"],
    "train into a store": lambda f: ["train", "--model", "mlp:16", "--out", f["store"], *FAST],
    "distill into an experiment folder": lambda f: ["distill", "--teacher", f["run"], "-T", "2", "--out",
                                                    f["mnist"], *FAST],
    "cluster into a store": lambda f: ["specialists", "cluster", "--generalist", f["run"], "--clusters", "2",
                                       "--out", f["store"] / "specialists"],
    "demo into a run": lambda f: ["demo", "--out", f["run"] / "demo", "--no-progress"],
    "reproduce into a run": lambda f: ["reproduce", "mnist", "--quick", "--out", f["run"], "--no-progress"],
}


@pytest.mark.parametrize("case", OUTPUTS)
def test_an_output_in_a_folder_the_command_does_not_write_is_refused_and_nothing_changes(folders, case, capsys):
    link = folders["root"] / "link"
    if not link.exists():
        link.symlink_to(folders["run"])
    before = {name: _contents(folders[name]) for name in ("run", "store", "mnist")}
    argv = OUTPUTS[case](folders)
    line = _refused(capsys, argv)
    assert str(argv[argv.index("--json") + 1 if "--json" in argv else argv.index("--out") + 1]) in line
    assert "folder (it holds " in line and "choose" in line
    assert {name: _contents(folders[name]) for name in before} == before


def test_commands_still_write_their_own_folders_and_beside_others(folders, tmp_path):
    root = folders["root"]
    refuse_foreign_destination(root / "run.onnx", "export --out")  # beside a run, not in it
    refuse_foreign_destination(folders["run"], "train --out", makes=RUN, inside=(RUN, EXPERIMENT))  # --resume
    refuse_foreign_destination(folders["run"] / "member-00", "train --out", makes=RUN, inside=(RUN, EXPERIMENT))
    refuse_foreign_destination(folders["mnist"] / "runs" / "x", "distill --out", makes=RUN, inside=(RUN, EXPERIMENT))
    started = tmp_path / "started"  # a job killed as it took its lock: nothing in it to lose
    with locks.hold_folder(started):
        pass
    refuse_foreign_destination(started, "reproduce mnist --out", makes=EXPERIMENT, inside=(EXPERIMENT,))
    with pytest.raises(DarkKnowledgeError, match="is a darkknowledge run folder"):
        refuse_foreign_destination(started, "export --out")
    with pytest.raises(DarkKnowledgeError, match="is not a usable path"):  # one line, not a traceback
        refuse_foreign_destination("a\0b", "bench --json")


@pytest.mark.parametrize("experiment, other", [("lm", "mnist"), ("mnist", "lm")])
def test_reproduce_refuses_another_experiments_folder_and_leaves_it_as_it_was(folders, experiment, other, capsys):
    before = _contents(folders[other])
    line = _refused(capsys, ["reproduce", experiment, "--quick", "--out", folders[other], "--no-progress",
                             "--data-dir", DATA])
    assert f"holds the {other} experiment (results.json)" in line and f"'reproduce {other}' continues it" in line
    assert _contents(folders[other]) == before


def test_an_experiment_folder_records_its_experiment_and_older_folders_are_recognised(folders, tmp_path, capsys):
    new = tmp_path / "new"
    with hold_experiment(new, "regularizer"):  # written as it starts, before any stage
        assert json.loads((new / EXPERIMENT_FILE).read_text()) == {"experiment": "regularizer"}
    line = _refused(capsys, ["reproduce", "ensemble", "--quick", "--out", new, "--no-progress"])
    assert "holds the regularizer experiment (experiment.json)" in line
    old = tmp_path / "old"
    shutil.copytree(folders["lm"], old)
    with hold_experiment(old, "lm"):  # made before experiment.json: recognised from results.json, and resumed
        assert json.loads((old / EXPERIMENT_FILE).read_text()) == {"experiment": "lm"}
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "results.json").write_text('{"something": 1}')
    assert "holds an unknown experiment" in _refused(capsys, ["reproduce", "mnist", "--out", unknown])


def _wait_for_lock(folder: Path, pid: int) -> None:
    deadline = time.monotonic() + 120
    while str(pid) not in ((folder / locks.LOCK_FILE).read_text() if (folder / locks.LOCK_FILE).exists() else ""):
        assert time.monotonic() < deadline, f"pid {pid} never took the lock of {folder}"
        time.sleep(0.05)


def _child(work) -> int:
    """``work()`` in a forked child (torch is already imported), killed by the test when it is done with it."""
    pid = fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            work()
        finally:
            os._exit(0)
    return pid


@pytest.mark.skipif(not (DATA / "shakespeare").is_dir(), reason="Shakespeare corpus not found")
def test_a_second_reproduce_on_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "lm"
    argv = ["reproduce", "lm", "--quick", "--out", str(out), "--data-dir", str(DATA), "--no-progress"]
    first = _child(lambda: main(argv))
    try:
        _wait_for_lock(out, first)
        line = _refused(capsys, argv)
        assert "experiment folder" in line and f"pid {first}" in line and "in use" in line
    finally:
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)


def test_a_second_distill_is_refused_before_it_computes_the_teachers_outputs(folders, tmp_path, capsys):
    student, store = tmp_path / "student", tmp_path / "store"

    def hold():
        with locks.hold_folder(student):
            time.sleep(600)

    holder = _child(hold)
    try:
        _wait_for_lock(student, holder)
        line = _refused(capsys, ["distill", "--teacher", folders["run"], "-T", "2", "--store-dir", store,
                                 "--out", student, *FAST])
        assert f"pid {holder}" in line and "in use" in line
        assert not store.exists() or not any(store.iterdir())  # no store was computed
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


def test_a_distill_into_a_run_it_may_not_continue_is_refused_before_it_computes_the_teachers_outputs(
        folders, tmp_path, capsys):
    student, store = tmp_path / "student", tmp_path / "store"
    argv = ["distill", "--teacher", str(folders["run"]), "-T", "2", "--out", str(student), *FAST]
    assert main(argv) == 0
    line = _refused(capsys, [*argv, "--store-dir", store])  # no --resume
    assert "already holds a training run; pass --resume" in line
    assert not store.exists() or not any(store.iterdir())  # no store was computed
