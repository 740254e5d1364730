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
def splits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for d in range(6):
        (folder / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, size=150)))
    corpus = load_corpus(folder)
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
