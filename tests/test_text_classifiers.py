"""Text classifiers: a table of labelled text tokenised once (and cached), Hugging Face sequence classifiers as
teacher and student, a student started from every other layer of its teacher, ONNX export with input_ids and
attention_mask, and the docs example run on real text (Shakespeare's lines, comedy or tragedy)."""

import csv
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge import checkpoint
from darkknowledge.classifiers import SequenceClassifier, init_from_teacher
from darkknowledge.cli import main
from darkknowledge.data import text_table
from darkknowledge.data.text_table import load_text_table
from darkknowledge.models import build_model

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "text-classifiers.md"
DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", ROOT.parent / "shared" / "data")).resolve()
TINY = "hf-classifier:bert,num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"
QUICK = ["--epochs", "1", "--batch-size", "32", "--no-progress", "--optimizer", "adamw", "--lr", "1e-3"]


def page_blocks(language: str) -> list[str]:
    return [code for lang, code in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", PAGE.read_text(), re.S | re.M)
            if lang == language]


def word_tokenizer(path: Path, texts) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer.save(str(path))
    return path


def table(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows(rows)
    return path


@pytest.fixture
def small(tmp_path):
    words = ["love", "night", "death", "crown", "fool", "sword", "dance", "blood"]
    g = np.random.default_rng(0)
    rows = [(" ".join(g.choice(words, 5)), "odd" if i % 2 else "even") for i in range(60)]
    csv_path = table(tmp_path / "lines.csv", rows)
    return csv_path, word_tokenizer(tmp_path / "tokenizer.json", [r[0] for r in rows])


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("darkknowledge: error: "), err
    for needle in needles:
        assert needle in err, err


def test_text_is_tokenised_to_ids_and_masks_once_and_cached_by_tokenizer_data_and_length(small, tmp_path,
                                                                                          monkeypatch):
    csv_path, tokenizer = small
    splits = load_text_table(csv_path, ("text",), "label", tokenizer, 8, tmp_path / "cache")
    x = splits.train.batch(torch.arange(3))[0]
    assert x.dtype == torch.int64 and x.shape == (3, 2, 8) and splits.train.classes == ("even", "odd")
    assert (x[:, 1].sum(1) == 5).all() and (x[:, 0][x[:, 1] == 0] == 0).all()  # 5 words, then [PAD] (id 0)
    assert splits.test is None and len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setattr(text_table, "tokenize", lambda *a: pytest.fail("tokenised again"))
    again = load_text_table(csv_path, ("text",), "label", tokenizer, 8, tmp_path / "cache")
    assert torch.equal(again.train.batch(torch.arange(3))[0], x)
    with pytest.raises(BaseException, match="tokenised again"):  # another length is another cache entry
        load_text_table(csv_path, ("text",), "label", tokenizer, 6, tmp_path / "cache")


def test_sentence_pairs_jsonl_and_a_split_column(tmp_path):
    rows = [{"first": f"a b {i}", "second": "c d", "label": i % 3, "split": "test" if i < 4 else "train"}
            for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", [f"{r['first']} {r['second']}" for r in rows])
    splits = load_text_table(path, ("first", "second"), "label", tokenizer, 10)
    assert len(splits.train) == 8 and len(splits.test) == 4 and splits.train.classes == ("0", "1", "2")
    assert (splits.train.batch(torch.arange(8))[0][:, 1].sum(1) == 5).all()  # both texts: 3 + 2 tokens


def test_bad_text_tables_are_one_line_errors(small, tmp_path, capsys):
    csv_path, tokenizer = small
    train = ["train", "--model", TINY, "--tokenizer", tokenizer, "--out", tmp_path / "run", *QUICK]
    code, _, err = run(capsys, *train, "--data", csv_path, "--text-column", "line")
    one_line_error(code, err, "no column 'line'", "--text-column")
    empty = table(tmp_path / "empty.csv", [("a b", "x"), ("", "y"), ("c", "y")])
    code, _, err = run(capsys, *train, "--data", empty, "--text-column", "text")
    one_line_error(code, err, "1 rows have an empty text in 'text'", "row 2")
    one = table(tmp_path / "one.csv", [("a b", "x"), ("c", "x")])
    code, _, err = run(capsys, *train, "--data", one, "--text-column", "text")
    one_line_error(code, err, "holds one class ('x')", "--label-column")
    code, _, err = run(capsys, "train", "--model", "mlp:8", "--data", csv_path, "--text-column", "text",
                       "--out", tmp_path / "run", *QUICK)
    one_line_error(code, err, "--tokenizer PATH")
    assert not (tmp_path / "run").exists()


def test_a_student_must_read_the_teachers_tokenizer(small, tmp_path, capsys):
    csv_path, tokenizer = small
    assert main([str(a) for a in ["train", "--model", TINY, "--data", csv_path, "--text-column", "text",
                                  "--tokenizer", tokenizer, "--max-length", "8", "--out", tmp_path / "teacher",
                                  *QUICK]]) == 0
    capsys.readouterr()
    other = word_tokenizer(tmp_path / "other.json", ["other words entirely"])
    code, _, err = run(capsys, "distill", "--teacher", tmp_path / "teacher", "--student", TINY, "-T", "2",
                       "--tokenizer", other, "--out", tmp_path / "student", *QUICK)
    one_line_error(code, err, "another tokenizer", "teacher and student must read the same token ids")
    assert not (tmp_path / "student").exists()


def test_a_half_depth_student_starts_from_every_other_teacher_layer():
    spec = "hf-classifier:bert,num_hidden_layers={},hidden_size=32,num_attention_heads=2,intermediate_size=64," \
           "vocab_size=50"
    torch.manual_seed(0)
    teacher, student = build_model(spec.format(4), (2, 8), 3), build_model(spec.format(2), (2, 8), 3)
    assert isinstance(student, SequenceClassifier)
    copied = init_from_teacher(student, teacher)
    layers = lambda m: m.model.bert.encoder.layer  # noqa: E731
    assert copied == len(student.state_dict())
    for i, j in ((0, 0), (1, 2)):
        for p, q in zip(layers(student)[i].parameters(), layers(teacher)[j].parameters()):
            assert torch.equal(p, q)
    assert torch.equal(student.model.classifier.weight, teacher.model.classifier.weight)
    ids = torch.randint(0, 50, (3, 8))
    x = torch.stack([ids, torch.ones_like(ids)], 1)
    assert student(x).shape == (3, 3)


@pytest.mark.skipif(not (DATA / "shakespeare").is_dir(), reason="Shakespeare files not found; set "
                                                                  "DARKKNOWLEDGE_DATA")
def test_the_docs_example_runs_on_shakespeare(tmp_path, monkeypatch, capsys):
    """The page's own code and commands, on its first 400 lines and one epoch: teacher, a half-depth student
    started from the teacher's layers, the labels-only twin, evaluated, the student exported with its tokenizer."""
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DARKKNOWLEDGE_DATA", str(DATA))
    exec(compile(page_blocks("python")[0], str(PAGE), "exec"), {"__name__": "__docs__"})
    lines = Path("lines.csv").read_text().splitlines()
    Path("lines.csv").write_text("\n".join(lines[:401]) + "\n")
    results = {}
    for line in page_blocks("bash")[0].replace("\\\n", " ").splitlines():
        argv = shlex.split(line)[1:]
        if argv[0] in ("train", "distill"):
            argv += ["--epochs", "1", "--no-progress"]
        code, out, err = run(capsys, *argv)
        assert code == 0, f"{line}: {err}"
        if argv[0] == "evaluate":
            results[Path(argv[1]).name] = json.loads(out)
        if argv[0] == "distill":
            assert "weight tensors copied from the teacher's" in err and "validation split: the teacher's" in err
    assert {r["total"] for r in results.values()} == {80} and set(results) == {"teacher", "student", "twin"}
    assert checkpoint.read_model_meta("runs/text/student")["classes"] == ["comedy", "tragedy"]
    import onnx
    graph = onnx.load("runs/text/student.onnx").graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert Path("runs/text/student.onnx.tokenizer.json").read_bytes() == Path("tokenizer.json").read_bytes()
    assert list(Path("runs/text/tokenized").glob("*.npy"))  # tokenised once, beside the runs


def test_a_text_classifier_exports_with_two_named_inputs_and_its_tokenizer_and_benches(small, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    csv_path, tokenizer = small
    assert main([str(a) for a in ["train", "--model", TINY, "--data", csv_path, "--text-column", "text",
                                  "--tokenizer", tokenizer, "--max-length", "8", "--out", tmp_path / "run",
                                  *QUICK]]) == 0
    code, out, err = run(capsys, "export", tmp_path / "run", "--out", tmp_path / "model.onnx")
    assert code == 0, err
    import onnx
    assert [i.name for i in onnx.load(tmp_path / "model.onnx").graph.input] == ["input_ids", "attention_mask"]
    assert (tmp_path / "model.onnx.tokenizer.json").read_bytes() == tokenizer.read_bytes()
    card = (tmp_path / "model.onnx.model_card.md").read_text()
    assert "`input_ids`, `attention_mask`" in card and "Tokenizer.from_file('model.onnx.tokenizer.json')" in card
    code, out, err = run(capsys, "bench", tmp_path / "run", "--calls", "5", "--batch-size", "8")
    assert code == 0 and "hf-classifier:bert" in out, err


def test_an_hf_folder_export_is_read_back_as_a_teacher_or_student_folder(small, tmp_path, capsys):
    csv_path, tokenizer = small
    data = ["--data", csv_path, "--text-column", "text", "--tokenizer", tokenizer, "--max-length", "8"]
    assert main([str(a) for a in ["train", "--model", TINY, *data, "--out", tmp_path / "run", *QUICK]]) == 0
    code, out, err = run(capsys, "export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0 and "0 different predictions" in out, err
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert "from_pretrained('hf')" in (tmp_path / "hf.model_card.md").read_text()
    # the folder as a model: from_pretrained, its weights the exported ones
    code, _, err = run(capsys, "train", "--model", f"hf-classifier:{tmp_path / 'hf'}", *data, "--out",
                       tmp_path / "again", *QUICK)
    assert code == 0, err
    # a student folder whose tokenizer is not the teacher's is refused
    word_tokenizer(tmp_path / "hf" / "tokenizer.json", ["other words entirely"])
    code, _, err = run(capsys, "distill", "--teacher", tmp_path / "run", "--student",
                       f"hf-classifier:{tmp_path / 'hf'}", "-T", "2", "--out", tmp_path / "student", *QUICK)
    one_line_error(code, err, "the student's folder has another tokenizer")
