"""The transfer set: what ``fit``, ``Distillation``, ``SoftTargets``, ``Ensemble``, the specialists, evaluation and
export take. Anything with these four methods (and ``name``, ``classes``) is one::

    class TransferSet(Protocol):
        def __len__(self) -> int: ...
        def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...  # model-ready inputs, int64 labels
        def fingerprint(self) -> str: ...   # names the data, cheaply
        def describe(self) -> dict: ...     # what model.json records: kind, input shape, classes, transform

A **case** is one row of the soft-target store: an image, a table row, or one token position of a window. Labels
``[B]`` give one case per item; labels ``[B, T]`` (a set with ``cases_per_item = T``) give T cases per item, item
``i`` owning store rows ``i*T .. i*T+T-1``. A label equal to ``ignore_index`` (``-100`` for sets that declare it)
counts for nothing.

Adapters (:func:`as_transfer_set` picks one):

- :class:`ArrayTransferSet`: inputs and labels as tensors or NumPy arrays (a memory-mapped ``.npy`` too: one
  larger than 1 GB is read row by row with ``pread``, so a file larger than RAM trains in bounded memory), any
  shape and dtype: float features, RGB ``[3, H, W]``, uint8 images, int64 token ids. A batch is one gather.
  :class:`darkknowledge.data.LabeledImages` (the built-in image sets) is the same fast path.
- :class:`DatasetTransferSet`: any map-style ``torch.utils.data.Dataset`` yielding ``(input, label)``; batches go
  through a ``DataLoader`` (workers, ``pin_memory``) whose sampler carries the indices, so the store finds rows.

**Preprocessing is declared, not implied**: each set has a :class:`Transform` (uint8 inputs: ``/ 255`` by default;
tables: per-feature standardisation; float tensors: none) that ``batch`` applies, that ``describe`` records in
``model.json`` and that evaluation, export and the model card reapply.

**The fingerprint rule** (what a store or a resume checks): SHA-256 of the kind, shape, dtype, classes, transform,
every label, and the bytes of the inputs, all of them when they take at most :data:`FULL_HASH_BYTES`, else of
:data:`SAMPLE_ITEMS` items drawn with a fixed seed (a memory-mapped file of terabytes is not read on every run). So a
store or a resume refuses other data: another length, other labels, other sampled bytes.

A :class:`DatasetTransferSet` never reads its items for the fingerprint: a ``Dataset`` that augments in
``__getitem__`` gives other bytes on every read, so its fingerprint would differ in every process (a resume refused,
the store recomputed). It is named by what it declares: its name (``name=``, else the class's name), length,
input shape, classes, transform, its labels when it has a ``targets`` attribute, and the SHA-256 of every file
it lists in a ``files`` attribute. Two different Datasets that declare the same are taken for the same data: give
them different names, or list their files. Building a store over a set whose items change between two reads
warns (:func:`changes_between_reads`): the stored targets are one random view of each case. One over a
``TensorDataset`` of (inputs, labels) hashes as the pair of tensors does, so a store computed over the pinned
``DatasetTransferSet`` serves the same tensors given as arrays.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import DarkKnowledgeError
from .idx import sha256_file

FULL_HASH_BYTES = 1 << 28  # 256 MB: inputs up to this size are hashed whole
SAMPLE_ITEMS = 1024  # items hashed from larger inputs (and from any Dataset), drawn with FINGERPRINT_SEED
FINGERPRINT_SEED = 2015
FILE_READ_BYTES = 1 << 30  # memory-mapped inputs larger than this are read row by row with pread (see _FileRows)
IGNORE_INDEX = -100  # the label of a position that counts for nothing (token-level sets)
MAX_INFERRED_CLASSES = 1_000_000  # classes counted from labels (0..max label); more is a stray label


@runtime_checkable
class TransferSet(Protocol):
    name: str
    classes: tuple[str, ...]

    def __len__(self) -> int: ...

    def batch(self, indices: Tensor) -> tuple[Any, Tensor]: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Transform:
    """``x -> (x / divide - mean) / std`` in float32, or nothing (``identity``: token ids, ready floats).

    ``mean`` / ``std`` are one number or one per channel (dimension 1 of the batch: an image's channel, a table's
    feature). Recorded by :meth:`describe` and rebuilt by :meth:`from_description`.
    """

    divide: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def identity(self) -> bool:
        return self.divide is None and self.mean is None and self.std is None

    def __call__(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        y = x.float()
        if self.divide is not None:  # in place on a fresh copy: the same bits as the library's historic uint8 / 255
            y = y.div_(self.divide) if y is not x else y / self.divide
        x = y
        if self.mean is not None:
            x = x - self._per_channel(self.mean, x)
        if self.std is not None:
            x = x / self._per_channel(self.std, x)
        return x

    @staticmethod
    def _per_channel(values: tuple[float, ...], x: Tensor) -> Tensor:
        t = torch.tensor(values, dtype=x.dtype, device=x.device)
        return t.reshape(1, -1, *([1] * (x.dim() - 2))) if len(values) > 1 else t

    def describe(self) -> dict[str, Any]:
        if self.identity:
            return {"name": "identity"}
        out: dict[str, Any] = {"name": "normalize"}
        if self.divide is not None:
            out["divide"] = self.divide
        if self.mean is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std or (1.0,))
        return out

    def text(self) -> str:
        """One line for a model card or an export's metadata."""
        if self.identity:
            return "none (inputs as stored)"
        parts = [f"/ {self.divide:g}"] if self.divide is not None else []
        if self.mean is not None:
            parts.append(f"minus mean {_short(self.mean)}, divided by std {_short(self.std or (1.0,))}")
        return "float32; " + ", then ".join(parts)

    @classmethod
    def from_description(cls, described: dict[str, Any] | None) -> Transform:
        if not described or described.get("name") == "identity":
            return cls()
        mean, std = described.get("mean"), described.get("std")
        return cls(described.get("divide"), tuple(mean) if mean else None, tuple(std) if std else None)


UINT8_PIXELS = Transform(divide=255)  # the preprocessing of every built-in image set


def _short(values: Sequence[float]) -> str:
    return f"{values[0]:.4g}" if len(values) == 1 else f"[{', '.join(f'{v:.4g}' for v in values[:4])}" \
        + (", ...]" if len(values) > 4 else "]")


def default_transform(dtype) -> Transform:
    """uint8 inputs are pixels (/ 255); anything else is taken as it is."""
    return UINT8_PIXELS if str(dtype).endswith("uint8") else Transform()


def _as_index(indices) -> np.ndarray:
    if isinstance(indices, Tensor):
        return indices.cpu().numpy()
    return np.asarray(indices, dtype=np.int64)


def _infer_classes(labels: np.ndarray, ignore_index: int | None, name: str) -> tuple[str, ...]:
    valid = labels[labels != ignore_index] if ignore_index is not None else labels
    count = int(valid.max()) + 1 if valid.size else 0
    if count > MAX_INFERRED_CLASSES:  # the list of names (and the model's output layer) would fill memory
        raise DarkKnowledgeError(f"{name}: the largest label is {count - 1}, which makes {count:,} classes (labels "
                                 f"are class indices 0..C-1); at most {MAX_INFERRED_CLASSES:,} are supported: "
                                 "number the classes from 0, or give their names")
    return tuple(str(c) for c in range(count))


class ArrayTransferSet:
    """Inputs ``[N, ...]`` and int64 labels ``[N]`` (or ``[N, T]``: T cases per item) held as tensors or NumPy
    arrays (memory-mapped ones are read a batch at a time). ``classes`` default to ``0..max label``."""

    def __init__(self, inputs, labels, classes: Sequence[str] | None = None, name: str = "arrays",
                 transform: Transform | None = None, ignore_index: int | None = None):
        if isinstance(inputs, Tensor):
            inputs = inputs.detach().cpu()
        elif _FileRows.readable(inputs):
            inputs = _FileRows(inputs)
        labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if len(inputs) != len(labels):
            raise DarkKnowledgeError(f"{name}: {len(inputs)} inputs but {len(labels)} labels; give one label per "
                                     "input")
        if labels.dtype.kind not in "iu":
            raise DarkKnowledgeError(f"{name}: labels must be integers (class indices), got {labels.dtype}; "
                                     "map class names to 0..C-1 first")
        self.inputs = inputs
        self._labels = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: labels are small, may be read-only
        self.classes = tuple(str(c) for c in classes) if classes is not None else _infer_classes(labels,
                                                                                                ignore_index, name)
        self.name = name
        self.transform = transform if transform is not None else default_transform(inputs.dtype)
        self.ignore_index = ignore_index
        valid = labels[labels != ignore_index] if ignore_index is not None else labels
        if valid.size and (int(valid.min()) < 0 or int(valid.max()) >= len(self.classes)):
            raise DarkKnowledgeError(f"{name}: labels must lie in 0..{len(self.classes) - 1} (the classes)"
                                     + (f" or be {ignore_index}" if ignore_index is not None else "")
                                     + f", got {int(valid.min())}..{int(valid.max())}")
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"ArrayTransferSet({self.name!r}: {len(self)} x {list(self.input_shape)} {self.dtype}, " \
               f"{self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> Tensor:
        return self._labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    @property
    def dtype(self) -> str:
        return str(self.inputs.dtype).replace("torch.", "")

    @property
    def cases_per_item(self) -> int:
        return int(np.prod(self._labels.shape[1:])) if self._labels.dim() > 1 else 1

    def raw(self, indices) -> Tensor:
        """The stored inputs at ``indices``, before the transform."""
        if isinstance(self.inputs, Tensor):
            index = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
            return self.inputs.index_select(0, index.cpu().long())
        index = _as_index(indices)
        return torch.from_numpy(self.inputs.take(index) if isinstance(self.inputs, _FileRows)
                                else np.take(self.inputs, index, 0))

    def batch(self, indices) -> tuple[Tensor, Tensor]:
        index = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
        return self.transform(self.raw(index)), self._labels.index_select(0, index.cpu().long())

    def subset(self, indices, name: str | None = None) -> ArrayTransferSet:
        index = _as_index(indices)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        inputs = self.inputs[torch.from_numpy(index)] if isinstance(self.inputs, Tensor) \
            else self.inputs.rows(index) if isinstance(self.inputs, _FileRows) else self.inputs[index]
        return ArrayTransferSet(inputs, self._labels[torch.from_numpy(index)], self.classes,
                                self.name if name is None else name, self.transform, self.ignore_index)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"kind": "arrays", "shape": [len(self), *self.input_shape], "dtype": self.dtype,
                                 "classes": list(self.classes), "transform": self.transform.describe()}).encode())
            h.update(np.ascontiguousarray(self._labels.numpy(), dtype="<i8"))
            nbytes = len(self) * int(np.prod(self.input_shape, dtype=np.int64)) * _itemsize(self.inputs)
            if nbytes <= FULL_HASH_BYTES:
                chunk = max(1, FULL_HASH_BYTES // 16 // max(nbytes // max(len(self), 1), 1))
                for start in range(0, len(self), chunk):
                    h.update(_bytes(self.raw(np.arange(start, min(start + chunk, len(self))))))
            else:
                h.update(_bytes(self.raw(_sample(len(self)))))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return _described(self, "arrays")


def _described(data, kind: str) -> dict[str, Any]:
    """What model.json records of an array or Dataset transfer set (``ignore_index`` only where one is set)."""
    described = {"kind": kind, "name": data.name, "cases": len(data), "input_shape": list(data.input_shape),
                 "dtype": data.dtype, "classes": list(data.classes), "transform": data.transform.describe()}
    if data.ignore_index is not None:
        described["ignore_index"] = data.ignore_index
    return described


class _FileRows:
    """The rows of a memory-mapped ``.npy`` array read with ``pread``: the page cache serves them, and nothing is
    mapped into the process, so one pass over a file larger than RAM keeps the process small (reading through the
    memory map would map up to 2 MB around every random row: file pages count as the process's resident memory).
    ``index``: which rows of the file, in order (a subset)."""

    def __init__(self, array: np.memmap, index: np.ndarray | None = None):
        self.filename, self.offset = array.filename, array.offset
        self.dtype, self.row_shape = array.dtype, array.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * array.dtype.itemsize
        self.index = np.arange(len(array)) if index is None else index
        self.shape = (len(self.index), *self.row_shape)
        self._fd: int | None = None
        self._pid = None

    @staticmethod
    def readable(array) -> bool:
        """A whole C-ordered array mapped straight from its file (not a view of one), of more than
        :data:`FILE_READ_BYTES` (a smaller one is faster gathered through the map, and fits in memory)."""
        return isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename is not None \
            and array.flags.c_contiguous and array.ndim >= 1 and array.nbytes > FILE_READ_BYTES

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, index: np.ndarray) -> _FileRows:
        part = _FileRows.__new__(_FileRows)
        part.__dict__.update(self.__dict__, index=self.index[index], _fd=None, _pid=None)
        part.shape = (len(part.index), *self.row_shape)
        return part

    def take(self, rows: np.ndarray) -> np.ndarray:
        if self._fd is None or self._pid != os.getpid():  # a DataLoader worker opens its own
            self._fd, self._pid = os.open(self.filename, os.O_RDONLY), os.getpid()
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, row in enumerate(self.index[rows]):
            os.preadv(self._fd, [flat[i]], self.offset + int(row) * self.row_bytes)
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def _itemsize(inputs) -> int:
    return inputs.element_size() if isinstance(inputs, Tensor) else inputs.dtype.itemsize


def _bytes(t: Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _sample(n: int) -> np.ndarray:
    rng = np.random.default_rng(FINGERPRINT_SEED)
    return np.sort(rng.choice(n, size=min(n, SAMPLE_ITEMS), replace=False))


def _item_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


class _Collate:
    """Stack ``(input, label)`` items and apply the transform, in the DataLoader's worker (picklable). No items
    (a micro-batch with no case of this rank's) give empty tensors of the items' shape."""

    def __init__(self, transform: Transform, input_shape: tuple[int, ...], dtype: torch.dtype):
        self.transform, self.input_shape, self.dtype = transform, input_shape, dtype

    def __call__(self, items):
        if not items:
            return self.transform(torch.empty(0, *self.input_shape, dtype=self.dtype)), torch.empty(0).long()
        inputs = torch.stack([_item_tensor(x) for x, _ in items])
        labels = torch.stack([_item_tensor(y).long() for _, y in items])
        return self.transform(inputs), labels


class DatasetTransferSet:
    """Any map-style ``torch.utils.data.Dataset`` whose items are ``(input, label)`` (tensors, NumPy arrays or
    numbers). Batches are read through a ``DataLoader`` with ``num_workers`` worker processes and ``pin_memory``
    (default: when CUDA is present); the sampler hands it the very indices asked for, so rows stay in step with the
    soft-target store. ``classes`` default to the dataset's ``classes`` attribute, else ``0..max label`` (the
    labels come from its ``targets`` attribute, else one pass over the items)."""

    def __init__(self, dataset, classes: Sequence[str] | None = None, name: str | None = None,
                 transform: Transform | None = None, num_workers: int = 0, pin_memory: bool | None = None,
                 ignore_index: int | None = None):
        if len(dataset) == 0:
            raise DarkKnowledgeError(f"{name or type(dataset).__name__}: the dataset is empty")
        first = dataset[0]
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            raise DarkKnowledgeError(f"{name or type(dataset).__name__}: items must be (input, label) pairs, got "
                                     f"{type(first).__name__}; wrap the dataset so it yields (input, label)")
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        example = _item_tensor(first[0])
        self.input_shape = tuple(example.shape)
        self.dtype = str(example.dtype).replace("torch.", "")
        self._collate_args = (tuple(example.shape), example.dtype)
        self.transform = transform if transform is not None else default_transform(example.dtype)
        self.ignore_index = ignore_index
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._labels: Tensor | None = None
        given = classes if classes is not None else getattr(dataset, "classes", None)
        self.classes = tuple(str(c) for c in given) if given is not None \
            else _infer_classes(self.labels.numpy(), ignore_index, self.name)
        self._fingerprint: str | None = None
        self._within: tuple[DatasetTransferSet, np.ndarray] | None = None  # a subset's whole set and rows

    def __repr__(self) -> str:
        return f"DatasetTransferSet({self.name!r}: {len(self)} x {list(self.input_shape)} {self.dtype}, " \
               f"{self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> Tensor:
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == len(self):
                self._labels = torch.as_tensor(np.asarray(targets)).long()
            else:
                self._labels = torch.cat([labels for _, labels, _ in self.batches(
                    torch.arange(len(self)).split(1024))]) if len(self) else torch.empty(0, dtype=torch.long)
        return self._labels

    def batch(self, indices) -> tuple[Tensor, Tensor]:
        return _Collate(self.transform, *self._collate_args)([self.dataset[int(i)] for i in _as_index(indices)])

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(inputs, labels, indices) for each batch of ``index_batches``, in order, read ahead by the workers."""
        from torch.utils.data import DataLoader
        index_batches = [torch.as_tensor(b).long() for b in index_batches]
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in index_batches],
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            collate_fn=_Collate(self.transform, *self._collate_args))
        for (inputs, labels), indices in zip(loader, index_batches):  # a DataLoader keeps its sampler's order
            yield inputs, labels, indices

    def subset(self, indices, name: str | None = None) -> DatasetTransferSet:
        from torch.utils.data import Subset
        index = _as_index(indices)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        part = DatasetTransferSet.__new__(DatasetTransferSet)
        part.__dict__.update(self.__dict__)
        part.dataset = Subset(self.dataset, index.tolist())
        part.name = self.name if name is None else name
        part._labels = self.labels[torch.from_numpy(index)] if self._labels is not None else None
        part._fingerprint = None
        whole, rows = self._within or (self, np.arange(len(self)))
        part._within = (whole, rows[index])  # named by the whole set and the rows kept
        return part

    def fingerprint(self) -> str:
        """What the Dataset declares, never its items (see the module's fingerprint rule); a subset's adds the
        rows it keeps to its whole set's. Tensors (a TensorDataset pair) are the data itself: hashed as arrays."""
        if self._fingerprint is None and _tensor_pair(self.dataset):
            # The same tensors wrapped otherwise (pinned, with workers) are the same data: the key of the pair.
            self._fingerprint = ArrayTransferSet(*self.dataset.tensors, self.classes, self.name, self.transform,
                                                 self.ignore_index).fingerprint()
        if self._fingerprint is None:
            whole, rows = self._within or (self, None)
            h = hashlib.sha256()
            files = getattr(whole.dataset, "files", None)
            h.update(json.dumps({"kind": "dataset", "name": whole.name.split("/")[0], "cases": len(whole),
                                 "input_shape": list(self.input_shape), "classes": list(self.classes),
                                 "transform": self.transform.describe(),
                                 "files": None if files is None else [sha256_file(Path(f)) for f in files]}).encode())
            targets = getattr(whole.dataset, "targets", None)
            if targets is not None:
                h.update(np.ascontiguousarray(np.asarray(targets), dtype="<i8"))
            if rows is not None:
                h.update(np.ascontiguousarray(rows, dtype="<i8"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return _described(self, "dataset")


class _View:
    """Cases ``index`` of a transfer set that has no ``subset`` of its own."""

    def __init__(self, data, index: np.ndarray, name: str | None = None):
        self.data, self.index = data, index
        self.name = name or data.name
        self.classes = data.classes
        self.transform = getattr(data, "transform", Transform())
        self.ignore_index = getattr(data, "ignore_index", None)
        self.cases_per_item = cases_per_item(data)  # a view of token windows: windows, each of T cases

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices):
        return self.data.batch(torch.from_numpy(self.index[_as_index(indices)]))

    def subset(self, indices, name: str | None = None):
        return _View(self.data, self.index[_as_index(indices)], name or self.name)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.data.fingerprint()}|{hashlib.sha256(self.index.tobytes()).hexdigest()}"
                              .encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {**self.data.describe(), "name": self.name, "cases": len(self)}


def changes_between_reads(data, items: int = 4) -> bool:
    """Whether reading the first ``items`` cases twice gives other inputs: a Dataset that augments in
    ``__getitem__`` (random crops, flips, noise). Outputs computed once over it are then one random view."""
    rows = torch.arange(min(items, len(data)))
    first, second = data.batch(rows)[0], data.batch(rows)[0]
    if isinstance(first, Tensor):
        return not torch.equal(first, second)
    return any(not torch.equal(a, b) for a, b in zip(first.values(), second.values())) \
        if isinstance(first, dict) else False


def subset(data, indices, name: str | None = None):
    """The cases of ``data`` at ``indices`` (integer indices or a boolean mask), as a transfer set."""
    if hasattr(data, "subset"):
        return data.subset(indices, name) if name is not None else data.subset(indices)
    index = _as_index(indices)
    return _View(data, np.flatnonzero(index) if index.dtype == bool else index, name)


def _tensor_pair(data) -> bool:
    """A ``TensorDataset`` of (inputs, labels): held in memory, taken as an (inputs, labels) pair."""
    return isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2


def as_transfer_set(data, classes: Sequence[str] | None = None, name: str | None = None):
    """``data`` as a transfer set: a transfer set itself, an ``(inputs, labels)`` pair of tensors or arrays, a
    ``TensorDataset`` of two tensors (both held in memory: the fast path), or any map-style ``Dataset``."""
    if isinstance(data, TransferSet) and not isinstance(data, torch.utils.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayTransferSet(data[0], data[1], classes, name or "arrays")
    if _tensor_pair(data):
        return ArrayTransferSet(*data.tensors, classes, name or "TensorDataset")
    if isinstance(data, torch.utils.data.Dataset):
        return DatasetTransferSet(data, classes, name)
    raise DarkKnowledgeError(f"cannot use a {type(data).__name__} as a transfer set; give an (inputs, labels) pair "
                             "of tensors or arrays, a torch Dataset of (input, label) items, or an object with "
                             "__len__, batch, fingerprint and describe (darkknowledge.data.TransferSet)")


def batches(data, index_batches: Sequence[Tensor]) -> Iterator[tuple[Any, Tensor, Tensor]]:
    """(inputs, labels, indices) for each batch of indices, in order: through the set's own reader when it has
    one (a DataLoader's workers), else one ``batch`` call each."""
    if hasattr(data, "batches"):
        yield from data.batches(index_batches)
        return
    for indices in index_batches:
        inputs, labels = data.batch(indices)
        yield inputs, labels, indices


def in_order(data, batch_size: int) -> list[Tensor]:
    """Index batches covering ``data`` in order."""
    return list(torch.arange(len(data)).split(batch_size))


def cases_per_item(data) -> int:
    """Store rows per item: 1, or T for labels ``[N, T]`` (item ``i`` owns rows ``i*T .. i*T+T-1``)."""
    return int(getattr(data, "cases_per_item", 1))


def num_cases(data) -> int:
    return len(data) * cases_per_item(data)


def case_rows(data, indices: Tensor) -> Tensor:
    """The store rows of the items at ``indices``, shaped like their labels."""
    per = cases_per_item(data)
    if per == 1:
        return indices
    return indices.reshape(-1, 1) * per + torch.arange(per)


def input_shape(data) -> tuple[int, ...]:
    """The shape of one input (without the batch dimension)."""
    shape = getattr(data, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    inputs, _ = data.batch(torch.arange(min(1, len(data))))
    return tuple(inputs.shape[1:])
