"""The compact layout inside the one store: a token store's sampled rows packed by the codec, built chunk by chunk
(resumable), read by row into the targets a sampled store of the same settings holds, refused when damaged; and
the one-file store of images in the same layout."""

import json

import numpy as np
import pytest
import torch

from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.store_codec import STEP, CompactCodec
from darkknowledge.transformer import build_language_model
from test_language_models import TINY, splits  # noqa: F401  (the tiny corpus fixture)

SETTINGS = dict(samples=4, head=3)


@pytest.fixture
def teacher(splits):  # noqa: F811
    torch.manual_seed(0)
    return build_language_model(TINY, splits.tokenizer.vocab_size)


def test_a_compact_store_holds_the_sampled_stores_draws_in_fewer_bytes(splits, teacher, tmp_path):  # noqa: F811
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    sampled = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, **SETTINGS)
    compact = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, compact="log8", **SETTINGS)
    e4m3 = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, compact="e4m3", **SETTINGS)
    assert len({sampled.key, compact.key, e4m3.key}) == 3 and compact.layout == "compact"
    codec = CompactCodec(train.vocab_size, 3, 4, "log8")
    assert compact.bytes_per_case == codec.bytes_per_row < sampled.bytes_per_case == 4 * 7 + 8
    assert (compact.top_k, compact.head, compact.describe()["quant"]) == (7, 3, "log8")
    assert "quant" not in sampled.describe()  # the other layouts describe themselves as before
    rows = np.arange(len(sampled))
    a = sampled.targets(rows, 1.0)["topk_targets"]
    for store in (compact, e4m3):
        b = store.targets(rows, 1.0)["topk_targets"]
        # the same draws (seeded as the sampled store's), so the same ids; probabilities up to the head's 8 bits
        # (1/32 nat of log8, 1/16 of the log-ratio for e4m3) and the float16 of the sampled store's logits
        assert torch.equal(a.indices, b.indices)
        assert torch.isneginf(b.tail_logsumexp).all() and torch.isfinite(b.logits).all()
        torch.testing.assert_close(b.logits.exp(), a.logits.exp(), atol=0.02, rtol=STEP)
    # a batch decodes its rows only, the same rows however they are asked for
    some = torch.tensor([[5, 900], [17, 3]])
    c = compact.topk(some)
    assert c.logits.shape == (4, 1, 7)
    assert torch.equal(c.indices[:, 0], compact.targets(some.flatten(), 1.0)["topk_targets"].indices)
    assert SoftTargets.open(compact.path).key == compact.key  # checksummed, its header fits the schema
    with pytest.raises(DarkKnowledgeError, match="temperature 1 only"):
        compact.targets(rows[:2], 2.0)
    for bad in (dict(compact="int4", samples=4), dict(compact="log8", top_k=4), dict(compact="log8")):
        with pytest.raises(DarkKnowledgeError, match="compact is a quantisation") as raised:
            SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, **bad)
        assert "\n" not in str(raised.value)


def test_a_killed_compact_build_resumes_to_the_uninterrupted_store(splits, teacher, tmp_path):  # noqa: F811
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    kwargs = dict(tokenizer_sha256=sha, compact="log8", **SETTINGS)

    def kill_after_two_chunks(done, total):
        if done >= 2 * 2 * 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SoftTargets.build(teacher, train, tmp_path / "s", on_chunk=kill_after_two_chunks, batch_windows=2, **kwargs)
    chunks = []
    resumed = SoftTargets.build(teacher, train, tmp_path / "s", on_chunk=lambda d, t: chunks.append(d),
                                batch_windows=50, **kwargs)
    assert chunks[0] == (4 + 50) * 16  # it went on from where the kill left it
    fresh = SoftTargets.build(teacher, train, tmp_path / "fresh", batch_windows=7, **kwargs)
    assert (resumed.path / "rows.bin").read_bytes() == (fresh.path / "rows.bin").read_bytes()
    assert resumed.header["checksums"] == fresh.header["checksums"]

    # a partial store whose recorded rows are zeros is rebuilt, not finished
    header = json.loads((resumed.path / "targets.json").read_text())
    header["complete"] = False
    del header["checksums"]
    (resumed.path / "targets.json").write_text(json.dumps(header))
    (resumed.path / "rows.bin").write_bytes(bytes((resumed.path / "rows.bin").stat().st_size))
    lines = []
    rebuilt = SoftTargets.build(teacher, train, tmp_path / "s", log=lines.append, **kwargs)
    assert any("hold no compact rows; rebuilding it" in line for line in lines), lines
    assert (rebuilt.path / "rows.bin").read_bytes() == (fresh.path / "rows.bin").read_bytes()


@pytest.mark.parametrize("field, value", [("quant", "int4"), ("head", 2), ("quant", None)])
def test_a_damaged_compact_header_is_refused_in_one_line_and_rebuilt(splits, teacher, tmp_path,  # noqa: F811
                                                                      field, value):
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    kwargs = dict(tokenizer_sha256=sha, compact="log8", **SETTINGS)
    store = SoftTargets.build(teacher, train, tmp_path, **kwargs)
    header_path = store.path / "targets.json"
    header = json.loads(header_path.read_text())
    header["key_parts"][field] = value  # and the key made to match, so only the arrays can tell
    from darkknowledge.store_files import key_of
    header["key"] = key_of(header["key_parts"])
    header_path.write_text(json.dumps(header))
    with pytest.raises(DarkKnowledgeError, match="targets.json") as raised:
        SoftTargets.open(store.path)
    assert "\n" not in str(raised.value)
    lines = []
    rebuilt = SoftTargets.build(teacher, train, tmp_path, log=lines.append, **kwargs)
    assert any("rebuilding it" in line for line in lines) and SoftTargets.open(rebuilt.path).layout == "compact"


def test_the_one_file_store_of_images_has_the_compact_layout_too(tmp_path):
    from darkknowledge.data.transfer import ArrayTransferSet
    torch.manual_seed(0)
    x, y = torch.randn(300, 12), torch.randint(0, 40, (300,))
    data = ArrayTransferSet(x, y, classes=[str(c) for c in range(40)], name="random")
    teacher = torch.nn.Linear(12, 40)
    sampled = SoftTargets.compute(teacher, data, tmp_path, samples=6, head=4)
    compact = SoftTargets.compute(teacher, data, tmp_path, samples=6, head=4, compact="log8")
    # 10 ids of 6 bits in 8 bytes, a byte a head probability, 2 of P
    assert compact.layout == "compact" and compact.bytes_per_case == CompactCodec(40, 4, 6).bytes_per_row == 8 + 4 + 2
    reopened = SoftTargets.open(compact.path)
    assert reopened.key == compact.key and reopened.describe()["quant"] == "log8"
    rows = torch.arange(300)
    a, b = sampled.topk(rows), reopened.topk(rows)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.logits.exp(), a.logits.exp(), atol=1e-3, rtol=STEP)
    assert SoftTargets.compute(teacher, data, tmp_path, samples=6, head=4, compact="log8").key == compact.key
    # a header whose rows are not the codec's width is refused in one line
    header = json.loads(compact.path.read_text())
    header["arrays"]["rows"]["shape"][-1] = 17
    compact.path.write_text(json.dumps(header))
    with pytest.raises(DarkKnowledgeError) as raised:
        SoftTargets.open(compact.path)
    assert "\n" not in str(raised.value)


def test_a_resident_compact_store_stays_packed_and_decodes_the_stores_targets(splits, teacher, tmp_path):  # noqa: F811
    from darkknowledge import feeding
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    compact = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, compact="log8", **SETTINGS)
    cpu = torch.device("cpu")
    resident = feeding.ResidentTargets(compact, 1.0, cpu, rows_per_read=7)
    assert resident.packed.dtype == torch.uint8 and resident.packed.shape == (len(compact), compact.bytes_per_case)
    rows = torch.tensor([5, 0, len(compact) - 1, 5])
    got, want = resident.targets(rows)["topk_targets"], compact.targets(rows, 1.0)["topk_targets"]
    for name in ("logits", "indices", "tail_logsumexp", "tail_mean"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # made resident when its packed bytes fit, though its decoded targets would not
    packed = len(compact) * compact.bytes_per_case / feeding.RESIDENT_SHARE
    assert feeding.ResidentTargets.of(compact, 1.0, cpu, int(packed)) is not None
    assert feeding.ResidentTargets.of(compact, 1.0, cpu, int(packed) - 8) is None
    with pytest.raises(DarkKnowledgeError, match="temperature 1 only"):
        feeding.ResidentTargets.of(compact, 2.0, cpu, 1 << 30)


@pytest.mark.parametrize("free", [0, 1 << 30])
def test_fit_fed_ahead_from_a_compact_store_trains_the_model_it_trains_as_read(splits, teacher, tmp_path,  # noqa: F811
                                                                               monkeypatch, free):
    from darkknowledge import feeding
    from darkknowledge.training import Distillation, TrainConfig, fit
    train, sha = splits.windows["train"], splits.tokenizer.sha256
    store = SoftTargets.build(teacher, train, tmp_path, tokenizer_sha256=sha, compact="log8", **SETTINGS)
    models = []
    for ahead in (False, True):
        if ahead:  # fit's CUDA feeding path on the CPU: resident (packed rows decoded per batch) or read ahead
            monkeypatch.setattr(feeding, "AHEAD_DEVICES", ("cuda", "cpu"))
            monkeypatch.setattr(feeding, "free_bytes", lambda device: free)
        torch.manual_seed(1)
        student = build_language_model(TINY, train.vocab_size)
        fit(student, train, None, TrainConfig(epochs=1, batch_size=8, lr=0.1, progress=False),
            Distillation(1.0, store=store, hard_weight=0.5), device="cpu", log=lambda _: None)
        models.append(student.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
