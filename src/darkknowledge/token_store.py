"""The soft-target store for language models: one row per token position of a tokenised corpus, on disk.

**What a row holds.** The teacher's next-token distribution at T = 1 as logits: for an ensemble the log of the
members' mean probability (their arithmetic mean at T = 1, the ensemble's own prediction), so a student can be
softened at any T from one store. Two layouts:

- ``dense``: all V logits in float16 (``2 V`` bytes a token: 8 KB at V = 4,096);
- ``topk``: the K largest logits (float16), their token ids (uint16 when V <= 65,536, else int32) and the two
  numbers of :class:`darkknowledge.losses.TopKTargets` summarising the rest (float32): ``4 K + 8`` bytes with
  uint16 ids (136 B at K = 32). Exact at T = 1 up to float16 rounding; the tail is an estimate at other T.

**Built chunk by chunk, safe against a kill.** :meth:`TokenTargets.build` runs the teacher over ``batch_windows``
windows at a time and writes their rows into preallocated files; after every chunk it flushes the files and then
records how many positions are done in the header (written to a temporary name and renamed). A build killed at
any point leaves a header saying ``complete: false`` and a count of rows that are on disk: the next build with
the same key resumes there (rows past the count are rewritten). A complete store records every file's SHA-256;
opening checks the sizes and, by default, the checksums, and a store that fails is rebuilt by ``build`` (and
refused by ``open``), never silently used. Memory is bounded by one chunk plus the memory map.

**Keyed, and checked against what reads it.** The store lives in ``FOLDER/<key[:16]>/``; the key hashes each
member's weights, the windows' fingerprint (token ids, context, split), the tokenizer's SHA-256 and the layout.
:meth:`TokenTargets.open` given the reader's windows, tokenizer or vocabulary refuses a store built for others
with one line.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint
from .errors import DarkKnowledgeError
from .losses import TopKTargets, topk_targets
from .soft_targets import module_sha256

FORMAT = "darkknowledge/token-targets-1"
HEADER = "targets.json"


def _array_specs(layout: str, positions: int, vocab_size: int, top_k: int | None) -> dict[str, tuple[str, tuple]]:
    if layout == "dense":
        return {"logits": ("<f2", (positions, vocab_size))}
    index_dtype = "<u2" if vocab_size <= 1 << 16 else "<i4"
    return {"topk_logits": ("<f2", (positions, top_k)), "topk_indices": (index_dtype, (positions, top_k)),
            "tail": ("<f4", (positions, 2))}


@torch.no_grad()
def ensemble_logits(members: list[nn.Module], ids: Tensor) -> Tensor:
    """``log mean_m softmax(member_m(ids))``, ``[B, S, V]`` float32: the members' mean distribution at T = 1."""
    log_probs = torch.stack([torch.log_softmax(m(ids).float(), -1) for m in members])
    return log_probs.logsumexp(0) - np.log(len(members)) if len(members) > 1 else log_probs[0]


class TokenTargets:
    """A teacher's per-token targets over one split's windows; ``targets(window_indices)`` feeds the loss."""

    def __init__(self, folder: Path, header: dict[str, Any]):
        self.folder, self.header = folder, header
        self._arrays = {name: np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r", shape=tuple(shape))
                        for name, (dtype, shape) in header["arrays"].items()}

    # -- what it holds -----------------------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        return self.header["layout"]

    @property
    def top_k(self) -> int | None:
        return self.header["top_k"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    @property
    def bytes_per_token(self) -> float:
        return sum(np.dtype(d).itemsize * int(np.prod(s[1:])) for d, s in self.header["arrays"].values())

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "layout": self.layout, "top_k": self.top_k, "key": self.header["key"],
                "members": self.header["members"], "positions": self.header["positions"],
                "bytes_per_token": self.bytes_per_token}

    def targets(self, windows, window_indices) -> dict[str, Any]:
        """Keyword arguments for :func:`darkknowledge.losses.distillation_loss`: ``teacher_logits`` ``[B, S, V]``
        (dense) or ``topk_targets`` ``[B, S, K]`` for the given windows."""
        rows = windows.positions(window_indices).numpy()
        shape = rows.shape
        flat = rows.reshape(-1)
        if self.layout == "dense":
            return {"teacher_logits": torch.from_numpy(self._arrays["logits"][flat].astype(np.float32))
                    .reshape(*shape, -1)}
        values = torch.from_numpy(self._arrays["topk_logits"][flat].astype(np.float32)).reshape(*shape, -1)
        indices = torch.from_numpy(self._arrays["topk_indices"][flat].astype(np.int64)).reshape(*shape, -1)
        tail = torch.from_numpy(np.asarray(self._arrays["tail"][flat])).reshape(*shape, 2)
        return {"topk_targets": TopKTargets(values, indices, tail[..., 0], tail[..., 1])}

    # -- making and opening ------------------------------------------------------------------------------------

    @staticmethod
    def key_parts(members: list, windows, tokenizer_sha256: str, top_k: int | None) -> dict[str, Any]:
        teachers = [f"store:{m.header['key']}" if isinstance(m, TokenTargets) else module_sha256(m) for m in members]
        return {"format": FORMAT, "members": teachers, "windows": windows.fingerprint(),
                "tokenizer": tokenizer_sha256, "vocab_size": windows.vocab_size,
                "layout": "dense" if top_k is None else "topk", "top_k": top_k}

    @classmethod
    def build(cls, teacher: nn.Module | list[nn.Module], windows, folder: str | Path, *, tokenizer_sha256: str,
              top_k: int | None = None, batch_windows: int = 16,
              on_chunk: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] = print) -> TokenTargets:
        """Reuse an intact store of this key, resume a partial one, or compute it; ``top_k=None`` is dense.

        ``teacher``: a model, a list of members (their mean distribution), or a dense store over the same windows,
        whose rows are summarised without running the members again (top-k of its float16 logits).

        ``on_chunk(done, total)`` is called after each chunk is durable (progress, or a test's kill switch); ``log``
        says when a store is resumed or rebuilt, and why.
        """
        members = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        vocab_size = windows.vocab_size
        if isinstance(teacher, TokenTargets) and (teacher.layout != "dense" or teacher.header["windows_fingerprint"]
                                                  != windows.fingerprint()):
            raise DarkKnowledgeError(f"a store as teacher must be a dense store over these windows, got "
                                     f"{teacher.layout} {teacher.folder}")
        if top_k is not None and not 1 <= top_k <= vocab_size:
            raise DarkKnowledgeError(f"top_k must be in [1, {vocab_size}] (the vocabulary), got {top_k}")
        parts = cls.key_parts(members, windows, tokenizer_sha256, top_k)
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        folder = Path(folder) / key[:16]
        header_path = folder / HEADER
        header = json.loads(header_path.read_text()) if header_path.exists() else None
        if header is not None and header.get("key") == key and header.get("complete"):
            problem = cls._problem(folder, header, verify=True)
            if problem is None:
                return cls(folder, header)
            log(f"token store {folder}: {problem}; rebuilding it")
            header = None
        elif header is not None and header.get("key") == key:
            log(f"token store {folder}: {cls._problem(folder, header, verify=False)}; resuming there")
        if header is None or header.get("key") != key:
            header = {"format": FORMAT, "key": key, "key_parts": parts, "layout": parts["layout"], "top_k": top_k,
                      "vocab_size": vocab_size, "members": len(members), "positions": windows.num_tokens,
                      "context": windows.context, "windows": len(windows), "tokenizer": tokenizer_sha256,
                      "windows_fingerprint": parts["windows"], "complete": False, "positions_done": 0,
                      "arrays": {name: [d, list(s)] for name, (d, s) in
                                 _array_specs(parts["layout"], windows.num_tokens, vocab_size, top_k).items()}}
            folder.mkdir(parents=True, exist_ok=True)
            for name, (dtype, shape) in header["arrays"].items():
                np.memmap(folder / f"{name}.bin", dtype=dtype, mode="w+", shape=tuple(shape)).flush()
            checkpoint.write_json(header_path, header)
        cls._fill(members, windows, folder, header, batch_windows, on_chunk)
        header["checksums"] = {name: checkpoint.sha256_file(folder / f"{name}.bin") for name in header["arrays"]}
        header["complete"] = True
        checkpoint.write_json(header_path, header)
        return cls(folder, header)

    @staticmethod
    def _fill(members, windows, folder: Path, header: dict, batch_windows: int, on_chunk) -> None:
        arrays = {name: np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r+", shape=tuple(shape))
                  for name, (dtype, shape) in header["arrays"].items()}
        source = members[0] if isinstance(members[0], TokenTargets) else None
        for m in members if source is None else ():
            m.eval()
        context, started = windows.context, time.perf_counter()
        first_window = header["positions_done"] // context
        for start in range(first_window, len(windows), batch_windows):
            stop = min(start + batch_windows, len(windows))
            if source is None:
                logits = ensemble_logits(members, windows.batch(torch.arange(start, stop))[0])
            else:
                logits = source.targets(windows, torch.arange(start, stop))["teacher_logits"]
            logits = logits.reshape(-1, windows.vocab_size)
            rows = slice(start * context, stop * context)
            if header["layout"] == "dense":
                arrays["logits"][rows] = logits.numpy().astype(np.float16)
            else:
                summary = topk_targets(logits, header["top_k"])
                arrays["topk_logits"][rows] = summary.logits.numpy().astype(np.float16)
                arrays["topk_indices"][rows] = summary.indices.numpy()
                arrays["tail"][rows] = torch.stack([summary.tail_logsumexp, summary.tail_mean], -1).numpy()
            for array in arrays.values():
                array.flush()
            # Only after the rows are on disk does the header say so: a kill never leaves rows counted unwritten.
            header["positions_done"] = stop * context
            header["build_seconds"] = header.get("build_seconds", 0.0) + time.perf_counter() - started
            started = time.perf_counter()
            checkpoint.write_json(folder / HEADER, header)
            if on_chunk is not None:
                on_chunk(header["positions_done"], header["positions"])

    @staticmethod
    def _problem(folder: Path, header: dict, verify: bool) -> str | None:
        if not header.get("complete"):
            return f"its build stopped after {header.get('positions_done', 0)} of {header.get('positions')} positions"
        for name, (dtype, shape) in header["arrays"].items():
            path = folder / f"{name}.bin"
            expected = np.dtype(dtype).itemsize * int(np.prod(shape))
            if not path.exists() or path.stat().st_size != expected:
                return f"{path.name} is missing or truncated"
            if verify and checkpoint.sha256_file(path) != header["checksums"][name]:
                return f"{path.name} does not match its checksum (corrupted)"
        return None

    @classmethod
    def open(cls, folder: str | Path, *, windows=None, tokenizer_sha256: str | None = None,
             vocab_size: int | None = None, verify: bool = True) -> TokenTargets:
        """Open a complete store; refuse (one line) one built for other windows, tokenizer or vocabulary."""
        folder = Path(folder)
        try:
            header = json.loads((folder / HEADER).read_text())
        except (OSError, ValueError):
            raise DarkKnowledgeError(f"{folder} holds no token store ({HEADER} missing or unreadable)") from None
        if header.get("format") != FORMAT:
            raise DarkKnowledgeError(f"{folder} is not a {FORMAT} store")
        problem = cls._problem(folder, header, verify)
        if problem is not None:
            raise DarkKnowledgeError(f"token store {folder}: {problem}; build it again")
        if vocab_size is not None and vocab_size != header["vocab_size"]:
            raise DarkKnowledgeError(f"token store {folder} holds a vocabulary of {header['vocab_size']} tokens, the "
                                     f"student has {vocab_size}: teacher and student vocabularies differ")
        if tokenizer_sha256 is not None and tokenizer_sha256 != header["tokenizer"]:
            raise DarkKnowledgeError(f"token store {folder} was built with another tokenizer (SHA-256 "
                                     f"{header['tokenizer'][:12]}, this run's {tokenizer_sha256[:12]}); build a store "
                                     f"with this run's tokenizer")
        if windows is not None and windows.fingerprint() != header["windows_fingerprint"]:
            raise DarkKnowledgeError(f"token store {folder} was built over another corpus or split (windows "
                                     f"fingerprint differs: {windows.describe()['split']} split, context "
                                     f"{windows.context}); build a store over this data")
        return cls(folder, header)
