"""Pretrained Hugging Face folders and ``hf:`` students: a tiny GPT-2 made with transformers and saved with its
tokenizer loads as a teacher or student (:func:`darkknowledge.pretrained.load_causal_lm`); tokenizers are compared
and vocabularies trimmed to their real tokens; ``hf:`` students save and reload tied; a student starts from the
teacher's layers; language-model runs are exported as Hugging Face folders, evaluated and benched."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.language_model import LMConfig, load_language_model, train_language_model
from darkknowledge.transformer import build_language_model, parse_hf

transformers = pytest.importorskip("transformers")
WORDS = "the quick brown fox jumps over a lazy dog while seven tired kings sing of old wars and wine".split()


def _one_line_error(work, match: str) -> str:
    with pytest.raises(DarkKnowledgeError, match=match) as raised:
        work()
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for d in range(6):
        (folder / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, size=150)))
    return folder


@pytest.fixture(scope="module")
def splits(corpus_folder):
    corpus = load_corpus(corpus_folder)
    documents = split_documents(corpus.documents, seed=0)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    return tokenise_corpus(corpus, documents, tokenizer, context=16)


# --- hf: students ------------------------------------------------------------------------------------------------

def test_hf_spec_values_are_typed():
    assert parse_hf("hf:gpt2,n_layer=2,tie_word_embeddings=false,resid_pdrop=0.0,activation_function=gelu_new") == (
        "gpt2", {"n_layer": 2, "tie_word_embeddings": False, "resid_pdrop": 0.0, "activation_function": "gelu_new"})
    untied = build_language_model("hf:gpt2,n_layer=1,n_embd=16,n_head=2,tie_word_embeddings=False", 20, 16)
    assert untied.model.lm_head.weight.data_ptr() != untied.model.transformer.wte.weight.data_ptr()
    _one_line_error(lambda: build_language_model("hf:gpt2,n_layer=1,tie_word_embeddings=maybe", 20, 16),
                    "transformers cannot build it.*tie_word_embeddings")


def test_an_hf_spec_keeps_the_positions_it_gives_and_takes_the_context_otherwise():
    """GPT-2's max_position_embeddings is an alias of n_positions: a spec's n_positions was overwritten by the
    run's context through it (a student of a teacher's 64 positions rebuilt with 16 could not load its weights)."""
    assert build_language_model("hf:gpt2,n_layer=1,n_embd=16,n_head=2,n_positions=64", 20, 16).model.config \
        .n_positions == 64
    assert build_language_model("hf:gpt2,n_layer=1,n_embd=16,n_head=2", 20, 16).model.config.n_positions == 16
    assert build_language_model("hf:llama,num_hidden_layers=1,hidden_size=16,num_attention_heads=2,"
                                "intermediate_size=32,max_position_embeddings=64", 20, 16).model.config \
        .max_position_embeddings == 64


@pytest.mark.parametrize("tied", ["true", "false"])
def test_an_hf_student_trains_checkpoints_and_reloads_to_the_same_logits(splits, tmp_path, tied):
    spec = f"hf:gpt2,n_layer=2,n_embd=16,n_head=2,tie_word_embeddings={tied}"
    model, _ = train_language_model(spec, splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                                    LMConfig(epochs=1, batch_size=8), run_dir=tmp_path / "run", log=lambda _: None)
    reloaded, meta = load_language_model(tmp_path / "run")
    inner = reloaded.model
    assert (inner.lm_head.weight.data_ptr() == inner.transformer.wte.weight.data_ptr()) == (tied == "true")
    ids, _ = splits.windows["test"].batch([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), rtol=0, atol=0)


# --- darkknowledge's own tokenizers in the Hugging Face format ----------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_runs_tokenizer_loads_in_transformers_and_an_old_runs_still_verifies(tmp_path, kind):
    from darkknowledge.language_model import save_tokenizer
    tokenizer = TextTokenizer.train([" ".join(WORDS * 20) + "\nÉ 😀"], kind, vocab_size=300)
    save_tokenizer(tmp_path, tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the lazy kings sing\nÉ 😀 of zq"
    assert hf(text).input_ids == tokenizer.encode(text).tolist()
    assert hf.eos_token_id == tokenizer.end_of_document and hf.decode(tokenizer.encode("the dog")) == "the dog"
    assert TextTokenizer.load(tmp_path / "tokenizer.json", sha256=tokenizer.sha256).sha256 == tokenizer.sha256
    old = tmp_path / "old.json"  # what runs saved before the Hugging Face format: its SHA-256 is the one recorded
    old.write_text(tokenizer.to_json())
    assert tokenizer.sha256 == hashlib.sha256(old.read_bytes()).hexdigest()
    assert TextTokenizer.load(old, sha256=tokenizer.sha256).encode(text).tolist() == tokenizer.encode(text).tolist()


# --- pretrained Hugging Face folders ------------------------------------------------------------------------------

def _tiny_gpt2(folder: Path, vocab_size: int = 300, layers: int = 2, seed: int = 0) -> Path:
    """A tiny GPT-2 saved as people save one: save_pretrained for the model and for its (BPE) tokenizer; its
    output layer padded past the tokenizer's tokens to ``vocab_size`` rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS * 30)], trainer=trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _tiny_gpt2(tmp_path_factory.mktemp("teacher") / "teacher-hf")


def test_a_hugging_face_folder_loads_with_its_tokenizer(teacher):
    from darkknowledge.pretrained import load_causal_lm
    model, tokenizer, described = load_causal_lm(teacher)
    reference = transformers.GPT2LMHeadModel.from_pretrained(teacher)
    ids = torch.as_tensor(tokenizer.encode("the lazy dog sings")).unsqueeze(0)
    assert ids.numel() > 1 and tokenizer.decode(ids[0]) == "the lazy dog sings"
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits)
    assert tokenizer.end_of_document == 0 and tokenizer.vocab_size == 290 <= described["vocab_size"] == 300
    assert tokenizer.sha256 == hashlib.sha256((teacher / "tokenizer.json").read_bytes()).hexdigest()
    assert described["max_positions"] == 64 and described["kind"] == "huggingface" and not model.training
    assert load_causal_lm(teacher, dtype="bfloat16")[0](ids).dtype == torch.bfloat16


def test_a_runs_description_gives_its_positions(splits, tmp_path):
    from darkknowledge.pretrained import load_causal_lm
    train_language_model("gpt:layers=1,dim=16,heads=2,context=16", splits.tokenizer, splits.windows["train"],
                         splits.windows["validation"], LMConfig(epochs=1, batch_size=8), run_dir=tmp_path / "run",
                         log=lambda _: None)
    _, tokenizer, described = load_causal_lm(tmp_path / "run")
    assert described["max_positions"] == 16 and tokenizer.sha256 == splits.tokenizer.sha256


@pytest.mark.parametrize("damage, match", [
    ("no-weights", "has no safetensors weights"), ("bin-only", r"pytorch_model\.bin; pickled"),
    ("unknown-config", "transformers cannot read this config"), ("no-tokenizer", "has no tokenizer.json"),
    ("neither", "neither a Hugging Face folder"), ("no-eos", "no end-of-document"),
    ("bad-dtype", "dtype must be one of")])
def test_a_broken_folder_is_refused_in_one_line(teacher, tmp_path, damage, match):
    import shutil
    from darkknowledge.pretrained import load_causal_lm
    folder = Path(shutil.copytree(teacher, tmp_path / "folder"))
    if damage in ("no-weights", "bin-only"):
        (folder / "model.safetensors").unlink()
        if damage == "bin-only":
            (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    elif damage == "unknown-config":
        (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    elif damage == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "neither":
        (folder / "config.json").unlink()
    elif damage == "no-eos":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<nope>"}))
    _one_line_error(lambda: load_causal_lm(folder, dtype="float64" if damage == "bad-dtype" else None), match)


def test_teacher_and_student_must_share_a_tokenizer(teacher, splits, tmp_path):
    from darkknowledge.language_model import save_tokenizer
    from darkknowledge.pretrained import check_same_tokenizer, load_hf_tokenizer
    ours = load_hf_tokenizer(teacher)
    check_same_tokenizer(ours, load_hf_tokenizer(teacher))
    _one_line_error(lambda: check_same_tokenizer(ours, splits.tokenizer), "is not the teacher's")
    save_tokenizer(tmp_path, splits.tokenizer)  # a run's tokenizer, read back as a folder's: still the same one
    check_same_tokenizer(splits.tokenizer, load_hf_tokenizer(tmp_path))


def test_a_run_keeps_a_hugging_face_folders_tokenizer_byte_for_byte_and_reads_it_back(teacher, tmp_path):
    """What a student distilled from a folder's teacher saves: it used to crash ('HFTokenizer' has no 'save'), and
    the run then failed to load ('not a tokenizer darkknowledge saved')."""
    from darkknowledge.language_model import load_run_tokenizer, save_tokenizer
    from darkknowledge.pretrained import load_hf_tokenizer
    tokenizer = load_hf_tokenizer(teacher)
    save_tokenizer(tmp_path, tokenizer)
    assert (tmp_path / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    meta = {"tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}
    loaded = load_run_tokenizer(tmp_path, meta)
    assert loaded.sha256 == tokenizer.sha256 and loaded.end_of_document == tokenizer.end_of_document
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).eos_token_id == tokenizer.end_of_document
    _one_line_error(lambda: load_run_tokenizer(tmp_path, {**meta, "tokenizer_sha256": "0" * 64}),
                    "not a tokenizer darkknowledge saved")


def test_padding_rows_are_masked_out_of_the_shared_vocabulary(teacher, tmp_path):
    from darkknowledge.pretrained import RealVocabulary, load_causal_lm, real_vocabulary
    model, tokenizer, described = load_causal_lm(teacher)  # 300 rows for 290 tokens
    student, _, student_described = load_causal_lm(_tiny_gpt2(tmp_path / "student", vocab_size=320, layers=1))
    vocab = real_vocabulary(tokenizer, described["vocab_size"], student_described["vocab_size"])
    assert vocab == 290
    ids = torch.as_tensor(tokenizer.encode("the fox")).unsqueeze(0)
    with torch.no_grad():
        real = RealVocabulary(model, vocab)(ids)
        assert real.shape[-1] == RealVocabulary(student, vocab)(ids).shape[-1] == 290
        torch.testing.assert_close(real, model(ids)[..., :290])
    assert torch.softmax(real, -1).sum(-1).allclose(torch.ones(1))  # a distribution over the real tokens only
    _one_line_error(lambda: real_vocabulary(tokenizer, 300, 280), "280 outputs cannot score a tokenizer of 290")


# --- a student from the teacher's layers --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hf", "gpt"])
def test_a_student_starts_from_the_teachers_layers(teacher, kind):
    from darkknowledge.pretrained import load_causal_lm, parse_student_init, student_from_teacher_layers
    model = load_causal_lm(teacher)[0] if kind == "hf" else build_language_model(
        "gpt:layers=3,dim=16,heads=2,context=16", 290)
    layers = parse_student_init("teacher-layers=1" if kind == "hf" else "teacher-layers=0,2")
    student = student_from_teacher_layers(model, layers)
    teacher_state, student_state = model.state_dict(), student.state_dict()
    renamed = {"hf": {"model.transformer.h.0.": "model.transformer.h.1."},
               "gpt": {"blocks.0.": "blocks.0.", "blocks.1.": "blocks.2."}}[kind]
    for name, value in student_state.items():
        source = next((name.replace(s, t, 1) for s, t in renamed.items() if name.startswith(s)), name)
        assert torch.equal(value, teacher_state[source]), name
    assert len(student_state) < len(teacher_state)
    ids = torch.randint(0, 290, (2, 8))
    assert student(ids).shape == model(ids).shape
    inner = student.model if kind == "hf" else student
    assert (inner.config.n_layer if kind == "hf" else inner.config.layers) == len(layers)
    with torch.no_grad():  # copies: training the student leaves the teacher alone
        next(student.parameters()).add_(1)
    assert torch.equal(next(model.parameters()), teacher_state[next(iter(teacher_state))])
    _one_line_error(lambda: student_from_teacher_layers(model, [0, 5]), "the teacher has")
    _one_line_error(lambda: parse_student_init("layers=a"), "teacher-layers=I,J")


@pytest.mark.parametrize("arch, options", [
    ("gpt2", dict(n_layer=3, n_embd=16, n_head=2, n_positions=48, bos_token_id=0, eos_token_id=0,
                  activation_function="gelu", tie_word_embeddings=False)),
    ("llama", dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=24, max_position_embeddings=48)),
    ("qwen2", dict(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=24, max_position_embeddings=48))])
def test_the_spec_of_a_student_from_the_teachers_layers_builds_it_again(arch, options):
    from darkknowledge.pretrained import spec_of, student_from_teacher_layers
    from darkknowledge.transformer import HFCausalLM
    config = transformers.AutoConfig.for_model(arch, vocab_size=40, **options)
    torch.manual_seed(0)
    student = student_from_teacher_layers(HFCausalLM(transformers.AutoModelForCausalLM.from_config(config)), [0, 2])
    spec = spec_of(student, 40, "of layers 0,2")
    assert spec.startswith(f"hf:{arch},") and "vocab_size" not in spec
    rebuilt = build_language_model(spec, 40, 16)  # a run's context below the teacher's positions: kept at 48
    rebuilt.load_state_dict(student.state_dict())  # strict: every name and shape the same
    assert rebuilt.model.config.num_hidden_layers == 2
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids), student.eval()(ids), rtol=0, atol=0)
    gpt = student_from_teacher_layers(build_language_model("gpt:layers=3,dim=16,heads=2,context=16", 40), [1])
    assert spec_of(gpt, 40, "of layer 1") == "gpt:layers=1,dim=16,heads=2,context=16"
    student.model.config.scaling = {"factor": 2.0}  # a table no key=value spec holds
    _one_line_error(lambda: spec_of(student, 40, "of layers 0,2"),
                    "the student of layers 0,2: an hf: spec cannot rebuild its architecture .settings scaling differ")


# --- export, evaluate and bench of language-model runs ------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_run(splits, tmp_path_factory):
    run = tmp_path_factory.mktemp("hf-run") / "run"
    train_language_model("hf:gpt2,n_layer=2,n_embd=16,n_head=2", splits.tokenizer, splits.windows["train"],
                         splits.windows["validation"], LMConfig(epochs=1, batch_size=8), run_dir=run,
                         log=lambda _: None)
    return run


def test_an_hf_run_exports_as_a_folder_transformers_loads_to_the_same_logits(hf_run, splits, tmp_path, capsys):
    from darkknowledge.cli import main
    assert main(["export", str(hf_run), "--format", "hf", "--out", str(tmp_path / "student-hf")]) == 0
    assert "max |logit difference| after loading it with transformers" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student-hf", local_files_only=True)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "student-hf")
    model = load_language_model(hf_run)[0]
    ids = torch.as_tensor([hf_tokenizer("the lazy dog").input_ids])
    assert ids[0].tolist() == splits.tokenizer.encode("the lazy dog").tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(ids), atol=1e-5, rtol=0)
    assert loaded.config.eos_token_id == splits.tokenizer.end_of_document
    out = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_export_hf_refuses_a_gpt_run_and_a_full_folder_in_one_line(hf_run, splits, tmp_path, capsys):
    from darkknowledge.cli import main
    train_language_model("gpt:layers=1,dim=16,heads=2,context=16", splits.tokenizer, splits.windows["train"],
                         splits.windows["validation"], LMConfig(epochs=1, batch_size=8), run_dir=tmp_path / "gpt",
                         log=lambda _: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for run, out, match in [(tmp_path / "gpt", tmp_path / "x", "--student hf:"),
                            (hf_run, tmp_path / "full", "not an empty folder")]:
        assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("darkknowledge: error:") and match in err
    assert not (tmp_path / "x").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_folder_and_a_run_are_evaluated_in_language_model_units(teacher, hf_run, splits):
    from darkknowledge.data.text import TokenWindows
    from darkknowledge.pretrained import evaluate_causal_lm, load_causal_lm, load_hf_tokenizer
    tokenizer = load_hf_tokenizer(teacher)
    windows = TokenWindows(tokenizer.encode(" ".join(WORDS * 4)), 16, "test", tokenizer.vocab_size)
    result = evaluate_causal_lm(teacher, windows)
    ids, labels = windows.batch(range(len(windows)))
    with torch.no_grad():
        logits = load_causal_lm(teacher)[0](ids)[..., :tokenizer.vocab_size]  # the padding rows masked out
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert result["log_loss"] == pytest.approx(float(nll), rel=1e-4)
    assert result["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4) and result["tokens"] == labels.numel()
    assert 0 <= result["accuracy"] <= 1 and json.dumps(result)
    assert evaluate_causal_lm(hf_run, splits.windows["test"])["tokens"] == splits.windows["test"].num_tokens
    long = TokenWindows(tokenizer.encode(" ".join(WORDS * 20)), 65, "test", tokenizer.vocab_size)
    _one_line_error(lambda: evaluate_causal_lm(teacher, long), "longer than .* 64 positions")
    _one_line_error(lambda: evaluate_causal_lm(teacher, splits.windows["test"]), "tokenise the corpus")


def test_bench_gives_prompt_and_decode_speed_of_a_folder_and_a_run_side_by_side(teacher, hf_run, tmp_path, capsys):
    from darkknowledge.cli import main
    assert main(["bench", str(teacher), str(hf_run), "--json", str(tmp_path / "bench.json")]) == 0
    table = capsys.readouterr().out
    assert "prompt tokens/s" in table and "decode tokens/s" in table and str(hf_run) in table
    models = json.loads((tmp_path / "bench.json").read_text())["models"]
    assert [m["kind"] for m in models] == ["huggingface", "darkknowledge"]
    assert all(m["prompt_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0 for m in models)


def test_evaluate_of_a_language_model_without_a_corpus_names_data_in_one_line(teacher, hf_run, capsys):
    from darkknowledge.cli import main
    for source in (teacher, hf_run):
        assert main(["evaluate", str(source)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a language model" in err and "--data CORPUS" in err


def test_train_takes_a_hugging_face_folder_or_its_tokenizer_json_as_tokenizer(teacher, tmp_path):
    """A labels-only twin of a student distilled from a folder shares its tokenizer: `train --tokenizer FOLDER`
    (or FOLDER/tokenizer.json) used to be refused ('a folder' / 'not a tokenizer darkknowledge saved')."""
    from darkknowledge.lm_jobs import Corpus, corpus_tokenizer
    from darkknowledge.pretrained import load_hf_tokenizer
    expected = load_hf_tokenizer(teacher)
    for choice in (teacher, teacher / "tokenizer.json"):
        tokenizer = corpus_tokenizer(Corpus(str(tmp_path)), str(choice))
        assert tokenizer.sha256 == expected.sha256 and tokenizer.end_of_document == expected.end_of_document
    (tmp_path / "other.json").write_text("{}")
    _one_line_error(lambda: corpus_tokenizer(Corpus(str(tmp_path)), str(tmp_path / "other.json")),
                    "not a valid tokenizer")


def test_bench_of_a_folder_and_a_mistyped_run_names_the_missing_one(teacher, tmp_path, capsys):
    """It used to say 'give runs of one kind', the missing run read as an image model."""
    from darkknowledge.cli import main
    assert main(["bench", str(teacher), str(tmp_path / "runs" / "studnet")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs/studnet does not exist" in err


def test_the_spec_of_a_folder_rebuilds_its_architecture_or_refuses_in_one_line():
    from darkknowledge.pretrained import spec_of
    from darkknowledge.transformer import HFCausalLM
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=298, activation_function="relu")
    spec = spec_of(HFCausalLM(transformers.GPT2LMHeadModel(config)), 290, "student-hf")
    # its padded rows, and the default n_positions too: a run rebuilds it at any --context; its special ids,
    # which an hf: spec otherwise leaves unset
    assert parse_hf(spec) == ("gpt2", {"vocab_size": 298, "n_positions": 1024, "n_embd": 16, "n_layer": 1,
                                       "n_head": 2, "activation_function": "relu", "bos_token_id": 50256,
                                       "eos_token_id": 50256})
    rebuilt = build_language_model(spec, 290, 32)
    assert rebuilt.model.lm_head.weight.shape == (298, 16) and rebuilt.model.config.n_positions == 1024
    _one_line_error(lambda: build_language_model("hf:gpt2,n_layer=1,n_positions=16", 290, 32),
                    "windows of 32 tokens are longer than its 16 positions; give --context 16 or less")
    config.task_specific_params = {"summarization": {"min_length": 5}}  # a table: no spec holds it
    _one_line_error(lambda: spec_of(HFCausalLM(transformers.GPT2LMHeadModel(config)), 290, "student-hf"),
                    "the student student-hf: an hf: spec cannot rebuild its architecture .settings "
                    "task_specific_params differ")


# --- distill --student-init and --dtype from the command line -----------------------------------------------------

@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory):
    """A 3-layer GPT-2 folder whose output layer is its tokenizer's vocabulary (290 tokens, no padding rows)."""
    return _tiny_gpt2(tmp_path_factory.mktemp("deep") / "teacher-hf", vocab_size=290, layers=3)


def _cli(*argv):
    import contextlib
    import io
    from darkknowledge.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_distill_starts_a_student_from_the_teachers_layers_and_it_evaluates_and_exports(deep_teacher, corpus_folder,
                                                                                        tmp_path):
    distill = ["distill", "--teacher", deep_teacher, "--data", corpus_folder, "-T", "1", "--epochs", "1",
               "--batch-size", "8", "--lr", "1e-9", "--no-progress"]
    code, _, err = _cli(*distill, "--student-init", "teacher-layers=0,2", "--out", tmp_path / "run")
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["init"] == {"teacher_layers": [0, 2]}
    assert meta["spec"].startswith("hf:gpt2,") and "n_layer=2" in meta["spec"] and "n_positions=64" in meta["spec"]
    # a rate of 1e-9: the run's weights are still the teacher's layers 0 and 2 (renumbered 0 and 1), its
    # embeddings, final norm and output layer
    student = load_language_model(tmp_path / "run")[0].state_dict()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(deep_teacher, local_files_only=True).state_dict()
    kept = {"transformer.h.0.": "transformer.h.0.", "transformer.h.1.": "transformer.h.2."}
    for name, value in student.items():
        inner = name.removeprefix("model.")
        source = next((inner.replace(s, t, 1) for s, t in kept.items() if inner.startswith(s)), inner)
        torch.testing.assert_close(value, teacher[source], atol=1e-6, rtol=0, msg=name)
    # the kept layers are in the run's key: other layers are another run, not the finished one reused
    code, _, err = _cli(*distill, "--student-init", "teacher-layers=0,2", "--out", tmp_path / "run")
    assert code == 0 and "reused" in err, err
    code, _, err = _cli(*distill, "--student-init", "teacher-layers=1,2", "--out", tmp_path / "run")
    assert code == 1 and "choose another --out" in err, err
    code, out, err = _cli("evaluate", tmp_path / "run", "--data", corpus_folder)
    assert code == 0 and json.loads(out)["tokens"] > 0, err
    code, out, err = _cli("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "student-hf")
    assert code == 0 and "max |logit difference|" in out, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student-hf", local_files_only=True)
    assert exported.config.n_layer == 2 and exported.config.n_positions == 64
    for argv, match in [(["--student-init", "teacher-layers=0,3"], "the teacher has 3 layers"),
                        (["--student-init", "layers=1"], "teacher-layers=I,J"),
                        (["--student-init", "teacher-layers=0", "--student", "hf:gpt2,n_layer=1"], "not both")]:
        code, _, err = _cli(*distill, *argv, "--out", tmp_path / "refused")
        last = err.strip().splitlines()[-1]  # after transformers' own progress bar of loading the teacher
        assert code == 1 and last.startswith("darkknowledge: error:") and match in last, err
    assert not (tmp_path / "refused").exists()


def test_a_run_without_student_init_keeps_the_key_it_had():
    """Runs finished before --student-init existed are reused by key: the key of a run without it is unchanged."""
    from dataclasses import asdict
    from darkknowledge.language_model import Objective, run_key

    class Windows:
        def fingerprint(self):
            return "f" * 64
    config = LMConfig(epochs=1, batch_size=8)
    before = hashlib.sha256(json.dumps({"spec": "gpt:layers=1", "tokenizer": "t", "train": "f" * 64,
                                        "config": asdict(config), "objective": Objective().describe()},
                                       sort_keys=True).encode()).hexdigest()
    assert run_key("gpt:layers=1", "t", Windows(), config, Objective()) == before
    assert run_key("gpt:layers=1", "t", Windows(), config, Objective(), {"teacher_layers": [0]}) != before


def test_dtype_bfloat16_loads_the_teacher_in_bfloat16_for_a_store_and_for_evaluate(deep_teacher, corpus_folder,
                                                                                   tmp_path):
    build = ["store", "build", "--teacher", deep_teacher, "--data", corpus_folder, "--layout", "topk", "--top-k", "4",
             "--out", tmp_path / "stores"]
    code, _, err = _cli(*build, "--dtype", "bfloat16")
    assert code == 0, err
    assert "bfloat16 weights" in err
    code, _, err = _cli(*build)  # auto: the folder's own float32, another teacher's store
    assert code == 0 and "float32 weights" in err, err
    assert len(list((tmp_path / "stores").glob("*/targets.json"))) == 2
    code, out, err = _cli("evaluate", deep_teacher, "--data", corpus_folder, "--dtype", "bfloat16")
    assert code == 0 and json.loads(out)["dtype"] == "bfloat16", err
    # a store of the bfloat16 teacher serves a distill that loads it so, and only that one
    assert _cli(*build[:-1], tmp_path / "bf16-stores", "--dtype", "bfloat16")[0] == 0
    distill = ["distill", "--teacher", deep_teacher, "--data", corpus_folder, "--store", tmp_path / "bf16-stores",
               "--student", "hf:gpt2,n_layer=1,n_embd=16,n_head=2", "-T", "1", "--epochs", "1", "--batch-size", "8",
               "--no-progress"]
    code, _, err = _cli(*distill, "--out", tmp_path / "float32-teacher")
    assert code == 1 and "in another --dtype" in err and not (tmp_path / "float32-teacher").exists(), err
    code, _, err = _cli(*distill, "--dtype", "bfloat16", "--out", tmp_path / "bfloat16-teacher")
    assert code == 0, err
    code, _, err = _cli(*build, "--dtype", "float64")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'float64'" in err, err
    config = tmp_path / "options.toml"
    config.write_text('dtype = "half"\n')
    code, _, err = _cli("distill", "--config", config, "--teacher", deep_teacher, "--data", corpus_folder, "-T", "1",
                        "--out", tmp_path / "run")
    assert code == 1 and err.count("\n") == 1 and "--dtype must be one of auto, float32" in err, err
