"""The compact codec: a sampled row packed into bytes and back keeps its ids exactly, its head probabilities within
the quantisation step, its draws' weights, and so the estimate's lack of bias."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.losses import TopKTargets, sampled_targets
from darkknowledge.store_codec import STEP, CompactCodec


def dense(t, classes):
    return torch.zeros(len(t.logits), classes).scatter_add_(1, t.indices, t.logits.exp())


@pytest.mark.parametrize("quant", ["log8", "e4m3"])
def test_a_decoded_row_is_the_sampled_row_up_to_the_heads_quantisation(quant):
    torch.manual_seed(0)
    vocab, head, samples = 500, 8, 12
    logits = torch.randn(300, vocab) * 3
    t = sampled_targets(logits, samples, torch.Generator().manual_seed(1), head)
    codec = CompactCodec(vocab, head, samples, quant)
    rows = codec.encode(t)
    assert rows.dtype == np.uint8 and rows.shape == (300, codec.bytes_per_row)
    assert codec.bytes_per_row == math.ceil(20 * 9 / 8) + 8 + 2  # 9-bit ids, a byte a head probability, P
    back = codec.decode(rows)
    # the same convention: h + K distinct ids, finite log-probabilities summing to one, an empty tail
    assert back.logits.shape == back.indices.shape == (300, head + samples)
    assert all(len(set(row.tolist())) == head + samples for row in back.indices)
    assert torch.isfinite(back.logits).all() and torch.isneginf(back.tail_logsumexp).all()
    assert (back.tail_mean == 0).all()
    torch.testing.assert_close(back.logits.exp().sum(-1), torch.ones(300), atol=1e-5, rtol=0)
    # ids exactly: the head in order, the draws with their frequencies up to P's 16 bits
    assert torch.equal(back.indices[:, :head], t.indices[:, :head])
    a, b = dense(t, vocab), dense(back, vocab)
    tail = torch.ones(300, vocab, dtype=torch.bool).scatter_(1, t.indices[:, :head], False)
    assert torch.equal(a[tail] > 0, b[tail] > 0)
    torch.testing.assert_close(b[tail], a[tail], atol=2e-5, rtol=0)
    # the head's log-ratios to the row's maximum within half a step: 1/32 nat (log8); e4m3 within 1/16 of the
    # log-ratio (3 mantissa bits) or 2^-10 nat (its subnormals, below 2^-6)
    ratio = lambda x: x[:, :head].log() - x[:, :1].log()
    true = ratio(t.logits.exp())
    gap = (ratio(back.logits.exp()) - true).abs()
    limit = STEP / 2 if quant == "log8" else torch.maximum(true.abs() / 16, torch.tensor(2.0 ** -10))
    limit = limit + 1e-4  # float32 round trips
    assert (gap <= limit).all()


@settings(max_examples=30, deadline=None)
@given(vocab=st.sampled_from([2, 4096, 4097, 131072]), head=st.integers(0, 5), samples=st.integers(1, 20),
       n=st.integers(1, 9), seed=st.integers(0, 2 ** 31))
def test_ids_pack_and_unpack_exactly_at_any_vocabulary(vocab, head, samples, n, seed):
    head = min(head, vocab - 1)
    samples = min(samples, vocab - head)
    codec = CompactCodec(vocab, head, samples)
    assert codec.id_bits == max(1, math.ceil(math.log2(vocab)))  # 1, 12, 13, 17
    rng = np.random.default_rng(seed)
    head_ids = np.stack([rng.permutation(vocab)[:head] for _ in range(n)]) if head else np.zeros((n, 0), int)
    picks = rng.integers(0, vocab, (n, samples))
    head_p = np.sort(rng.random((n, head)), -1)[:, ::-1] + 1e-3
    mass = rng.random(n)
    rows = codec.pack(head_p, head_ids, picks, mass)
    assert rows.shape == (n, codec.bytes_per_row) and rows.nbytes == n * codec.bytes_per_row
    _, ids, drawn, p = codec.unpack(rows)
    assert np.array_equal(ids.numpy(), head_ids) and np.array_equal(drawn.numpy(), picks)
    assert np.allclose(p.numpy(), mass, atol=0.5 / 65535 + 1e-7)


def test_the_decoded_estimate_stays_unbiased():
    torch.manual_seed(0)
    vocab, head, samples = 60, 4, 6
    logits = torch.randn(1, vocab).repeat(4000, 1) * 2
    probs = torch.softmax(logits[0], -1)
    codec = CompactCodec(vocab, head, samples)
    mean = torch.zeros(vocab)
    for seed in range(5):  # 20,000 rows drawn with five seeds
        t = sampled_targets(logits, samples, torch.Generator().manual_seed(seed), head)
        mean += dense(codec.decode(codec.encode(t)), vocab).mean(0) / 5
    # the tail's frequencies average to its probabilities (std of the mean here < 1e-3), the head within a step
    torch.testing.assert_close(mean, probs, atol=2.5e-3, rtol=STEP)


def test_rows_not_written_by_the_codec_are_told_apart_and_bad_settings_refused():
    codec = CompactCodec(4096, 16, 16)
    t = sampled_targets(torch.randn(5, 4096) * 3, 16, torch.Generator().manual_seed(0), 16)
    rows = codec.encode(t)
    assert codec.valid(rows).all() and not codec.valid(np.zeros_like(rows)).any()
    assert not CompactCodec(4096, 0, 16).valid(np.zeros((2, CompactCodec(4096, 0, 16).bytes_per_row), np.uint8)).any()
    assert [CompactCodec(4096, h, k).bytes_per_row for h, k in ((16, 16), (12, 16), (6, 10))] == [66, 56, 32]
    for bad in ({"quant": "int4"}, {"head": -1}, {"samples": 0}, {"head": 4090}):
        with pytest.raises(DarkKnowledgeError) as raised:
            CompactCodec(**{"vocab_size": 4096, "head": 16, "samples": 16, **bad})
        assert "\n" not in str(raised.value)
    cut = TopKTargets(t.logits[:, :24], t.indices[:, :24], t.tail_logsumexp, t.tail_mean)  # draws missing
    with pytest.raises(DarkKnowledgeError, match="samples=8"):
        CompactCodec(4096, 16, 8).encode(cut)
    with pytest.raises(DarkKnowledgeError, match=r"rows \[n, 32\]"):
        codec.encode(cut)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ["log8", "e4m3"])
@pytest.mark.parametrize("vocab", [2, 4096, 4097, 131072])
@pytest.mark.parametrize("head", [0, 1, 12])
def test_rows_decode_as_a_tensor_on_their_device_to_the_same_bits_as_the_numpy_rows(vocab, head, quant, device):
    head = min(head, vocab - 1)
    samples = min(21, vocab - head)
    codec = CompactCodec(vocab, head, samples, quant)
    rng = np.random.default_rng(vocab + head)
    n = 300
    head_ids = np.stack([rng.permutation(vocab)[:head] for _ in range(n)]) if head else np.zeros((n, 0), int)
    head_p = np.sort(rng.random((n, head)), -1)[:, ::-1] / (2 * max(head, 1))
    rows = codec.pack(head_p, head_ids, rng.integers(0, vocab, (n, samples)), 1 - head_p.sum(-1))
    from_numpy = codec.decode(rows)
    on_device = codec.decode(torch.from_numpy(rows).to(device))
    for name in ("logits", "indices", "tail_logsumexp", "tail_mean"):
        value = getattr(on_device, name)
        assert value.device.type == device
        assert torch.equal(value.cpu(), getattr(from_numpy, name)), name
    assert np.array_equal(codec.valid(torch.from_numpy(rows).to(device)), codec.valid(rows))
    with pytest.raises(DarkKnowledgeError, match="uint8"):
        codec.decode(torch.from_numpy(rows).long())
