"""Labelled image sets held in memory, and the seeded train/validation split."""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import DarkKnowledgeError
from .transfer import UINT8_PIXELS, Transform


# eq=False: tensors compared element-wise have no single truth value. repr=False: a summary, not 47 MB of pixels.
@dataclass(frozen=True, eq=False, repr=False)
class LabeledImages:
    """uint8 images ``[N, H, W]`` with int64 labels ``[N]``; shared between callers, so treat as read-only.

    A transfer set (:mod:`darkknowledge.data.transfer`), the fastest one: a batch is one gather and ``/ 255``.
    """

    transform: ClassVar[Transform] = UINT8_PIXELS
    ignore_index: ClassVar[int | None] = None
    dtype: ClassVar[str] = "uint8"

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 3:
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W], got {self.images.dtype} "
                             f"{list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.name}: labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                             f"{list(self.labels.shape)}")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"{self.name}: labels must lie in 0..{len(self.classes) - 1}")
        object.__setattr__(self, "classes", tuple(self.classes))

    def __repr__(self) -> str:
        h, w = self.image_shape
        return f"LabeledImages({self.name!r}: {len(self)} images {h}x{w}, {self.num_classes} classes)"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.image_shape

    def raw(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float inputs in [0, 1] and labels of the cases at ``indices``: one gather each."""
        return self.transform(self.images[indices]), self.labels[indices]

    def describe(self) -> dict[str, Any]:
        return {"kind": "images", "name": self.name, "cases": len(self), "input_shape": list(self.image_shape),
                "dtype": "uint8", "classes": list(self.classes), "transform": self.transform.describe()}

    def subset(self, indices: torch.Tensor, name: str | None = None) -> LabeledImages:
        """The cases at ``indices`` (integer indices or a boolean mask), in that order."""
        return LabeledImages(self.images[indices], self.labels[indices], self.classes,
                             self.name if name is None else name)

    def where_labels(self, keep: Iterable[int], name: str | None = None) -> LabeledImages:
        """Only the cases whose label is in ``keep`` (labels are not renumbered)."""
        keep = sorted({int(k) for k in keep})
        outside = [k for k in keep if not 0 <= k < self.num_classes]
        if outside:
            raise DarkKnowledgeError(f"{self.name}: labels {outside} are not classes of this dataset; "
                                     f"choose labels in 0..{self.num_classes - 1}")
        return self.subset(torch.isin(self.labels, torch.tensor(keep, dtype=torch.int64)), name)

    def fingerprint(self) -> str:
        """SHA-256 over pixels, labels, shape and class names: names the exact data a model saw."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"shape": list(self.images.shape), "classes": list(self.classes)}).encode())
            h.update(np.ascontiguousarray(self.images.numpy()))
            # Fixed little-endian so the hash does not depend on the machine.
            h.update(np.ascontiguousarray(self.labels.numpy(), dtype="<i8"))
            object.__setattr__(self, "_fingerprint", h.hexdigest())
        return self._fingerprint


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's official training and test sets."""

    train: LabeledImages
    test: LabeledImages


def _validation_count(size: int | float, n: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise DarkKnowledgeError(f"{name}: validation size {size!r} is not a number; give a count or a fraction")
    # Whole floats >= 1 are counts: the CLI parses --val-size as a float, so 10000 arrives as 10000.0.
    if isinstance(size, numbers.Integral) or (size >= 1 and float(size).is_integer()):
        count = int(size)
    elif 0 < size < 1:
        count = round(float(size) * n)
    else:
        count = 0
    if not 0 < count < n:
        raise DarkKnowledgeError(f"{name}: validation size {size!r} gives {count} of {n} cases; choose a count "
                                 f"between 1 and {n - 1} or a fraction in (0, 1) that leaves cases on both sides")
    return count


def validation_split(train, size: int | float, seed: int = 0):
    """Split ``train`` (any transfer set with ``subset``) into (the rest, validation) at random, the same way for
    the same seed.

    ``size`` is a number of cases (an int, or a whole float >= 1) or a fraction in (0, 1). Both parts keep the
    original order. The rest keeps ``train``'s name; the validation set is named ``"<dataset>/val"``.
    """
    count = _validation_count(size, len(train), train.name)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, rest_idx = order[:count].sort().values, order[count:].sort().values
    dataset = train.name.split("/")[0]
    return train.subset(rest_idx), train.subset(val_idx, f"{dataset}/val")
