"""MNIST-100: two digits side by side, balanced classes, deterministic from a seed, train and test kept apart."""

import os
from pathlib import Path

import pytest
import torch

from darkknowledge.data import DatasetSplits, LabeledImages, load_dataset
from darkknowledge.data.mnist100 import MNIST100_CLASSES, make_mnist_100
from darkknowledge.errors import DarkKnowledgeError
from darkknowledge.jobs import DataChoice

DATA = Path(os.environ.get("DARKKNOWLEDGE_DATA", Path(__file__).parents[2] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="MNIST files not found; set DARKKNOWLEDGE_DATA")


def fake_digits(per_digit: int, split: str, tag: int) -> LabeledImages:
    """Image k of digit d: pixel [0, 0] = d, [0, 1] = k, [0, 2] = a tag naming the split."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    images = torch.zeros(len(labels), 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 1] = torch.arange(per_digit).repeat(10).to(torch.uint8)
    images[:, 0, 2] = tag
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(tag))
    return LabeledImages(images[order], labels[order], tuple("0123456789"), f"fake/{split}")


FAKE = DatasetSplits(train=fake_digits(30, "train", 1), test=fake_digits(7, "test", 2))


def test_halves_are_digits_of_the_label_from_the_matching_split():
    splits = make_mnist_100(FAKE, seed=3, train_per_class=4, test_per_class=2)
    for data, per_class, tag in ((splits.train, 4, 1), (splits.test, 2, 2)):
        assert data.image_shape == (28, 56) and data.classes == MNIST100_CLASSES
        assert torch.bincount(data.labels, minlength=100).tolist() == [per_class] * 100
        left, right = data.images[:, 0, 0].long(), data.images[:, 0, 28].long()
        assert torch.equal(left * 10 + right, data.labels)
        assert set(data.images[:, 0, 2].tolist()) == {tag} and set(data.images[:, 0, 30].tolist()) == {tag}
    assert splits.train.name == "mnist-100/train" and splits.test.name == "mnist-100/test"


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = make_mnist_100(FAKE, seed=5, train_per_class=3, test_per_class=1)
    b = make_mnist_100(FAKE, seed=5, train_per_class=3, test_per_class=1)
    c = make_mnist_100(FAKE, seed=6, train_per_class=3, test_per_class=1)
    assert a.train.fingerprint() == b.train.fingerprint() and a.test.fingerprint() == b.test.fingerprint()
    assert a.train.fingerprint() != c.train.fingerprint()


def test_draws_cover_many_source_images():
    splits = make_mnist_100(FAKE, seed=0, train_per_class=20, test_per_class=1)
    picked = {(int(d), int(k)) for d, k in zip(splits.train.images[:, 0, 0], splits.train.images[:, 0, 1])}
    assert len(picked) > 0.9 * len(FAKE.train)  # 4000 draws from 300 images reach nearly all of them


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(DarkKnowledgeError, match="at least 1 case per class"):
        make_mnist_100(FAKE, train_per_class=0)
    eight = LabeledImages(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.arange(4), tuple("0123456789"), "small")
    with pytest.raises(DarkKnowledgeError, match="28x28"):
        make_mnist_100(DatasetSplits(eight, eight))


@needs_mnist
def test_registered_dataset_sizes_and_validation_split():
    splits = load_dataset("mnist-100", DATA)
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert load_dataset("mnist-100", DATA) is splits  # built once per process
    train, val, test = DataChoice("mnist-100", str(DATA)).load()
    assert (len(train), len(val), len(test)) == (50000, 10000, 10000)
    mnist = load_dataset("mnist", DATA)
    # Test pairs are made of test digits only: every left half is an MNIST test image.
    test_images = {bytes(img.numpy()) for img in mnist.test.images}
    assert all(bytes(img.numpy()) in test_images for img in splits.test.images[:50, :, :28])
