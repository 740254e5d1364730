"""The file engine under the soft-target store (both forms): arrays of rows on disk, written and checked, no targets.

A store's arrays (``specs``: name -> (dtype, shape), the first axis the rows) live either back to back in one
file, each starting on a page boundary (:func:`array_layout`, :class:`Writer`, :func:`map_arrays`), or one file
each (``<name>.bin`` in a folder: :func:`create_array_files`, :func:`array_files_problem`,
:func:`map_array_files`). Either way rows are written in place with ``pwrite`` of whole rows (:class:`RowFiles`),
so ranks on several machines never rewrite each other's bytes of a shared page, and checked by SHA-256.

Headers are JSON written atomically (``checkpoint.write_json``) and read through :mod:`darkknowledge.reading`
(:func:`read_json`); their key is the SHA-256 of their key parts (:func:`key_of`). One build per store runs at a
time (:func:`store_lock`). Writes shared among ranks or resumed after a kill keep their bookkeeping as sorted,
disjoint ranges ``[start, stop)`` of rows or windows (:func:`merged`, :func:`missing`, :func:`rank_share`), each
rank its own progress file (:func:`read_ranges`) that is also its marker (:func:`unseen_ranks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import checkpoint, locks, reading, schemas
from .distributed import Workers
from .errors import DarkKnowledgeError

ALIGN = 4096  # arrays of one file start on page boundaries
_CHUNK = 1 << 20  # bytes per read when hashing

Specs = dict[str, tuple[str, tuple]]


def key_of(key_parts: dict[str, Any]) -> str:
    """A store's key: the SHA-256 of what went into it, as sorted JSON."""
    return hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()


def read_json(path: Path, what: str) -> Any:
    """The JSON at ``path`` (a regular file of bounded size); one line naming the file when it is not JSON."""
    try:
        return json.loads(reading.read_bytes(path, what, reading.JSON_LIMIT))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DarkKnowledgeError(f"{what} header {path} is not valid JSON ({e})") from None


def store_lock(header_path: Path | None, workers: Workers, log: Callable[[str], None],
               what: str = "soft-target store"):
    """The store's exclusive lock (rank 0 holds it for all), after removing temp files of dead writers."""
    if header_path is None or not workers.is_main:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(locks.hold(header_path.with_suffix(".lock"), f"{what} {header_path}", wait=log))
    checkpoint.remove_stale_temp(header_path.parent, f".{header_path.stem}.")
    return stack


# ---------------------------------------------------------------------------------------------------------------
# Rows: checked, then written in place
# ---------------------------------------------------------------------------------------------------------------

def array_layout(specs: Specs) -> tuple[dict[str, int], dict[str, int], int]:
    """Each array's byte offset in one file (page-aligned, back to back) and bytes per row, and the file's size."""
    offsets, row_bytes, offset = {}, {}, 0
    for name, (dtype, shape) in specs.items():
        offset = -(-offset // ALIGN) * ALIGN
        offsets[name] = offset
        row_bytes[name] = np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
        offset += row_bytes[name] * shape[0]
    return offsets, row_bytes, offset


def checked_rows(specs: Specs, first_row: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` as contiguous arrays of the store's dtypes, after checking they fit rows ``first_row..``."""
    if set(arrays) != set(specs):
        raise DarkKnowledgeError(f"a store chunk must hold {', '.join(sorted(specs))}, got "
                                 f"{', '.join(sorted(arrays))}")
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise DarkKnowledgeError("the arrays of a store chunk have different numbers of rows")
    count = rows.pop()
    checked = {}
    for name, (dtype, shape) in specs.items():
        if first_row + count > shape[0]:
            raise DarkKnowledgeError(f"store chunks hold more than the {shape[0]} cases announced")
        checked[name] = np.ascontiguousarray(arrays[name], dtype=dtype)
        if checked[name].shape[1:] != shape[1:]:
            raise DarkKnowledgeError(f"store chunk array {name} has rows of shape {checked[name].shape[1:]}, "
                                     f"expected {shape[1:]}")
    return checked


class RowFiles:
    """Open array files written row range by row range in place: :meth:`one_file` (page-aligned arrays back to
    back) or :meth:`per_array` (``<name>.bin`` in a folder). ``O_CREAT``: a rank that cannot see the files rank 0
    made writes its own, and rank 0 misses its marker and says so."""

    def __init__(self, specs: Specs, places: dict[str, tuple[int, int]]):
        self.specs = specs
        _, self.row_bytes, _ = array_layout(specs)
        self._places = places  # array name -> (file descriptor, offset of its first row)
        self._fds = sorted({fd for fd, _ in places.values()})

    @classmethod
    def one_file(cls, specs: Specs, path: Path) -> RowFiles:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        offsets, _, _ = array_layout(specs)
        return cls(specs, {name: (fd, offsets[name]) for name in specs})

    @classmethod
    def per_array(cls, specs: Specs, folder: Path) -> RowFiles:
        return cls(specs, {name: (os.open(folder / f"{name}.bin", os.O_WRONLY | os.O_CREAT, 0o644), 0)
                           for name in specs})

    def write(self, first_row: int, arrays: dict[str, np.ndarray]) -> int:
        """Write ``arrays`` (checked first) as rows ``first_row..``; returns the number of rows."""
        return self.write_checked(first_row, checked_rows(self.specs, first_row, arrays))

    def write_checked(self, first_row: int, arrays: dict[str, np.ndarray]) -> int:
        count = 0
        for name, data in arrays.items():
            fd, offset = self._places[name]
            view, position = memoryview(data).cast("B"), offset + first_row * self.row_bytes[name]
            while view:
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            count = len(data)
        return count

    def sync(self) -> None:
        """Every row written so far on disk."""
        for fd in self._fds:
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> RowFiles:
        return self

    def __exit__(self, *_) -> None:
        self.close()


class Writer:
    """Arrays laid out back to back (page-aligned) in one file, or held in memory (``data_path=None``), filled in
    row order and hashed as they go; the file is written under a temporary name and renamed when finished."""

    def __init__(self, specs: Specs, data_path: Path | None):
        self.specs = specs
        self.data_path = data_path
        _, _, self.total_bytes = array_layout(specs)
        self.hashes = {name: hashlib.sha256() for name in specs}
        self.rows = 0
        self.files = self.tmp = None
        self.memory: dict[str, np.ndarray] | None = None
        if data_path is None:
            self.memory = {name: np.empty(shape, dtype=dtype) for name, (dtype, shape) in specs.items()}
        else:
            data_path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=data_path.parent)
            os.close(fd)
            self.files = RowFiles.one_file(specs, Path(self.tmp))

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        arrays = checked_rows(self.specs, self.rows, arrays)
        for name, data in arrays.items():
            self.hashes[name].update(memoryview(data).cast("B"))
            if self.memory is not None:
                self.memory[name][self.rows:self.rows + len(data)] = data
        if self.files is not None:
            self.files.write_checked(self.rows, arrays)
        self.rows += len(next(iter(arrays.values())))

    def finish(self, num_rows: int) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        """(each array's header entry, the arrays when in memory); the file is in place under its name."""
        if self.rows != num_rows:
            raise DarkKnowledgeError(f"store chunks held {self.rows} cases, expected {num_rows}")
        meta = arrays_meta(self.specs, {name: h.hexdigest() for name, h in self.hashes.items()})
        if self.memory is not None:
            return meta, self.memory
        os.truncate(self.tmp, self.total_bytes)  # padding after the last array, if any
        self.files.sync()
        self.files.close()
        self.files = None
        checkpoint.replace(self.tmp, self.data_path)
        return meta, None

    def abort(self) -> None:
        if self.files is not None:
            self.files.close()
            self.files = None
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Checking and reading what was written
# ---------------------------------------------------------------------------------------------------------------

def sha256_range(f, offset: int, nbytes: int) -> str:
    """The SHA-256 of ``nbytes`` of the open file ``f`` from ``offset``, read a block at a time."""
    h = hashlib.sha256()
    f.seek(offset)
    left = nbytes
    while left > 0:
        block = f.read(min(_CHUNK, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def checksums(f, specs: Specs) -> dict[str, str]:
    """The SHA-256 of each array of the one-file layout in the open file ``f``."""
    offsets, row_bytes, _ = array_layout(specs)
    return {name: sha256_range(f, offsets[name], row_bytes[name] * shape[0]) for name, (_, shape) in specs.items()}


def arrays_meta(specs: Specs, sha256: dict[str, str]) -> dict[str, Any]:
    """Each array's header entry of the one-file layout: dtype, shape, offset, bytes and SHA-256."""
    offsets, row_bytes, _ = array_layout(specs)
    return {name: {"dtype": dtype, "shape": list(shape), "offset": offsets[name],
                   "nbytes": row_bytes[name] * shape[0], "sha256": sha256[name]}
            for name, (dtype, shape) in specs.items()}


def map_arrays(data_path: Path, meta: dict[str, Any], verify: bool,
               what: str) -> tuple[dict[str, np.ndarray], mmap.mmap]:
    """The arrays of a one-file store memory-mapped read-only (and, with ``verify``, each checked against its
    SHA-256 first, one streaming read, no copy kept), with the mapping they share."""
    with open(data_path, "rb") as f:
        if verify:
            for name, entry in meta.items():
                if sha256_range(f, entry["offset"], entry["nbytes"]) != entry["sha256"]:
                    raise DarkKnowledgeError(f"{what} data {data_path}: array {name} does not match the checksum "
                                             "in its header (corrupt)")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arrays = {name: np.frombuffer(mapping, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])),
                                  offset=entry["offset"]).reshape(entry["shape"])
              for name, entry in meta.items()}
    return arrays, mapping


def create_array_files(folder: Path, specs: Specs) -> None:
    """``<name>.bin`` of every array in ``folder``, zeros of its full size, ready to be written in place."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (dtype, shape) in specs.items():
        np.memmap(folder / f"{name}.bin", dtype=dtype, mode="w+", shape=tuple(shape)).flush()


def array_files_problem(folder: Path, specs: Specs) -> str | None:
    """Whether an array file is missing, not a regular file, or not of its size."""
    for name, (dtype, shape) in specs.items():
        path = folder / f"{name}.bin"
        expected = np.dtype(dtype).itemsize * int(np.prod(shape))
        if not path.is_file() or path.stat().st_size != expected:
            return f"{path.name} is missing or truncated"
    return None


def map_array_files(folder: Path, specs: Specs) -> dict[str, np.ndarray]:
    return {name: np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=tuple(shape))
            for name, (dtype, shape) in specs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Progress: sorted, disjoint ranges [start, stop) of rows (or windows of rows) on disk, and each rank's share
# ---------------------------------------------------------------------------------------------------------------

def merged(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, stop in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        elif start < stop:
            out.append([start, stop])
    return out


def count(ranges: list[list[int]]) -> int:
    return sum(stop - start for start, stop in ranges)


def missing(done: list[list[int]], n: int) -> list[list[int]]:
    """The ranges of ``range(n)`` not in ``done``."""
    gaps, at = [], 0
    for start, stop in done:
        if start > at:
            gaps.append([at, start])
        at = max(at, stop)
    return gaps + ([[at, n]] if at < n else [])


def rank_share(ranges: list[list[int]], workers: Workers) -> list[list[int]]:
    """This rank's contiguous share (:meth:`Workers.shard`) of the items in ``ranges`` taken in order."""
    part, out, offset = workers.shard(count(ranges)), [], 0
    for start, stop in ranges:
        low, high = max(part.start - offset, 0), min(part.stop - offset, stop - start)
        if low < high:
            out.append([start + low, start + high])
        offset += stop - start
    return out


def read_ranges(path: Path, limit: int, what: str) -> list[list[int]]:
    """The ranges a rank's progress file records; none when it is unreadable or out of ``range(limit)`` (its
    rows are then written again: only rows recorded as written are ever skipped)."""
    try:
        progress = schemas.check(schemas.RankProgress, read_json(path, what), path, "")
    except (OSError, ValueError, DarkKnowledgeError):
        return []
    ranges = progress["windows_done"]
    return ranges if all(start < stop <= limit for start, stop in ranges) else []


def unseen_ranks(markers: list[Path], what: str, folder: str) -> str | None:
    """Rank 0's refusal to finish a store while it cannot see the marker of every rank (``markers[r]``: rank r's):
    a rank that wrote its share on a disk of its own would leave a store with rows missing."""
    absent = [r for r, marker in enumerate(markers) if not marker.exists()]
    if not absent:
        return None
    return (f"ranks {absent} wrote their share of the {what} where rank 0 cannot see it; give {folder} on a "
            "file system that every rank (every node) sees")
