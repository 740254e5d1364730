"""Datasets as labelled uint8 image tensors in memory: MNIST, Fashion-MNIST (verified IDX files) and digits.

Files live in ``<data dir>/<dataset>/`` under their original names; see :func:`resolve_data_dir`.
"""

from .base import DatasetSplits, LabeledImages, validation_split
from .datasets import DEFAULT_VALIDATION_SIZE, available_datasets, load_dataset, resolve_data_dir

__all__ = ["DEFAULT_VALIDATION_SIZE", "DatasetSplits", "LabeledImages", "available_datasets", "load_dataset",
           "resolve_data_dir", "validation_split"]
