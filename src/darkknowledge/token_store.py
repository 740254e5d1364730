"""The soft-target store for language models: one row per token position of a tokenised corpus, on disk.

**What a row holds.** The teacher's next-token distribution at T = 1 as logits: for an ensemble the log of the
members' mean probability (their arithmetic mean at T = 1, the ensemble's own prediction), so a student can be
softened at any T from one store. Three layouts:

- ``dense``: all V logits in float16 (``2 V`` bytes a token: 8 KB at V = 4,096);
- ``topk``: the K largest logits (float16), their token ids (uint16 when V <= 65,536, else int32) and the two
  numbers of :class:`darkknowledge.losses.TopKTargets` summarising the rest (float32): ``4 K + 8`` bytes with
  uint16 ids (136 B at K = 32). Exact at T = 1 up to float16 rounding; the tail is an estimate at other T.
- ``sampled``: the same arrays holding K tokens drawn from the teacher at T = 1 and their frequencies
  (:func:`darkknowledge.losses.sampled_targets`: an unbiased estimate of its distribution, with an empty tail);
  for distilling at T = 1. With a head of h, the h most probable tokens are kept exact and only the rest is
  drawn (h + K columns). The draws are seeded by the store's key and the window, so a resumed or re-sharded
  build writes the same rows.

**Built chunk by chunk, safe against a kill.** :meth:`TokenTargets.build` runs the teacher over ``batch_windows``
windows at a time and writes their rows into preallocated files; after every chunk it syncs the files and then
records which windows are done in the header (written to a temporary name and renamed). A build killed at
any point leaves a header saying ``complete: false`` and the windows whose rows are on disk: the next build with
the same key resumes there (rows not recorded are rewritten). Under torchrun every rank builds its contiguous
share of the windows into the same files and records its progress in a file of its own; rank 0 checksums the
files and writes the one complete header. A complete store records every file's SHA-256;
opening checks the sizes and, by default, the checksums, and a store that fails is rebuilt by ``build`` (and
refused by ``open``), never silently used. Memory is bounded by one chunk plus the memory map.

**Keyed, and checked against what reads it.** The store lives in ``FOLDER/<key[:16]>/``; the key hashes each
member's weights, the windows' fingerprint (token ids, context, split), the tokenizer's SHA-256 and the layout.
:meth:`TokenTargets.open` given the reader's windows, tokenizer or vocabulary refuses a store built for others
with one line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, schemas, store_files
from .distributed import Workers, current
from .errors import DarkKnowledgeError
from .losses import TopKTargets, topk_targets
from .soft_targets import check_temperature, drawn_rows, module_sha256
from .store_files import count, merged, missing, rank_share
from .outputs import logits_of

FORMAT = "darkknowledge/token-targets-1"
HEADER = "targets.json"
RANK_PROGRESS = "targets.rank{}.json"  # under torchrun: the window ranges one rank has written
ROW_TOLERANCE = 0.05  # |log sum of a row's probabilities| a float16 row of a true distribution stays within


def _array_specs(layout: str, positions: int, vocab_size: int, top_k: int | None) -> dict[str, tuple[str, tuple]]:
    if layout == "dense":
        return {"logits": ("<f2", (positions, vocab_size))}
    index_dtype = "<u2" if vocab_size <= 1 << 16 else "<i4"
    return {"topk_logits": ("<f2", (positions, top_k)), "topk_indices": (index_dtype, (positions, top_k)),
            "tail": ("<f4", (positions, 2))}


@torch.no_grad()
def ensemble_logits(members: list[nn.Module], ids: Tensor) -> Tensor:
    """``log mean_m softmax(member_m(ids))``, ``[B, S, V]`` float32: the members' mean distribution at T = 1."""
    log_probs = torch.stack([torch.log_softmax(logits_of(m(ids)).float(), -1) for m in members])
    return log_probs.logsumexp(0) - np.log(len(members)) if len(members) > 1 else log_probs[0]


class TokenTargets:
    """A teacher's per-token targets over one split's windows, one row per token position: ``targets(rows, T)``
    feeds :class:`darkknowledge.training.Distillation` as a :class:`darkknowledge.soft_targets.SoftTargets`
    does (``len``, ``transfer_fingerprint``, ``describe``)."""

    def __init__(self, folder: Path, header: dict[str, Any]):
        self.folder, self.header = folder, header
        self._arrays = store_files.map_array_files(folder, _specs(header))

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

    @property
    def head(self) -> int:
        """Of a sampled store: how many of each row's columns are the teacher's most probable tokens, exact."""
        return self.header["key_parts"].get("head", 0)

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "layout": self.layout, "top_k": self.top_k, "head": self.head,
                "key": self.header["key"],
                "members": self.header["members"], "positions": self.header["positions"],
                "bytes_per_token": self.bytes_per_token}

    def __len__(self) -> int:
        """Rows: one per token position of the windows (the cases of :func:`darkknowledge.training.fit`)."""
        return self.header["positions"]

    @property
    def transfer_fingerprint(self) -> str:
        return self.header["windows_fingerprint"]

    @property
    def path(self) -> Path:
        return self.folder

    def targets(self, rows, temperature: float) -> dict[str, Any]:
        """Keyword arguments for :func:`darkknowledge.losses.distillation_loss` at ``temperature`` for the given
        rows (token positions: case rows, as :class:`darkknowledge.soft_targets.SoftTargets` reads them):
        ``teacher_logits`` ``[rows, V]`` (dense) or ``topk_targets`` ``[rows, K]``. The logits are the teacher's
        at T = 1, softened by the loss; a sampled store's draws are frequencies at T = 1, so it refuses another T."""
        self.check_temperature(temperature)
        flat = np.asarray(torch.as_tensor(rows, dtype=torch.int64).reshape(-1))
        if self.layout == "dense":
            return {"teacher_logits": torch.from_numpy(self._arrays["logits"][flat].astype(np.float32))}
        values = torch.from_numpy(self._arrays["topk_logits"][flat].astype(np.float32))
        indices = torch.from_numpy(self._arrays["topk_indices"][flat].astype(np.int64))
        tail = torch.from_numpy(np.asarray(self._arrays["tail"][flat]))
        return {"topk_targets": TopKTargets(values, indices, tail[..., 0], tail[..., 1])}

    def check_temperature(self, temperature: float) -> None:
        """Refuse (one line) a temperature this store cannot distil at."""
        check_temperature(self.layout, temperature)

    # -- making and opening ------------------------------------------------------------------------------------

    @staticmethod
    def key_parts(members: list, windows, tokenizer_sha256: str, top_k: int | None,
                  samples: int | None = None, head: int = 0) -> dict[str, Any]:
        teachers = [f"store:{m.header['key']}" if isinstance(m, TokenTargets) else module_sha256(m) for m in members]
        layout = "dense" if top_k is None and samples is None else "topk" if samples is None else "sampled"
        parts = {"format": FORMAT, "members": teachers, "windows": windows.fingerprint(),
                 "tokenizer": tokenizer_sha256, "vocab_size": windows.vocab_size,
                 "layout": layout, "top_k": top_k if samples is None else head + samples}
        return {**parts, "head": head} if head else parts  # without a head, the keys of stores made before

    @classmethod
    def build(cls, teacher: nn.Module | list[nn.Module], windows, folder: str | Path, *, tokenizer_sha256: str,
              top_k: int | None = None, samples: int | None = None, head: int = 0, batch_windows: int = 16,
              on_chunk: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] = print) -> TokenTargets:
        """Reuse an intact store of this key, resume a partial one, or compute it; ``top_k=None`` is dense,
        ``samples=K`` the sampled layout (K draws a position), ``head=h`` with it: the h most probable tokens
        kept exact and the K draws made from the rest.

        ``teacher``: a model, a list of members (their mean distribution), or a dense store over the same windows,
        whose rows are summarised without running the members again (top-k of its float16 logits).

        Under torchrun (any initialised process group) every rank computes its contiguous share of the windows
        not yet done and writes their rows in place; rank 0 holds the store's lock, logs, checksums the files and
        marks the store complete; every rank returns the same store. ``folder`` must be one every rank sees.

        ``on_chunk(done, total)`` is called after each chunk is durable (progress, or a test's kill switch; under
        torchrun on every rank, ``done`` counting what that rank knows is done); ``log`` says when a store is
        resumed or rebuilt, and why.
        """
        workers = current()
        if not workers.is_main:
            log = lambda _: None  # noqa: E731  every rank computes its share; rank 0 alone says what was done
        members = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        vocab_size = windows.vocab_size
        if isinstance(teacher, TokenTargets) and (teacher.layout != "dense" or teacher.header["windows_fingerprint"]
                                                  != windows.fingerprint()):
            raise DarkKnowledgeError(f"a store as teacher must be a dense store over these windows, got "
                                     f"{teacher.layout} {teacher.folder}")
        if top_k is not None and samples is not None:
            raise DarkKnowledgeError("give top_k or samples, not both: a store is top-k or sampled")
        for name, k in (("top_k", top_k), ("samples", samples)):
            if k is not None and not 1 <= k <= vocab_size:
                raise DarkKnowledgeError(f"{name} must be in [1, {vocab_size}] (the vocabulary), got {k}")
        if head and (samples is None or not 0 < head <= vocab_size - samples):
            raise DarkKnowledgeError(f"head is for a sampled store, with head + samples <= {vocab_size} (the "
                                     f"vocabulary); got head {head}, samples {samples}")
        parts = cls.key_parts(members, windows, tokenizer_sha256, top_k, samples, head)
        key = store_files.key_of(parts)
        folder = Path(folder) / key[:16]
        with store_files.store_lock(folder / HEADER, workers, log, "token store"):  # one build per store; others wait
            # Rank 0 decides (reuse, resume or start) and every rank follows the header it sends.
            header = workers.on_main(lambda: cls._start(folder, key, parts, len(members), windows, log))
            if header["complete"]:
                return cls(folder, header)
            workers.write_share(lambda: cls._fill(members, windows, folder, header, batch_windows, on_chunk, workers),
                                "token store")
            header = workers.on_main(lambda: cls._finish(folder, header, workers.world_size))
            return cls(folder, header)

    @classmethod
    def _start(cls, folder: Path, key: str, parts: dict[str, Any], members: int, windows,
               log: Callable[[str], None]) -> dict[str, Any]:
        """Rank 0: the header of an intact store, of a partial one with every rank's progress gathered into it,
        or of a new one whose files are made here (zeros)."""
        header_path = folder / HEADER
        header = None
        if header_path.exists() or header_path.is_symlink():
            header, problem = read_header(header_path)
            if problem is None and header["key"] != key:
                problem = "its header is of another store"
            if problem is not None:
                log(f"token store {folder}: {problem}; rebuilding it")
                header = None
        if header is not None and header["complete"]:
            problem = cls._problem(folder, header, verify=True)
            if problem is None:
                return header
            log(f"token store {folder}: {problem}; rebuilding it")
            header = None
        elif header is not None:
            header = _gather_progress(folder, header)
            problem = store_files.array_files_problem(folder, _specs(header)) or \
                cls(folder, header)._unwritten_rows()
            log(f"token store {folder}: {problem or cls._problem(folder, header, verify=False)}; "
                f"{'rebuilding it' if problem else 'resuming there'}")
            header = None if problem else header
        if header is None:
            header = {"format": FORMAT, "key": key, "key_parts": parts, "layout": parts["layout"],
                      "top_k": parts["top_k"], "vocab_size": windows.vocab_size, "members": members,
                      "positions": windows.num_tokens, "context": windows.context, "windows": len(windows),
                      "tokenizer": parts["tokenizer"], "windows_fingerprint": parts["windows"], "complete": False,
                      "positions_done": 0, "windows_done": [],
                      "arrays": {name: [d, list(s)] for name, (d, s) in _array_specs(
                          parts["layout"], windows.num_tokens, windows.vocab_size, parts["top_k"]).items()}}
            store_files.create_array_files(folder, _specs(header))
            for stale in _rank_progress_files(folder):  # of an earlier build of these rows, now all zeros
                stale.unlink()
            checkpoint.write_json(header_path, header)
        return header

    @staticmethod
    def _finish(folder: Path, header: dict[str, Any], world_size: int) -> dict[str, Any]:
        """Rank 0, once every rank has written its share: every file's SHA-256, and the header marked complete."""
        if world_size > 1:
            problem = store_files.unseen_ranks([folder / RANK_PROGRESS.format(r) for r in range(world_size)],
                                               "token store", "a store folder")
            if problem is not None:
                raise DarkKnowledgeError(problem)
            header = _gather_progress(folder, header)
        header["checksums"] = {name: checkpoint.sha256_file(folder / f"{name}.bin") for name in header["arrays"]}
        header["complete"] = True
        checkpoint.write_json(folder / HEADER, header)
        return header

    @staticmethod
    def _fill(members, windows, folder: Path, header: dict, batch_windows: int, on_chunk, workers: Workers) -> None:
        """Compute this rank's share of the windows not yet done, chunk by chunk, and write their rows in place
        (``pwrite`` of whole rows: ranks on several machines never rewrite each other's bytes of a shared page).

        Progress is a list of done window ranges (``windows_done``; a header without it, from before, counts a
        prefix in ``positions_done``). One process records it in the header after every chunk. Under torchrun
        each rank records its own ranges in ``targets.rank<r>.json`` (rank-owned, so no rank waits for another
        or races for the header; the file is also its marker that rank 0 sees its rows); rank 0 folds them into
        the header when it finishes the store or resumes a killed build, and the next build, with any number of
        ranks, shares out whatever is still missing."""
        specs = _specs(header)
        source = members[0] if isinstance(members[0], TokenTargets) else None
        for m in members if source is None else ():
            m.eval()
        context, started = windows.context, time.perf_counter()
        known = _windows_done(header)
        mine = rank_share(missing(known, len(windows)), workers)
        done_here: list[list[int]] = []
        progress = folder / RANK_PROGRESS.format(workers.rank)

        def record() -> None:
            if workers.distributed:
                checkpoint.write_json(progress, {"windows_done": done_here})
                return
            header["windows_done"] = merged(known + done_here)
            header["positions_done"] = count(header["windows_done"]) * context
            header["build_seconds"] = header.get("build_seconds", 0.0) + time.perf_counter() - started
            checkpoint.write_json(folder / HEADER, header)

        if workers.distributed:
            record()  # the marker, even for a rank with nothing left to do
        with store_files.RowFiles.per_array(specs, folder) as files:
            for first, last in mine:
                for start in range(first, last, batch_windows):
                    stop = min(start + batch_windows, last)
                    if source is None:
                        logits = ensemble_logits(members, windows.batch(torch.arange(start, stop))[0])
                    else:
                        logits = source.targets(range(start * context, stop * context), 1.0)["teacher_logits"]
                    logits = logits.reshape(-1, windows.vocab_size)
                    if header["layout"] == "dense":
                        rows = {"logits": logits.numpy()}
                    else:
                        head = header["key_parts"].get("head", 0)  # a sampled store's draws seeded by window
                        summary = (topk_targets(logits, header["top_k"]) if header["layout"] == "topk" else
                                   drawn_rows(logits, header["key"], header["top_k"] - head, head, start, context))
                        rows = {"topk_logits": summary.logits.numpy(), "topk_indices": summary.indices.numpy(),
                                "tail": torch.stack([summary.tail_logsumexp, summary.tail_mean], -1).numpy()}
                    files.write(start * context, rows)
                    files.sync()
                    # Only after the rows are on disk is their range recorded: a kill never leaves rows counted
                    # unwritten (rows written but not yet recorded are computed again).
                    done_here = merged(done_here + [[start, stop]])
                    record()
                    started = time.perf_counter()
                    if on_chunk is not None:
                        on_chunk(count(merged(known + done_here)) * context, header["positions"])

    @staticmethod
    def _problem(folder: Path, header: dict, verify: bool) -> str | None:
        if not header.get("complete"):
            return f"its build stopped after {header.get('positions_done', 0)} of {header.get('positions')} positions"
        if problem := store_files.array_files_problem(folder, _specs(header)):
            return problem
        for name in header["arrays"]:
            path = folder / f"{name}.bin"
            if verify and checkpoint.sha256_file(path) != header["checksums"][name]:
                return f"{path.name} does not match its checksum (corrupted)"
        return None

    def _unwritten_rows(self, batch_positions: int = 4096) -> str | None:
        """Whether the rows a partial build recorded as written hold distributions: each row's log-probabilities
        (its kept logits and, for top-k, its tail) sum to one, which zeros or garbage do not."""
        for start, stop in _windows_done(self.header):
            for first in range(start * self.header["context"], stop * self.header["context"], batch_positions):
                rows = slice(first, min(first + batch_positions, stop * self.header["context"]))
                if self.layout == "dense":
                    kept = torch.from_numpy(np.asarray(self._arrays["logits"][rows], dtype=np.float32))
                else:
                    kept = torch.from_numpy(np.concatenate([np.asarray(self._arrays["topk_logits"][rows], np.float32),
                                                            self._arrays["tail"][rows, :1]], 1))
                total = kept.logsumexp(-1)
                if not bool((total.abs() < ROW_TOLERANCE).all()):
                    return f"rows recorded as written (windows {start}..{stop}) hold no distributions"
        return None

    @classmethod
    def open(cls, folder: str | Path, *, windows=None, tokenizer_sha256: str | None = None,
             vocab_size: int | None = None, verify: bool = True) -> TokenTargets:
        """Open a complete store; refuse (one line) one built for other windows, tokenizer or vocabulary."""
        folder = Path(folder)
        if not (folder / HEADER).exists():
            raise DarkKnowledgeError(f"{folder} holds no token store ({HEADER} missing)")
        header, problem = read_header(folder / HEADER)
        if problem is not None:
            raise DarkKnowledgeError(f"token store {folder / HEADER}: {problem}; build it again")
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


def _specs(header: dict[str, Any]) -> store_files.Specs:
    return {name: (dtype, tuple(shape)) for name, (dtype, shape) in header["arrays"].items()}


def read_header(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(header, None)`` when the header at ``path`` fits its schema and agrees with its key and with itself,
    else ``(None, why not)``: a header is never half-trusted."""
    try:
        header = store_files.read_json(path, "token store")
    except (OSError, ValueError, DarkKnowledgeError) as e:
        return None, f"{HEADER} is unreadable or not JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    try:
        schemas.check(schemas.TokenStoreHeader, header, path, "")
    except DarkKnowledgeError as e:
        return None, str(e).rstrip("; ")
    return (None, problem) if (problem := header_problem(header)) else (header, None)


def header_problem(header: dict[str, Any]) -> str | None:
    """Why a header that fits its schema does not describe its store, or None: its key must be the hash of its
    key parts, the fields a reader uses (layout, top_k, vocabulary, tokenizer, windows) those of the key parts,
    and its arrays those its layout and sizes make."""
    parts = header["key_parts"]
    if header["key"] != store_files.key_of(parts):
        return "its header's key is not the hash of its key_parts (edited or damaged)"
    pairs = {"layout": "layout", "top_k": "top_k", "vocab_size": "vocab_size", "tokenizer": "tokenizer",
             "windows_fingerprint": "windows"}
    for field, part in pairs.items():
        if header[field] != parts.get(part):
            return f"its header's {field} is not the one in its key_parts (edited or damaged)"
    if not isinstance(parts.get("members"), list) or header["members"] != len(parts["members"]):
        return "its header's members is not the number of members in its key_parts"
    if header["positions"] != header["windows"] * header["context"]:
        return "its header's positions is not windows x context"
    expected = {name: [dtype, list(shape)] for name, (dtype, shape) in _array_specs(
        header["layout"], header["positions"], header["vocab_size"], header["top_k"]).items()}
    if header["arrays"] != expected:
        return "its header's arrays are not those of its layout and sizes"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Progress: sorted, disjoint ranges [start, stop) of windows whose rows are on disk (store_files keeps the ranges)
# ---------------------------------------------------------------------------------------------------------------

def _windows_done(header: dict[str, Any]) -> list[list[int]]:
    if "windows_done" in header:
        return header["windows_done"]
    done = header["positions_done"] // header["context"]  # a header from before: a prefix
    return [[0, done]] if done else []


def _rank_progress_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(RANK_PROGRESS.format("*")))


def _gather_progress(folder: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: the ranges the ranks recorded folded into the header (written before their files are removed)."""
    files = _rank_progress_files(folder)
    if not files:
        return header
    ranges = _windows_done(header) + [r for f in files for r in store_files.read_ranges(f, header["windows"],
                                                                                           "token store")]
    header = {**header, "windows_done": merged(ranges)}
    header["positions_done"] = count(header["windows_done"]) * header["context"]
    checkpoint.write_json(folder / HEADER, header)
    for f in files:
        f.unlink()
    return header
