"""Language models from the command line: a corpus given as a folder of .txt files, a .jsonl or a table's text
column, split by whole documents; the one label convention (labels shifted by the library, Hugging Face-style
unshifted labels too); bad corpora refused in one line."""

import json
import math
import shutil

import pytest
import torch

from darkknowledge.data.text import (IGNORE_INDEX, TextTokenizer, causal_sequences, is_corpus, load_corpus,
                                     shift_labels, split_documents, tokenise_corpus)
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.training import TrainConfig, fit

DOCUMENTS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (5 + i) for i in range(6)]


def _one_line(work, match: str) -> None:
    with pytest.raises(DarkKnowledgeError, match=match) as raised:
        work()
    assert "\n" not in str(raised.value)


def _folder(tmp_path, documents=DOCUMENTS):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(documents):
        (folder / f"doc{i}.txt").write_text(text)
    return folder


def _jsonl(tmp_path, documents=DOCUMENTS, field="text"):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


def _table(tmp_path, documents=DOCUMENTS, suffix=".csv"):
    import pandas as pd
    frame = pd.DataFrame({"id": range(len(documents)), "body": documents})
    path = tmp_path / f"corpus{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_every_corpus_format_gives_the_same_documents_split_whole(tmp_path, kind):
    column = "body" if kind in ("csv", "parquet") else None
    path = {"txt": lambda: _folder(tmp_path), "jsonl": lambda: _jsonl(tmp_path),
            "csv": lambda: _table(tmp_path), "parquet": lambda: _table(tmp_path, suffix=".parquet")}[kind]()
    assert is_corpus(path, column)
    corpus = load_corpus(path, column)
    assert sorted(corpus.documents.values()) == sorted(DOCUMENTS)
    splits = split_documents(corpus.documents, seed=3)
    assert splits == split_documents(corpus.documents, seed=3)  # seeded
    assert sorted(sum(splits.values(), [])) == sorted(corpus.documents)  # whole documents, each in one split


def test_image_folders_and_labelled_tables_are_not_corpora(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    assert not is_corpus(tmp_path / "images")
    arrays = tmp_path / "arrays"  # x.npy, y.npy and classes.txt: an arrays folder, not a corpus
    arrays.mkdir()
    for name in ("x.npy", "y.npy", "classes.txt"):
        (arrays / name).write_text("")
    assert not is_corpus(arrays)
    assert not is_corpus(_table(tmp_path))  # a table without --text-column is a labelled table


def test_bad_corpora_are_refused_in_one_line(tmp_path):
    _one_line(lambda: load_corpus(_folder(tmp_path, DOCUMENTS[:2])), "needs at least 3: add documents")
    _one_line(lambda: load_corpus(_table(tmp_path), "text"), r"no text column 'text' \(columns: id, body\)")
    _one_line(lambda: load_corpus(_table(tmp_path, ["", "", "", ""]), "body"), "text column 'body' is empty")
    _one_line(lambda: load_corpus(_jsonl(tmp_path, field="content")), "no 'text' field")
    assert len(load_corpus(_jsonl(tmp_path, field="content"), "content").documents) == len(DOCUMENTS)
    _one_line(lambda: load_corpus(_table(tmp_path)), "needs --text-column")


def test_labels_are_shifted_by_the_library_and_hugging_face_style_labels_read_the_same():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, IGNORE_INDEX]]
    # Hugging Face's way: labels = input_ids, -100 where nothing is predicted (here the prompt's first token)
    assert shift_labels(torch.tensor([[-100, 6, 7, 8]])).tolist() == [[6, 7, 8, IGNORE_INDEX]]
    assert shift_labels(torch.tensor([[5, 6, -100, -100]])).tolist() == [[6, -100, -100, IGNORE_INDEX]]


def test_token_windows_follow_the_same_convention(tmp_path):
    corpus = load_corpus(_folder(tmp_path))
    documents = split_documents(corpus.documents)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    windows = tokenise_corpus(corpus, documents, tokenizer, context=8).windows["train"]
    inputs, labels = windows.batch([0])
    following, _ = windows.batch([1])
    assert torch.equal(labels[:, :-1], shift_labels(inputs)[:, :-1])  # label t: the token after input t
    assert labels[0, -1] == following[0, 0]  # a window's last label is the next window's first token


def test_unshifted_labels_train_a_causal_model_with_minus_100_ignored():
    from darkknowledge.transformer import build_language_model
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (8, 6))
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX  # a prompt: nothing predicted there
    data = causal_sequences(ids, labels, vocab_size=11)
    assert (data.batch([0])[1][0] == IGNORE_INDEX).sum() == 2  # the prompt's second label, and the last position
    model = build_language_model("gpt:layers=1,dim=8,heads=2,context=6", 11)
    result = fit(model, data, data, TrainConfig(epochs=1, batch_size=4, progress=False), device="cpu",
                 log=lambda _: None)
    assert result.history[-1]["val_tokens"] == 8 * 4  # per sequence: 6 positions, 2 ignored


# -- store build and evaluate on a corpus, from the command line ------------------------------------------------

TINY = "gpt:layers=1,dim=16,heads=2,context=16"


@pytest.fixture(scope="module")
def teacher_and_corpus(tmp_path_factory):
    """A tiny darkknowledge teacher (context 16) trained on the corpus it is then used with."""
    from darkknowledge.language_model import LMConfig, train_language_model
    root = tmp_path_factory.mktemp("lm")
    folder = _folder(root)
    corpus = load_corpus(folder)
    documents = split_documents(corpus.documents)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    splits = tokenise_corpus(corpus, documents, tokenizer, context=16)
    train_language_model(TINY, tokenizer, splits.windows["train"], splits.windows["validation"],
                         LMConfig(epochs=1, batch_size=8), run_dir=root / "teacher", log=lambda _: None)
    return root / "teacher", folder


def _cli(*argv):
    import contextlib
    import io
    from darkknowledge.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_store_build_prints_its_size_and_speed_and_a_rerun_reuses_it(teacher_and_corpus, tmp_path):
    teacher, corpus = teacher_and_corpus
    code, out, err = _cli("store", "build", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "stores",
                          "--layout", "topk", "--top-k", "4")
    assert code == 0, err
    assert "24 bytes per token" in out and "tokens/s" in out  # 4 x (2 + 2) + 8 bytes of tail
    assert "tokens/s so far" in err  # progress while it runs
    assert "weights on cpu" in err  # where the teacher ran (--device; auto here, a machine without CUDA)
    header = json.loads(next((tmp_path / "stores").glob("*/targets.json")).read_text())
    assert header["complete"] and header["layout"] == "topk"
    code, out2, _ = _cli("store", "build", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "stores",
                         "--layout", "topk", "--top-k", "4")
    assert code == 0 and len(list((tmp_path / "stores").iterdir())) == 1  # the same key: reused


@pytest.mark.parametrize("layout", ["sampled", "compact"])
def test_a_killed_store_build_resumes_to_the_uninterrupted_store(teacher_and_corpus, tmp_path, layout):
    import os
    import signal
    from darkknowledge.lm_jobs import Corpus, build_store
    from test_reliability import _in_child
    teacher, corpus = teacher_and_corpus
    data = Corpus(str(corpus), context=16)
    whole, _ = build_store(teacher, data, tmp_path / "whole", layout, head=2, samples=3, log=lambda _: None,
                           on_chunk=lambda *_: None)

    def killed():
        build_store(teacher, data, tmp_path / "killed", layout, head=2, samples=3, log=lambda _: None,
                    on_chunk=lambda done, total: os.kill(os.getpid(), signal.SIGKILL))
    _, status = os.waitpid(_in_child(killed), 0)
    assert os.WIFSIGNALED(status)
    partial = json.loads(next((tmp_path / "killed").glob("*/targets.json")).read_text())
    assert not partial["complete"] and 0 < partial["positions_done"] < partial["positions"]
    lines = []
    resumed, _ = build_store(teacher, data, tmp_path / "killed", layout, head=2, samples=3, log=lines.append,
                             on_chunk=lambda *_: None)
    assert any("resuming there" in line for line in lines)
    assert resumed.header["checksums"] == whole.header["checksums"]  # the same bytes as one uninterrupted build


def test_bad_input_to_store_build_is_one_line_and_writes_nothing(teacher_and_corpus, tmp_path):
    teacher, corpus = teacher_and_corpus
    (tmp_path / "small").mkdir()
    small = _folder(tmp_path / "small", DOCUMENTS[:2])
    for extra, message in [(["--context", "32"], "--context 32 is longer than the teacher"),
                           (["--data", small], "needs at least 3: add documents"),
                           (["--layout", "sampled"], "needs --samples"),
                           (["--layout", "dense", "--top-k", "3"], "--top-k is for --layout topk"),
                           (["--layout", "compact"], "--layout compact needs --samples"),
                           (["--layout", "sampled", "--samples", "3", "--quant", "e4m3"],
                            "--quant is for --layout compact"),
                           *([(["--device", "cuda"], "this machine has no CUDA device")]
                             if not torch.cuda.is_available() else [])]:
        argv = ["store", "build", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "stores", *extra]
        code, _, err = _cli(*argv)
        assert code == 1 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "stores").exists()


def test_evaluate_prints_per_token_metrics_of_a_split_of_the_corpus(teacher_and_corpus):
    teacher, corpus = teacher_and_corpus
    code, out, err = _cli("evaluate", teacher, "--data", corpus, "--split", "test")
    assert code == 0, err
    result = json.loads(out)
    assert result["split"] == "test" and result["context"] == 16 and result["tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["log_loss"]))
    assert 0 <= result["accuracy"] <= 1
    code, _, err = _cli("evaluate", teacher, "--data", corpus, "--context", "64")
    assert code == 1 and "--context 64 is longer than the model" in err


# -- train and distill on a corpus ---------------------------------------------------------------------------

STUDENT = "gpt:layers=1,dim=8,heads=2"
LOOP = ["--epochs", "2", "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.01", "--no-progress"]


def test_train_on_a_corpus_trains_a_language_model_that_evaluate_reads(teacher_and_corpus, tmp_path):
    _, corpus = teacher_and_corpus
    code, out, err = _cli("train", "--data", corpus, "--model", STUDENT, "--tokenizer", "char", "--context", "16",
                          "--out", tmp_path / "run", *LOOP, "--grad-accumulation", "2", "--clip-grad-norm", "1")
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["kind"] == "language-model" and meta["context"] == 16
    assert meta["data"]["documents"] == {"train": 4, "validation": 1, "test": 1}  # split sizes recorded
    assert meta["config"]["grad_accumulation"] == 2
    code, out, err = _cli("evaluate", tmp_path / "run", "--data", corpus)
    assert code == 0 and json.loads(out)["tokens"] > 0, err
    code, _, err = _cli("train", "--data", corpus, "--out", tmp_path / "run2", *LOOP)
    assert code == 1 and "give gpt:" in err  # the image default is no language model


def test_distill_from_a_store_or_online_and_foreign_stores_refused(teacher_and_corpus, tmp_path):
    teacher, corpus = teacher_and_corpus
    assert _cli("store", "build", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "stores",
                "--layout", "dense")[0] == 0
    common = ["distill", "--teacher", teacher, "--data", corpus, "--student", STUDENT, "-T", "2", *LOOP]
    code, _, err = _cli(*common, "--store", tmp_path / "stores", "--out", tmp_path / "stored")
    assert code == 0 and "soft-target store" in err, err
    code, _, err = _cli(*common, "--out", tmp_path / "online", "--teacher-device", "cpu")
    assert code == 0 and "teacher run on every batch" in err, err
    stored, online = (json.loads((tmp_path / r / "model.json").read_text()) for r in ("stored", "online"))
    # the same teacher, whether stored (float16 logits) or run online: nearly the same student
    assert stored["history"][0]["val_log_loss"] == pytest.approx(online["history"][0]["val_log_loss"], abs=0.05)
    # a store over other windows (another context) is refused in one line, nothing written
    code, _, err = _cli(*common, "--store", tmp_path / "stores", "--context", "8", "--out", tmp_path / "other")
    assert code == 1 and err.count("\n") == 1 and "another corpus or split" in err, err
    assert not (tmp_path / "other").exists()
    # a store of another teacher
    other_teacher = tmp_path / "teacher2"
    shutil.copytree(teacher, other_teacher)
    from darkknowledge.language_model import load_language_model, save_language_model
    from darkknowledge.data.text import TextTokenizer as Tok
    model, meta = load_language_model(other_teacher)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_language_model(other_teacher, model, Tok.load(other_teacher / "tokenizer.json"), meta)
    code, _, err = _cli(*common[:2], other_teacher, *common[3:], "--store", tmp_path / "stores",
                        "--out", tmp_path / "other")
    assert code == 1 and "another teacher" in err, err
    # a folder holding a run of other settings is refused, not trained over
    before = (tmp_path / "online" / "model.safetensors").read_bytes()
    code, _, err = _cli(*common[:-len(LOOP)], "--epochs", "1", "--no-progress", "--out", tmp_path / "online")
    assert code == 1 and "choose another --out" in err, err
    assert (tmp_path / "online" / "model.safetensors").read_bytes() == before


def test_distill_from_a_compact_store_at_t1_and_a_damaged_one_refused(teacher_and_corpus, tmp_path):
    teacher, corpus = teacher_and_corpus
    stores = tmp_path / "stores"
    build = ["store", "build", "--teacher", teacher, "--data", corpus, "--out", stores, "--head", "4",
             "--samples", "6"]
    code, out, err = _cli(*build, "--layout", "compact", "--quant", "e4m3")
    assert code == 0, err
    # the vocabulary of the char tokenizer here: 7-bit ids; 10 ids, 4 head bytes and 2 of P
    vocab = json.loads(next(stores.glob("*/targets.json")).read_text())["vocab_size"]
    bits = max(1, math.ceil(math.log2(vocab)))
    assert f"store compact of" in out and f"{math.ceil(10 * bits / 8) + 4 + 2:g} bytes per token" in out, out
    code, out, _ = _cli(*build, "--layout", "sampled")
    assert code == 0 and f"{4 * 10 + 8:g} bytes per token" in out
    compact = next(f for f in stores.iterdir() if json.loads((f / "targets.json").read_text())["layout"] == "compact")
    shutil.rmtree(stores / next(f.name for f in stores.iterdir() if f != compact))
    common = ["distill", "--teacher", teacher, "--data", corpus, "--student", STUDENT, *LOOP, "--store", stores]
    code, _, err = _cli(*common, "-T", "1", "--samples", "6", "--quant", "log8", "--out", tmp_path / "layout")
    assert code == 1 and err.count("\n") == 1 and "store build --layout" in err, err  # not silently ignored
    assert not (tmp_path / "layout").exists()
    code, _, err = _cli(*common, "-T", "2", "--out", tmp_path / "hot")
    assert code == 1 and err.count("\n") == 1 and "temperature 1 only" in err, err
    code, _, err = _cli(*common, "-T", "1", "--out", tmp_path / "student")
    assert code == 0, err
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    assert math.isfinite(meta["history"][-1]["val_log_loss"])
    # a header damaged in place is refused in one line, and nothing is trained
    header = json.loads((compact / "targets.json").read_text())
    header["arrays"]["rows"][1][1] += 1
    (compact / "targets.json").write_text(json.dumps(header))
    code, _, err = _cli(*common, "-T", "1", "--out", tmp_path / "damaged")
    assert code == 1 and err.count("\n") == 1 and "targets.json" in err, err
    assert not (tmp_path / "damaged").exists()


@pytest.mark.parametrize("student", [STUDENT, "hf:gpt2,n_layer=1,n_embd=8,n_head=2,vocab_size=64"],
                         ids=["gpt", "hf-padded"])  # 64 output rows for the char tokenizer's fewer tokens
def test_a_killed_distill_resumes_to_the_uninterrupted_student(teacher_and_corpus, tmp_path, student):
    import os
    from test_reliability import _in_child
    teacher, corpus = teacher_and_corpus
    common = ["distill", "--teacher", teacher, "--data", corpus, "--student", student, "-T", "2", *LOOP]
    assert _cli(*common, "--out", tmp_path / "whole")[0] == 0
    pid = _in_child(lambda: _cli(*common, "--out", tmp_path / "killed"), kill_at_rename=6)  # after epoch 1's state
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert (tmp_path / "killed" / "state.json").exists() and not (tmp_path / "killed" / "tokenizer.json").exists()
    code, _, err = _cli(*common, "--out", tmp_path / "killed")
    assert code == 1 and "--resume" in err  # a killed run continues only when asked
    code, _, err = _cli(*common, "--out", tmp_path / "killed", "--resume")
    assert code == 0 and "resuming" in err, err
    assert (tmp_path / "killed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_decay_weights_leaves_biases_and_norms_alone_and_all_decays_every_parameter(optimizer):
    from torch import nn
    for decay, norm_decays in (("weights", False), ("all", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
        nn.init.constant_(model[0].bias, 1.0)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        config = TrainConfig(optimizer=optimizer, weight_decay=0.5, lr=0.1, momentum=0.0, decay=decay)
        step = config.make_optimizer(model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # the step is the decay alone
        step.step()
        after = dict(model.named_parameters())
        assert not torch.equal(after["0.weight"], before["0.weight"])  # a weight always decays
        for name in ("0.bias", "1.weight"):
            assert torch.equal(after[name], before[name]) != norm_decays, (decay, name)


def test_a_corpus_run_trains_with_the_corpus_recipe_and_an_option_given_wins(teacher_and_corpus, tmp_path):
    from darkknowledge.cli import CORPUS_RECIPE
    _, corpus = teacher_and_corpus
    plain = ["train", "--data", corpus, "--model", STUDENT, "--tokenizer", "char", "--context", "16", "--epochs", "1",
             "--batch-size", "8", "--no-progress"]
    code, _, err = _cli(*plain, "--out", tmp_path / "recipe")
    assert code == 0, err
    config = json.loads((tmp_path / "recipe" / "model.json").read_text())["config"]
    assert {name: config[name] for name in CORPUS_RECIPE} == CORPUS_RECIPE
    assert CORPUS_RECIPE == {"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup": 0.05,
                             "weight_decay": 0.1, "decay": "weights", "select_by": "log_loss"}
    code, _, err = _cli(*plain, "--lr", "0.01", "--schedule", "onecycle", "--out", tmp_path / "mine")
    assert code == 0, err
    config = json.loads((tmp_path / "mine" / "model.json").read_text())["config"]
    assert config["lr"] == 0.01 and config["schedule"] == "onecycle" and config["optimizer"] == "adamw"
    assert config.get("warmup", 0) == 0  # onecycle warms up on its own: the recipe's warm-up is not added (a
    # setting at its default is left out of the record)


def test_an_image_run_keeps_the_image_defaults_and_help_names_both(teacher_and_corpus):
    from darkknowledge.cli import CORPUS_RECIPE, _train_config, build_parser
    _, corpus = teacher_and_corpus
    parser = build_parser()
    image = _train_config(parser.parse_args(["train", "--dataset", "digits", "--out", "x"]))
    default = TrainConfig()
    assert {name: getattr(image, name) for name in CORPUS_RECIPE} == \
        {name: getattr(default, name) for name in CORPUS_RECIPE}
    text = _train_config(parser.parse_args(["distill", "--data", str(corpus), "--out", "x", "--weight-decay", "0"]))
    assert text.optimizer == "adamw" and text.lr == 3e-3 and text.weight_decay == 0
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["distill"]._actions}
    assert "0.05 for images and tables, 0.003 for a text corpus" in helps["lr"]
    assert "sgd for images and tables, adamw for a text corpus" in helps["optimizer"]


def test_a_student_folder_starts_from_its_weights_and_must_share_the_teachers_tokenizer(teacher_and_corpus, tmp_path):
    teacher, corpus = teacher_and_corpus
    from darkknowledge.language_model import load_language_model
    common = ["distill", "--teacher", teacher, "--data", corpus, "-T", "1", *LOOP[:-3], "--lr", "1e-9",
              "--no-progress"]
    code, _, err = _cli(*common, "--student", teacher, "--out", tmp_path / "self")
    assert code == 0, err
    # a rate of 1e-9: the student is still its starting folder's model, not a freshly initialised one
    student, start = (load_language_model(run)[0].state_dict() for run in (tmp_path / "self", teacher))
    assert all(torch.allclose(student[k], start[k], atol=1e-6) for k in start)
    other = tmp_path / "other-corpus"
    other.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (other / f"doc{i}.txt").write_text(text.upper())
    assert _cli("train", "--data", other, "--model", STUDENT, "--tokenizer", "char", "--context", "16",
                "--out", tmp_path / "upper", *LOOP)[0] == 0
    code, _, err = _cli(*common, "--student", tmp_path / "upper", "--out", tmp_path / "mixed")
    assert code == 1 and "another tokenizer than the teacher" in err, err
    assert not (tmp_path / "mixed").exists()


# -- padded vocabularies: output rows past the tokenizer's tokens -----------------------------------------------

def test_on_real_vocabulary_cuts_padding_keeps_an_exact_model_and_refuses_fewer_outputs():
    from darkknowledge.lm_jobs import on_real_vocabulary
    from darkknowledge.pretrained import RealVocabulary
    from darkknowledge.transformer import build_language_model
    tokenizer = TextTokenizer.train(DOCUMENTS, "char")
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    exact = build_language_model(TINY, vocab)
    lines = []
    assert on_real_vocabulary(exact, tokenizer, "teacher", "exact", lines.append) is exact and not lines
    padded = build_language_model(f"hf:gpt2,n_layer=1,n_embd=16,n_head=2,vocab_size={vocab + 8}", vocab, 16).eval()
    cut = on_real_vocabulary(padded, tokenizer, "teacher", "padded", lines.append)
    assert isinstance(cut, RealVocabulary) and cut.model is padded
    assert lines == [f"the teacher padded has {vocab + 8} outputs for its tokenizer's {vocab} tokens: the 8 padding "
                     "rows past them are ignored"]
    ids = torch.as_tensor(tokenizer.encode("the lazy dog")).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(cut(ids), padded(ids)[..., :vocab])

    class Loud(torch.nn.Module):  # its padding rows the most probable of all: generate still draws real tokens
        def forward(self, ids):
            logits = padded(ids)
            return torch.cat([logits[..., :vocab], logits[..., vocab:] + 100], -1)
    from darkknowledge.language_model import generate
    assert generate(Loud(), tokenizer, "the", tokens=8, context=16) == generate(cut, tokenizer, "the", tokens=8,
                                                                                context=16)
    fewer = build_language_model(TINY, vocab - 3)
    _one_line(lambda: on_real_vocabulary(fewer, tokenizer, "student", "small", lines.append),
              f"the student small gives {vocab - 3} logits a token but its tokenizer has {vocab} tokens")
    _one_line(lambda: build_language_model(f"hf:gpt2,n_layer=1,vocab_size={vocab - 1}", vocab, 16),
              f"vocab_size={vocab - 1} is fewer outputs than the tokenizer's {vocab} tokens")


@pytest.fixture(scope="module")
def padded_folders(tmp_path_factory):
    """Tiny GPT-2 folders saved by save_pretrained with one tokenizer of 290 tokens: a teacher of 354 output rows
    (64 of padding) and students of 298 and 290, and a corpus of the tokenizer's words."""
    import numpy as np
    pytest.importorskip("transformers")
    from test_pretrained import WORDS, _tiny_gpt2
    root = tmp_path_factory.mktemp("padded")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, size=150)))
    folders = {rows: _tiny_gpt2(root / f"gpt2-{rows}", vocab_size=rows, layers=2 if rows == 354 else 1, seed=rows)
               for rows in (354, 298, 290)}
    return folders, corpus


def test_padded_teacher_and_students_work_in_every_verb_on_the_real_vocabulary(padded_folders, tmp_path):
    from darkknowledge.language_model import load_language_model
    from safetensors.torch import load_file
    folders, corpus = padded_folders
    teacher, student = folders[354], folders[298]
    code, out, err = _cli("store", "build", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "stores",
                          "--layout", "topk", "--top-k", "4")
    assert code == 0, err
    assert "354 outputs for its tokenizer's 290 tokens: the 64 padding rows past them are ignored" in err
    assert json.loads(next((tmp_path / "stores").glob("*/targets.json")).read_text())["vocab_size"] == 290
    loop = [*LOOP, "--weight-decay", "0"]  # padding rows get no gradient: with no decay they stay as they were
    common = ["distill", "--teacher", teacher, "--data", corpus, "-T", "2", *loop]
    code, _, err = _cli(*common, "--student", student, "--store", tmp_path / "stores", "--out", tmp_path / "stored")
    assert code == 0, err
    assert "the student's 8 output rows past the tokenizer's 290 tokens are padding" in err
    code, _, err = _cli(*common, "--student", folders[290], "--out", tmp_path / "online")
    assert code == 0, err
    code, _, err = _cli("train", "--data", corpus, "--model", "hf:gpt2,n_layer=1,n_embd=16,n_head=2,vocab_size=298",
                        "--tokenizer", teacher, "--context", "32", "--out", tmp_path / "labels", *loop)
    assert code == 0, err
    # what is saved is the plain model with its own padding: 298 rows, the 8 past the tokens as they started
    model, meta = load_language_model(tmp_path / "stored")
    head = model.model.lm_head.weight
    start = load_file(student / "model.safetensors")["transformer.wte.weight"]
    assert meta["vocab_size"] == 290 and head.shape[0] == 298
    assert torch.equal(head[290:], start[290:]) and not torch.equal(head[:290], start[:290])
    assert load_language_model(tmp_path / "online")[0].model.lm_head.weight.shape[0] == 290
    # a student of the padded teacher's layers keeps its output layer, padding and all: its spec says so
    code, _, err = _cli(*common, "--student-init", "teacher-layers=1", "--out", tmp_path / "layers")
    assert code == 0, err
    model, meta = load_language_model(tmp_path / "layers")
    assert "vocab_size=354" in meta["spec"] and model.model.lm_head.weight.shape[0] == 354
    for model in (teacher, tmp_path / "stored", tmp_path / "online", tmp_path / "labels"):
        code, out, err = _cli("evaluate", model, "--data", corpus, "--split", "test")
        assert code == 0, err
        # the untrained teacher's ~290: uniform over the real tokens (354 with its padding)
        assert json.loads(out)["tokens"] > 0 and json.loads(out)["perplexity"] < 300
    code, out, err = _cli("export", tmp_path / "stored", "--format", "hf", "--out", tmp_path / "exported")
    assert code == 0, err
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["vocab_size"] == 298


def test_a_gpt_student_from_the_teachers_layers_reads_the_runs_context_and_reloads(teacher_and_corpus, tmp_path):
    """A gpt: teacher of context 16 distilled at --context 8: the student keeps the first 8 rows of the teacher's
    position table, so the run rebuilds it from its spec and context and loads its weights."""
    from darkknowledge.language_model import load_language_model
    teacher, corpus = teacher_and_corpus
    code, _, err = _cli("distill", "--teacher", teacher, "--data", corpus, "--student-init", "teacher-layers=0",
                        "--context", "8", "-T", "1", "--epochs", "1", "--batch-size", "8", "--lr", "1e-9",
                        "--no-progress", "--out", tmp_path / "run")
    assert code == 0, err
    student, meta = load_language_model(tmp_path / "run")
    start = load_language_model(teacher)[0].state_dict()
    assert meta["spec"] == "gpt:layers=1,dim=16,heads=2,context=8" and meta["init"] == {"teacher_layers": [0]}
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, start[name][:8] if name == "position.weight" else start[name], atol=1e-6,
                                   rtol=0, msg=name)
    code, _, err = _cli("distill", "--data", corpus, "--student-init", "teacher-layers=0", "--out", tmp_path / "x",
                        "-T", "1")
    assert code == 1 and "needs --teacher" in err, err
    code, _, err = _cli("distill", "--teacher", teacher, "--dataset", "digits", "--student-init", "teacher-layers=0",
                        "--out", tmp_path / "x", "-T", "1")
    assert code == 1 and "--student-init and --dtype are for a language model on a text corpus" in err, err
    assert not (tmp_path / "x").exists()
