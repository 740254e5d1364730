"""Feeding a GPU ahead of its steps: how ``fit``'s micro-batches reach a CUDA device without the step waiting for
the host (issue 30: a store epoch cost up to 2x a plain one because the store's rows and the inputs crossed from
host memory, synchronously, every batch).

- An in-memory training set (the built-in images, tensors) whose inputs fit is copied to the device once: a batch is
  then one gather there (:class:`ResidentInputs`).
- A soft-target store whose targets at the run's temperature fit lives on the device (:class:`ResidentTargets`):
  its rows are one gather there too. A row's targets depend on that row alone, so they are the very numbers the
  store gives batch by batch. A compact store's rows stay packed there (a sixth of the bytes of its decoded
  targets at V = 4,096, h = 12, K = 21) and a batch's rows are decoded on the device (:mod:`darkknowledge.store_codec`).
- Otherwise a micro-batch's inputs, labels and stored targets are gathered on the host into pinned memory and
  copied non-blocking, one micro-batch ahead of the step that uses them (:func:`one_ahead`).

On the CPU nothing here runs: :class:`Feeder` hands the batches over as read, and the loss reads the store itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .data.base import LabeledImages
from .data.transfer import ArrayTransferSet, batches, case_rows

AHEAD_DEVICES = ("cuda",)  # device types fed ahead (tests add "cpu" to run this path without a GPU)
RESIDENT_SHARE = 0.25  # of the device's free memory that resident inputs, or resident targets, may take
READ_ROWS = 1 << 15  # store rows read at a time while copying a store to the device


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (0 where not known: nothing is made resident there)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def tensors_of(targets: dict[str, Any]) -> list[Tensor]:
    """Every tensor of a loss's targets (tensors, or dataclasses of tensors such as TopKTargets), in a fixed
    order."""
    return [t for value in targets.values() for t in ([value] if isinstance(value, Tensor) else
                                                      [getattr(value, f.name) for f in dataclasses.fields(value)])]


def map_tensors(targets: dict[str, Any], fn: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """``targets`` with ``fn`` applied to each of their tensors (the same structure)."""
    return {name: fn(value) if isinstance(value, Tensor) else dataclasses.replace(
        value, **{f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)})
        for name, value in targets.items()}


def moved(value: Tensor, device: torch.device, pin: bool = False) -> Tensor:
    """``value`` on ``device``; with ``pin``, through pinned memory and without blocking the host."""
    if value.device == device:
        return value
    if pin and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=value.is_pinned())


def one_ahead(items: Iterable[Any]) -> Iterator[Any]:
    """``items`` in order, each made (its host work done, its copies issued) before the previous one is handed
    over: the device computes a step while the host prepares the next."""
    iterator = iter(items)
    sentinel = object()
    current = next(iterator, sentinel)
    for following in iterator:
        yield current
        current = following
    if current is not sentinel:
        yield current


class ResidentInputs:
    """An in-memory set's inputs copied to ``device`` once (labels stay on the host, where the store's rows are
    found); :meth:`batches` reads as :func:`darkknowledge.data.transfer.batches` does, with one gather there."""

    def __init__(self, inputs: Tensor, labels: Tensor, transform, device: torch.device):
        self.inputs, self.labels, self.transform = inputs.to(device), labels, transform

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for indices in index_batches:
            picked = self.inputs.index_select(0, indices.to(self.inputs.device, non_blocking=True))
            yield self.transform(picked), self.labels.index_select(0, indices), indices

    @classmethod
    def of(cls, train, device: torch.device, free: int) -> ResidentInputs | None:
        """``train``'s inputs on ``device`` when it holds them in memory and they take at most
        :data:`RESIDENT_SHARE` of ``free`` bytes; None otherwise."""
        if isinstance(train, LabeledImages):
            inputs = train.images
        elif isinstance(train, ArrayTransferSet) and isinstance(train.inputs, Tensor):
            inputs = train.inputs
        else:
            return None
        if inputs.nbytes > free * RESIDENT_SHARE:
            return None
        return cls(inputs, train.labels, train.transform, device)


class ResidentTargets:
    """A store's targets at one temperature for all its rows, on a device: ``targets(rows)`` is one gather
    there, the numbers ``store.targets(rows, temperature)`` gives."""

    def __init__(self, store, temperature: float, device: torch.device, rows_per_read: int = READ_ROWS):
        n = len(store)
        self.device, self.codec = device, store.codec
        if self.codec is not None:  # kept packed: 64 bytes a token, 404 decoded (V = 4,096, h = 12, K = 21)
            store.check_temperature(temperature)
            self.packed = torch.empty((n, self.codec.bytes_per_row), dtype=torch.uint8, device=device)
            for rows, arrays in store.iter_batches(rows_per_read):
                self.packed[rows].copy_(arrays["rows"][:, 0])
            return
        self.parts: dict[str, Any] = {}
        for start in range(0, n, rows_per_read):
            part = store.targets(torch.arange(start, min(n, start + rows_per_read)), temperature)
            if not self.parts:  # one buffer a tensor, filled read by read (no second copy to concatenate)
                self.parts = map_tensors(part, lambda t: torch.empty((n, *t.shape[1:]), dtype=t.dtype,
                                                                     device=device))
            for whole, piece in zip(tensors_of(self.parts), tensors_of(part)):
                whole[start:start + len(piece)].copy_(piece)

    def targets(self, rows: Tensor) -> dict[str, Any]:
        rows = rows.to(self.device, non_blocking=True)
        if self.codec is not None:
            return {"topk_targets": self.codec.decode(self.packed.index_select(0, rows))}
        return map_tensors(self.parts, lambda t: t.index_select(0, rows))

    @classmethod
    def of(cls, store, temperature: float, device: torch.device, free: int) -> ResidentTargets | None:
        """``store``'s targets on ``device`` when they take at most :data:`RESIDENT_SHARE` of ``free`` bytes;
        None otherwise."""
        if len(store) == 0:
            return None
        row = tensors_of(store.targets(torch.arange(1), temperature))  # refuses a temperature the store cannot take
        per_row = store.bytes_per_case if store.codec is not None else sum(t.nbytes for t in row)
        if len(store) * per_row > free * RESIDENT_SHARE:
            return None
        return cls(store, temperature, device)


class Feeder:
    """The loop's micro-batches ``(inputs, labels, indices, targets)``. On the CPU as read, ``targets`` None (the
    loss reads the store). On CUDA (:data:`AHEAD_DEVICES`) already on the device, one micro-batch ahead: inputs
    from :class:`ResidentInputs` when they fit, and a store's targets of the batch's counted cases from
    :class:`ResidentTargets` when they fit, else gathered into pinned memory and copied non-blocking."""

    def __init__(self, train, objective, device: torch.device, ignore_index: int | None, free: int | None = None):
        self.train, self.device, self.ignore_index = train, device, ignore_index
        self.ahead = device.type in AHEAD_DEVICES
        self.pin = device.type == "cuda"
        self.source, self.store, self.resident, self.temperature = train, None, None, None
        if self.ahead:
            free = free_bytes(device) if free is None else free
            self.source = ResidentInputs.of(train, device, free) or train
            self.store = getattr(objective, "store", None)
            if self.store is not None:
                self.temperature = objective.temperature
                self.resident = ResidentTargets.of(self.store, self.temperature, device, free)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Any, Tensor, Tensor, Any]]:
        read = batches(self.source, index_batches)
        if not self.ahead:
            return ((inputs, labels, indices, None) for inputs, labels, indices in read)
        return one_ahead(self._on_device(*item) for item in read)

    def _on_device(self, inputs, labels: Tensor, indices: Tensor):
        targets = None
        if self.store is not None:
            rows = case_rows(self.train, indices).reshape(-1)
            if self.ignore_index is not None:  # the counted cases only, as the loss sees them
                rows = rows[labels.reshape(-1).cpu() != self.ignore_index]
            if self.resident is not None:
                targets = self.resident.targets(rows)
            else:
                targets = map_tensors(self.store.targets(rows, self.temperature),
                                      lambda t: moved(t, self.device, self.pin))
        inputs = {k: moved(v, self.device, self.pin) for k, v in inputs.items()} if isinstance(inputs, dict) \
            else moved(inputs, self.device, self.pin)
        return inputs, moved(labels, self.device, self.pin), indices, targets
