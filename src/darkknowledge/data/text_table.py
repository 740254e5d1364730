"""Labelled text from a table (``--data lines.csv --text-column text --label-column play``): one row per case, one
text column (or two, for sentence pairs) and a label column, in CSV, Parquet or JSON Lines.

The texts are tokenised with the teacher's tokenizer (a Hugging Face ``tokenizer.json``, or a folder holding one),
truncated and padded to ``max_length``. A case's input is one int64 tensor ``[2, max_length]``: row 0 the token
ids, row 1 the attention mask (1 = a real token). One tensor keeps every transfer-set path as it is (batches,
subsets, the validation split, fingerprints, the soft-target store); a sequence classifier
(:mod:`darkknowledge.classifiers`) splits it into ``input_ids`` and ``attention_mask``.

Tokenising is done once: the ids and masks are cached in ``cache_dir`` (beside the run) under a key of the
tokenizer's and the file's SHA-256, the columns and ``max_length``; a later run on the same data reads them back
(without pickle). Classes are the label column's sorted distinct values. A column named ``split`` with the values
``train`` and ``test`` holds the test split out; without it there is no test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import DarkKnowledgeError
from .base import DatasetSplits
from .files import read_table
from .idx import one_line, sha256_file
from .transfer import ArrayTransferSet

TEXT_SUFFIXES = (".csv", ".parquet", ".jsonl")
SPLIT_COLUMN = "split"  # optional: "train" or "test" per row
DEFAULT_MAX_LENGTH = 128
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_path(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` names (the file, or a folder holding it), or a one-line error."""
    path = Path(path).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DarkKnowledgeError(f"--tokenizer {path}: no {TOKENIZER_FILE} there; give a Hugging Face tokenizer.json "
                                 "or the folder of a model that has one")
    return file.resolve()


def load_tokenizer(path: str | Path):
    """A Hugging Face fast tokenizer (``tokenizers.Tokenizer``) from a ``tokenizer.json`` or a folder holding one."""
    from tokenizers import Tokenizer
    file = tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own kinds for a malformed file
        raise DarkKnowledgeError(f"--tokenizer {file}: not a tokenizer.json the tokenizers library reads "
                                 f"({one_line(e)})") from None


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's padding, else its [PAD] / <pad> token, else 0."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    return 0


def tokenize(tokenizer, texts: list, max_length: int) -> np.ndarray:
    """``[N, 2, max_length]`` int64: ids and attention mask of each text (or ``(first, second)`` pair)."""
    tokenizer = tokenizer.__class__.from_str(tokenizer.to_str())  # truncation and padding set on a copy
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=pad_id(tokenizer), length=max_length)
    encoded = tokenizer.encode_batch(texts)
    out = np.empty((len(texts), 2, max_length), dtype=np.int64)
    out[:, 0] = [e.ids for e in encoded]
    out[:, 1] = [e.attention_mask for e in encoded]
    return out


def load_text_table(path: str | Path, text_columns: tuple[str, ...], label_column: str | None, tokenizer: str | Path,
                    max_length: int = DEFAULT_MAX_LENGTH, cache_dir: str | Path | None = None) -> DatasetSplits:
    """The training (and, with a ``split`` column, test) set of labelled text in ``path`` (see the module doc)."""
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DarkKnowledgeError(f"--data {path}: text needs a table ({', '.join(TEXT_SUFFIXES)}) with "
                                 "--text-column")
    if not 1 <= len(text_columns) <= 2:
        raise DarkKnowledgeError(f"--text-column: give one text column, or two for sentence pairs; got "
                                 f"{len(text_columns)}")
    frame = read_table(path, text=True)
    label_column = label_column or "label"
    for column, option in [*((c, "--text-column") for c in text_columns), (label_column, "--label-column")]:
        if column not in frame.columns:
            columns = ", ".join(map(str, frame.columns[:12]))
            raise DarkKnowledgeError(f"{path}: no column {column!r} (columns: {columns}); pass {option} NAME")
    texts = []
    for column in text_columns:
        values = frame[column]
        empty = values.isna() | (values.astype(str).str.strip() == "")
        if empty.any():
            raise DarkKnowledgeError(f"{path}: {int(empty.sum())} rows have an empty text in {column!r} (the first "
                                     f"is row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}); fill or drop them")
        texts.append(values.astype(str).tolist())
    labels = frame[label_column]
    if labels.isna().any() or (labels.astype(str).str.strip() == "").any():
        raise DarkKnowledgeError(f"{path}: rows without a label in {label_column!r}; fill or drop them")
    values = sorted(labels.unique().tolist(), key=lambda v: (isinstance(v, str), v))
    if len(values) < 2:
        raise DarkKnowledgeError(f"{path}: the label column {label_column!r} holds one class ({values[0]!r}); a "
                                 "classifier needs two or more: check --label-column")
    y = labels.map({v: i for i, v in enumerate(values)}).to_numpy(dtype=np.int64)
    file = tokenizer_path(tokenizer)
    x = _cached_ids(path, text_columns, file, max_length, len(frame), cache_dir,
                    lambda: tokenize(load_tokenizer(file), list(zip(*texts)) if len(texts) == 2 else texts[0],
                                     max_length))
    classes = [str(v) for v in values]
    test = None
    if SPLIT_COLUMN in frame.columns:
        split = frame[SPLIT_COLUMN].astype(str).str.strip().str.lower()
        unknown = sorted(set(split) - {"train", "test"})
        if unknown:
            raise DarkKnowledgeError(f"{path}: column {SPLIT_COLUMN!r} holds {unknown[0]!r}; its values are train "
                                     "or test")
        is_test = (split == "test").to_numpy()
        test = _text_set(x[is_test], y[is_test], classes, f"{path.name}/test") if is_test.any() else None
        x, y = x[~is_test], y[~is_test]
    return DatasetSplits(train=_text_set(x, y, classes, f"{path.name}/train"), test=test)


def _text_set(x: np.ndarray, y: np.ndarray, classes: list[str], name: str) -> ArrayTransferSet:
    return ArrayTransferSet(torch.from_numpy(np.ascontiguousarray(x)), y, classes, name)


def _cached_ids(path: Path, columns: tuple[str, ...], tokenizer_file: Path, max_length: int, rows: int,
                cache_dir: str | Path | None, compute) -> np.ndarray:
    """``compute()``, or the ids and masks it gave before for the same tokenizer, file, columns and length."""
    if cache_dir is None:
        return compute()
    key = hashlib.sha256(json.dumps({"tokenizer": sha256_file(tokenizer_file), "data": sha256_file(path),
                                     "columns": list(columns), "max_length": max_length}).encode()).hexdigest()
    cached = Path(cache_dir) / f"{key[:24]}.npy"
    if cached.exists():
        try:
            ids = np.load(cached, allow_pickle=False)
            if ids.dtype == np.int64 and ids.ndim == 3 and ids.shape == (rows, 2, max_length):
                return ids
        except (OSError, ValueError):
            pass  # a damaged cache file: tokenised again and rewritten
    from ..checkpoint import atomic_write
    ids = compute()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            np.save(out, ids, allow_pickle=False)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, write)
    return ids
