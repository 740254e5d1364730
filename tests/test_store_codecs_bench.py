"""benchmarks/store_codecs.py: the codec comparison of issue 31 runs end to end on a tiny model and a tiny store,
and its measures mean what they say (dense against itself is 0, top-k's KL falls as k grows, a sampled row's
reverse KL is infinite, bytes are counted from what is stored)."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.data.text import TokenWindows
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.losses import topk_targets
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.transformer import build_language_model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import store_codecs  # noqa: E402

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
FIELDS = {"name", "family", "settings", "bytes_per_token", "times_smaller_than_dense", "encode_tokens_per_s",
          "decode_tokens_per_s", "kl_rebuilt_to_dense", "kl_dense_to_rebuilt", "ce_abs_error", "ce_bias"}


def peaked_logits(n=256, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * 3).half()


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    torch.manual_seed(0)
    vocab, context = 300, 8
    ids = np.random.default_rng(0).integers(0, vocab, 24 * context + 1)
    windows = TokenWindows(ids, context, "train", vocab)
    teacher = build_language_model(f"gpt:layers=1,dim=16,heads=2,context={context}", vocab)
    return SoftTargets.build(teacher, windows, tmp_path_factory.mktemp("stores"), tokenizer_sha256="test",
                             log=lambda _: None), windows


@pytest.mark.skipif(not (DATA / "shakespeare").is_dir(), reason="Shakespeare corpus not found; set DARKKNOWLEDGE_DATA")
def test_quick_smoke_run_writes_every_field(tmp_path):
    result = store_codecs.main(["--quick", "--out", str(tmp_path), "--data-dir", str(DATA)])
    written = json.loads((tmp_path / "codecs.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["source"]["smoke_test"] is True and written["command"].startswith("python benchmarks/")
    names = {r["name"] for r in written["codecs"]}
    assert {"dense float16", "topk k=8", "topk k=32", "sampled h=16 K=16", "sampled h=8 K=24",
            "sampled h=0 K=32"} <= names
    assert any(s["name"] == "distillkit" and "--distillkit" in s["reason"] for s in written["skipped"])
    for row in written["codecs"]:
        assert FIELDS <= set(row)
        assert row["encode_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["kl_rebuilt_to_dense"] >= 0 and row["ce_abs_error"] >= 0
    dense = next(r for r in written["codecs"] if r["name"] == "dense float16")
    assert dense["kl_rebuilt_to_dense"] == 0 and dense["kl_dense_to_rebuilt"] == 0 and dense["ce_abs_error"] == 0
    assert dense["bytes_per_token"] == 2 * written["vocab_size"]
    # today's rows: 4 (h + K) + 8 bytes, as the folder store's arrays take
    assert next(r for r in written["codecs"] if r["name"] == "sampled h=16 K=16")["bytes_per_token"] == 136
    assert (tmp_path / "codecs.md").read_text().count("\n") == len(written["codecs"]) + len(written["skipped"]) + 2
    assert (tmp_path / "codecs.png").read_bytes()[:4] == b"\x89PNG"


def test_dense_against_itself_is_zero_and_topk_kl_falls_as_k_grows():
    logits = peaked_logits()
    codecs = [store_codecs.dense_codec(), *[store_codecs.topk_codec(k, 512) for k in (1, 4, 16, 64, 256)]]
    rows = store_codecs.measure(codecs, logits, None, context=8)
    assert rows[0]["kl_rebuilt_to_dense"] == 0 and rows[0]["kl_dense_to_rebuilt"] == 0
    forward = [r["kl_rebuilt_to_dense"] for r in rows[1:]]
    reverse = [r["kl_dense_to_rebuilt"] for r in rows[1:]]
    assert all(a > b for a, b in zip(forward, forward[1:])) and all(a > b for a, b in zip(reverse, reverse[1:]))
    assert [r["bytes_per_token"] for r in rows[1:]] == [4 * k + 8 for k in (1, 4, 16, 64, 256)]
    assert rows[0]["ce_abs_error"] is None  # no weaker model given


def test_a_topk_rebuild_keeps_the_tail_mass_spread_evenly():
    logits = peaked_logits(n=4, vocab=64).float()
    t = topk_targets(logits, 8)
    log_r = store_codecs.rebuild_topk(t, 64)
    p = logits.softmax(-1)
    assert torch.allclose(log_r.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(log_r.exp().gather(-1, t.indices), p.gather(-1, t.indices), atol=1e-6)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, t.indices, False)
    tail_r = log_r.exp()[tail].reshape(4, 56)
    assert torch.allclose(tail_r, tail_r[:, :1].expand(-1, 56))  # even
    assert torch.allclose(tail_r.sum(-1), p[tail].reshape(4, 56).sum(-1), atol=1e-6)  # the right mass


def test_sampled_rows_have_no_reverse_kl_and_a_cross_entropy_without_bias():
    logits = peaked_logits(n=512, vocab=128, seed=1)
    weaker = peaked_logits(n=512, vocab=128, seed=2)
    rows = store_codecs.measure([store_codecs.sampled_codec(0, 32, 128, 8), store_codecs.topk_codec(8, 128)],
                                logits, weaker, context=8)
    sampled, topk = rows
    assert sampled["kl_dense_to_rebuilt"] is None and sampled["kl_rebuilt_to_dense"] > 0
    assert topk["kl_dense_to_rebuilt"] is not None and math.isfinite(topk["kl_dense_to_rebuilt"])
    # the draws' cross-entropy is unbiased: it errs both ways, its mean error small beside its spread
    assert abs(sampled["ce_bias"]) < 0.25 * sampled["ce_abs_error"]


def test_a_dense_store_is_sampled_by_whole_windows(dense_store, tmp_path):
    store, windows = dense_store
    result = store_codecs.main(["--store", str(store.path), "--positions", "40", "--out", str(tmp_path)])
    assert result["positions"] == 40 and result["source"]["key"] == store.key and result["vocab_size"] == 300
    assert all(r["ce_abs_error"] is None for r in result["codecs"])
    chosen = store_codecs.sample_windows(len(windows), 40, 8, 0)
    rows, _, again = store_codecs.store_rows(str(store.path), 40, 0)
    assert np.array_equal(chosen, again) and len(chosen) == 5
    assert torch.equal(rows, store.member_logits(windows.positions(torch.from_numpy(chosen)))[:, 0].half())


@pytest.mark.skipif(not (DATA / "shakespeare").is_dir(), reason="Shakespeare corpus not found; set DARKKNOWLEDGE_DATA")
def test_runs_of_an_experiment_give_the_rows_their_dense_store_would_hold(tmp_path):
    from darkknowledge import checkpoint
    from darkknowledge.data.text import TextTokenizer, load_corpus, tokenise_corpus
    from darkknowledge.language_model import LMConfig, train_language_model
    corpus = load_corpus(DATA / "shakespeare")
    names = sorted(corpus.documents)
    documents = {"train": names[:1], "validation": names[1:2], "test": names[2:3]}
    tokenizer = TextTokenizer.train([corpus.documents[names[0]][:20_000]], "char")
    splits = tokenise_corpus(corpus, documents, tokenizer, 8)
    out = tmp_path / "lm"
    out.mkdir()
    tokenizer.save(out / "tokenizer.json")
    checkpoint.write_json(out / "data.json", {**splits.describe(), "tokens": {"train": 800}})
    train = type(splits.windows["train"])(splits.windows["train"].ids.numpy()[:801], 8, "train", tokenizer.vocab_size)
    train_language_model("gpt:layers=1,dim=16,heads=2,context=8", tokenizer, train, splits.windows["validation"],
                         LMConfig(epochs=1), run_dir=out / "teacher", log=lambda _: None)
    result = store_codecs.main(["--teacher", str(out / "teacher"), "--weaker", str(out / "teacher"),
                                "--experiment", str(out), "--positions", "32", "--data-dir", str(DATA),
                                "--out", str(tmp_path / "codecs")])
    assert result["source"]["windows_fingerprint"] == train.fingerprint() and result["positions"] == 32
    assert all(r["ce_abs_error"] is not None for r in result["codecs"])
    with pytest.raises(DarkKnowledgeError, match="no data.json and tokenizer.json"):
        store_codecs.main(["--teacher", str(out / "teacher"), "--experiment", str(tmp_path), "--out", str(tmp_path)])


def test_a_store_that_is_not_dense_is_refused_in_one_line(dense_store, tmp_path):
    store, windows = dense_store
    topk = SoftTargets.build(store, windows, store.path.parent, tokenizer_sha256="test", top_k=4,
                             log=lambda _: None)
    with pytest.raises(DarkKnowledgeError, match="give a dense token store") as error:
        store_codecs.main(["--store", str(topk.path), "--out", str(tmp_path)])
    assert "\n" not in str(error.value)
    with pytest.raises(DarkKnowledgeError, match="no distillkit/compression folder"):
        store_codecs.distillkit_codecs(str(tmp_path), 300)


DISTILLKIT = os.environ.get("DISTILLKIT")  # a checkout of github.com/arcee-ai/DistillKit


@pytest.mark.skipif(not DISTILLKIT, reason="set DISTILLKIT to a DistillKit checkout to run its codec")
def test_distillkit_runs_beside_ours_and_its_rows_become_a_topk_store(dense_store, tmp_path):
    store, windows = dense_store
    result = store_codecs.main(["--store", str(store.path), "--positions", "40", "--out", str(tmp_path),
                                "--distillkit", DISTILLKIT])
    theirs = {r["name"]: r for r in result["codecs"] if r["family"] == "distillkit"}
    assert set(theirs) == {f"distillkit {name}" for name in store_codecs.DISTILLKIT}
    # at V = 300 (9-bit ids): a bfloat16, three float32 terms and 50 ids of 9 bits
    assert theirs["distillkit budget"]["bytes_per_token"] == 2 + 12 + math.ceil(50 * 9 / 8)
    assert all(r["kl_dense_to_rebuilt"] is not None for r in theirs.values())
    assert all(r["kl_rebuilt_to_dense_zero_tail"] >= 0 for r in theirs.values())
    assert result["distillkit"]["path"] == str(Path(DISTILLKIT).resolve())
    if (Path(DISTILLKIT) / ".git").exists():  # a clone: its commit is recorded
        assert len(result["distillkit"]["commit"]) == 40

    made = store_codecs.distillkit_store(str(store.path), str(tmp_path / "stores"), DISTILLKIT, "budget")
    assert made.layout == "topk" and made.top_k == 50 and made.transfer_fingerprint == windows.fingerprint()
    codec = next(c for c in store_codecs.distillkit_codecs(DISTILLKIT, 300)[0] if c.name == "distillkit budget")
    rows = windows.positions(torch.arange(3)).reshape(-1)
    expected = codec.rebuild(codec.decode(codec.encode(store.member_logits(rows)[:, 0], 0)))
    t = made.topk(rows)
    stored = store_codecs.rebuild_topk(type(t)(*(getattr(t, f)[:, 0] for f in
                                                 ("logits", "indices", "tail_logsumexp", "tail_mean"))), 300)
    assert torch.allclose(stored.exp(), expected.exp(), atol=1e-4)
