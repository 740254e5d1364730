"""scikit-learn's 8x8 handwritten digits: ships with scikit-learn, so it works offline and trains in seconds."""

from __future__ import annotations

import numpy as np
import torch

from .base import DatasetSplits, LabeledImages

# The digits have no official test set. A fixed seed cuts the same quarter of the 1797 cases as test everywhere.
DIGITS_SPLIT_SEED = 2015
DIGITS_TEST_FRACTION = 0.25


def load_digits_splits() -> DatasetSplits:
    """1348 training and 449 test images, pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes a second to import

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.data.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = tuple(str(d) for d in range(10))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    test_idx, train_idx = order[:n_test].sort().values, order[n_test:].sort().values
    return DatasetSplits(train=LabeledImages(images[train_idx], labels[train_idx], classes, "digits/train"),
                         test=LabeledImages(images[test_idx], labels[test_idx], classes, "digits/test"))
