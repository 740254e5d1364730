"""MNIST-100: two-digit numbers 00-99, two MNIST digits side by side (28x56), for §5's specialists.

100 classes with natural confusable groups (numbers sharing a digit, numbers whose digits are easily confused:
17/11/71, 35/38/85, ...), made deterministically from a seed:

- Every class gets the same number of cases: 600 per class in training (60,000, as many as MNIST's training
  set) and 100 per class in test (10,000). Class ``10 * a + b`` is an image of digit ``a`` on the left and
  digit ``b`` on the right.
- Each half is an MNIST image of that digit drawn at random (with replacement) from the matching official
  split: training pairs only from MNIST's training images, test pairs only from its test images, so no test
  digit is ever seen in training.
- The same seed gives the same pixels on every machine (torch's CPU generator is platform-independent).

``load_dataset("mnist-100")`` builds it from the MNIST files with :data:`MNIST100_SEED`.
"""

from __future__ import annotations

import torch

from ..errors import DarkKnowledgeError
from .base import DatasetSplits, LabeledImages

MNIST100_SEED = 2015
MNIST100_TRAIN_PER_CLASS = 600  # 60,000 training pairs
MNIST100_TEST_PER_CLASS = 100   # 10,000 test pairs
MNIST100_CLASSES = tuple(f"{n:02d}" for n in range(100))


def make_pairs(digits: LabeledImages, per_class: int, generator: torch.Generator, name: str) -> LabeledImages:
    """``per_class`` images of every number 00-99 from the single digits in ``digits``, in a shuffled order."""
    if per_class < 1:
        raise DarkKnowledgeError(f"MNIST-100 needs at least 1 case per class, got {per_class}")
    if digits.num_classes != 10 or digits.image_shape != (28, 28):
        raise DarkKnowledgeError(f"MNIST-100 is made from 28x28 images of 10 digits, got {digits!r}")
    labels = torch.arange(100).repeat(per_class)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    # Positions of each digit's images in the source split, then one random pick per half.
    by_digit = [torch.nonzero(digits.labels == d).flatten() for d in range(10)]
    counts = torch.tensor([len(p) for p in by_digit])
    if int(counts.min()) == 0:
        raise DarkKnowledgeError(f"{digits.name} has no image of digit {int(counts.argmin())}")
    flat = torch.cat(by_digit)  # every digit's positions, one block per digit
    starts = torch.cumsum(counts, 0) - counts
    halves = []
    for digit in (labels // 10, labels % 10):
        draw = torch.randint(0, 2**62, (len(labels),), generator=generator) % counts[digit]
        halves.append(digits.images[flat[starts[digit] + draw]])
    return LabeledImages(torch.cat(halves, dim=2).contiguous(), labels, MNIST100_CLASSES, name)


def make_mnist_100(mnist: DatasetSplits, seed: int = MNIST100_SEED, train_per_class: int = MNIST100_TRAIN_PER_CLASS,
                   test_per_class: int = MNIST100_TEST_PER_CLASS) -> DatasetSplits:
    """MNIST-100's training pairs (from MNIST train) and test pairs (from MNIST test), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    train = make_pairs(mnist.train, train_per_class, generator, "mnist-100/train")
    test = make_pairs(mnist.test, test_per_class, generator, "mnist-100/test")
    return DatasetSplits(train=train, test=test)
