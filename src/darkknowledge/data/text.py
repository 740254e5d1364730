"""A text corpus (a folder of ``.txt`` files, a ``.jsonl`` or a table's text column), split by whole documents,
tokenised, cut into token windows.

- :func:`load_corpus` reads a folder's every ``*.txt`` (sorted by name) as UTF-8 (a file that is not UTF-8 is
  refused with its name), a ``.jsonl``'s ``text`` field (one document a line) or a ``.csv`` / ``.parquet``
  table's text column (one document a row); empty (or whitespace-only) documents are skipped and counted.
  :func:`is_corpus` tells a corpus from the other data ``--data`` takes, by what the path holds.
- :func:`split_documents` assigns whole documents to train / validation / test by a seeded permutation of their
  names (fixed by the seed and recorded in the run), so no work leaks between splits.
- :class:`TextTokenizer` is character level or a byte-level BPE trained on the training split only, with Hugging
  Face ``tokenizers``; it is saved beside the run (``tokenizer.json``, in the Hugging Face format, so
  ``transformers.AutoTokenizer`` loads it) and its SHA-256 is checked on load. Its SHA-256 names the tokenizer,
  not the file: it is that of its darkknowledge/tokenizer-1 JSON (:meth:`TextTokenizer.to_json`), the format runs
  saved before, so the SHA-256 recorded in every run, store and experiment stays the same.
- :class:`TokenWindows` is the transfer set of a language model (:mod:`darkknowledge.data.transfer`): the
  split's documents joined by an end-of-document token, cut into non-overlapping windows of ``context`` tokens;
  item ``i`` is window ``i``, its inputs the window and its labels the next tokens. A *case* is one token
  position, ``i * context + t`` (a row of the token store); every position counts, so no label is ``-100``.

**One label convention** (docs/language-models-cli.md): the labels a loss sees are already shifted, label ``t``
being the token after input ``t``. Labels given the Hugging Face way, unshifted (``labels = input_ids``, ``-100``
where nothing is predicted), become that by :func:`shift_labels`; :class:`LabeledSequences` does it for a user's
``(input_ids, labels)`` arrays, so such data trains in :func:`darkknowledge.training.fit` as token windows do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import reading, schemas
from ..errors import DarkKnowledgeError

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # a label that is not predicted (Hugging Face's convention)
TABLE_SUFFIXES = (".csv", ".parquet")
END_OF_DOCUMENT = "<|endoftext|>"
TOKENIZER_FORMAT = "darkknowledge/tokenizer-1"
TOKENIZER_KINDS = ("char", "bpe")


@dataclass(frozen=True)
class TextCorpus:
    """Documents by file name, and how many empty files were skipped."""

    folder: Path
    documents: dict[str, str]
    skipped_empty: int

    def fingerprint(self) -> str:
        """SHA-256 over every document's name and text: names the corpus exactly (5 MB hashes in milliseconds)."""
        h = hashlib.sha256()
        for name, text in self.documents.items():
            h.update(f"{name}\n{len(text)}\n".encode())
            h.update(text.encode())
        return h.hexdigest()


def is_corpus(path: str | Path, text_column: str | None = None, label_column: str | None = None) -> bool:
    """Whether ``--data PATH`` is a text corpus (a language model's), by what it holds: a folder with ``.txt`` files
    directly in it, or a ``.jsonl`` / a table with a ``text_column``, with no label column (``label_column``, default
    ``label``). A table or ``.jsonl`` that has labels is labelled text, a classifier's (data/text_table.py)."""
    path = Path(path).expanduser()
    if path.is_dir():  # an arrays folder (x.npy, y.npy, classes.txt) is not one
        return not (path / "x.npy").exists() and any(p.name != "classes.txt" for p in path.glob("*.txt"))
    suffix = path.suffix.lower()
    if not (suffix == ".jsonl" or (suffix in TABLE_SUFFIXES and text_column is not None)) or not path.is_file():
        return False
    return (label_column or "label") not in _column_names(path)


def _column_names(path: Path) -> list[str]:
    """A table's column names (a .jsonl's: its first line's fields) without reading it whole."""
    try:
        if path.suffix.lower() == ".jsonl":
            reading.check_file(path, "--data", None)  # a regular file, not a FIFO
            with open(path, "rb") as f:
                first = next((line for line in f if line.strip()), b"{}")
            fields = json.loads(first)
            return list(fields) if isinstance(fields, dict) else []
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet
            return list(pyarrow.parquet.read_schema(path).names)
        import pandas
        return list(pandas.read_csv(path, nrows=0).columns)
    except Exception:  # an unreadable file is reported, in one line, by the reader it goes to
        return []


def load_corpus(source: str | Path, text_column: str | None = None) -> TextCorpus:
    """The documents of a folder of ``.txt`` files (by file name), of a ``.jsonl`` (``text_column``, default
    ``text``, of each line's object; named by line) or of a CSV / Parquet table's ``text_column`` (by row)."""
    source = Path(source).expanduser()
    suffix = source.suffix.lower()
    if source.is_dir():
        if text_column is not None:
            raise DarkKnowledgeError(f"--text-column is for a .jsonl, .csv or .parquet corpus; {source} is a folder "
                                     "of .txt files (one document each): drop --text-column")
        texts = _folder_texts(source)
    elif suffix == ".jsonl" and source.is_file():
        texts = _jsonl_texts(source, text_column or "text")
    elif suffix in TABLE_SUFFIXES and source.is_file():
        if text_column is None:
            raise DarkKnowledgeError(f"{source}: a table corpus needs --text-column NAME (the column holding each "
                                     "document's text)")
        texts = _table_texts(source, text_column)
    else:
        raise DarkKnowledgeError(f"text corpus {source} is not a folder of .txt files, a .jsonl file or a "
                                 ".csv/.parquet table; give one of those")
    documents = {name: text for name, text in texts.items() if text.strip()}
    skipped = len(texts) - len(documents)
    if len(documents) < len(SPLITS):
        raise DarkKnowledgeError(f"text corpus {source} has {len(documents)} non-empty document(s) "
                                 f"({skipped} empty skipped); splitting by document into train, validation and test "
                                 f"needs at least {len(SPLITS)}: add documents")
    return TextCorpus(source, documents, skipped)


def _folder_texts(folder: Path) -> dict[str, str]:
    texts = {}
    for path in sorted(folder.glob("*.txt")):
        try:
            texts[path.name] = reading.read_text(path, "text corpus", reading.TEXT_LIMIT)
        except UnicodeDecodeError as error:
            raise DarkKnowledgeError(f"{path} is not UTF-8 text (byte {error.start}); convert it "
                                     f"(e.g. iconv -t utf-8) or move it out of the corpus folder") from None
    return texts


def _jsonl_texts(path: Path, field_name: str) -> dict[str, str]:
    try:
        lines = reading.read_text(path, "text corpus", reading.TEXT_LIMIT).splitlines()
    except UnicodeDecodeError as error:
        raise DarkKnowledgeError(f"{path} is not UTF-8 text (byte {error.start}); convert it "
                                 "(e.g. iconv -t utf-8)") from None
    texts, width = {}, len(str(len(lines)))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DarkKnowledgeError(f"{path}, line {number}: not JSON; give one JSON object a line") from None
        if not isinstance(record, dict) or field_name not in record:
            raise DarkKnowledgeError(f"{path}, line {number}: no {field_name!r} field; give each line a "
                                     f"{field_name!r} field, or name the field with --text-column")
        if not isinstance(record[field_name], str):
            raise DarkKnowledgeError(f"{path}, line {number}: field {field_name!r} is not a text")
        texts[f"line-{number:0{width}d}"] = record[field_name]
    return texts


def _table_texts(path: Path, column: str) -> dict[str, str]:
    from .files import read_table
    frame = read_table(path, text=True)
    if column not in frame.columns:
        raise DarkKnowledgeError(f"{path}: no text column {column!r} (columns: "
                                 f"{', '.join(map(str, frame.columns[:12]))}); pass --text-column NAME")
    values = frame[column]
    if not all(isinstance(v, str) for v in values.dropna()):
        raise DarkKnowledgeError(f"{path}: column {column!r} holds values that are not text; name the text column "
                                 "with --text-column")
    texts = {f"row-{i:0{len(str(len(values)))}d}": v for i, v in enumerate(values) if isinstance(v, str)}
    if not any(text.strip() for text in texts.values()):
        raise DarkKnowledgeError(f"{path}: text column {column!r} is empty (no row holds text); name the column "
                                 "that does with --text-column")
    return texts


def split_documents(names, validation: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Whole documents per split: a permutation of the sorted names by ``seed``; at least one in each."""
    names = sorted(names)
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise DarkKnowledgeError(f"validation and test fractions must be in (0, 1) and sum below 1, "
                                 f"got {validation} and {test}")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val, n_test = (max(1, round(f * len(names))) for f in (validation, test))
    chosen = [names[i] for i in order]
    return {"validation": sorted(chosen[:n_val]), "test": sorted(chosen[n_val:n_val + n_test]),
            "train": sorted(chosen[n_val + n_test:])}


class TextTokenizer:
    """Characters or byte-level BPE; ``encode`` gives int64 ids, ``decode`` text; ``sha256`` names it.

    Character level: the training split's characters, sorted, plus ``<unk>`` (id 0) for characters it never saw
    and the end-of-document token. BPE: Hugging Face ``tokenizers``' byte-level BPE (no unknowns).
    """

    def __init__(self, kind: str, state: dict[str, Any]):
        self.kind, self.state = kind, state
        if kind == "char":
            self._chars = state["chars"]
            self._ids = {c: i for i, c in enumerate(self._chars)}
            self.vocab_size = len(self._chars)
            self.end_of_document = self._ids[END_OF_DOCUMENT]
        else:
            from tokenizers import Tokenizer
            self._bpe = Tokenizer.from_str(json.dumps(state["bpe"]))
            self.vocab_size = self._bpe.get_vocab_size()
            self.end_of_document = self._bpe.token_to_id(END_OF_DOCUMENT)
            if self.end_of_document is None:
                raise DarkKnowledgeError(f"the BPE has no {END_OF_DOCUMENT} token")

    @classmethod
    def train(cls, texts: list[str], kind: str = "bpe", vocab_size: int = 4096) -> TextTokenizer:
        if kind not in TOKENIZER_KINDS:
            raise DarkKnowledgeError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
        if kind == "char":
            return cls("char", {"chars": ["<unk>", END_OF_DOCUMENT] + sorted(set("".join(texts)))})
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise DarkKnowledgeError("a BPE tokenizer needs Hugging Face tokenizers: pip install "
                                     "'darkknowledge[text]' (or use the character-level tokenizer)") from None
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(texts, trainer=trainer)
        return cls("bpe", {"bpe": json.loads(bpe.to_str())})

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "char":
            return np.fromiter((self._ids.get(c, 0) for c in text), dtype=np.int64, count=len(text))
        return np.asarray(self._bpe.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "char":
            return "".join(self._chars[i] if i > 1 else "" for i in ids)
        return self._bpe.decode(ids)

    def to_json(self) -> str:
        """The darkknowledge/tokenizer-1 JSON: what :attr:`sha256` hashes (and what older runs saved)."""
        return json.dumps({"format": TOKENIZER_FORMAT, "kind": self.kind, **self.state}, sort_keys=True)

    def to_hf_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` of this tokenizer: the BPE's own, or for characters a word-level
        model over single characters (each character one token, ``<unk>`` for unseen ones) that joins them back."""
        if self.kind == "bpe":
            return json.dumps(self.state["bpe"])
        special = [{"id": i, "content": self._chars[i], "single_word": False, "lstrip": False, "rstrip": False,
                    "normalized": False, "special": True} for i in (0, self.end_of_document)]
        return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
                           "normalizer": None,
                           "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                                             "behavior": "Isolated", "invert": False},
                           "post_processor": None, "decoder": {"type": "Fuse"},
                           "model": {"type": "WordLevel", "vocab": self._ids, "unk_token": self._chars[0]}})

    def hf_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` beside :meth:`to_hf_json`: which class loads it and its special tokens."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": END_OF_DOCUMENT,
                **({"unk_token": self._chars[0]} if self.kind == "char" else {})}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self.sha256}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_hf_json())

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> TextTokenizer:
        """Read a saved tokenizer, in the Hugging Face format darkknowledge writes or the darkknowledge/tokenizer-1
        format older runs hold; ``sha256`` (from the run's model.json) must match, else one line says so."""
        path = Path(path)
        fix = "restore the file, or delete it to train it again"
        try:
            text = reading.read_bytes(path, "tokenizer", reading.JSON_LIMIT)
            # An old file is its own to_json(), so its bytes name it: checked before any field is used.
            found = hashlib.sha256(text).hexdigest()
            state = json.loads(text)
        except (OSError, ValueError) as error:
            raise DarkKnowledgeError(f"cannot read tokenizer {path}: {error}") from None
        old = isinstance(state, dict) and "format" in state
        if sha256 is not None and old and found != sha256:
            raise _not_this_runs(path, found, sha256)
        if old:
            schemas.check(schemas.TokenizerFile, state, path, fix)
            state.pop("format")
        try:
            tokenizer = cls(state.pop("kind"), state) if old else cls._from_hf(state)
        except ImportError:
            raise
        except Exception as error:  # tokenizers raises plain Exceptions on a BPE it cannot read
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DarkKnowledgeError(f"{path} is not a valid tokenizer ({why}); {fix}") from None
        if not old and tokenizer.to_hf_json().encode() != text:  # exactly what save writes, or not ours
            raise DarkKnowledgeError(f"{path} is not a tokenizer darkknowledge saved (its Hugging Face JSON differs "
                                     f"from the one its vocabulary gives); {fix}")
        if sha256 is not None and tokenizer.sha256 != sha256:
            raise _not_this_runs(path, tokenizer.sha256, sha256)
        return tokenizer

    @classmethod
    def _from_hf(cls, state: Any) -> TextTokenizer:
        """A tokenizer from the Hugging Face JSON :meth:`to_hf_json` wrote: word level over characters, or BPE."""
        model = state.get("model") if isinstance(state, dict) else None
        kind = model.get("type") if isinstance(model, dict) else None
        if kind == "BPE":
            return cls("bpe", {"bpe": state})
        vocab = model.get("vocab") if kind == "WordLevel" else None
        if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) < 2:
            raise ValueError("neither a word-level model over characters with ids 0..n-1 nor a BPE")
        chars = sorted(vocab, key=vocab.get)
        if chars[:2] != ["<unk>", END_OF_DOCUMENT] or any(len(c) != 1 for c in chars[2:]):
            raise ValueError(f"a character tokenizer starts with <unk> and {END_OF_DOCUMENT}, then single characters")
        return cls("char", {"chars": chars})


def _not_this_runs(path: Path, found: str, expected: str) -> DarkKnowledgeError:
    return DarkKnowledgeError(f"tokenizer {path} is not the one this run was trained with (SHA-256 {found[:12]} != "
                              f"{expected[:12]}); restore the run's tokenizer.json")


class TokenWindows:
    """Non-overlapping windows of ``context`` tokens over one split: a transfer set for a language model, with
    ``context`` cases (token positions) an item and the vocabulary's ids as classes.

    ``batch(indices)`` gives ``(inputs, labels)``, both ``[B, context]`` int64 (labels are the inputs shifted by
    one: the next token). ``positions(indices)`` are the store rows of those windows' tokens ``[B, context]``.
    """

    ignore_index = None  # every position counts (a -100 label would mark one that does not)

    def __init__(self, ids: np.ndarray, context: int, name: str, vocab_size: int):
        if context < 1:
            raise DarkKnowledgeError(f"context must be >= 1 token, got {context}")
        windows = (len(ids) - 1) // context
        if windows < 1:
            raise DarkKnowledgeError(f"split {name!r} has {len(ids)} tokens: fewer than one window of {context}")
        self.context, self.name, self.vocab_size = context, name, vocab_size
        self.ids = torch.from_numpy(np.ascontiguousarray(ids[:windows * context + 1]))
        self.num_windows = windows

    def __len__(self) -> int:
        return self.num_windows

    @property
    def num_tokens(self) -> int:
        return self.num_windows * self.context

    @property
    def cases_per_item(self) -> int:
        return self.context

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(self.vocab_size))

    def batch(self, indices) -> tuple[Tensor, Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        starts = indices.unsqueeze(1) * self.context + torch.arange(self.context)
        return self.ids[starts], self.ids[starts + 1]

    def positions(self, indices) -> Tensor:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return indices.unsqueeze(1) * self.context + torch.arange(self.context)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.context}|{self.vocab_size}\n".encode())
        h.update(self.ids.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": "token-windows", "split": self.name, "context": self.context, "windows": self.num_windows,
                "tokens": self.num_tokens, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint()}


def shift_labels(labels) -> Tensor:
    """Hugging Face-style labels ``[..., S]`` (label ``t`` the token *at* ``t``, ``-100`` where nothing counts) in
    the library's convention: label ``t`` is the token after input ``t``, and the last position, with no next token,
    is ``-100``."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)], -1)


def causal_sequences(input_ids, labels=None, *, vocab_size: int, name: str = "sequences"):
    """A user's token sequences ``[N, S]`` as a transfer set for :func:`darkknowledge.training.fit`, the labels
    shifted by :func:`shift_labels` (``labels`` unshifted, Hugging Face's way; default: the inputs themselves), so
    a causal model learns to predict the next token; every ``-100`` counts for nothing, in the loss and in metrics."""
    from .transfer import ArrayTransferSet
    input_ids = torch.as_tensor(input_ids, dtype=torch.int64)
    labels = shift_labels(input_ids if labels is None else labels)
    if labels.shape != input_ids.shape:
        raise DarkKnowledgeError(f"{name}: labels {list(labels.shape)} must have the inputs' shape "
                                 f"{list(input_ids.shape)}")
    return ArrayTransferSet(input_ids, labels, classes=[str(i) for i in range(vocab_size)], name=name,
                            ignore_index=IGNORE_INDEX)


@dataclass
class TextSplits:
    """A corpus split by document and tokenised: ``windows[split]`` per split, and what fixes them."""

    tokenizer: TextTokenizer
    windows: dict[str, TokenWindows]
    documents: dict[str, list[str]]
    corpus_sha256: str
    skipped_empty: int

    def describe(self) -> dict[str, Any]:
        return {"corpus_sha256": self.corpus_sha256, "documents": self.documents, "skipped_empty": self.skipped_empty,
                "tokenizer": self.tokenizer.describe(),
                "tokens": {name: w.num_tokens for name, w in self.windows.items()}}


def tokenise_corpus(corpus: TextCorpus, documents: dict[str, list[str]], tokenizer: TextTokenizer,
                    context: int, max_tokens: int | None = None) -> TextSplits:
    """Each split's documents encoded and joined by the end-of-document token (``max_tokens`` caps each split:
    small runs and tests)."""
    windows = {}
    for split in SPLITS:
        pieces = []
        for name in documents[split]:
            pieces += [tokenizer.encode(corpus.documents[name]), np.array([tokenizer.end_of_document])]
        ids = np.concatenate(pieces)[:None if max_tokens is None else max_tokens + 1]
        windows[split] = TokenWindows(ids, context, split, tokenizer.vocab_size)
    return TextSplits(tokenizer, windows, documents, corpus.fingerprint(), corpus.skipped_empty)
