"""benchmarks/store_students.py on a --quick reproduction: a top-k store summarised from the experiment's dense store
gets a student trained with the plan's recipe at T = 1 and a row with its share of the dense store's gain, measured
against the experiment's own baseline and student-T1; a store over other windows is refused before any training."""

import os
import sys
from pathlib import Path

import pytest

from darkknowledge import checkpoint
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.experiments.lm import QUICK, experiment_splits, reproduce_lm
from darkknowledge.language_model import load_language_model
from darkknowledge.soft_targets import DENSE, SoftTargets

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import store_students  # noqa: E402

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "shakespeare").is_dir(),
                                reason="Shakespeare corpus not found; set DARKKNOWLEDGE_DATA")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-lm")
    results = reproduce_lm(out, plan="quick", data_dir=str(DATA), progress=False, log=lambda _: None)
    return out, results, experiment_splits(QUICK, out, str(DATA))


def dense_store(out):
    return next(h.parent for h in (out / "runs" / "token-targets").glob("*/targets.json")
                if SoftTargets.open(h.parent, verify=False).layout in DENSE)


def test_a_topk_store_of_the_dense_rows_gets_a_student_and_a_share(quick, tmp_path):
    out, results, splits = quick
    dense = SoftTargets.open(dense_store(out), verify=False)
    top4 = SoftTargets.build(dense, splits.windows["train"], tmp_path / "stores", top_k=4,
                             tokenizer_sha256=splits.tokenizer.sha256, log=lambda _: None)
    # a codec's own bytes a token, as store_codecs.py's codecs.json gives them, for the store named like it
    checkpoint.write_json(tmp_path / "codecs.json", {"codecs": [{"name": "top 4", "bytes_per_token": 12.5}]})
    args = ["--experiment", str(out), "--store", f"top 4={top4.path}", "--out", str(tmp_path / "res"),
            "--data-dir", str(DATA), "--codecs", str(tmp_path / "codecs.json")]
    first = store_students.main(args)
    baseline, dense_row, row = first["rows"]
    assert first["plan_name"] == "quick" and row["store"] == "top 4" and row["bytes_per_token"] == 4 * 4 + 8
    assert row["codec_bytes_per_token"] == 12.5
    # measured against the experiment's own runs, evaluated as reproduce lm evaluated them
    for ours, theirs in ((baseline, "baseline"), (dense_row, "student-T1")):
        assert ours["test_log_loss"] == results["models"][theirs]["test_log_loss"]
    assert dense_row["bytes_per_token"] == dense.bytes_per_case
    for metric in ("log_loss", "accuracy"):
        share, (low, high) = row[f"share_of_dense_gain_{metric}"], row[f"interval_of_dense_gain_{metric}"]
        b, d, s = (r[f"test_{metric}"] for r in (baseline, dense_row, row))
        assert share == pytest.approx((s - b) / (d - b), rel=1e-4) and low <= share <= high
    # the plan's student recipe at T = 1 on this store, in OUT/runs
    _, meta = load_language_model(tmp_path / "res" / "runs" / "student-T1-top-4")
    assert meta["spec"] == QUICK.spec
    assert "| top 4 | 12.5 (stored 24) |" in (tmp_path / "res" / "store_students.md").read_text()
    # a rerun reuses the finished student (same key): the same numbers
    assert store_students.main(args)["rows"] == first["rows"]


def test_the_dense_store_itself_gives_the_experiments_own_student(quick, tmp_path):
    """The recipe is exactly reproduce lm's: its dense store trains here the student-T1 it trained there."""
    out, results, _ = quick
    assert store_students.experiment_plan(out, None) == ("quick", QUICK)  # read back from results.json
    dense = dense_store(out)
    # twice, two spawned processes at a time: the numbers do not depend on --jobs (nor on a store's name)
    rows = store_students.main(["--experiment", str(out), "--store", f"baseline={dense}", f"again={dense}",
                                "--out", str(tmp_path), "--data-dir", str(DATA), "--jobs", "2"])["rows"]
    theirs = {k: v for k, v in rows[1].items() if k.startswith(("val_", "test_"))}
    for row in rows[2:]:
        assert {k: v for k, v in row.items() if k.startswith(("val_", "test_"))} == theirs
        assert row["share_of_dense_gain_log_loss"] == pytest.approx(1)


def test_a_store_over_other_windows_is_refused_in_one_line_before_training(quick, tmp_path):
    out, _, splits = quick
    member = load_language_model(out / "runs" / "member-0")[0]
    other = SoftTargets.build(member, splits.windows["validation"], tmp_path / "stores", top_k=4,
                              tokenizer_sha256=splits.tokenizer.sha256, log=lambda _: None)
    with pytest.raises(DarkKnowledgeError, match="another corpus or split") as error:
        store_students.main(["--experiment", str(out), "--store", str(other.path), "--out", str(tmp_path / "res"),
                             "--data-dir", str(DATA)])
    assert "\n" not in str(error.value) and not (tmp_path / "res").exists()
    # nor does it write into the experiment
    with pytest.raises(DarkKnowledgeError, match="inside .* experiment folder"):
        store_students.main(["--experiment", str(out), "--store", str(other.path), "--runs", str(out / "runs"),
                             "--out", str(tmp_path / "res"), "--data-dir", str(DATA)])


def test_an_experiment_without_results_needs_its_plan(tmp_path):
    with pytest.raises(DarkKnowledgeError, match="--plan NAME"):
        store_students.experiment_plan(tmp_path, None)
    assert store_students.experiment_plan(tmp_path, "compact")[0] == "compact"
