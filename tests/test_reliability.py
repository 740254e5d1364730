"""Crashes and concurrent writers: a run killed at any rename resumes to the model an uninterrupted run makes
(and its previous best model stays loadable meanwhile); a second writer of a run folder is refused naming the
holder; a lock of a dead process is taken over; a second writer of a soft-target store waits and reuses it."""

import io
import json
import os
import signal
import socket
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy
import pytest
import torch

from darkknowledge import checkpoint, jobs, locks
from darkknowledge.cli import main
from darkknowledge.data import load_dataset
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.training import TrainConfig

SPEC = "mlp:16"
CONFIG = TrainConfig(epochs=2, batch_size=256, progress=False)


def fork() -> int:
    """``os.fork()``, or the test skipped once this process has initialised CUDA: a forked child cannot use it
    again, so it would fail rather than be killed where the test wants (benchmarks/device_check.sh runs the forking
    tests in a process of their own, on the CPU)."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised in this process: a forked child cannot use it")
    return os.fork()


def _in_child(work, *, kill_at_rename: int | None = None) -> int:
    """Run ``work()`` in a forked child (cheap: torch is already imported); returns its pid."""
    pid = fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)
            checkpoint._renames = 0
            if kill_at_rename is not None:
                os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"] = str(kill_at_rename)
            work()
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _train(out: Path, resume: bool = False, config: TrainConfig = CONFIG):
    # On the CPU: what is tested is the resume, and a forked child could not use CUDA (see fork)
    return jobs.train_run(SPEC, jobs.DataChoice("digits"), config, out, resume, log=lambda _: None, device="cpu")


def _count_renames(out: Path) -> int:
    os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"] = "1000000000"  # counts, never kills
    checkpoint._renames = 0
    try:
        _train(out)
        return checkpoint._renames
    finally:
        del os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"]


def _killed_at(out: Path, rename: int) -> None:
    _, status = os.waitpid(_in_child(lambda: _train(out), kill_at_rename=rename), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _kill_and_resume(tmp_path, renames_to_kill):
    renames = _count_renames(tmp_path / "reference")
    reference = checkpoint.read_model_meta(tmp_path / "reference")["weights_sha256"]
    assert renames == 2 * 6  # per improving epoch: pending sidecar, weights, sidecar, state (2), metrics
    for rename in renames_to_kill or range(1, renames + 1):
        out = tmp_path / f"killed-{rename}"
        _killed_at(out, rename)
        if (out / checkpoint.MODEL_META).exists() or checkpoint._pending_meta(out):
            checkpoint.load_model(out)  # the previous (or the new) best model, whole
        _train(out, resume=True)
        assert checkpoint.read_model_meta(out)["weights_sha256"] == reference, f"killed at rename {rename}"
        assert not list(out.glob(".*.tmp")) and not (out / checkpoint.PENDING_META).exists()


def test_a_run_killed_in_the_windows_of_its_second_epoch_resumes_to_the_uninterrupted_model(tmp_path):
    _kill_and_resume(tmp_path, [8, 9, 11])  # before the weights', the sidecar's and the state's rename


@pytest.mark.slow
def test_a_run_killed_at_any_rename_keeps_its_last_model_and_resumes_to_the_uninterrupted_model(tmp_path):
    _kill_and_resume(tmp_path, None)


def test_a_commit_cut_between_the_weights_and_the_sidecar_is_read_from_the_pending_sidecar(tmp_path):
    # Epoch 2 commits its model with renames 7 (pending sidecar), 8 (weights) and 9 (sidecar): killed before 9.
    _killed_at(tmp_path / "run", 9)
    sidecar = json.loads((tmp_path / "run" / checkpoint.MODEL_META).read_text())
    in_place = checkpoint.sha256_file(tmp_path / "run" / checkpoint.MODEL_WEIGHTS)
    assert sidecar["epoch"] == 1 and sidecar["weights_sha256"] != in_place  # the old sidecar no longer vouches ...
    _, meta = checkpoint.load_model(tmp_path / "run")  # ... the pending one does
    assert meta["weights_sha256"] == in_place and meta["epoch"] == 2


def test_the_long_run_folder_layout_of_older_versions_still_resumes(tmp_path):
    _killed_at(tmp_path / "run", 7)  # after epoch 1 was saved whole
    (tmp_path / "run" / locks.LOCK_FILE).unlink()  # older versions wrote no lock file
    _, result = _train(tmp_path / "run", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    slow = TrainConfig(epochs=10_000, batch_size=256, progress=False)
    writer = _in_child(lambda: _train(out, config=slow))
    try:
        deadline = time.monotonic() + 60
        while not (out / checkpoint.STATE_META).exists():  # the first writer is training
            assert time.monotonic() < deadline
            time.sleep(0.05)
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["train", "--model", SPEC, "--out", str(out), "--epochs", "1", "--no-progress", "--resume"])
        lines = err.getvalue().strip().splitlines()
        assert code == 1 and len(lines) == 1, err.getvalue()
        assert f"pid {writer} on host {socket.gethostname()}" in lines[0] and "in use" in lines[0]
    finally:
        os.kill(writer, signal.SIGKILL)
        os.waitpid(writer, 0)
    # The holder died without releasing anything: its lock file still names it, and is taken over.
    assert str(writer) in (out / locks.LOCK_FILE).read_text()
    with locks.hold_folder(out):
        assert json.loads((out / locks.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_second_writer_of_a_store_waits_for_the_first_and_reuses_its_store(tmp_path):
    train = load_dataset("digits").train
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    first = SoftTargets.compute(teacher, train, tmp_path)
    lock = next(tmp_path.glob("*.lock"))
    def hold_a_while():
        with locks.hold(lock, "store"):
            time.sleep(1.0)
    holder = _in_child(hold_a_while)
    while str(holder) not in lock.read_text():  # until the child holds it
        time.sleep(0.01)
    said = []
    second = SoftTargets.compute(teacher, train, tmp_path, log=said.append)
    os.waitpid(holder, 0)
    assert "waiting for it" in said[0] and f"pid {holder}" in said[0] and "reusing" in said[-1]
    assert torch.equal(second.member_logits(slice(None)), first.member_logits(slice(None)))


def test_temp_files_of_a_dead_writer_are_removed_when_the_run_is_opened(tmp_path):
    _killed_at(tmp_path / "run", 7)
    stale = tmp_path / "run" / ".model.safetensors.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    _train(tmp_path / "run", resume=True)
    assert not stale.exists()


@pytest.mark.parametrize("rename", [2, 3, 4])
def test_a_killed_first_epoch_is_started_again_by_resume_not_refused(tmp_path, rename):
    _killed_at(tmp_path / "run", rename)  # before the weights', the sidecar's, the state's rename: no state yet
    _, result = _train(tmp_path / "run", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


# -- files that are not regular files, or too large: refused in one line, never a hang or a full memory --------

class _Hung(Exception):
    pass


def _run_within(seconds: int, *argv) -> tuple[int, str]:
    """The CLI's exit status and stderr; a read that blocks (a FIFO with no writer) fails the test after
    ``seconds`` instead of hanging it (the alarm's exception interrupts the blocked system call)."""
    def hung(signum, frame):
        raise _Hung(f"darkknowledge {' '.join(map(str, argv))} still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text("the quick brown fox " * 50)
    return folder


# (where the bad file goes, the command that reads it), by the kind of file
READERS = {
    "model.json": ("run/model.json", lambda t: ["evaluate", t / "run"]),
    "results.json": ("results/results.json", lambda t: ["report", t / "results", "--out", t / "page.html"]),
    "--config": ("config.toml", lambda t: ["train", "--config", t / "config.toml", "--out", t / "out"]),
    "corpus .txt": ("corpus/doc9.txt", lambda t: ["reproduce", "lm", "--quick", "--data", t / "corpus",
                                                  "--out", t / "out"]),
    "--data x.npz": ("x.npz", lambda t: ["train", "--data", t / "x.npz", "--out", t / "out"]),
    "--data x.csv": ("x.csv", lambda t: ["train", "--data", t / "x.csv", "--out", t / "out"]),
    "--data x.npy": ("arrays/y.npy", lambda t: ["train", "--data", t / "arrays", "--out", t / "out"]),
}


def _place(tmp_path: Path, where: str, make) -> list:
    """The command of a READERS kind with ``make(path)`` creating its file."""
    if where.startswith("corpus/"):
        _corpus(tmp_path / "corpus")
    if where.startswith("arrays/"):
        (tmp_path / "arrays").mkdir()
        numpy.save(tmp_path / "arrays" / "x.npy", numpy.zeros((4, 2), numpy.float32))
    target = tmp_path / where
    target.parent.mkdir(exist_ok=True)
    make(target)
    return target


@pytest.mark.parametrize("kind", sorted(READERS))
def test_a_fifo_in_place_of_a_file_is_refused_in_one_line_not_waited_on(tmp_path, kind):
    where, command = READERS[kind]
    _place(tmp_path, where, os.mkfifo)
    code, err = _run_within(60, *command(tmp_path))
    assert code != 0 and err.count("\n") == 1 and "FIFO (named pipe), not a regular file" in err, err
    assert Path(where).name in err


@pytest.mark.parametrize("kind", sorted(READERS))
def test_a_device_in_place_of_a_file_is_refused_in_one_line_not_read_into_memory(tmp_path, kind):
    where, command = READERS[kind]
    _place(tmp_path, where, lambda path: path.symlink_to("/dev/zero"))
    code, err = _run_within(60, *command(tmp_path))
    assert code != 0 and err.count("\n") == 1 and "is a device, not a regular file" in err, err


def test_a_config_file_larger_than_any_config_is_refused_unread(tmp_path):
    config = tmp_path / "config.toml"
    with open(config, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    code, err = _run_within(60, "train", "--config", config, "--out", tmp_path / "out")
    assert code != 0 and err.count("\n") == 1 and "larger than 1 MiB" in err, err
