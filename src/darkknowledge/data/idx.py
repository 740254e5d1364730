"""Reading gzip-compressed IDX files (the MNIST format) and hashing files once per process."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from .. import reading
from ..errors import DarkKnowledgeError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_FIX = "delete it and re-download it (--download) or copy the original file again"

# (path, size, mtime_ns) -> SHA-256: tests and experiments load the same files many times.
_sha256_cache: dict[tuple[str, int, int], str] = {}


def hash_file(path: Path) -> str:
    """Hex SHA-256 of a file, always read afresh."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file; recomputed only when its path, size or modification time changes."""
    reading.check_file(path, "dataset", None)  # a FIFO would block the hash
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        _sha256_cache[key] = hash_file(path)
    return _sha256_cache[key]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in a gzip-compressed IDX file whose header must carry ``magic``."""
    try:
        compressed = reading.read_bytes(path, "dataset", reading.TEXT_LIMIT)
    except OSError as e:
        raise DarkKnowledgeError(f"cannot read {path} ({one_line(e)}); check that it exists and is readable") from None
    try:
        raw = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise DarkKnowledgeError(f"{path} is not a complete gzip file ({one_line(e)}); {_FIX}") from None
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    found = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label" if magic == LABELS_MAGIC else "IDX"
        raise DarkKnowledgeError(f"{path} has magic number {found}, not {magic} of an IDX {kind} file; {_FIX}")
    if len(raw) < header:
        raise DarkKnowledgeError(f"{path} is truncated: {len(raw)} bytes, shorter than its IDX header; {_FIX}")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DarkKnowledgeError(f"{path} holds {len(raw)} bytes after decompression but its header {list(dims)} "
                                 f"needs {expected}; {_FIX}")
    # A copy owns writable memory: torch warns about, and must not write through, a view of immutable bytes.
    return np.frombuffer(raw, np.uint8, expected - header, header).reshape(dims).copy()


def one_line(error: BaseException) -> str:
    """An exception's text on one line, for messages that must stay one line."""
    return " ".join(str(error).split()) or type(error).__name__
