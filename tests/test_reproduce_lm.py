"""``darkknowledge reproduce lm --quick`` (§4 on text): every stage runs on the Shakespeare corpus, the files are
written, the numbers come from the evaluation code, a rerun reuses every stage, and ``generate`` samples a run."""

import contextlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.cli import main
from darkknowledge.data.text import TextTokenizer
from darkknowledge.experiments.lm import QUICK
from darkknowledge.language_model import load_language_model
from darkknowledge.locks import LOCK_FILE
from test_reliability import fork

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "shakespeare").is_dir(),
                                reason="Shakespeare corpus not found; set DARKKNOWLEDGE_DATA")


def _run(out):
    return main(["reproduce", "lm", "--quick", "--out", str(out), "--data-dir", str(DATA), "--no-progress"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-lm")
    assert _run(out) == 0
    return out


def test_writes_results_report_and_plot_with_every_stage(quick_run):
    for name in ("results.json", "report.md", "lm.png", "tokenizer.json", "data.json"):
        assert (quick_run / name).stat().st_size > 0
    r = json.loads((quick_run / "results.json").read_text())
    assert r["quick"] is True and r["plan_name"] == "quick" and "reproduce lm --quick" in r["command"]
    assert set(r["models"]) >= {"baseline", "ensemble", "student-T1", "student-T2", "half-labels"}
    assert [row["store"] for row in r["top_k"]] == (["dense"] + [f"top{k}" for k in QUICK.top_ks]
                                                     + [f"sampled{k}" for k in QUICK.sampled]
                                                     + [f"top{h}+sampled{k}" for h, k in QUICK.sampled_tails]
                                                     + [f"top{h}+{k}-{q}" for h, k, q in QUICK.compact])
    assert r["top_k"][1]["bytes_per_token"] == 4 * QUICK.top_ks[0] + 8
    for sampled in r["top_k"][-3:]:  # distilled at T = 1, so measured against the dense store's student at T = 1
        assert sampled["run"] == f"student-T1-{sampled['store']}" and sampled["dense_run"] == "student-T1"
    assert [r["stores"][row["store"]]["layout"] for row in r["top_k"][-3:]] == ["sampled", "sampled", "compact"]
    head, draws = QUICK.sampled_tails[0]
    assert r["stores"][f"top{head}+sampled{draws}"]["head"] == head
    assert r["top_k"][-2]["bytes_per_token"] == 4 * (head + draws) + 8
    # the compact row: the same head and draws packed, ids in ceil(log2 V) bits, a byte a head probability, P
    (head, draws, quant), = QUICK.compact
    bits = math.ceil(math.log2(TextTokenizer.load(quick_run / "tokenizer.json").vocab_size))
    assert r["stores"][f"top{head}+{draws}-{quant}"]["quant"] == quant
    assert r["top_k"][-1]["bytes_per_token"] == math.ceil((head + draws) * bits / 8) + head + 2
    assert f"top{head}+{draws}-{quant}" in (quick_run / "report.md").read_text()
    # each sparse store's share of the dense gain has its block-bootstrap interval; dense's share is 1 by definition
    assert "interval_of_dense_gain_accuracy" not in r["top_k"][0]
    for row in r["top_k"][1:]:
        for metric in ("accuracy", "log_loss"):
            low, high = row[f"interval_of_dense_gain_{metric}"]
            assert low <= high
    for metric in ("accuracy", "log_loss"):
        share = r["share_transferred"][metric]
        assert share["low"] <= share["share"] <= share["high"]
    # The documents of the three splits are disjoint and recorded.
    documents = r["data"]["documents"]
    assert not set(documents["train"]) & set(documents["test"]) and len(documents["validation"]) >= 1


def test_numbers_come_from_the_evaluation_code(quick_run):
    r = json.loads((quick_run / "results.json").read_text())
    chosen = r["chosen_on_validation"]["run"]
    model, meta = load_language_model(quick_run / "runs" / chosen)
    data = json.loads((quick_run / "data.json").read_text())
    assert meta["tokenizer_sha256"] == data["tokenizer"]["sha256"] and meta["objective"] == "distillation"
    assert r["models"][chosen]["test_log_loss"] > 0
    best = min(r["temperature_sweep"], key=lambda row: row["val_log_loss"])
    assert best["run"] == chosen  # chosen on validation, not test


def test_rerun_reuses_every_stage_and_generate_samples(quick_run, capsys):
    before = json.loads((quick_run / "results.json").read_text())
    assert _run(quick_run) == 0
    out = capsys.readouterr().out
    after = json.loads((quick_run / "results.json").read_text())
    # reused stages keep the seconds their runs recorded, so the rerun reports the experiment's time, not 0
    assert after["stage_seconds"] == before["stage_seconds"] and after["training_seconds"] > 0
    assert out.count("finished run of these settings, reused") == len(json.loads(
        (quick_run / "results.json").read_text())["stage_seconds"]) - 1 - len(QUICK.top_ks) - len(QUICK.sampled) \
        - len(QUICK.sampled_tails) - len(QUICK.compact)
    assert main(["generate", str(quick_run / "runs" / "baseline"), "--prompt", "KING.", "--tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("KING.")
    assert main(["generate", str(quick_run / "runs" / "baseline"), "--top-k", "0"]) == 1
    assert "--top-k must be in [1," in capsys.readouterr().err


def test_killed_between_the_weights_and_the_sidecar_over_a_model_of_other_settings_the_rerun_finishes(
        quick_run, tmp_path):
    """The crash recovery must keep a language model's pending sidecar: it alone says the weights in place are the
    finished language model, while model.json is still the loop's sidecar of its best epoch."""
    for rename in range(1, 30):  # the first rename that cuts the baseline's commit before its sidecar
        out = tmp_path / f"killed-{rename}"
        shutil.copytree(quick_run / "runs" / "half-labels", out / "runs" / "baseline",
                        ignore=shutil.ignore_patterns(LOCK_FILE))
        pid = fork()
        if pid == 0:  # the child (torch already imported, so cheap): killed at the rename, never returns
            checkpoint._renames = 0
            os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"] = str(rename)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                _run(out)
            os._exit(3)
        assert os.WIFSIGNALED(os.waitpid(pid, 0)[1])
        run = out / "runs" / "baseline"
        # the commit of the finished language model cut before its sidecar: only the pending one says what it is
        if (run / checkpoint.PENDING_META).exists() and \
                json.loads((run / checkpoint.PENDING_META).read_text()).get("kind") == "language-model":
            break
    assert main(["generate", str(run), "--prompt", "KING.", "--tokens", "4"]) == 0  # reads the pending sidecar
    assert _run(out) == 0
    assert load_language_model(run)[1]["weights_sha256"] == \
        load_language_model(quick_run / "runs" / "baseline")[1]["weights_sha256"]


@pytest.mark.slow
def test_killed_at_every_rename_the_rerun_ends_with_the_uninterrupted_numbers(quick_run, tmp_path):
    """Each of the quick reproduction's ~120 renames (data, runs, stores, report; about 3 s each): the rerun
    must end with the models an uninterrupted run makes."""
    expected = json.loads((quick_run / "results.json").read_text())["models"]
    for rename in range(1, 1000):
        out = tmp_path / f"killed-{rename}"
        pid = fork()
        if pid == 0:
            checkpoint._renames = 0
            os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"] = str(rename)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                _run(out)
            os._exit(3)
        if not os.WIFSIGNALED(os.waitpid(pid, 0)[1]):
            break  # past the last rename
        with contextlib.redirect_stdout(io.StringIO()):
            assert _run(out) == 0, f"killed at rename {rename}"
        assert json.loads((out / "results.json").read_text())["models"] == expected, f"killed at rename {rename}"
        shutil.rmtree(out)
    assert rename > 100


def test_own_text_folder_with_data_and_its_mistakes_in_one_line(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(4):
        (folder / f"t{i}.txt").write_text(("all the world's a stage, and all the men and women merely players. "
                                           * 60) + str(i))
    (folder / "blank.txt").write_text("")
    assert main(["reproduce", "lm", "--quick", "--data", str(folder), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert "skipped 1 empty document(s)" in capsys.readouterr().out
    (folder / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    assert main(["reproduce", "lm", "--quick", "--data", str(folder), "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert "bad.txt is not UTF-8" in err and err.count("\n") == 1
    assert main(["reproduce", "ensemble", "--quick", "--data", str(folder)]) == 1
    assert "--data is lm's" in capsys.readouterr().err


def test_jobs_trains_the_independent_runs_in_processes_to_the_same_numbers(quick_run, tmp_path, capfd):
    """``--jobs 2``: members and each phase's students trained two at a time in worker processes, then reused by
    the sequential pipeline; every model's numbers equal the one-process run's."""
    out = tmp_path / "jobs"
    assert main(["reproduce", "lm", "--quick", "--out", str(out), "--data-dir", str(DATA), "--no-progress",
                 "--jobs", "2"]) == 0
    printed = capfd.readouterr().out  # the file descriptor's: the worker processes print there too
    assert "runs in 2 processes: baseline, member-0" in printed and "[member-0] epoch 1/" in printed
    # the main process trained nothing itself: each run it names was finished by a worker
    assert printed.count("finished run of these settings, reused") == 1 + QUICK.members + 1 + \
        len(QUICK.temperatures) + 1 + len(QUICK.top_ks) + len(QUICK.sampled) + len(QUICK.sampled_tails) + \
        len(QUICK.compact)
    one, two = (json.loads((folder / "results.json").read_text()) for folder in (quick_run, out))
    assert two["models"] == one["models"] and two["chosen_on_validation"] == one["chosen_on_validation"]
    assert main(["reproduce", "mnist", "--quick", "--jobs", "2"]) == 1
    assert "--jobs is lm's" in capfd.readouterr().err


def test_the_plan_sets_the_share_of_works_in_each_split(tmp_path):
    from dataclasses import replace

    from darkknowledge.experiments.lm import prepare_data

    plan = replace(QUICK, validation_fraction=0.1, test_fraction=0.5)
    splits = prepare_data(plan, tmp_path, None, log=lambda _: None)
    documents = json.loads((tmp_path / "data.json").read_text())["documents"]
    works = sum(len(names) for names in documents.values())
    assert len(documents["test"]) == round(0.5 * works) and len(documents["validation"]) == round(0.1 * works)
    assert splits.windows["train"].num_tokens == plan.max_train_tokens


@pytest.mark.parametrize("damage", [("data.json", "[]"), ("data.json", "{}"), ("data.json", "{"),
                                    ("tokenizer.json", '"chars"'), ("tokenizer.json", '{"format": 1}'),
                                    ("tokenizer.json", None)], ids=lambda d: f"{d[0]}={d[1]}")
def test_a_damaged_data_record_or_tokenizer_is_made_again_the_same(tmp_path, damage):
    from darkknowledge.experiments.lm import prepare_data

    first = prepare_data(QUICK, tmp_path, None, log=lambda _: None).tokenizer.sha256
    name, text = damage
    if text is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_text(text)
    again = prepare_data(QUICK, tmp_path, None, log=lambda _: None).tokenizer.sha256
    assert again == first == json.loads((tmp_path / "data.json").read_text())["tokenizer"]["sha256"]
    assert TextTokenizer.load(tmp_path / "tokenizer.json", sha256=first).sha256 == first  # the file is that one


@pytest.mark.parametrize("damaged", [b"[]", b"{}", b'{"corpus_sha256": 1}', b"\xff"])
def test_a_damaged_data_json_is_made_again_from_the_corpus_not_a_traceback(tmp_path, damaged):
    from darkknowledge.experiments.lm import prepare_data

    first = prepare_data(QUICK, tmp_path, None, log=lambda _: None)
    record = (tmp_path / "data.json").read_bytes()
    (tmp_path / "data.json").write_bytes(damaged)
    lines = []
    again = prepare_data(QUICK, tmp_path, None, log=lines.append)
    assert any("data.json is not" in line for line in lines), lines
    assert (tmp_path / "data.json").read_bytes() == record  # the same corpus gives the same record and tokenizer
    assert again.tokenizer.sha256 == first.tokenizer.sha256
