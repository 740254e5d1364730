"""Language-model run folders lose nothing and trust nothing unchecked: a run killed at any rename, over a folder
holding a model of other settings, finishes to the model an uninterrupted run makes; damaged files (tokenizer,
weights, sidecar, state) are repaired or trained again when a run is built and refused in one line when it is only
read; a model.json naming a model too large for the memory is refused before anything is built."""

import io
import json
import os
import shutil
import signal
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from darkknowledge import checkpoint, jobs
from darkknowledge.cli import main
from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.language_model import (LMConfig, generate, load_language_model, load_run_tokenizer,
                                          train_language_model)
from darkknowledge.locks import LOCK_FILE
from darkknowledge.training import TrainConfig
from darkknowledge.transformer import build_language_model, count_parameters
from test_reliability import _in_child  # the forked child both kill tests use

TINY = "gpt:layers=1,dim=16,heads=2,context=16"
CONFIG = LMConfig(epochs=2, batch_size=8, lr=1e-2)
OTHER = LMConfig(epochs=1, batch_size=8, lr=1e-2, seed=1)  # the settings of the model the folder held before
WORDS = "the quick brown fox jumps over a lazy dog while seven tired kings sing of old wars and wine".split()


def _splits(folder: Path, upper: bool = False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for d in range(6):
        text = " ".join(rng.choice(WORDS, size=150))
        (folder / f"doc{d}.txt").write_text(text.upper() if upper else text)
    corpus = load_corpus(folder)
    documents = split_documents(corpus.documents, seed=0)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    return tokenise_corpus(corpus, documents, tokenizer, context=16)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return _splits(tmp_path_factory.mktemp("corpus") / "c")


def _train(splits, run, config=CONFIG, log=lambda _: None):
    return train_language_model(TINY, splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                                config, run_dir=run, log=log)


@pytest.fixture(scope="module")
def finished(splits, tmp_path_factory):
    """A finished run of CONFIG (copied by the tests that damage it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _train(splits, run)
    return run


def _weights(run: Path) -> str:
    return checkpoint.sha256_file(run / checkpoint.MODEL_WEIGHTS)


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(LOCK_FILE))
    return to


def _one_line_error(work, match: str) -> str:
    with pytest.raises(DarkKnowledgeError, match=match) as raised:
        work()
    assert "\n" not in str(raised.value)
    return str(raised.value)


def _killed_at(rename: int, work) -> bool:
    """Run ``work()`` in a forked child killed (SIGKILL) just before its ``rename``-th rename; False when it
    finished first."""
    pid = _in_child(work, kill_at_rename=rename)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"the run failed (status {status}) before rename {rename}"
        return False
    assert os.WTERMSIG(status) == signal.SIGKILL, status
    return True


def _count_renames(work) -> int:
    os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"] = "1000000000"  # counts, never kills
    checkpoint._renames = 0
    try:
        work()
        return checkpoint._renames
    finally:
        del os.environ["DARKKNOWLEDGE_KILL_AT_RENAME"]


def test_a_run_killed_at_every_rename_over_a_model_of_other_settings_finishes_to_the_uninterrupted_model(
        splits, tmp_path):
    before = tmp_path / "other-settings"
    _train(splits, before, OTHER)
    reference = _copy(before, tmp_path / "reference")
    _train(splits, reference)
    weights = _weights(reference)
    rename = 0
    while True:
        rename += 1
        out = _copy(before, tmp_path / f"killed-{rename}")
        if not _killed_at(rename, lambda: _train(splits, out)):
            break
        if (out / checkpoint.MODEL_META).exists() and _kind(out) == "language-model":
            load_language_model(out)  # the previous model or the new one, whole, meanwhile
        lines = []
        _train(splits, out, log=lines.append)
        assert _weights(out) == weights, f"killed at rename {rename}: {lines}"
        _, loaded = load_language_model(out)
        assert loaded["weights_sha256"] == weights
        assert load_run_tokenizer(out, loaded).sha256 == splits.tokenizer.sha256
        assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == \
            ["metrics.jsonl", "model.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], \
            f"killed at rename {rename}"
    assert rename > 10  # every commit of both epochs and of the model was cut (3 + 3 + tokenizer, pending, 2)


def _kind(run) -> str | None:
    return json.loads((run / checkpoint.MODEL_META).read_text()).get("kind")


def test_a_pending_language_model_sidecar_is_read_and_committed_not_dropped(splits, tmp_path):
    before = tmp_path / "run"
    _train(splits, before, OTHER)
    # Cut between the weights' rename and the sidecar's: the last rename of the run. The sidecar in place is then
    # the loop's own of its best epoch; only the pending one says the folder holds a finished language model.
    renames = _count_renames(lambda: _train(splits, _copy(before, tmp_path / "counted")))
    run = _copy(before, tmp_path / "cut")
    assert _killed_at(renames, lambda: _train(splits, run))
    in_place = checkpoint.sha256_file(run / checkpoint.MODEL_WEIGHTS)
    assert _kind(run) != "language-model"
    assert json.loads((run / checkpoint.PENDING_META).read_text())["kind"] == "language-model"
    assert load_language_model(run)[1]["weights_sha256"] == in_place  # what generate reads too
    with checkpoint.open_run(run):  # recovery commits it
        pass
    assert json.loads((run / checkpoint.MODEL_META).read_text())["weights_sha256"] == in_place
    assert not (run / checkpoint.PENDING_META).exists()


@pytest.mark.parametrize("damage", ["edited", "swapped", "deleted", "not-json", "no-chars", "chars-empty",
                                    "chars-string", "chars-ints", "bpe-empty", "bare-string", "hf-edited",
                                    "hf-no-model", "hf-vocab-ints", "hf-decoder"])
def test_a_damaged_tokenizer_is_refused_in_one_line_and_repaired_by_a_rerun(splits, finished, tmp_path, damage):
    run = _copy(finished, tmp_path / "run")
    path = run / "tokenizer.json"
    hf = json.loads(path.read_text())  # the Hugging Face format runs save
    good = json.loads(splits.tokenizer.to_json())  # the format runs saved before it
    vocab = hf["model"]["vocab"]
    broken = {"edited": {**good, "chars": good["chars"][:-1]},
              "swapped": json.loads(_splits(tmp_path / "upper", upper=True).tokenizer.to_json()),
              "no-chars": {k: v for k, v in good.items() if k != "chars"}, "chars-empty": {**good, "chars": []},
              "chars-string": {**good, "chars": "abc"}, "chars-ints": {**good, "chars": [1, 2, 3]},
              "bpe-empty": {**good, "kind": "bpe", "bpe": {}}, "bare-string": "chars",
              "hf-edited": {**hf, "model": {**hf["model"], "vocab": {**vocab, "Z": len(vocab)}}},
              "hf-no-model": {k: v for k, v in hf.items() if k != "model"},
              "hf-vocab-ints": {**hf, "model": {**hf["model"], "vocab": list(vocab.values())}},
              "hf-decoder": {**hf, "decoder": None}}
    if damage == "deleted":
        path.unlink()
    elif damage == "not-json":
        path.write_text("{")
    else:
        path.write_text(json.dumps(broken[damage]))
    meta = load_language_model(run)[1]
    _one_line_error(lambda: load_run_tokenizer(run, meta), "tokenizer")
    if damage not in ("deleted", "swapped", "edited", "hf-edited"):  # broken outright: refused, SHA-256 or not
        _one_line_error(lambda: TextTokenizer.load(path), str(path))
    lines = []
    _train(splits, run, log=lines.append)
    assert any("tokenizer.json repaired" in line for line in lines) and "reused" in lines[-1]
    assert load_run_tokenizer(run, meta).sha256 == splits.tokenizer.sha256


def test_a_consistent_foreign_tokenizer_is_refused_not_an_index_error(splits, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    foreign = TextTokenizer.train(["xyz"], "char")  # another vocabulary, its SHA-256 recorded as the run's
    foreign.save(run / "tokenizer.json")
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "tokenizer_sha256": foreign.sha256}))
    _one_line_error(lambda: load_run_tokenizer(run, load_language_model(run)[1]), "has 5 tokens but the run's")
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["generate", str(run), "--prompt", "the", "--tokens", "3"]) == 1
    assert len(err.getvalue().strip().splitlines()) == 1 and "tokenizer" in err.getvalue()


def _rewrite_weights(run: Path, change) -> None:
    """Replace the run's weights by ``change(tensors)`` and record their checksum, as a tamperer would."""
    tensors = change(load_file(run / "model.safetensors"))
    save_file(tensors, run / "model.safetensors")
    meta = json.loads((run / "model.json").read_text())
    meta["weights_sha256"] = checkpoint.sha256_file(run / "model.safetensors")
    (run / "model.json").write_text(json.dumps(meta))


def _rewrite_meta(run: Path, **fields) -> None:
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, **fields}))


@pytest.mark.parametrize("damage, error", [
    (lambda run: _rewrite_meta(run, spec="gpt:layers=100000000"), "GB of memory is available"),
    (lambda run: _rewrite_meta(run, vocab_size=7), "do not fit the model"),
    (lambda run: _rewrite_meta(run, context=8), "do not fit the model"),
    (lambda run: _rewrite_meta(run, spec="gpt:layers=2,dim=16,heads=2"), "do not fit the model"),
    (lambda run: _rewrite_meta(run, history="x"), "field 'history'"),
    (lambda run: _rewrite_weights(run, lambda t: {k: v.to(torch.int32) for k, v in t.items()}), "as int32"),
    (lambda run: _rewrite_weights(run, lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}),
     "holds NaN or inf"),
], ids=["huge-spec", "vocab-size", "context", "spec", "history", "int32", "nan"])
def test_a_damaged_run_is_refused_in_one_line_on_load_and_trained_again_by_a_rerun(splits, finished, tmp_path,
                                                                                   damage, error):
    run = _copy(finished, tmp_path / "run")
    damage(run)
    _one_line_error(lambda: load_language_model(run), error)
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["generate", str(run), "--prompt", "the", "--tokens", "3"]) == 1
    assert len(err.getvalue().strip().splitlines()) == 1 and error.split()[0] in err.getvalue()
    lines = []
    _train(splits, run, log=lines.append)
    assert "training it again" in lines[0] and not any("reused" in line for line in lines)
    assert _weights(run) == _weights(finished)
    load_language_model(run)


def test_weights_linked_to_another_runs_file_are_refused_and_never_reused(splits, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    _train(splits, tmp_path / "other", OTHER)
    other = _weights(tmp_path / "other")
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").symlink_to(tmp_path / "other" / "model.safetensors")
    _rewrite_meta(run, weights_sha256=other)  # it even vouches for them
    _one_line_error(lambda: load_language_model(run), "outside its folder")
    lines = []
    _train(splits, run, log=lines.append)
    assert "training it again" in lines[0]
    assert not (run / "model.safetensors").is_symlink()
    assert _weights(tmp_path / "other") == other  # untouched


@pytest.mark.parametrize("state", ["list", "no-best", "best-not-a-dict"])
def test_a_damaged_language_model_state_starts_training_afresh(splits, tmp_path, state):
    run = tmp_path / "run"

    def stop_after_epoch_1(line):
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(splits, run, log=stop_after_epoch_1)
    saved = json.loads((run / "state.json").read_text())
    saved = {"list": [], "no-best": {k: v for k, v in saved.items() if k != "best"},
             "best-not-a-dict": {**saved, "best": 3}}[state]
    (run / "state.json").write_text(json.dumps(saved))
    lines = []
    _train(splits, run, log=lines.append)
    assert any("training starts afresh" in line for line in lines) and not any("resumed" in line for line in lines)
    assert lines[-1].startswith("epoch 2/2")
    load_language_model(run)


def test_an_image_run_is_not_a_language_model_run_nor_the_reverse(splits, finished, tmp_path):
    image = tmp_path / "image"
    jobs.train_run("mlp:16", jobs.DataChoice("digits"), TrainConfig(epochs=1, batch_size=256, progress=False), image,
                   False, log=lambda _: None)
    _one_line_error(lambda: load_language_model(image), "holds an image model, not a language model")
    _one_line_error(lambda: _train(splits, image), "holds an image model, not a language model")
    checkpoint.load_model(image)  # untouched
    _one_line_error(lambda: checkpoint.load_model(finished), "holds a language model, not an image model")


@pytest.mark.parametrize("change, error", [
    (lambda t: {k: v.to(torch.int32) for k, v in t.items()}, "as int32"),
    (lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, "holds NaN or inf"),
], ids=["int32", "nan"])
def test_image_weights_are_checked_beyond_their_checksum(tmp_path, change, error):
    run = tmp_path / "run"
    jobs.train_run("mlp:16", jobs.DataChoice("digits"), TrainConfig(epochs=1, batch_size=256, progress=False), run,
                   False, log=lambda _: None)
    _rewrite_weights(run, change)
    _one_line_error(lambda: checkpoint.load_model(run), error)


def test_a_tiny_sampling_temperature_is_the_most_probable_token_not_a_traceback(splits, finished):
    model, meta = load_language_model(finished)
    tokenizer = load_run_tokenizer(finished, meta)
    greedy = generate(model, tokenizer, "the", tokens=5, temperature=1e-300)
    assert greedy == generate(model, tokenizer, "the", tokens=5, temperature=1e-300, seed=1) and len(greedy) == 5


def test_a_language_model_too_large_for_the_memory_is_refused_before_it_is_built(splits, tmp_path):
    _one_line_error(lambda: train_language_model("gpt:layers=100000000", splits.tokenizer, splits.windows["train"],
                                                 splits.windows["validation"], CONFIG, run_dir=tmp_path / "run"),
                    "GB of memory is available")
    assert not (tmp_path / "run" / "model.json").exists()


@pytest.mark.parametrize("spec", ["gpt:layers=2,dim=16,heads=2,context=32", "gpt:layers=1,dim=12,heads=3",
                                  "hf:gpt2,n_layer=3,n_embd=16,n_head=2"])
def test_a_language_models_size_is_counted_from_its_spec(spec):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers")
    built = sum(p.numel() for p in build_language_model(spec, 50, 24).parameters())
    assert count_parameters(spec, 50, 24) == built
