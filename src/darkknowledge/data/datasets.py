"""Loading a dataset by name from the data folder, with an in-process cache."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DarkKnowledgeError
from .base import DatasetSplits, LabeledImages
from .digits import load_digits_splits
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .mnist100 import make_mnist_100
from .sources import SOURCES, IdxSource, RemoteFile, ensure_files

DATA_ENV = "DARKKNOWLEDGE_DATA"

# Validation cases cut at random from each training set by default: for MNIST, Fashion-MNIST and MNIST-100 10000
# of the 60000 training images (as many as the test set); for digits 15% of its 1348 training images (202).
DEFAULT_VALIDATION_SIZE: dict[str, int | float] = {"digits": 0.15, "fashion-mnist": 10000, "mnist": 10000,
                                                   "mnist-100": 10000}

# Datasets made from another one's files: name -> (source dataset, builder of the splits from the source's).
DERIVED = {"mnist-100": ("mnist", make_mnist_100)}

# (name, folder, file stats) -> splits. Experiments and tests load the same data many times; the tensors are
# shared, which is safe because nothing writes to them. File stats in the key notice replaced files.
_loaded: dict[tuple, DatasetSplits] = {}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(["digits", *SOURCES, *DERIVED])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding one sub-folder per dataset: ``data_dir``, else ``$DARKKNOWLEDGE_DATA``, else the
    user cache folder (``$XDG_CACHE_HOME/darkknowledge`` or ``~/.cache/darkknowledge``)."""
    if data_dir is not None and str(data_dir):
        chosen = Path(data_dir)
    elif os.environ.get(DATA_ENV):
        chosen = Path(os.environ[DATA_ENV])
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        chosen = Path(cache) / "darkknowledge"
    return chosen.expanduser().resolve()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> DatasetSplits:
    """The official train and test sets of dataset ``name``; ``digits`` needs no files, ``mnist-100`` MNIST's."""
    if name in DERIVED:
        source, build = DERIVED[name]
        splits = load_dataset(source, data_dir, download)
        # The source's splits stay in _loaded for good, so their id names them (and changes with their files).
        key = (name, id(splits))
        if key not in _loaded:
            _loaded[key] = build(splits)
        return _loaded[key]
    if name == "digits":
        key: tuple = (name,)
    elif name in SOURCES:
        folder = resolve_data_dir(data_dir) / name
        # Checked on every call (cheap once hashed): a file replaced since the last load is verified again.
        ensure_files(SOURCES[name], folder, download)
        key = (name, str(folder), _stats(folder, SOURCES[name]))
    else:
        raise DarkKnowledgeError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}")
    if key not in _loaded:
        _loaded[key] = load_digits_splits() if name == "digits" else _load_idx(SOURCES[name], folder)
    return _loaded[key]


def _stats(folder: Path, source: IdxSource) -> tuple[tuple[int, int], ...]:
    return tuple((s.st_size, s.st_mtime_ns) for s in (os.stat(folder / f.name) for f in source.files))


def _load_idx(source: IdxSource, folder: Path) -> DatasetSplits:
    """Parse the four files, already verified against their checksums (so image and label counts agree)."""
    def split(part: str, images: RemoteFile, labels: RemoteFile) -> LabeledImages:
        x = read_idx(folder / images.name, IMAGES_MAGIC)
        y = read_idx(folder / labels.name, LABELS_MAGIC)
        return LabeledImages(torch.from_numpy(x), torch.from_numpy(y.astype("int64")), source.classes,
                             f"{source.name}/{part}")

    return DatasetSplits(train=split("train", source.train_images, source.train_labels),
                         test=split("test", source.test_images, source.test_labels))
