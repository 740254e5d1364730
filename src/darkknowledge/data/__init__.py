"""Transfer sets (any data: :mod:`.transfer`) and the built-in datasets as labelled uint8 image tensors in memory:
MNIST, Fashion-MNIST (verified IDX files) and digits.

Files live in ``<data dir>/<dataset>/`` under their original names; see :func:`resolve_data_dir`.
"""

from .base import DatasetSplits, LabeledImages, validation_split
from .transfer import (ArrayTransferSet, DatasetTransferSet, Transform, TransferSet, as_transfer_set, batches,
                       subset)
from .datasets import DEFAULT_VALIDATION_SIZE, available_datasets, load_dataset, resolve_data_dir

__all__ = ["ArrayTransferSet", "DEFAULT_VALIDATION_SIZE", "DatasetSplits", "DatasetTransferSet", "LabeledImages",
           "Transform", "TransferSet", "as_transfer_set", "available_datasets", "batches", "load_dataset",
           "resolve_data_dir", "subset", "validation_split"]
