"""Language models end to end on a tiny corpus: text splits, tokenizers, the causal transformer, the token store
(top-k and dense, kill-safe), training with resume, evaluation, sampling, and the one-line refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.data.text import TextTokenizer, load_corpus, split_documents, tokenise_corpus
from darkknowledge import language_model
from darkknowledge.errors import DarkKnowledgeError, TrainingDiverged
from darkknowledge.locks import LOCK_FILE
from darkknowledge.language_model import (LMConfig, Objective, block_bootstrap_share, evaluate_language_model,
                                          generate, load_language_model, load_run_tokenizer, train_language_model)
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.transformer import build_language_model, parse_gpt

TINY = "gpt:layers=1,dim=16,heads=2,context=16"
WORDS = "the quick brown fox jumps over a lazy dog while seven tired kings sing of old wars and wine".split()


def write_corpus(folder: Path, documents: int = 6, words: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        (folder / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, size=words)) + "\n")
    return folder


@pytest.fixture
def splits(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path / "corpus"))
    documents = split_documents(corpus.documents, seed=0)
    tokenizer = TextTokenizer.train([corpus.documents[n] for n in documents["train"]], "char")
    return tokenise_corpus(corpus, documents, tokenizer, context=16)


def test_corpus_is_split_by_whole_documents_fixed_by_the_seed(tmp_path):
    corpus = load_corpus(write_corpus(tmp_path / "c", documents=10))
    a, b = split_documents(corpus.documents, seed=3), split_documents(corpus.documents, seed=3)
    assert a == b and sorted(sum(a.values(), [])) == sorted(corpus.documents)
    assert not set(a["train"]) & (set(a["validation"]) | set(a["test"]))
    assert split_documents(corpus.documents, seed=4) != a


def test_empty_documents_are_skipped_and_counted_and_non_utf8_names_the_file(tmp_path):
    folder = write_corpus(tmp_path / "c")
    (folder / "empty.txt").write_text("  \n")
    assert load_corpus(folder).skipped_empty == 1
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DarkKnowledgeError, match=r"latin1\.txt is not UTF-8") as raised:
        load_corpus(folder)
    assert "\n" not in str(raised.value)


def test_bpe_tokenizer_round_trips_and_is_checked_on_load(tmp_path):
    pytest.importorskip("tokenizers")
    texts = [" ".join(WORDS * 20)]
    tokenizer = TextTokenizer.train(texts, "bpe", vocab_size=300)
    text = "the lazy kings sing"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tokenizer.save(tmp_path / "tokenizer.json")
    assert TextTokenizer.load(tmp_path / "tokenizer.json", sha256=tokenizer.sha256).encode(text).tolist() == \
        tokenizer.encode(text).tolist()
    other = TextTokenizer.train(texts, "char")
    with pytest.raises(DarkKnowledgeError, match="not the one this run was trained with"):
        TextTokenizer.load(tmp_path / "tokenizer.json", sha256=other.sha256)


def test_windows_labels_are_the_next_tokens(splits):
    train = splits.windows["train"]
    ids, labels = train.batch([0, 2])
    assert ids.shape == labels.shape == (2, 16)
    assert torch.equal(labels[:, :-1], ids[:, 1:])
    assert torch.equal(train.positions([2])[0], torch.arange(32, 48))


def test_causal_transformer_sees_only_the_past():
    torch.manual_seed(0)
    model = build_language_model(TINY, 20).eval()
    ids = torch.randint(0, 20, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 20
    a, b = model(ids), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10]) and not torch.allclose(a[0, 10:], b[0, 10:])
    with pytest.raises(DarkKnowledgeError, match="dim divisible by heads"):
        parse_gpt("gpt:dim=10,heads=3")


def test_language_models_are_in_the_model_registry():
    from darkknowledge.models import build_model
    model = build_model(TINY, (16,), 20)
    assert model(torch.randint(0, 20, (2, 16))).shape == (2, 16, 20)
    assert model.darkknowledge_spec == {"spec": TINY}
    with pytest.raises(DarkKnowledgeError, match="unknown option"):
        build_model("gpt:depth=2", (16,), 20)


def test_hf_causal_lm_from_a_config_as_teacher_and_student():
    pytest.importorskip("transformers")
    model = build_language_model("hf:gpt2,n_layer=1,n_embd=16,n_head=2", 20, context=16)
    assert model(torch.randint(0, 20, (2, 16))).shape == (2, 16, 20)
    with pytest.raises(DarkKnowledgeError, match="transformers cannot build it"):
        build_language_model("hf:no-such-architecture", 20)


@pytest.mark.parametrize("top_k", [None, 4])
def test_store_rows_are_the_teachers_per_token_targets(splits, tmp_path, top_k):
    torch.manual_seed(0)
    members = [build_language_model(TINY, splits.tokenizer.vocab_size) for _ in range(2)]
    train = splits.windows["train"]
    store = SoftTargets.build(members, train, tmp_path / "store", tokenizer_sha256=splits.tokenizer.sha256,
                              top_k=top_k, batch_windows=3)
    assert store.bytes_per_case == (2 * train.vocab_size if top_k is None else 4 * top_k + 8)
    ids, _ = train.batch([1, 5])
    with torch.no_grad():
        expected = torch.log(torch.stack([torch.softmax(m.eval()(ids), -1) for m in members]).mean(0))
    targets = store.targets(train.positions([1, 5]), 1.0)  # rows: the windows' token positions
    expected = expected.reshape(2 * 16, -1)
    if top_k is None:
        torch.testing.assert_close(targets["teacher_logits"], expected, atol=2e-2, rtol=1e-2)
    else:
        top = targets["topk_targets"]
        assert top.logits.shape == (2 * 16, 4)
        torch.testing.assert_close(top.logits, expected.topk(4, -1).values, atol=2e-2, rtol=1e-2)


def test_one_store_class_opens_both_forms_and_reads_rows_one_way(splits, tmp_path):
    """A folder store (build) and a one-file store (compute) over the same token windows are one class, opened by
    one ``open`` and read by the same rows: their targets agree (float16 against float32 logits)."""
    from darkknowledge.soft_targets import module_sha256
    from darkknowledge.store_files import key_of

    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    built = SoftTargets.build(teacher, train, tmp_path / "folder", tokenizer_sha256=sha, top_k=4)
    computed = SoftTargets.compute(teacher, train, tmp_path / "file", top_k=4)
    folder_store = SoftTargets.open(built.path, windows=train, tokenizer_sha256=sha,
                                    vocab_size=splits.tokenizer.vocab_size)
    file_store = SoftTargets.open(computed.path, windows=train, vocab_size=splits.tokenizer.vocab_size)
    rows = train.positions([0, 3])  # token positions of two windows, [2, 16]
    for store in (folder_store, file_store):
        assert len(store) == train.num_tokens and store.num_classes == splits.tokenizer.vocab_size
        assert store.transfer_fingerprint == train.fingerprint() and store.top_k == 4
        assert store.targets(rows, 2.0)["topk_targets"].logits.shape == (32, 4)
    torch.testing.assert_close(folder_store.probabilities(rows, 1.0), file_store.probabilities(rows, 1.0),
                               atol=2e-3, rtol=2e-2)
    assert folder_store.bytes_per_case == 4 * 4 + 8 and file_store.bytes_per_case == (4 + 2) * 4 + 8  # float32 logits
    # the folder store's key and description are those of the token store it was before the fold, so its
    # reproductions find their stores and language-model runs keep their run keys
    assert built.key == key_of({"format": "darkknowledge/token-targets-1", "members": [module_sha256(teacher)],
                                "windows": train.fingerprint(), "tokenizer": sha, "vocab_size": train.vocab_size,
                                "layout": "topk", "top_k": 4})
    assert built.path.name == built.key[:16] and set(built.describe()) == {
        "folder", "layout", "top_k", "head", "key", "members", "positions", "bytes_per_token"}
    with pytest.raises(DarkKnowledgeError, match="built with another tokenizer"):
        SoftTargets.open(computed.path, tokenizer_sha256=sha)


def test_topk_store_summarised_from_a_dense_store_matches_one_from_the_members(splits, tmp_path):
    torch.manual_seed(0)
    members = [build_language_model(TINY, splits.tokenizer.vocab_size) for _ in range(2)]
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    dense = SoftTargets.build(members, train, tmp_path, tokenizer_sha256=sha)
    from_dense = SoftTargets.build(dense, train, tmp_path, tokenizer_sha256=sha, top_k=4)
    from_members = SoftTargets.build(members, train, tmp_path, tokenizer_sha256=sha, top_k=4)
    assert from_dense.path != from_members.path  # keyed by their sources
    a, b = (s.targets(train.positions([0, 3]), 1.0)["topk_targets"] for s in (from_dense, from_members))
    torch.testing.assert_close(a.logits, b.logits, atol=2e-2, rtol=1e-2)  # float16 rows, summarised again
    with pytest.raises(DarkKnowledgeError, match="must be a dense store over these windows"):
        SoftTargets.build(from_dense, train, tmp_path, tokenizer_sha256=sha, top_k=2)


def test_a_killed_build_resumes_and_a_corrupted_store_is_rebuilt(splits, tmp_path):
    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    train = splits.windows["train"]
    kwargs = dict(tokenizer_sha256=splits.tokenizer.sha256, top_k=4)

    def kill_after_two_chunks(done, total):
        if done >= 2 * 2 * 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SoftTargets.build(teacher, train, tmp_path / "s", on_chunk=kill_after_two_chunks, batch_windows=2, **kwargs)
    (folder,) = (tmp_path / "s").iterdir()
    header = json.loads((folder / "targets.json").read_text())
    assert header["complete"] is False and header["positions_done"] == 64
    with pytest.raises(DarkKnowledgeError, match="build stopped after 64"):
        SoftTargets.open(folder)
    chunks = []
    resumed = SoftTargets.build(teacher, train, tmp_path / "s", on_chunk=lambda d, t: chunks.append(d),
                                batch_windows=50, **kwargs)
    assert len(train) > 54 and chunks[0] == (4 + 50) * 16  # it went on from where the kill left it
    fresh = SoftTargets.build(teacher, train, tmp_path / "fresh", batch_windows=50, **kwargs)
    every = range(len(resumed))
    for name in ("logits", "indices"):
        assert torch.equal(getattr(resumed.targets(every, 1.0)["topk_targets"], name),
                           getattr(fresh.targets(every, 1.0)["topk_targets"], name))
    # A complete store whose file changed afterwards is never used: open refuses it, build recomputes it.
    with open(folder / "topk_logits.bin", "r+b") as f:
        f.write(b"\x00\x7c")
    with pytest.raises(DarkKnowledgeError, match="does not match its checksum"):
        SoftTargets.open(folder)
    chunks.clear()
    SoftTargets.build(teacher, train, tmp_path / "s", on_chunk=lambda d, t: chunks.append(d), batch_windows=50,
                      **kwargs)
    assert chunks[0] == 50 * 16 and SoftTargets.open(folder)


def test_store_of_other_tokenizer_corpus_or_vocabulary_is_refused_with_one_line(splits, tmp_path):
    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    store = SoftTargets.build(teacher, splits.windows["train"], tmp_path, tokenizer_sha256=splits.tokenizer.sha256,
                              top_k=4)
    cases = [(dict(tokenizer_sha256="0" * 64), "built with another tokenizer"),
             (dict(vocab_size=splits.tokenizer.vocab_size + 1), "vocabularies differ"),
             (dict(windows=splits.windows["validation"]), "built over another corpus or split")]
    for kwargs, pattern in cases:
        with pytest.raises(DarkKnowledgeError, match=pattern) as raised:
            SoftTargets.open(store.path, **kwargs)
        assert "\n" not in str(raised.value)


def test_train_distil_resume_evaluate_and_generate(splits, tmp_path):
    tokenizer, train, val = splits.tokenizer, splits.windows["train"], splits.windows["validation"]
    config = LMConfig(epochs=2, batch_size=8, lr=1e-2)
    teacher, meta = train_language_model(TINY, tokenizer, train, val, config, run_dir=tmp_path / "t", log=print)
    assert meta["best_epoch"] in (1, 2) and len(meta["history"]) == 2
    loaded, loaded_meta = load_language_model(tmp_path / "t")
    assert load_run_tokenizer(tmp_path / "t", loaded_meta).sha256 == tokenizer.sha256
    test = splits.windows["test"]
    before = evaluate_language_model(build_language_model(TINY, tokenizer.vocab_size), test)
    after = evaluate_language_model(loaded, test)
    assert after["log_loss"] < before["log_loss"] - 0.5 and 0 <= after["accuracy"] <= 1
    assert after["perplexity"] == pytest.approx(np.exp(after["log_loss"]))

    store = SoftTargets.build(teacher, train, tmp_path / "store", tokenizer_sha256=tokenizer.sha256, top_k=8)
    objective = Objective(store, temperature=2.0, soft_weight=1.0, hard_weight=0.5)
    lines = []

    def stop_after_epoch_1(line):
        lines.append(line)
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_language_model(TINY, tokenizer, train, val, config, objective, run_dir=tmp_path / "s",
                             log=stop_after_epoch_1)
    student, student_meta = train_language_model(TINY, tokenizer, train, val, config, objective,
                                                 run_dir=tmp_path / "s", log=lines.append)
    assert any(line.startswith("resuming") and "after epoch 1" in line for line in lines)
    assert student_meta["objective"] == "distillation" and student_meta["top_k"] == 8
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != LOCK_FILE) == \
        ["metrics.jsonl", "model.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # The same settings again: the finished run is reused, not retrained.
    train_language_model(TINY, tokenizer, train, val, config, objective, run_dir=tmp_path / "s", log=lines.append)
    assert "finished run of these settings, reused" in lines[-1]
    text = generate(student, tokenizer, "the quick", tokens=20, seed=0)
    assert isinstance(text, str) and len(text) == 20  # character level: one character per token
    assert generate(student, tokenizer, "the quick", tokens=20, seed=0) == text


def test_a_diverged_language_model_is_refused_and_nothing_is_saved(splits, tmp_path, monkeypatch):
    build = language_model.build_language_model

    def nan_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        return model

    monkeypatch.setattr(language_model, "build_language_model", nan_model)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 1"):
        train_language_model(TINY, splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                             LMConfig(epochs=2, batch_size=8), run_dir=tmp_path / "run", log=print)
    assert not (tmp_path / "run" / "model.json").exists() and not list((tmp_path / "run").glob("state*"))


def test_a_second_writer_of_a_language_model_run_is_refused_in_one_line(splits, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from darkknowledge.locks import hold_folder\n"
                               f"with hold_folder({str(run)!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DarkKnowledgeError, match=f"in use by another darkknowledge process \\(pid {holder.pid}"):
            train_language_model(TINY, splits.tokenizer, splits.windows["train"], splits.windows["validation"],
                                 LMConfig(epochs=1, batch_size=8), run_dir=run, log=print)
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "model.json").exists()


def test_block_bootstrap_share_of_the_gain():
    rng = np.random.default_rng(0)
    windows = 200
    base = rng.normal(100, 5, windows)
    ensemble, student = base - 10 + rng.normal(0, 1, windows), base - 8 + rng.normal(0, 1, windows)
    make = lambda nll: {"window_nll": nll.tolist(), "window_correct": [0] * windows, "tokens": windows * 16}
    result = block_bootstrap_share(make(base), make(ensemble), make(student), "log_loss")
    assert result["share"] == pytest.approx((student.sum() - base.sum()) / (ensemble.sum() - base.sum()))
    assert result["low"] < result["share"] < result["high"] and result["high"] - result["low"] < 0.1


def test_sampled_store_holds_unbiased_draws_at_t1_the_same_however_it_was_built(splits, tmp_path):
    from darkknowledge.losses import sampled_targets, topk_soft_target_cross_entropy

    # The frequencies of many draws approach the distribution: the estimate is unbiased.
    logits = torch.randn(1, 50).repeat(4000, 1)
    targets = sampled_targets(logits, 8, torch.Generator().manual_seed(0))
    frequencies = torch.zeros(4000, 50).scatter_add_(1, targets.indices, targets.logits.exp()).mean(0)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=4e-3, rtol=0)
    # Its loss is -sum (c / K) log q, the tail empty; at T != 1 an Objective refuses the store.
    z = torch.randn(4000, 50, requires_grad=True)
    loss = topk_soft_target_cross_entropy(z, targets, temperature=1.0)
    dense = torch.zeros(4000, 50).scatter_add_(1, targets.indices, targets.logits.exp())
    torch.testing.assert_close(loss, -(dense * torch.log_softmax(z, -1)).sum(-1).mean())
    loss.backward()
    torch.testing.assert_close(z.grad, (torch.softmax(z, -1) - dense).detach() / 4000, atol=1e-7, rtol=1e-4)

    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    one = SoftTargets.build(teacher, train, tmp_path / "a", tokenizer_sha256=sha, samples=4, batch_windows=3)
    other = SoftTargets.build(teacher, train, tmp_path / "b", tokenizer_sha256=sha, samples=4, batch_windows=50)
    assert one.layout == "sampled" and one.bytes_per_case == 4 * 4 + 8
    a, b = (s.targets(range(len(s)), 1.0)["topk_targets"] for s in (one, other))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)  # seeded per window, not chunk
    torch.testing.assert_close(a.logits.exp().sum(-1), torch.ones(a.logits.shape[:-1]), atol=2e-3, rtol=0)
    assert Objective(one, temperature=1.0).describe()["layout"] == "sampled"
    with pytest.raises(DarkKnowledgeError, match="temperature 1 only") as raised:
        Objective(one, temperature=2.0)
    assert "\n" not in str(raised.value)
    with pytest.raises(DarkKnowledgeError, match="not both"):
        SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, top_k=4, samples=4)


def test_sampled_store_with_a_head_keeps_the_head_exact_and_estimates_the_rest_without_bias(splits, tmp_path):
    from darkknowledge.losses import sampled_targets

    logits = torch.randn(1, 50).repeat(4000, 1)
    probs = torch.softmax(logits[0], -1)
    targets = sampled_targets(logits, 4, torch.Generator().manual_seed(0), head=3)
    # the 3 most probable tokens in every row at their exact probability; 3 + 4 columns, summing to 1
    head_p, head_ids = probs.topk(3)
    dense = torch.zeros(4000, 50).scatter_add_(1, targets.indices, targets.logits.exp())
    assert targets.indices.shape == (4000, 7)
    torch.testing.assert_close(dense[:, head_ids], head_p.expand(4000, 3), atol=1e-3, rtol=1e-3)  # float16
    torch.testing.assert_close(dense.sum(1), torch.ones(4000), atol=2e-3, rtol=0)
    # the draws from the rest: each weighs the rest's mass, so their mean is the rest of the distribution
    torch.testing.assert_close(dense.mean(0), probs, atol=3e-3, rtol=0)
    # a head holding all the mass: the draws weigh nothing, and the row is still the distribution
    peaked = torch.full((2, 50), -1e4)
    peaked[:, :2] = 0.0
    exact = sampled_targets(peaked, 4, torch.Generator().manual_seed(0), head=2)
    torch.testing.assert_close(exact.logits[:, :2].exp(), torch.full((2, 2), 0.5))

    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    plain = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, samples=4)
    headed = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, samples=4, head=2)
    assert headed.path != plain.path and headed.head == 2 and plain.head == 0
    assert headed.top_k == 6 and headed.bytes_per_case == 4 * 6 + 8
    rows = headed.targets(train.positions([0]), 1.0)["topk_targets"]
    with torch.no_grad():
        full = torch.softmax(teacher.eval()(train.batch(torch.tensor([0]))[0]).float(), -1)[0]
    stored = torch.zeros_like(full).scatter_add_(-1, rows.indices, rows.logits.exp())
    top2 = full.topk(2).indices
    torch.testing.assert_close(stored.gather(-1, top2), full.gather(-1, top2), atol=2e-3, rtol=2e-3)
    for bad in (dict(top_k=4, head=2), dict(samples=4, head=-1), dict(samples=4, head=10**6)):
        with pytest.raises(DarkKnowledgeError, match="head is for a sampled store") as raised:
            SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, **bad)
        assert "\n" not in str(raised.value)


def test_token_windows_are_a_transfer_set_that_fit_distils_from_a_token_store(splits, tmp_path):
    from darkknowledge.data.transfer import num_cases
    from darkknowledge.evaluation import evaluate
    from darkknowledge.training import Distillation, TrainConfig, fit
    tokenizer, train, val = splits.tokenizer, splits.windows["train"], splits.windows["validation"]
    assert num_cases(train) == train.num_tokens and len(train.classes) == tokenizer.vocab_size
    torch.manual_seed(0)
    teacher = build_language_model(TINY, tokenizer.vocab_size)
    store = SoftTargets.build(teacher, train, tmp_path / "store", tokenizer_sha256=tokenizer.sha256, top_k=4)
    assert len(store) == train.num_tokens and store.transfer_fingerprint == train.fingerprint()
    student = build_language_model(TINY, tokenizer.vocab_size)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adamw", schedule="cosine", warmup=0.1,
                         select_by="log_loss", progress=False)
    result = fit(student, train, val, config, Distillation(2.0, hard_weight=0.5, store=store),
                 run_dir=tmp_path / "run", log=lambda _: None)
    record = result.history[result.best_epoch - 1]
    assert {"train_soft", "train_hard", "val_perplexity", "val_tokens"} <= set(record)
    assert record["val_log_loss"] == min(r["val_log_loss"] for r in result.history)
    # per-token numbers of the loop's evaluation: those of evaluate_language_model, to the bit
    in_units = evaluate_language_model(student, val)
    assert record["val_log_loss"] == in_units["log_loss"] == evaluate(student, val).loss
    assert record["val_accuracy"] == in_units["accuracy"] and record["val_tokens"] == val.num_tokens
    assert record["val_perplexity"] == pytest.approx(np.exp(in_units["log_loss"]))
    # a store of other windows is refused, as a SoftTargets of another transfer set is
    with pytest.raises(DarkKnowledgeError, match="computed over another transfer set") as raised:
        fit(student, val, None, config, Distillation(2.0, store=store), log=lambda _: None)
    assert "\n" not in str(raised.value)


def test_a_sampled_store_distils_at_temperature_1_only_in_the_loop_too(splits, tmp_path):
    from darkknowledge.training import Distillation, TrainConfig, fit
    train = splits.windows["train"]
    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    store = SoftTargets.build(teacher, train, tmp_path / "store", tokenizer_sha256="t", samples=4)
    student = build_language_model(TINY, splits.tokenizer.vocab_size)
    config = TrainConfig(epochs=1, batch_size=8, optimizer="adamw", progress=False)
    with pytest.raises(DarkKnowledgeError, match="distils at temperature 1 only, got 2.0") as raised:
        fit(student, train, None, config, Distillation(2.0, store=store), log=lambda _: None)
    assert "\n" not in str(raised.value)
    fit(student, train, None, config, Distillation(1.0, store=store), log=lambda _: None)


def test_a_run_the_old_language_model_loop_stopped_resumes_in_fit_and_ends_as_an_uninterrupted_run(splits,
                                                                                                     tmp_path):
    from darkknowledge import checkpoint
    tokenizer, train, val = splits.tokenizer, splits.windows["train"], splits.windows["validation"]
    config = LMConfig(epochs=2, batch_size=8, lr=1e-2)
    whole, _ = train_language_model(TINY, tokenizer, train, val, config, run_dir=tmp_path / "whole", log=print)

    def stop_after_epoch_1(line):
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    run = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        train_language_model(TINY, tokenizer, train, val, config, run_dir=run, log=stop_after_epoch_1)
    # Rewrite the folder as the language models' own loop left it after epoch 1: its key, its history, its best
    # weights in best.safetensors, no model.json.
    state = json.loads((run / "state.json").read_text())
    best_weights = checkpoint.read_tensors(run / "model.safetensors", json.loads(
        (run / "model.json").read_text())["weights_sha256"], "model")
    record = state["history"][0]
    state.update(run_key=language_model.run_key(TINY, tokenizer.sha256, train, config, Objective()),
                 history=[{"epoch": 1, "train_loss": record["train_loss"], "seconds": 0.5,
                           "tokens_per_second": 1000.0, "val_log_loss": record["val_log_loss"],
                           "val_perplexity": record["val_perplexity"], "val_accuracy": record["val_accuracy"],
                           "val_tokens": record["val_tokens"]}],
                 best_validation={"log_loss": record["val_log_loss"], "epoch": 1,
                                  "sha256": checkpoint.write_tensors(run / "best.safetensors", best_weights)})
    for name in ("best", "seconds", "done"):
        state.pop(name)
    (run / "state.json").write_text(json.dumps(state))
    for name in ("model.json", "model.safetensors", "metrics.jsonl"):
        (run / name).unlink()

    lines = []
    resumed, meta = train_language_model(TINY, tokenizer, train, val, config, run_dir=run, log=lines.append)
    assert any(line.startswith("resuming") and "after epoch 1" in line for line in lines)
    assert [r["epoch"] for r in meta["history"]] == [1, 2] and not (run / "best.safetensors").exists()
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)


def test_a_language_model_gets_the_loops_accumulation_and_precision(splits, tmp_path):
    from darkknowledge.training import Distillation, TrainConfig, fit
    tokenizer, train = splits.tokenizer, splits.windows["train"]
    torch.manual_seed(0)
    store = SoftTargets.build(build_language_model(TINY, tokenizer.vocab_size), train, tmp_path / "store",
                              tokenizer_sha256=tokenizer.sha256)
    weights = {}
    for name, options in [("whole", {}), ("accumulated", {"grad_accumulation": 2}), ("bf16", {"bf16": True})]:
        torch.manual_seed(1)
        student = build_language_model(TINY, tokenizer.vocab_size)
        config = TrainConfig(epochs=1, batch_size=8, lr=0.1, progress=False, **options)  # SGD: no rounding blown up
        result = fit(student, train, None, config, Distillation(2.0, hard_weight=0.5, store=store), device="cpu",
                     log=lambda _: None)
        assert np.isfinite(result.history[0]["train_loss"])
        weights[name] = torch.cat([p.detach().flatten() for p in student.parameters()])
    # two micro-batches make the step one batch makes (up to float rounding)
    torch.testing.assert_close(weights["accumulated"], weights["whole"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(weights["bf16"], weights["whole"])


def _damage(field, value):
    def damage(header: dict) -> bytes:
        header[field] = value
        return json.dumps(header).encode()
    return damage


def _drop(field):
    def damage(header: dict) -> bytes:
        del header[field]
        return json.dumps(header).encode()
    return damage


def _dtype(header: dict) -> bytes:
    header["arrays"]["topk_logits"][0] = "<f9"
    return json.dumps(header).encode()


HEADER_DAMAGES = {"not JSON": lambda header: b"{not json", "a list": lambda header: b"[]",
                  "no checksums": _drop("checksums"), "dtype <f9": _dtype, "top_k changed": _damage("top_k", 2),
                  "vocab_size": _damage("vocab_size", 999), "tokenizer": _damage("tokenizer", "0" * 64),
                  "windows_fingerprint": _damage("windows_fingerprint", "f" * 64), "layout": _damage("layout", "dense"),
                  "key": _damage("key", "0" * 64)}


@pytest.fixture
def built_store(splits, tmp_path):
    torch.manual_seed(0)
    teacher = build_language_model(TINY, splits.tokenizer.vocab_size)
    kwargs = dict(tokenizer_sha256=splits.tokenizer.sha256, top_k=4, batch_windows=50)
    store = SoftTargets.build(teacher, splits.windows["train"], tmp_path / "s", **kwargs)
    return teacher, kwargs, store, store.targets(range(len(store)), 1.0)["topk_targets"]


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGES))
def test_a_damaged_store_header_is_refused_by_open_and_rebuilt_by_build(splits, built_store, damage):
    teacher, kwargs, store, reference = built_store
    train = splits.windows["train"]
    header_path = store.path / "targets.json"
    header_path.write_bytes(HEADER_DAMAGES[damage](json.loads(header_path.read_text())))
    with pytest.raises(DarkKnowledgeError, match="targets.json") as raised:
        SoftTargets.open(store.path, windows=train, tokenizer_sha256=splits.tokenizer.sha256,
                         vocab_size=splits.tokenizer.vocab_size)
    assert "\n" not in str(raised.value) and "vocabularies differ" not in str(raised.value)
    lines, chunks = [], []
    rebuilt = SoftTargets.build(teacher, train, store.path.parent, log=lines.append,
                                on_chunk=lambda done, total: chunks.append(done), **kwargs)
    assert any("rebuilding it" in line for line in lines) and chunks[0] == 50 * 16  # from the first window
    targets = rebuilt.targets(range(len(rebuilt)), 1.0)["topk_targets"]
    assert torch.equal(targets.indices, reference.indices) and torch.equal(targets.logits, reference.logits)
    assert SoftTargets.open(store.path).top_k == 4


def test_a_partial_store_whose_recorded_rows_are_zeros_is_rebuilt_not_finished(splits, built_store):
    teacher, kwargs, store, reference = built_store
    train = splits.windows["train"]
    header = json.loads((store.path / "targets.json").read_text())
    header["complete"] = False
    del header["checksums"]
    (store.path / "targets.json").write_text(json.dumps(header))
    for name in header["arrays"]:
        path = store.path / f"{name}.bin"
        path.write_bytes(bytes(path.stat().st_size))
    lines = []
    rebuilt = SoftTargets.build(teacher, train, store.path.parent, log=lines.append, **kwargs)
    assert any("hold no distributions; rebuilding it" in line for line in lines), lines
    assert torch.equal(rebuilt.targets(range(len(rebuilt)), 1.0)["topk_targets"].logits, reference.logits)


def test_a_garbage_rank_progress_file_beside_a_partial_store_is_ignored(splits, built_store):
    teacher, kwargs, store, reference = built_store
    train = splits.windows["train"]
    header = json.loads((store.path / "targets.json").read_text())
    header.update(complete=False, windows_done=[], positions_done=0)
    del header["checksums"]
    (store.path / "targets.json").write_text(json.dumps(header))
    for garbage in (b"\xff garbage", b"[]", b'{"windows_done": [[0, 100000]]}'):
        (store.path / "targets.rank0.json").write_bytes(garbage)
        rebuilt = SoftTargets.build(teacher, train, store.path.parent, log=lambda line: None, **kwargs)
        assert torch.equal(rebuilt.targets(range(len(rebuilt)), 1.0)["topk_targets"].logits, reference.logits)
        header["complete"] = False
        (store.path / "targets.json").write_text(json.dumps(header))


def test_a_tiny_sampling_temperature_samples_greedily_instead_of_failing(splits):
    torch.manual_seed(0)
    model = build_language_model(TINY, splits.tokenizer.vocab_size)
    greedy = generate(model, splits.tokenizer, "the", tokens=12, top_k=1)
    for seed in (0, 1):
        assert generate(model, splits.tokenizer, "the", tokens=12, temperature=1e-300, seed=seed) == greedy
