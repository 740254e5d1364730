"""Data-parallel training under torchrun (2 CPU processes, gloo, loopback only), specialists shared over ranks."""

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.augment import jitter_offsets, translate
from darkknowledge.cli import main
from darkknowledge.distributed import Workers
from darkknowledge.specialists.jobs import share_specialists

# One process trains exactly what two do with the same global batch, up to summation order (the ranks' gradients
# are added in another order than one process adds its cases'): measured 1.2e-07 for these 8 epochs. No jitter:
# with --jitter 1 this recipe amplifies any rounding difference, whoever makes it. In one process, initial weights
# moved by 5e-8 end 2.9e-4 apart after 3 epochs (1.5e-7 without jitter), and two processes differ from one by
# the same 2.9e-4; so the jittered batches are checked row for row instead (test_ranks_jitter_the_rows_...).
TOLERANCE = 1e-5
TRAIN = ["train", "--model", "mlp:512x2", "--batch-size", "32", "--lr", "0.02", "--no-progress"]
# CUDA hidden: these are CPU tests (gloo), and one process must train what two do, on the same device.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}


def torchrun(*argv, cwd, workers=2, **popen):
    """``torchrun --standalone --nproc-per-node N -m darkknowledge ARGV`` (a free port on localhost)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", "darkknowledge", *map(str, argv)]
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants at once, as a lost machine would (torchrun's workers have sessions of
    their own, so its process group does not hold them)."""
    def tree(p):
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        return [p] + [q for c in children for q in tree(int(c))]
    for p in tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def one_process(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "darkknowledge", *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, check=True)


def finished(proc, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def max_difference(run_a, run_b) -> float:
    a, b = (checkpoint.load_model(run)[0].state_dict() for run in (run_a, run_b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_shards_cover_the_range_once_and_differ_by_one_at_most():
    for n in (0, 1, 5, 128, 129):
        for world in (1, 2, 3, 8):
            parts = [Workers(rank, world).shard(n) for rank in range(world)]
            assert [i for part in parts for i in range(n)[part]] == list(range(n))
            sizes = [part.stop - part.start for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_specialists_are_shared_largest_first_to_the_least_loaded_rank():
    sizes = {0: 400, 1: 100, 2: 300, 3: 200, 4: 100}
    assert share_specialists(sizes, 2) == [[0, 1, 4], [2, 3]]  # loads 600 and 500
    assert share_specialists(sizes, 1) == [[0, 1, 2, 3, 4]]
    assert share_specialists({0: 5}, 3) == [[0], [], []]


def test_ranks_jitter_the_rows_one_process_jitters():
    images = torch.randint(0, 256, (45, 8, 8), dtype=torch.uint8)
    for size in (1, 2, 29, 32):
        generator = torch.Generator().manual_seed(size)
        batch = torch.randperm(45, generator=generator)[:size]
        offsets = jitter_offsets(size, 1, generator)
        parts = [Workers(rank, 2).shard(size) for rank in range(2)]
        ranks = torch.cat([translate(images[batch[part]], offsets[:, part], 1) for part in parts])
        assert torch.equal(ranks, translate(images[batch], offsets, 1))


def test_ddp_on_two_processes_trains_the_model_one_process_trains(tmp_path):
    two = torchrun(*TRAIN, "--epochs", "8", "--out", "two", cwd=tmp_path)
    one_process(*TRAIN, "--epochs", "8", "--out", "one", cwd=tmp_path)
    out = finished(two)
    assert out.count("saved") == 1  # rank 0 alone prints and writes
    difference = max_difference(tmp_path / "one", tmp_path / "two")
    print(f"2 processes vs 1, 8 epochs: largest weight difference {difference:.1e}")  # shown with pytest -s
    assert difference <= TOLERANCE
    history = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()] for run in ("one", "two")]
    assert [r["val_errors"] for r in history[0]] == [r["val_errors"] for r in history[1]]
    assert [r["train_errors"] for r in history[0]] == [r["train_errors"] for r in history[1]]

    # Distillation: both ranks write their shares of one soft-target store, byte for byte the one-process store.
    two = torchrun("distill", "--teacher", "one", "--student", "mlp:64", "-T", "3", "--epochs", "3",
                   "--batch-size", "32", "--out", "student-two", "--store-dir", "store-two", "--no-progress",
                   cwd=tmp_path)
    one_process("distill", "--teacher", "one", "--student", "mlp:64", "-T", "3", "--epochs", "3", "--batch-size",
                "32", "--out", "student-one", "--store-dir", "store-one", "--no-progress", cwd=tmp_path)
    assert "2 ranks" in finished(two)
    stores = [sorted((tmp_path / d).iterdir()) for d in ("store-one", "store-two")]
    assert [p.name for p in stores[0]] == [p.name for p in stores[1]]  # same key; no shards or markers left
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(stores[0], stores[1]) if a.suffix == ".bin")
    assert max_difference(tmp_path / "student-one", tmp_path / "student-two") <= TOLERANCE


def stop_after_epoch_2(two, run, epochs: int) -> int:
    """Kill the torchrun job ``two`` once its run folder records epoch 2; the epoch it stopped at, checked to be
    part-way."""
    state = run / checkpoint.STATE_META
    while two.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= 2:
            kill_tree(two.pid)
            break
        time.sleep(0.005)
    two.wait()
    stopped_at = json.loads(state.read_text())["epoch"]
    assert 2 <= stopped_at < epochs, "the run was not stopped part-way"
    return stopped_at


def test_a_run_stopped_with_two_workers_resumes_with_one(tmp_path):
    epochs = 8  # the horizon of TOLERANCE: rounding differences grow over long noisy runs (README)
    two = torchrun(*TRAIN, "--epochs", epochs, "--out", "run", cwd=tmp_path)
    stopped_at = stop_after_epoch_2(two, tmp_path / "run", epochs)

    out = one_process(*TRAIN, "--epochs", epochs, "--out", "run", "--resume", cwd=tmp_path).stderr
    assert f"resuming run after epoch {stopped_at}" in out
    one_process(*TRAIN, "--epochs", epochs, "--out", "uninterrupted", cwd=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    assert max_difference(tmp_path / "run", tmp_path / "uninterrupted") <= TOLERANCE


def test_four_specialists_on_two_ranks_are_each_trained_once(tmp_path):
    one_process("train", "--model", "mlp:32", "--epochs", "3", "--out", "generalist", "--no-progress", cwd=tmp_path)
    one_process("specialists", "cluster", "--generalist", "generalist", "--out", "sp", "--clusters", "4",
                "--min-size", "1", cwd=tmp_path)
    assert len(json.loads((tmp_path / "sp" / "subsets.json").read_text())["subsets"]) == 4
    out = finished(torchrun("specialists", "train", "sp", "--all", "--epochs", "2", "--no-progress", cwd=tmp_path))
    trained = [line for line in out.splitlines() if line.startswith("specialist ")]
    by_index = {int(line.split()[1]): line.rsplit("by rank ", 1)[1] for line in trained}
    assert sorted(by_index) == [0, 1, 2, 3] and len(trained) == 4  # each once
    assert set(by_index.values()) == {"0", "1"}  # both ranks worked
    assert "trained 4 specialists on 2 ranks" in out
    for index in range(4):
        state = checkpoint.read_json(tmp_path / "sp" / f"specialist-{index:02d}" / checkpoint.STATE_META, "state")
        assert [r["epoch"] for r in state["history"]] == [0, 1, 2]  # the untrained start, then 2 epochs, once


def test_a_store_dir_that_ranks_do_not_share_is_refused(tmp_path):
    script = tmp_path / "store.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from darkknowledge import distributed
        from darkknowledge.errors import DarkKnowledgeError
        from darkknowledge.jobs import DataChoice
        from darkknowledge.soft_targets import SoftTargets
        workers = distributed.init_from_env()
        train, _, _ = DataChoice("digits").load()
        teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        try:  # each rank gives its own folder: as if the ranks ran on machines without a shared file system
            SoftTargets.compute(teacher, train, f"store-{workers.rank}")
        except DarkKnowledgeError as e:
            print(f"rank {workers.rank}: {e}")
        distributed.shutdown()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("a file system that every rank (every node) sees") == 2


def test_a_sampled_store_computed_by_two_ranks_is_the_one_computed_by_one(tmp_path):
    script = tmp_path / "sampled.py"
    script.write_text(textwrap.dedent("""
        import torch
        from darkknowledge import distributed
        from darkknowledge.jobs import DataChoice
        from darkknowledge.soft_targets import SoftTargets
        distributed.init_from_env()
        train, _, _ = DataChoice("digits").load()
        torch.manual_seed(0)
        teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        SoftTargets.compute(teacher, train, "store", samples=3, head=1, batch_size=100)
        distributed.shutdown()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from darkknowledge.jobs import DataChoice
    from darkknowledge.soft_targets import SoftTargets
    train, _, _ = DataChoice("digits").load()
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    one = SoftTargets.compute(teacher, train, None, samples=3, head=1)  # one process, other batches
    [header] = (tmp_path / "store").glob("*.json")
    two = SoftTargets.open(header)
    rows = torch.arange(len(one))
    assert two.key == one.key and torch.equal(two.topk(rows).indices, one.topk(rows).indices)
    assert torch.equal(two.topk(rows).logits, one.topk(rows).logits)


def test_commands_that_run_as_one_process_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", "some-run"]) == 1
    err = capsys.readouterr().err
    assert "'evaluate' runs as one process" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("world", [2, 3])
def test_fit_refuses_more_workers_than_a_batch_has_cases(world):
    from darkknowledge.data import LabeledImages
    from darkknowledge.errors import DarkKnowledgeError
    from darkknowledge.models import build_model
    from darkknowledge.training import TrainConfig, fit
    data = LabeledImages(torch.zeros(1, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long),
                         tuple("0123456789"), "one case")
    with pytest.raises(DarkKnowledgeError, match=f"{world} workers need"):
        fit(build_model("mlp:4", (8, 8), 10), data, config=TrainConfig(epochs=1, progress=False),
            workers=Workers(0, world))


def test_an_ensemble_trains_and_grows_under_torchrun(tmp_path):
    ensemble = ["train", "--model", "mlp:16", "--epochs", "1", "--out", "ens", "--no-progress"]
    assert "2 trained now, 0 already finished" in finished(torchrun(*ensemble, "--members", "2", cwd=tmp_path))
    assert "1 trained now, 2 already finished" in finished(torchrun(*ensemble, "--members", "3", "--resume",
                                                                    cwd=tmp_path))
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["complete"] and [m["seed"] for m in manifest["members"]] == [0, 1, 2]


TOKEN_STORE = '''
import os, signal, sys
import numpy as np, torch
from darkknowledge import distributed
from darkknowledge.data.text import TokenWindows
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.transformer import build_language_model


def build(folder, top_k=None, kill_after=0):
    """A tiny store (vocabulary 32, 40 windows of 8 tokens, 2 members) built 3 windows a chunk; rank 1 kills
    itself after ``kill_after`` chunks (0: never)."""
    workers = distributed.current()
    windows = TokenWindows(np.random.default_rng(0).integers(0, 32, 40 * 8 + 1), 8, "train", 32)
    torch.manual_seed(0)
    members = [build_language_model("gpt:layers=1,dim=16,heads=2,context=8", 32) for _ in range(2)]
    chunks = []

    def on_chunk(done, total):
        chunks.append(done)
        if workers.rank == 1 and len(chunks) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    store = SoftTargets.build(members, windows, folder, tokenizer_sha256="0" * 64, top_k=top_k, batch_windows=3,
                              on_chunk=on_chunk)
    print(f"rank {workers.rank} returns {store.path.name}, {len(chunks)} chunks")
    return store


if __name__ == "__main__":
    distributed.init_from_env()
    build(sys.argv[1], int(sys.argv[2]) or None, int(sys.argv[3]))
    distributed.shutdown()
'''


def token_store(tmp_path, folder, top_k=None, kill_after=None):
    """The tiny token store built in ``folder``: by 2 ranks under torchrun (``kill_after``: rank 1 killed after
    that many chunks; returns the launcher's exit code and output), or in this process (returns the store)."""
    script = tmp_path / "token_store.py"
    script.write_text(TOKEN_STORE)
    if kill_after is None:
        return runpy.run_path(str(script))["build"](tmp_path / folder, top_k)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), folder, str(top_k or 0), str(kill_after)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def assert_same_store(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # no rank files left
    headers = [json.loads((folder / "targets.json").read_text()) for folder in (a, b)]
    assert headers[0]["complete"] and headers[0]["checksums"] == headers[1]["checksums"]
    assert all(p.read_bytes() == (b / p.name).read_bytes() for p in a.glob("*.bin"))


def test_two_ranks_build_the_token_store_one_process_builds(tmp_path):
    code, out = token_store(tmp_path, "two", kill_after=0)
    assert code == 0, out
    one = token_store(tmp_path, "one")
    assert out.count(f"returns {one.path.name}") == 2  # every rank opens the one store
    assert_same_store(one.path, tmp_path / "two" / one.path.name)
    # 20 windows each, 3 a chunk: each rank computed its own half (the ranks' lines may share one line of output)
    assert re.findall(r"returns \w+, (\d+) chunks", out) == ["7", "7"]


def test_a_token_store_killed_on_one_rank_resumes_to_the_rows_one_process_writes(tmp_path, capsys):
    code, out = token_store(tmp_path, "s", top_k=4, kill_after=2)
    assert code != 0, out
    (folder,) = (tmp_path / "s").iterdir()
    assert not json.loads((folder / "targets.json").read_text())["complete"]
    resumed = token_store(tmp_path, "s", top_k=4)  # here, in one process: progress does not depend on the ranks
    stopped_after = int(capsys.readouterr().out.split("its build stopped after ", 1)[1].split()[0])
    assert 2 * 3 * 8 <= stopped_after < 320  # rank 1's two chunks at least were kept, and the rest was resumed
    assert resumed.path == folder
    assert_same_store(token_store(tmp_path, "one", top_k=4).path, folder)


def test_the_windows_left_are_shared_out_once_in_contiguous_parts():
    from darkknowledge.store_files import missing, rank_share
    left = missing([[0, 4], [10, 12], [12, 20]], 25)
    assert left == [[4, 10], [20, 25]]
    for world in (1, 2, 3, 7, 16):
        parts = [rank_share(left, Workers(rank, world)) for rank in range(world)]
        windows = [w for part in parts for start, stop in part for w in range(start, stop)]
        assert windows == [*range(4, 10), *range(20, 25)]  # each once, in rank order
        sizes = [sum(stop - start for start, stop in part) for part in parts]
        assert max(sizes) - min(sizes) <= 1


KILLED_STORE_BUILD = """
import os, signal, sys
from darkknowledge import cli, lm_jobs
# rank 0's progress (the other ranks show none) kills it once its first chunk is on disk and recorded
lm_jobs._progress = lambda label: lambda done, total: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_store_build_under_torchrun_writes_the_store_one_process_writes(tmp_path):
    from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
    from darkknowledge.language_model import LMConfig, train_language_model
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 6)
    documents = load_corpus(corpus)
    split = split_documents(documents.documents)
    tokenizer = TextTokenizer.train([documents.documents[n] for n in split["train"]], "char")
    windows = tokenise_corpus(documents, split, tokenizer, context=16).windows
    train_language_model("gpt:layers=1,dim=16,heads=2,context=16", tokenizer, windows["train"],
                         windows["validation"], LMConfig(epochs=1, batch_size=8), run_dir=tmp_path / "teacher",
                         log=lambda _: None)
    assert len(windows["train"]) > 2 * 16  # more than one chunk of 16 windows for each rank
    build = ["store", "build", "--teacher", "teacher", "--data", "corpus", "--layout", "sampled", "--head", "2",
             "--samples", "3"]
    out = finished(torchrun(*build, "--out", "two", cwd=tmp_path))
    one = one_process(*build, "--out", "one", cwd=tmp_path).stdout
    assert out.count("bytes per token") == 1 and "tokens/s" in out  # rank 0 alone says what was built
    (folder,) = (tmp_path / "one").iterdir()
    assert folder.name in one and (tmp_path / "two" / folder.name).is_dir()  # the same key
    assert_same_store(folder, tmp_path / "two" / folder.name)
    # killed on rank 0 after its first chunk (torchrun then stops rank 1): a rerun resumes to the same store
    script = tmp_path / "killed_build.py"
    script.write_text(KILLED_STORE_BUILD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), *build, "--out", "killed"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not json.loads((tmp_path / "killed" / folder.name / "targets.json").read_text())["complete"]
    resumed = one_process(*build, "--out", "killed", cwd=tmp_path)
    assert "resuming there" in resumed.stderr, resumed.stderr
    assert_same_store(folder, tmp_path / "killed" / folder.name)
    # bad input stops every rank with the one-line error, nothing written (no rank waits for another)
    proc = torchrun(*build[:6], "--samples", "3", "--out", "bad", cwd=tmp_path)  # --layout topk by default
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "--head and --samples are for --layout sampled" in output.decode()
    assert not (tmp_path / "bad").exists()


# -- FSDP2: --strategy fsdp shards the student over the ranks ---------------------------------------------------

# A tiny gpt: language model on a corpus of .txt files, with the language models' loop: AdamW, clipping and
# gradient accumulation (under FSDP each micro-batch's gradients are reduced into the shards, where DDP waits
# for the step's last one).
LM_TRAIN = ["--data", "txt", "--tokenizer", "char", "--context", "16", "--epochs", "2", "--batch-size", "8",
            "--optimizer", "adamw", "--lr", "0.01", "--clip-grad-norm", "1", "--grad-accumulation", "2",
            "--no-progress"]
LM_STUDENT = "gpt:layers=2,dim=16,heads=2"
# FSDP sums the ranks' gradients in another order than DDP (a reduce-scatter of shards, not an all-reduce of
# buckets) and clips a norm summed from shards, so the weights differ by rounding, which AdamW's division by the
# root of its second moment magnifies: measured 1.1e-4 between fsdp and ddp after these 2 epochs of the corpus
# recipe (AdamW, warm-up then cosine, weight decay 0.1 on the weights), and 3.8e-5 between ddp and one process,
# the difference the DDP tests above allow for SGD (1.2e-7) grown by AdamW.
LM_TOLERANCE = 2e-4


def lm_difference(run_a, run_b) -> float:
    from darkknowledge.language_model import load_language_model
    a, b = (load_language_model(run)[0].state_dict() for run in (run_a, run_b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_trains_the_language_model_ddp_trains_and_distills_it_from_a_store(tmp_path):
    (tmp_path / "txt").mkdir()
    for i in range(6):
        (tmp_path / "txt" / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the "
                                                       "lazy dog. " * (5 + i))
    out = finished(torchrun("train", "--model", LM_STUDENT, *LM_TRAIN, "--out", "fsdp", "--strategy", "fsdp",
                            cwd=tmp_path))
    assert "strategy fsdp: 2 transformer block(s) and the rest of the model sharded over 2 ranks" in out
    assert out.count("saved") == 1  # rank 0 alone writes the run
    out = finished(torchrun("train", "--model", LM_STUDENT, *LM_TRAIN, "--out", "ddp", cwd=tmp_path))
    assert "strategy fsdp" not in out
    difference = lm_difference(tmp_path / "fsdp", tmp_path / "ddp")
    print(f"fsdp vs ddp, 2 epochs of AdamW: largest weight difference {difference:.1e}")  # shown with pytest -s
    assert difference <= LM_TOLERANCE
    # an ordinary run folder: one process evaluates it, and its settings are the ddp run's (the same run key)
    assert json.loads(one_process("evaluate", "fsdp", "--data", "txt", cwd=tmp_path).stdout)["tokens"] > 0
    metas = [json.loads((tmp_path / run / "model.json").read_text()) for run in ("fsdp", "ddp")]
    assert metas[0]["run_key"] == metas[1]["run_key"]

    # distillation from a store: the store read by shard, the student sharded
    one_process("store", "build", "--teacher", "ddp", "--data", "txt", "--out", "stores", "--layout", "topk",
                "--top-k", "4", cwd=tmp_path)
    distill = ["distill", "--teacher", "ddp", "--student", LM_STUDENT, "-T", "2", "--store", "stores", *LM_TRAIN]
    out = finished(torchrun(*distill, "--out", "student-fsdp", "--strategy", "fsdp", cwd=tmp_path))
    assert "soft-target store" in out and "strategy fsdp: 2 transformer block(s)" in out
    one_process(*distill, "--out", "student-one", cwd=tmp_path)
    assert lm_difference(tmp_path / "student-fsdp", tmp_path / "student-one") <= LM_TOLERANCE


def test_a_run_stopped_under_fsdp_resumes_under_fsdp_to_the_uninterrupted_run(tmp_path):
    epochs = 6
    fsdp = ["--out", "run", "--strategy", "fsdp"]
    train = [*TRAIN, "--optimizer", "adamw", "--lr", "0.001"]  # AdamW: moments and a step count to cut and gather
    two = torchrun(*train, "--epochs", epochs, *fsdp, cwd=tmp_path)
    stopped_at = stop_after_epoch_2(two, tmp_path / "run", epochs)
    # the saved state is the one DDP saves: whole weights and AdamW's moments, by parameter index
    saved = checkpoint.read_training_state(tmp_path / "run")
    assert [group["params"] for group in saved["optimizer_param_groups"]] == [list(range(6))]  # 3 layers

    out = finished(torchrun(*train, "--epochs", epochs, *fsdp, "--resume", cwd=tmp_path))
    assert f"resuming run after epoch {stopped_at}" in out
    one_process(*train, "--epochs", epochs, "--out", "uninterrupted", cwd=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    difference = max_difference(tmp_path / "run", tmp_path / "uninterrupted")
    print(f"fsdp, stopped and resumed, vs 1 process: largest weight difference {difference:.1e}")
    assert difference <= TOLERANCE


def test_fsdp_shards_each_transformer_block_and_the_root_of_other_models():
    from darkknowledge.models import build_model
    from darkknowledge.sharding import blocks
    from darkknowledge.transformer import Block, build_language_model
    gpt = build_language_model("gpt:layers=3,dim=8,heads=2,context=8", 16)
    assert blocks(gpt) == list(gpt.blocks) and all(isinstance(b, Block) for b in blocks(gpt))
    hf = build_language_model("hf:gpt2,n_layer=2,n_embd=8,n_head=2", 16, 8)  # Hugging Face's _no_split_modules
    assert [type(b).__name__ for b in blocks(hf)] == ["GPT2Block", "GPT2Block"]
    assert blocks(build_model("mlp:16", (8, 8), 10)) == []  # the root alone


def test_fsdp_refusals_are_one_line(tmp_path, capsys):
    assert main(["train", "--model", "mlp:4", "--epochs", "1", "--out", str(tmp_path / "x"), "--strategy", "fsdp",
                 "--fp16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fp16 must be off with strategy fsdp" in err and "use bf16" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    from darkknowledge.data import LabeledImages
    from darkknowledge.errors import DarkKnowledgeError
    from darkknowledge.models import build_model
    from darkknowledge.training import TrainConfig, fit
    data = LabeledImages(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                         tuple("0123456789"), "four cases")
    with pytest.raises(DarkKnowledgeError, match="fit's validate and keep hooks do not see; use strategy ddp"):
        fit(build_model("mlp:4", (8, 8), 10), data, config=TrainConfig(epochs=1, progress=False, strategy="fsdp"),
            workers=Workers(0, 2), keep=lambda model, epoch: model)
