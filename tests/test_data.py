import gzip
import hashlib
import os
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from darkknowledge.data import (DEFAULT_VALIDATION_SIZE, DatasetSplits, LabeledImages, available_datasets,
                                load_dataset, resolve_data_dir, validation_split)
from darkknowledge.data import idx, sources
from darkknowledge.data.digits import load_digits_splits
from darkknowledge.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, sha256_file
from darkknowledge.data.sources import SOURCES
from darkknowledge.errors import DarkKnowledgeError

REPO = Path(__file__).resolve().parents[1]
MNIST_TRAIN_PER_CLASS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_PER_CLASS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    env = os.environ.get("DARKKNOWLEDGE_DATA")
    # CI gives a path relative to the repository root; a dev shell without it uses the shared folder beside the repo.
    return (REPO / env).resolve() if env else (REPO.parent / "shared" / "data").resolve()


def require(data_dir: Path, name: str) -> Path:
    folder = data_dir / name
    missing = [f.name for f in SOURCES[name].files if not (folder / f.name).is_file()]
    if missing:
        pytest.skip(f"{name} files {missing} not in {folder}; set DARKKNOWLEDGE_DATA to the folder holding {name}/")
    return folder


@pytest.fixture(scope="module")
def mnist(data_dir) -> DatasetSplits:
    require(data_dir, "mnist")
    return load_dataset("mnist", data_dir)


def write_idx(path: Path, magic: int, array: np.ndarray, payload: bytes | None = None) -> Path:
    """A gzip-compressed IDX file; ``payload`` overrides the bytes after the header to make broken files."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + (array.astype(np.uint8).tobytes() if payload is None else payload)))
    return path


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def synthetic(n: int = 1000, name: str = "syn/train") -> LabeledImages:
    """Image i stores i in its first two pixels, so a split's cases can be traced back to their indices."""
    i = torch.arange(n)
    images = torch.zeros(n, 4, 4, dtype=torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = (i // 256).to(torch.uint8), (i % 256).to(torch.uint8)
    return LabeledImages(images, i % 3, ("a", "b", "c"), name)


def indices_of(data: LabeledImages) -> list[int]:
    return (data.images[:, 0, 0].long() * 256 + data.images[:, 0, 1].long()).tolist()


# IDX files


def test_read_idx_parses_header_and_values(tmp_path):
    images = np.arange(3 * 2 * 5).reshape(3, 2, 5)
    labels = np.array([7, 0, 9])
    got = read_idx(write_idx(tmp_path / "im.gz", IMAGES_MAGIC, images), IMAGES_MAGIC)
    assert got.dtype == np.uint8 and got.shape == (3, 2, 5) and (got == images).all()
    got = read_idx(write_idx(tmp_path / "lb.gz", LABELS_MAGIC, labels), LABELS_MAGIC)
    assert got.shape == (3,) and got.tolist() == [7, 0, 9]


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "labels.gz", LABELS_MAGIC, np.zeros(4))
    with pytest.raises(DarkKnowledgeError) as error:
        read_idx(path, IMAGES_MAGIC)
    message = assert_one_line(error)
    assert str(path) in message and "2049" in message and "2051" in message and "delete it" in message


@pytest.mark.parametrize("payload", [bytes(29), bytes(31)], ids=["short", "long"])
def test_read_idx_rejects_data_that_disagrees_with_its_header(tmp_path, payload):
    path = write_idx(tmp_path / "im.gz", IMAGES_MAGIC, np.zeros((3, 2, 5)), payload=payload)
    with pytest.raises(DarkKnowledgeError) as error:
        read_idx(path, IMAGES_MAGIC)
    assert str(path) in assert_one_line(error) and "needs 46" in str(error.value)


def test_read_idx_rejects_truncated_header_and_cut_off_gzip(tmp_path):
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress((IMAGES_MAGIC).to_bytes(4, "big") + bytes(5)))
    with pytest.raises(DarkKnowledgeError, match="truncated"):
        read_idx(short, IMAGES_MAGIC)
    whole = write_idx(tmp_path / "whole.gz", LABELS_MAGIC, np.arange(200) % 10).read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DarkKnowledgeError) as error:
        read_idx(cut, LABELS_MAGIC)
    assert "gzip" in assert_one_line(error) and str(cut) in str(error.value)


def test_sha256_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    calls = []
    real = idx.hash_file
    monkeypatch.setattr(idx, "hash_file", lambda p: calls.append(p) or real(p))
    assert sha256_file(path) == sha256_file(path) == hashlib.sha256(b"first").hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"other")  # same size: only the modification time tells the versions apart
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert sha256_file(path) == hashlib.sha256(b"other").hexdigest() and len(calls) == 2


# Finding and checking files


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKKNOWLEDGE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("DARKKNOWLEDGE_DATA")
    assert resolve_data_dir() == tmp_path / "xdg" / "darkknowledge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "darkknowledge"
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel") == tmp_path / "rel"  # relative paths become absolute


def test_unknown_dataset_lists_the_available_ones():
    assert available_datasets() == ["digits", "fashion-mnist", "mnist", "mnist-100"]
    assert set(DEFAULT_VALIDATION_SIZE) == set(available_datasets())
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("cifar10")
    assert "cifar10" in assert_one_line(error) and "digits, fashion-mnist, mnist, mnist-100" in str(error.value)


def test_missing_files_name_the_folder_and_the_fixes(tmp_path):
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("mnist", tmp_path)
    message = assert_one_line(error)
    assert str(tmp_path / "mnist") in message and "train-images-idx3-ubyte.gz" in message
    assert "--download" in message and "DARKKNOWLEDGE_DATA" in message and "--data-dir" in message
    assert not (tmp_path / "mnist").exists()  # nothing created without --download


def test_data_dir_pointing_at_the_dataset_folder_itself_gets_a_hint(tmp_path):
    for f in SOURCES["mnist"].files:
        (tmp_path / f.name).write_bytes(b"")
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("mnist", tmp_path)
    assert "must be the parent of mnist/" in assert_one_line(error)


def test_checksum_mismatch_is_detected_even_for_a_well_formed_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    source = SOURCES["mnist"]
    for images, labels in [(source.train_images, source.train_labels), (source.test_images, source.test_labels)]:
        write_idx(folder / images.name, IMAGES_MAGIC, np.zeros((2, 28, 28)))
        write_idx(folder / labels.name, LABELS_MAGIC, np.array([3, 4]))
    assert read_idx(folder / source.train_images.name, IMAGES_MAGIC).shape == (2, 28, 28)  # parses fine
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("mnist", tmp_path)
    message = assert_one_line(error)
    assert "checksum mismatch" in message and str(folder / source.train_images.name) in message
    assert "delete it" in message


# Real datasets


def test_mnist_loads_with_the_official_counts(mnist, data_dir):
    train, test = mnist.train, mnist.test
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.classes == tuple("0123456789") and train.num_classes == 10 and train.image_shape == (28, 28)
    assert (train.name, test.name) == ("mnist/train", "mnist/test") and len(train) == 60000
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_PER_CLASS
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_PER_CLASS
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert load_dataset("mnist", data_dir) is mnist  # loaded once per process


def test_data_dir_comes_from_the_environment(mnist, data_dir, monkeypatch):
    monkeypatch.setenv("DARKKNOWLEDGE_DATA", str(data_dir))
    assert load_dataset("mnist") is mnist


def test_fashion_mnist_loads_with_balanced_classes(data_dir):
    require(data_dir, "fashion-mnist")
    splits = load_dataset("fashion-mnist", data_dir)
    assert splits.train.images.shape == (60000, 28, 28) and splits.test.images.shape == (10000, 28, 28)
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.train.classes[0] == "T-shirt/top" and splits.train.classes[9] == "Ankle boot"
    assert splits.test.name == "fashion-mnist/test"


def test_digits_split_is_fixed_and_complete():
    from sklearn.datasets import load_digits

    splits = load_dataset("digits")
    assert splits.train.images.shape == (1348, 8, 8) and splits.test.images.shape == (449, 8, 8)
    assert splits.train.num_classes == 10 and splits.train.classes == tuple("0123456789")
    assert splits.train.images.dtype == torch.uint8 and int(splits.train.images.max()) == 255
    assert (splits.train.name, splits.test.name) == ("digits/train", "digits/test")
    every = load_digits()
    both = torch.cat([splits.train.labels, splits.test.labels])
    assert torch.bincount(both).tolist() == np.bincount(every.target).tolist()
    assert load_digits_splits().test.fingerprint() == splits.test.fingerprint()  # same split when rebuilt


# Splits, subsets, fingerprints


def test_validation_split_is_disjoint_complete_and_seeded():
    data = synthetic()
    rest, val = validation_split(data, 100, seed=0)
    assert (len(rest), len(val)) == (900, 100) and (rest.name, val.name) == ("syn/train", "syn/val")
    rest_idx, val_idx = indices_of(rest), indices_of(val)
    assert set(rest_idx).isdisjoint(val_idx) and sorted(rest_idx + val_idx) == list(range(1000))
    assert rest_idx == sorted(rest_idx) and val_idx == sorted(val_idx)  # original order kept
    assert val_idx != list(range(900, 1000))  # random, not the tail
    assert indices_of(validation_split(data, 100, seed=0)[1]) == val_idx
    assert indices_of(validation_split(data, 100, seed=1)[1]) != val_idx
    assert (rest.labels == torch.tensor(rest_idx) % 3).all()  # labels travel with their images


def test_validation_size_forms_and_bad_sizes():
    data = synthetic()
    assert len(validation_split(data, 0.25)[1]) == 250
    assert len(validation_split(data, 250.0)[1]) == 250  # the CLI passes counts as floats
    assert len(validation_split(data, np.int64(7))[1]) == 7
    for bad in [0, 1000, 2000, -5, 0.0, 1.5, 0.0001, True, "10%"]:
        with pytest.raises(DarkKnowledgeError) as error:
            validation_split(data, bad)
        assert "syn/train" in assert_one_line(error)


def test_subset_and_where_labels():
    data = synthetic(30)
    picked = data.subset(torch.tensor([5, 2]), "syn/picked")
    assert indices_of(picked) == [5, 2] and picked.name == "syn/picked" and picked.classes == data.classes
    kept = data.where_labels([0, 2])
    assert set(kept.labels.tolist()) == {0, 2} and len(kept) == 20 and kept.name == data.name
    with pytest.raises(DarkKnowledgeError, match=r"\[3\]"):
        data.where_labels([1, 3])


def test_fingerprint_follows_pixels_labels_and_classes():
    data = synthetic(50)
    same = LabeledImages(data.images.clone(), data.labels.clone(), data.classes, "other name")
    assert data.fingerprint() == same.fingerprint() and len(data.fingerprint()) == 64
    pixel = data.images.clone()
    pixel[17, 3, 2] += 1
    label = data.labels.clone()
    label[0] = 1
    variants = [LabeledImages(pixel, data.labels, data.classes, data.name),
                LabeledImages(data.images, label, data.classes, data.name),
                LabeledImages(data.images, data.labels, ("a", "b", "d"), data.name),
                LabeledImages(data.images.reshape(50, 2, 8), data.labels, data.classes, data.name)]
    prints = {v.fingerprint() for v in variants} | {data.fingerprint()}
    assert len(prints) == 5


def test_fingerprint_is_computed_once(monkeypatch):
    data = synthetic(50)
    first = data.fingerprint()
    monkeypatch.setattr(hashlib, "sha256", lambda *a: pytest.fail("fingerprint hashed twice"))
    assert data.fingerprint() == first


def test_labeled_images_rejects_wrong_types():
    with pytest.raises(ValueError):
        LabeledImages(torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.int64), ("a",), "x")
    with pytest.raises(ValueError):
        LabeledImages(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ("a",), "x")
    with pytest.raises(ValueError):
        LabeledImages(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ("a",), "x")


# Download, with the network replaced by local bytes


def test_download_fetches_missing_files_atomically_and_verified(data_dir, tmp_path, monkeypatch):
    real = require(data_dir, "mnist")
    folder = tmp_path / "mnist"
    folder.mkdir()
    source = SOURCES["mnist"]
    missing = source.train_labels.name
    for f in source.files:
        if f.name != missing:
            shutil.copy(real / f.name, folder / f.name)
    fetched = []

    def fake_fetch(url, out):
        fetched.append(url)
        assert not (folder / missing).exists()  # the real name appears only after verification
        assert any(p.name.startswith(f".{missing}.") for p in folder.iterdir())  # temp file beside the target
        out.write((real / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(sources, "fetch_url", fake_fetch)
    splits = load_dataset("mnist", tmp_path, download=True)
    assert fetched == [source.mirrors[0] + missing]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in source.files)  # no leftovers
    assert (folder / missing).read_bytes() == (real / missing).read_bytes()
    assert torch.bincount(splits.train.labels).tolist() == MNIST_TRAIN_PER_CLASS


def test_download_refuses_wrong_bytes_and_leaves_nothing(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(sources, "fetch_url", lambda url, out: fetched.append(url) or out.write(b"<html>"))
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("mnist", tmp_path, download=True)
    message = assert_one_line(error)
    assert "checksum mismatch" in message and "by hand" in message and str(tmp_path / "mnist") in message
    assert fetched == [m + "train-images-idx3-ubyte.gz" for m in SOURCES["mnist"].mirrors]  # every mirror tried
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_network_failure_names_the_url_and_manual_fix(tmp_path, monkeypatch):
    def offline(url, out):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources, "fetch_url", offline)
    with pytest.raises(DarkKnowledgeError) as error:
        load_dataset("fashion-mnist", tmp_path, download=True)
    message = assert_one_line(error)
    assert SOURCES["fashion-mnist"].mirrors[0] + "train-images-idx3-ubyte.gz" in message
    assert "Name or service not known" in message and "copy" in message and str(tmp_path / "fashion-mnist") in message
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


def test_download_falls_back_to_the_next_mirror(tmp_path, monkeypatch):
    payload = write_idx(tmp_path / "labels.gz", LABELS_MAGIC, np.array([1, 2, 3])).read_bytes()
    remote = sources.RemoteFile("labels.gz", len(payload), hashlib.sha256(payload).hexdigest())
    source = sources.IdxSource("toy", ("a",), "https://example.org", ("https://a/", "https://b/"),
                               remote, remote, remote, remote)

    def flaky(url, out):
        if url.startswith("https://a/"):
            raise TimeoutError("timed out")
        out.write(payload)

    monkeypatch.setattr(sources, "fetch_url", flaky)
    sources.download_file(source, remote, tmp_path / "toy")
    assert (tmp_path / "toy" / "labels.gz").read_bytes() == payload
    assert [p.name for p in (tmp_path / "toy").iterdir()] == ["labels.gz"]
