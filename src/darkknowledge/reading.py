"""Every file the tool reads is first checked to be a regular file of bounded size.

Opening a FIFO for reading blocks until a writer comes (forever, usually), and a device such as ``/dev/zero`` never
ends: read whole, it fills memory. So a path is refused, in one line naming it, unless it is a regular file (a
symlink to one is fine) no larger than a cap suited to its kind. :func:`read_bytes` opens without blocking and
checks the open file itself, so a path swapped between the check and the read is caught too; :func:`check_file` is
for paths handed to a library that opens them itself (NumPy, pandas, Pillow).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DarkKnowledgeError

MiB = 1 << 20
# Caps by kind of file. A sidecar, header or results file that large is not one the tool wrote.
JSON_LIMIT = 256 * MiB      # sidecars, manifests, store headers, results.json, metrics.jsonl, tokenizer.json
CONFIG_LIMIT = 1 * MiB      # a --config TOML file
TEXT_LIMIT = 1024 * MiB     # a .txt document of a corpus, a report.md, an image or figure, a dataset file


def _refuse(path: Path, mode: int, what: str) -> DarkKnowledgeError:
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    return DarkKnowledgeError(f"{what}: {path} is {kind}, not a regular file; give the path of a file")


def _check(path: Path, st: os.stat_result, what: str, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, st.st_mode, what)
    if limit is not None and st.st_size > limit:
        raise _too_large(path, what, limit)


def _too_large(path: Path, what: str, limit: int) -> DarkKnowledgeError:
    return DarkKnowledgeError(f"{what}: {path} is larger than {limit / MiB:,.0f} MiB, more than such a file "
                              "holds; check the path or restore the file")


def check_file(path: str | os.PathLike, what: str, limit: int | None) -> int:
    """The size of ``path`` if it is a regular file of at most ``limit`` bytes (None: any size); else a one-line
    error. Does not open it (opening a FIFO blocks). A missing file raises FileNotFoundError, for the caller to
    word."""
    path = Path(path)
    st = os.stat(path)
    _check(path, st, what, limit)
    return st.st_size


def read_bytes(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; else a one-line error. A missing file
    raises FileNotFoundError, for the caller to word."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        _check(path, os.fstat(fd), what, limit)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)  # a file growing past the cap since fstat is still refused
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_large(path, what, limit)
    return data


def read_text(path: str | os.PathLike, what: str, limit: int) -> str:
    """:func:`read_bytes` decoded as UTF-8 (UnicodeDecodeError for the caller to word)."""
    return read_bytes(path, what, limit).decode("utf-8")
