"""The soft-target store: a teacher's (or an ensemble's) outputs over a transfer set, computed once, on disk.

One class, :class:`SoftTargets`, for every kind of case (an image, a table row, a language model's token position)
and every layout; a batch is read by its rows (``targets(rows, T)``), one row per case.

**What is stored: logits, so any temperature can be used later.**

- ``full`` layout (a language model's store calls it ``dense``): every member's logits ``[N, M, C]`` (M = 1 for
  one teacher). Soft targets at any T and under any combine rule are computed per batch from these
  (``ensemble.distillation_targets``), exactly: one store serves a whole temperature sweep and all three combine
  rules. (One logit vector per case could not: the arithmetic mean of the members' softened distributions does
  not commute with T; see ``ensemble.py``.)
- ``topk`` layout (many classes): the k largest logits, their class indices and two numbers summarising the
  rest (:class:`darkknowledge.losses.TopKTargets`; exact at T = 1, documented estimate at other T). For an
  ensemble under ``arithmetic`` each member's top-k is kept (``[N, M, k]``: the loss averages the members'
  cross-entropies, which equals the cross-entropy with their mean); under ``geometric`` or ``logits`` (the same
  targets at every T) the top-k of the mean logits is kept (``[N, 1, k]``).
- ``sampled`` layout (distilling at T = 1 only): the same arrays holding, per case, ``samples`` classes drawn from
  the teacher's distribution at T = 1 (an ensemble's under its combine rule, ``[N, 1, h + K]``) and their
  frequencies (:func:`darkknowledge.losses.sampled_targets`: unbiased, with an empty tail); with a head of h the h
  most probable classes are kept exact and only the rest is drawn. The draws are seeded by the store's key and
  the row (a language model's store: the window), so a store computed in other batches, by other ranks or
  resumed after a kill holds the same rows.
- ``compact`` layout: the rows of a sampled store (the same draws for the same key and row) packed into one uint8
  array ``[N, 1, bytes]`` by :class:`darkknowledge.store_codec.CompactCodec` (ids in ``ceil(log2 C)`` bits, the
  head's probabilities in 8 bits, ``quant`` ``log8`` or ``e4m3``): 66 bytes a row at h = 16, K = 16 and C = 4,096
  where the sampled layout takes 136. A batch decodes only its rows, into the targets a sampled store gives.

**Two forms on disk**, read the same way (the arrays of both are seen as ``[N, M, ...]``):

- *one file* (:meth:`SoftTargets.compute`, ``darkknowledge/soft-targets-1``): ``STORE_DIR/<key[:16]>.bin`` holds
  the arrays back to back (page-aligned), ``<key[:16]>.json`` is the header: the key and what went into it,
  shapes, dtypes, offsets and every array's SHA-256. The data file is written under a temporary name and renamed,
  then the header, so a crash leaves no header or an intact store.
- *a folder* (:meth:`SoftTargets.build`, ``darkknowledge/token-targets-1``, a language model's corpus: one row
  per token position, the teacher's T = 1 distribution as float16 logits, an ensemble's as the log of its
  members' mean probability): ``FOLDER/<key[:16]>/`` holds ``<array>.bin`` files and ``targets.json``. It is
  built chunk by chunk into preallocated files; after every chunk the files are synced and then the windows done
  are recorded in the header, so a build killed at any point is resumed by the next one with the same key. Under
  torchrun every rank builds its share in place and records its progress in a file of its own; rank 0 checksums
  the files and writes the one complete header.

**Keyed so a stale store is never used.** The key is the SHA-256 of: each member's weights (a hash of its
state_dict tensors, names, shapes and dtypes, and its architecture's repr: what the logits depend on, even for a
model changed in memory), the transfer set's fingerprint (pixels, labels, classes; token ids, context, split),
the preprocessing or the tokenizer, the layout with k and the storage dtype, the combine rule where the stored
numbers depend on it (top-k of several members), and the format. The key names the files, so a changed teacher
or data finds no store and computes a new one; stores of other keys are left alone (delete them to reclaim).
Opening checks the header against its schema and its key, the files' sizes (truncation) and, by default, every
array's checksum (corruption); ``compute`` and ``build`` rebuild a store that fails and say why, :meth:`open`
refuses it in one line, as it refuses a store made for other windows, tokenizer or vocabulary than the reader's.
The file engine (layout, writes, checksums, locks, progress ranges) is :mod:`darkknowledge.store_files`.

**Reading does not load the files**: they are memory-mapped; a batch is a gather of its rows into a fresh tensor.
Pages the kernel brought in are file-backed page cache (reclaimable, shared), not the process's own memory;
:meth:`SoftTargets.iter_batches` also hands them back as it goes, for passes over stores larger than RAM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoint, reading, schemas, store_files
from .distributed import Workers, current
from .ensemble import COMBINE_RULES, Ensemble, check_combine, distillation_targets, ensemble_logits
from .errors import DarkKnowledgeError
from .data.transfer import UINT8_PIXELS, as_transfer_set, batches, cases_per_item, changes_between_reads, num_cases
from .evaluation import autocast, device_of, precision_of, to_device
from .losses import TopKTargets, sampled_targets, tail_logsumexp_at, topk_targets
from .outputs import logits_of
from .store_codec import QUANTS, CompactCodec

FORMAT = "darkknowledge/soft-targets-1"  # a store in one file and its header (compute)
FOLDER_FORMAT = "darkknowledge/token-targets-1"  # a store in a folder of array files (build)
FOLDER_HEADER = "targets.json"
RANK_PROGRESS = "targets.rank{}.json"  # under torchrun: the window ranges one rank has written
ROW_TOLERANCE = 0.05  # |log sum of a row's probabilities| a float16 row of a true distribution stays within
LAYOUTS = ("full", "topk", "sampled", "compact")
DRAWN = ("sampled", "compact")  # the layouts of draws at T = 1
DENSE = ("full", "dense")  # the full layout, as a one-file store and a folder store name it
STORAGE_DTYPES = {"float32": "<f4", "float16": "<f2"}
PREPROCESSING = "uint8 / 255"


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's architecture (its repr) and every state_dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n".encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def teacher_members(teacher: nn.Module) -> list[nn.Module]:
    return list(teacher.members) if isinstance(teacher, Ensemble) else [teacher]


def _default_combine(teacher: nn.Module) -> str:
    return teacher.combine if isinstance(teacher, Ensemble) else "arithmetic"


class SoftTargets:
    """Teacher outputs over a transfer set, memory-mapped (or in memory), read per batch by case index.

    Make one with :meth:`compute` (one file; reuses an intact store of the same key, else computes and writes it)
    or :meth:`build` (a folder, resumable; a language model's token windows), open an existing one of either form
    with :meth:`open`. ``combine`` is the rule applied when reading (``full`` layout: any rule).
    """

    def __init__(self, header: dict[str, Any], arrays: dict[str, np.ndarray], combine: str,
                 path: Path | None = None, mapping: mmap.mmap | None = None):
        self.header = header
        self._arrays = arrays  # every array [N, M, ...], whatever the form on disk
        self._mapping = mapping
        self.path = path
        if header.get("stored_combine") is not None and combine not in _compatible_rules(header["stored_combine"]):
            raise DarkKnowledgeError(
                f"this top-k store holds {header['stored_combine']} targets of {header['members_in_teacher']} members "
                f"and cannot give {combine!r} ones; compute a store with combine={combine!r}")
        self.combine = check_combine(combine)

    # -- what it holds -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows: one per case (a language model's store: per token position)."""
        return len(next(iter(self._arrays.values())))

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        k = f", k={self.top_k}" if self.top_k else ""
        return (f"SoftTargets({where}: {len(self)} cases x {self.num_classes} classes, {self.layout}{k}, "
                f"{self.members_in_teacher} member(s), combine={self.combine!r})")

    @property
    def _in_folder(self) -> bool:
        return self.header["format"] == FOLDER_FORMAT

    @property
    def key(self) -> str:
        return self.header["key"]

    @property
    def layout(self) -> str:
        return self.header["layout"]

    @property
    def top_k(self) -> int | None:
        return self.header["top_k"]

    @property
    def head(self) -> int:
        """Of a sampled store: how many of each row's columns are the teacher's most probable classes, exact."""
        return self.header["key_parts"].get("head", 0)

    @property
    def codec(self) -> CompactCodec | None:
        """Of a compact store: how its rows are packed (None for the other layouts)."""
        return _codec(self.header["key_parts"], self.num_classes)

    @property
    def num_classes(self) -> int:
        """Classes (of a language model's store: its vocabulary)."""
        return self.header["vocab_size" if self._in_folder else "num_classes"]

    @property
    def num_members(self) -> int:
        """Members whose outputs are stored (1 for a single teacher, a top-k store of mean logits, or draws)."""
        return self._arrays[next(iter(self._arrays))].shape[1]

    @property
    def members_in_teacher(self) -> int:
        return self.header["members" if self._in_folder else "members_in_teacher"]

    @property
    def transfer_fingerprint(self) -> str:
        return self.header["windows_fingerprint"] if self._in_folder else self.header["key_parts"]["transfer_set"]

    @property
    def bytes_per_case(self) -> int:
        """Bytes of one row (of a language model's store: bytes per token)."""
        return sum(a.itemsize * math.prod(a.shape[1:]) for a in self._arrays.values())

    @property
    def nbytes(self) -> int:
        return self.header["data_bytes"] if "data_bytes" in self.header else len(self) * self.bytes_per_case

    def with_combine(self, combine: str) -> SoftTargets:
        """The same stored numbers read under another rule (full layout: any rule)."""
        return SoftTargets(self.header, self._arrays, combine, self.path, self._mapping)

    def describe(self) -> dict[str, Any]:
        """For sidecars and the run key: what the targets are (each form as its runs' keys have always held it)."""
        if self._in_folder:
            return {"folder": str(self.path), "layout": self.layout, "top_k": self.top_k, "head": self.head,
                    "key": self.key, "members": self.members_in_teacher, "positions": len(self),
                    "bytes_per_token": self.bytes_per_case, **self._quant}
        return {"key": self.key, "layout": self.layout, "top_k": self.top_k, "combine": self.combine,
                "members": self.members_in_teacher, "dtype": self.header["dtype"],
                **({"head": self.head} if self.layout in DRAWN else {}), **self._quant}

    @property
    def _quant(self) -> dict[str, str]:
        """A compact store's quantisation, for what describes it (no field for the other layouts: their keys)."""
        return {"quant": self.header["key_parts"]["quant"]} if self.layout == "compact" else {}

    # -- reading ---------------------------------------------------------------------------------------------

    def _rows(self, name: str, indices: np.ndarray) -> Tensor:
        return torch.from_numpy(np.take(self._arrays[name], indices, axis=0))

    def _as_index(self, indices) -> np.ndarray:
        """Rows as a flat index: a slice, a range, or rows of any shape (a batch of windows' token positions)."""
        if isinstance(indices, slice):
            return np.arange(len(self))[indices]
        if isinstance(indices, Tensor):
            indices = indices.cpu().numpy()
        return np.asarray(indices, dtype=np.int64).reshape(-1)

    def member_logits(self, indices) -> Tensor:
        """Stored logits ``[B, M, C]`` (float32) of the cases at ``indices`` (full layout only)."""
        if self.layout not in DENSE:
            raise DarkKnowledgeError("a top-k store keeps only the k largest logits; use targets() or "
                                     "probabilities(), or compute a full store")
        return self._rows("logits", self._as_index(indices)).float()

    def topk(self, indices) -> TopKTargets:
        """The stored top-k summary ``[B, M, k]`` (top-k layout; sampled: the draws, ``[B, 1, h + K]``; compact:
        the same, decoded from the batch's rows only)."""
        if self.layout in DENSE:
            raise DarkKnowledgeError("this store holds full logits, not a top-k summary")
        rows = self._as_index(indices)
        if self.layout == "compact":
            t = self.codec.decode(np.take(self._arrays["rows"], rows, axis=0))
            return TopKTargets(*(getattr(t, name).unsqueeze(1) for name in
                                 ("logits", "indices", "tail_logsumexp", "tail_mean")))
        indices = torch.from_numpy(np.take(self._arrays["topk_indices"], rows, axis=0).astype(np.int64))
        return TopKTargets(self._rows("topk_logits", rows).float(), indices, self._rows("tail_logsumexp", rows),
                           self._rows("tail_mean", rows))

    def targets(self, indices, temperature: float) -> dict[str, Any]:
        """Keyword arguments for :func:`darkknowledge.losses.distillation_loss` giving the targets at T of the
        rows ``indices`` (flattened: one row per case): ``teacher_logits`` ``[B, C]``, ``soft_targets``
        (arithmetic mean of several members) or ``topk_targets`` (``[B, k]``; ``[B, M, k]`` for several
        members kept apart). The logits are the teacher's at T = 1, softened by the loss; a sampled store's draws
        are frequencies at T = 1, so it refuses another T."""
        self.check_temperature(temperature)
        if self.layout in DENSE:
            return distillation_targets(self.member_logits(indices), self.combine, temperature)
        t = self.topk(indices)
        if self.num_members == 1:  # one distribution a case
            t = TopKTargets(t.logits[:, 0], t.indices[:, 0], t.tail_logsumexp[:, 0], t.tail_mean[:, 0])
        return {"topk_targets": t}

    def check_temperature(self, temperature: float) -> None:
        """Refuse (one line) a temperature this store cannot distil at: draws are frequencies at T = 1."""
        check_layout_temperature(self.layout, temperature)

    def probabilities(self, indices, temperature: float) -> Tensor:
        """Dense soft targets ``[B, C]`` at ``temperature`` (top-k: the tail mass spread evenly over the tail)."""
        from .losses import softmax_with_temperature
        if self.layout in DENSE:
            targets = self.targets(indices, temperature)
            if "soft_targets" in targets:
                return targets["soft_targets"]
            return softmax_with_temperature(targets["teacher_logits"], temperature)
        self.check_temperature(temperature)
        t = self.topk(indices)
        batch, members, k = t.logits.shape
        top = t.logits / temperature
        tail = self.num_classes - k
        if tail == 0:
            dense = torch.zeros(batch, members, self.num_classes).scatter_(-1, t.indices, torch.softmax(top, -1))
            return dense.mean(1)
        tail_lse = tail_logsumexp_at(t, 1 / temperature, torch.float32, tail)
        log_z = torch.logaddexp(top.logsumexp(-1), tail_lse)
        dense = (torch.exp(tail_lse - log_z) / tail).unsqueeze(-1).expand(batch, members, self.num_classes).clone()
        dense.scatter_(-1, t.indices, torch.exp(top - log_z.unsqueeze(-1)))
        return dense.mean(1)

    def iter_batches(self, batch_size: int = 4096) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """Every row in order, ``batch_size`` at a time, as (slice, {array name: tensor}); pages already read are
        handed back to the kernel every ~64 MB, so a pass over a store larger than RAM stays small."""
        release_every = max(1, (64 << 20) // max(self.bytes_per_case * batch_size, 1))
        for step, start in enumerate(range(0, len(self), batch_size)):
            rows = slice(start, min(start + batch_size, len(self)))
            yield rows, {name: torch.from_numpy(np.array(a[rows])) for name, a in self._arrays.items()}
            if (step + 1) % release_every == 0:
                self.release()
        self.release()

    def release(self) -> None:
        """Drop this process's mapping of pages read so far (they stay in the page cache; no data is lost)."""
        if self._mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)

    # -- making one in one file --------------------------------------------------------------------------------

    @classmethod
    def compute(cls, teacher: nn.Module, transfer_set, store_dir: str | os.PathLike | None = None, *,
                top_k: int | None = None, samples: int | None = None, head: int = 0, compact: str | None = None,
                dtype: str = "float32", combine: str | None = None, batch_size: int = 2048, bf16: bool | str = False,
                log: Callable[[str], None] | None = None) -> SoftTargets:
        """The teacher's outputs over ``transfer_set``, from ``store_dir`` if an intact store of the same key is
        there, else computed in one batched pass of each member and written there (on the device the teacher's
        weights are on). ``transfer_set``: a transfer set or anything :func:`darkknowledge.data.as_transfer_set`
        takes; one row per case (a set with labels ``[N, T]`` has T cases per item).

        ``teacher``: any module mapping inputs to logits, or an :class:`Ensemble` (its members' logits are kept;
        ``combine`` defaults to the ensemble's rule). ``top_k``: keep only the k largest logits per case (and
        member). ``samples=K``: the sampled layout, K classes drawn per case at T = 1, and ``head=h`` with it the h
        most probable kept exact; ``compact="log8"`` or ``"e4m3"`` with them: the same draws packed into bytes
        (the compact layout). ``dtype``: ``float32`` or ``float16`` for the stored logits.
        ``store_dir=None``: in memory only.
        """
        log = log or (lambda _: None)
        transfer_set = as_transfer_set(transfer_set)
        combine = check_combine(combine or _default_combine(teacher))
        if dtype not in STORAGE_DTYPES:
            raise DarkKnowledgeError(f"store dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        if len(transfer_set) == 0:
            raise DarkKnowledgeError("the transfer set is empty; soft targets need at least one case")
        members = teacher_members(teacher)
        layout = _layout(top_k, samples, head, compact=compact)
        # Top-k of several members: per-member top-k for the arithmetic mean, top-k of the mean logits otherwise;
        # draws of several members: from their arithmetic mixture, or from the softmax of their mean logits.
        stored_combine = None
        if layout != "full" and len(members) > 1:
            stored_combine = "arithmetic" if combine == "arithmetic" else "mean-logits"
        key_parts = {
            "format": FORMAT,
            "teacher": [module_sha256(m) for m in members],
            "transfer_set": transfer_set.fingerprint(),
            "preprocessing": {"inputs": _preprocessing(transfer_set), "jitter": 0, **_precision_key(bf16)},
            "layout": layout, "top_k": top_k if samples is None else head + samples, "dtype": dtype,
            "stored_combine": stored_combine, **({"head": head} if layout in DRAWN else {}),
            **({"quant": compact} if compact else {}),
        }
        key = store_files.key_of(key_parts)
        header_path = Path(store_dir) / f"{key[:16]}.json" if store_dir is not None else None
        workers = current()
        if not workers.is_main:
            log = lambda _: None  # noqa: E731  every rank computes its share; rank 0 alone says what was done
        with store_files.store_lock(header_path, workers, log):  # one writer per store; others wait, then reuse it
            # Rank 0 looks for an intact store of this key (one checksum pass); every rank follows what it found.
            found = None
            if workers.is_main and header_path is not None and (header_path.exists()
                                                                 or header_path.with_suffix(".bin").exists()):
                try:
                    cls.open(header_path, combine=combine, expected_key=key)
                    found = "intact"
                except DarkKnowledgeError as problem:
                    found = f"not using {header_path}: {problem}; computing it again"
            found = workers.broadcast_json(found)
            if found == "intact":
                store = cls.open(header_path, combine=combine, expected_key=key, verify=False)  # verified just now
                log(f"soft targets: reusing {header_path} ({store.nbytes / 1e6:.1f} MB)")
                return store
            if found:
                log(f"soft targets: {found}")
            if changes_between_reads(transfer_set):
                log("soft targets: warning: the transfer set's items change between two reads (random "
                    "augmentation in __getitem__?): the stored targets are the teacher's outputs on one random view "
                    "of each case, not on what the student sees; run the teacher online instead (Distillation("
                    "teacher=...) without a store or cached logits)")

            started = time.perf_counter()
            describe = teacher.describe() if isinstance(teacher, Ensemble) else {"module": type(teacher).__name__}
            cases = num_cases(transfer_set)
            header = {"key_parts": key_parts, "num_cases": cases, "combine": combine,
                      "extra": {"teacher": describe, "members_in_teacher": len(members),
                                "transfer_set": {"name": transfer_set.name, "cases": cases,
                                                 "classes": list(transfer_set.classes)}}}
            if workers.distributed and header_path is not None:
                store = cls._compute_sharded(teacher, transfer_set, header_path, workers, batch_size, bf16, **header)
                how = f"{workers.world_size} ranks, each one batched pass of each member over its share"
            else:
                num_classes, chunks = _stored_logits(teacher, transfer_set, range(len(transfer_set)), key_parts,
                                                     batch_size, bf16)
                store = cls.write(chunks, header_path, num_classes=num_classes, **header)
                how = "one batched pass of each member"
            seconds = time.perf_counter() - started
            where = str(header_path) if header_path is not None else "memory"
            log(f"soft targets: computed {cases} cases x {len(members)} member(s) in {seconds:.1f}s "
                f"({how}), {store.nbytes / 1e6:.1f} MB {layout} store in {where}")
            return store

    @classmethod
    def _compute_sharded(cls, teacher: nn.Module, transfer_set, header_path: Path, workers: Workers,
                         batch_size: int, bf16: bool, *, key_parts: dict[str, Any], num_cases: int, combine: str,
                         extra: dict[str, Any]) -> SoftTargets:
        """Every rank computes its contiguous share of the cases and writes those rows in place into one data file;
        rank 0 then hashes it, renames it and writes the one header. ``header_path`` must be on a file system every
        rank sees: each rank leaves a marker, and rank 0 refuses to finish without all of them."""
        data_path = header_path.with_suffix(".bin")
        tmp = data_path.with_name(f".{data_path.name}.sharded.tmp")
        header_path.parent.mkdir(parents=True, exist_ok=True)  # on every rank: each may see its own disk
        if workers.is_main:
            header_path.unlink(missing_ok=True)  # the old header must not vouch for the new data
            for stale in header_path.parent.glob(f"{tmp.name}*"):
                stale.unlink()
        workers.barrier()

        items = workers.shard(len(transfer_set))
        rows = slice(items.start * cases_per_item(transfer_set), items.stop * cases_per_item(transfer_set))
        num_classes, chunks = _stored_logits(teacher, transfer_set, range(items.start, items.stop), key_parts,
                                             batch_size, bf16)
        num_classes = next(c for c in workers.all_gather_json(num_classes) if c is not None)
        specs = _array_specs(key_parts, num_cases, _stored_members(key_parts), num_classes)
        def write_share():
            with store_files.RowFiles.one_file(specs, tmp) as files:
                row = rows.start
                for chunk in chunks:
                    row += files.write(row, _chunk_arrays(chunk, key_parts, row))
                files.sync()
            tmp.with_name(f"{tmp.name}.rank{workers.rank}").touch()

        workers.write_share(write_share, "soft-target store")

        problem = None
        if workers.is_main:
            problem = store_files.unseen_ranks([tmp.with_name(f"{tmp.name}.rank{r}")
                                                for r in range(workers.world_size)], "soft-target store", "--store-dir")
            if problem is None:
                _, _, total = store_files.array_layout(specs)
                with open(tmp, "r+b") as f:
                    os.ftruncate(f.fileno(), total)
                    arrays_meta = store_files.arrays_meta(specs, store_files.checksums(f, specs))
                    os.fsync(f.fileno())
                checkpoint.replace(tmp, data_path)
                for marker in header_path.parent.glob(f"{tmp.name}.rank*"):
                    marker.unlink()
                checkpoint.write_json(header_path, _header(key_parts, num_cases, specs, num_classes, extra,
                                                           arrays_meta, total, data_path.name))
        workers.agree(problem)
        return cls.open(header_path, combine=combine, verify=False)  # rank 0 just hashed it

    @classmethod
    def write(cls, chunks: Iterable[Tensor | dict[str, Any]], header_path: str | os.PathLike | None, *,
              key_parts: dict[str, Any], num_cases: int, num_members: int | None = None, num_classes: int,
              combine: str = "arithmetic", extra: dict[str, Any] | None = None) -> SoftTargets:
        """Stream ``chunks`` (in case order) into a store; nothing is held in memory beyond one chunk.

        Each chunk is either member logits ``[b, M, C]`` (turned into the layout ``key_parts`` names) or, for a
        top-k store, a dict with ``topk_logits``/``topk_indices`` ``[b, M, k]`` and ``tail_logsumexp``/
        ``tail_mean`` ``[b, M]`` already made. ``header_path=None`` keeps the arrays in memory. ``num_members``:
        M (default: the members the stored layout keeps of the teacher described in ``key_parts``).
        """
        num_members = _stored_members(key_parts) if num_members is None else num_members
        specs = _array_specs(key_parts, num_cases, num_members, num_classes)
        writer = store_files.Writer(specs, Path(header_path).with_suffix(".bin") if header_path is not None else None)
        try:
            if header_path is not None:
                Path(header_path).unlink(missing_ok=True)  # the old header must not vouch for the new data
            for chunk in chunks:
                writer.append(_chunk_arrays(chunk, key_parts, writer.rows))
            arrays_meta, arrays = writer.finish(num_cases)
        except BaseException:
            writer.abort()
            raise
        data_file = Path(header_path).with_suffix(".bin").name if header_path is not None else None
        header = _header(key_parts, num_cases, specs, num_classes, extra, arrays_meta, writer.total_bytes, data_file)
        if header_path is None:
            return cls(header, arrays, combine)
        checkpoint.write_json(Path(header_path), header)
        return cls.open(header_path, combine=combine, verify=False)  # just hashed while writing

    # -- making one in a folder, chunk by chunk ------------------------------------------------------------------

    @classmethod
    def build(cls, teacher: nn.Module | list[nn.Module] | SoftTargets, windows, folder: str | os.PathLike, *,
              tokenizer_sha256: str, top_k: int | None = None, samples: int | None = None, head: int = 0,
              compact: str | None = None, batch_windows: int = 16, on_chunk: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] = print) -> SoftTargets:
        """A language model's store over ``windows`` (one row per token position) in a folder of ``folder``:
        reuse an intact store of this key, resume a partial one, or compute it; ``top_k=None`` is dense,
        ``samples=K`` the sampled layout (K draws a position), ``head=h`` with it: the h most probable tokens
        kept exact and the K draws made from the rest; ``compact="log8"`` or ``"e4m3"`` with them: the same
        draws packed into one row of bytes a position (:mod:`darkknowledge.store_codec`).

        ``teacher``: a model, a list of members (their mean distribution), or a dense store of one teacher over
        the same windows, whose rows are summarised without running the members again (top-k of its logits).

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
        if isinstance(teacher, SoftTargets) and (teacher.layout not in DENSE or teacher.num_members != 1 or
                                                 teacher.transfer_fingerprint != windows.fingerprint()):
            raise DarkKnowledgeError(f"a store as teacher must be a dense store over these windows, got "
                                     f"{teacher.layout} {teacher.path}")
        layout = _layout(top_k, samples, head, windows.vocab_size, compact)
        parts = {"format": FOLDER_FORMAT, "windows": windows.fingerprint(), "tokenizer": tokenizer_sha256,
                 "members": [f"store:{m.key}" if isinstance(m, SoftTargets) else module_sha256(m) for m in members],
                 "vocab_size": windows.vocab_size, "layout": "dense" if layout == "full" else layout,
                 "top_k": top_k if samples is None else head + samples,
                 **({"head": head} if head else {}),  # without a head, the keys of stores made before heads
                 **({"quant": compact} if compact else {})}
        key = store_files.key_of(parts)
        folder = Path(folder) / key[:16]
        with store_files.store_lock(folder / FOLDER_HEADER, workers, log, "token store"):  # one build at a time
            # Rank 0 decides (reuse, resume or start) and every rank follows the header it sends.
            header = workers.on_main(lambda: cls._start(folder, key, parts, len(members), windows, log))
            if not header["complete"]:
                workers.write_share(lambda: _fill(members, windows, folder, header, batch_windows, on_chunk,
                                                  workers), "token store")
                header = workers.on_main(lambda: _finish(folder, header, workers.world_size))
            return cls._in(folder, header)

    @classmethod
    def _in(cls, folder: Path, header: dict[str, Any], combine: str = "arithmetic") -> SoftTargets:
        """The store of a folder whose header was checked: its files mapped and seen as ``[N, 1, ...]``."""
        files = store_files.map_array_files(folder, _folder_specs(header))
        if "logits" in files:
            arrays = {"logits": files["logits"][:, None]}
        elif "rows" in files:  # compact: one row of bytes a position
            arrays = {"rows": files["rows"][:, None]}
        else:  # the tail's two numbers side by side in one file
            arrays = {"topk_logits": files["topk_logits"][:, None], "topk_indices": files["topk_indices"][:, None],
                      "tail_logsumexp": files["tail"][:, None, 0], "tail_mean": files["tail"][:, None, 1]}
        return cls(header, arrays, combine, folder)

    @classmethod
    def _start(cls, folder: Path, key: str, parts: dict[str, Any], members: int, windows,
               log: Callable[[str], None]) -> dict[str, Any]:
        """Rank 0: the header of an intact store, of a partial one with every rank's progress gathered into it,
        or of a new one whose files are made here (zeros)."""
        header_path = folder / FOLDER_HEADER
        header = None
        if header_path.exists() or header_path.is_symlink():
            header, problem = _read_folder_header(header_path)
            if problem is None and header["key"] != key:
                problem = "its header is of another store"
            if problem is not None:
                log(f"token store {folder}: {problem}; rebuilding it")
                header = None
        if header is not None and header["complete"]:
            problem = _folder_problem(folder, header, verify=True)
            if problem is None:
                return header
            log(f"token store {folder}: {problem}; rebuilding it")
            header = None
        elif header is not None:
            header = _gather_progress(folder, header)
            problem = store_files.array_files_problem(folder, _folder_specs(header)) or \
                cls._in(folder, header)._unwritten_rows()
            log(f"token store {folder}: {problem or _folder_problem(folder, header, verify=False)}; "
                f"{'rebuilding it' if problem else 'resuming there'}")
            header = None if problem else header
        if header is None:
            header = {"format": FOLDER_FORMAT, "key": key, "key_parts": parts, "layout": parts["layout"],
                      "top_k": parts["top_k"], "vocab_size": windows.vocab_size, "members": members,
                      "positions": windows.num_tokens, "context": windows.context, "windows": len(windows),
                      "tokenizer": parts["tokenizer"], "windows_fingerprint": parts["windows"], "complete": False,
                      "positions_done": 0, "windows_done": [],
                      "arrays": _folder_arrays(parts, windows.num_tokens)}
            store_files.create_array_files(folder, _folder_specs(header))
            for stale in _rank_progress_files(folder):  # of an earlier build of these rows, now all zeros
                stale.unlink()
            checkpoint.write_json(header_path, header)
        return header

    def _unwritten_rows(self, batch_positions: int = 4096) -> str | None:
        """Whether the rows a partial build recorded as written hold distributions: each row's log-probabilities
        (its kept logits and, for top-k, its tail) sum to one, which zeros or garbage do not."""
        for start, stop in _windows_done(self.header):
            context = self.header["context"]
            for first in range(start * context, stop * context, batch_positions):
                rows = slice(first, min(first + batch_positions, stop * context))
                if self.layout == "compact":  # a zero row decodes to a distribution, but not a valid one
                    if not self.codec.valid(self._arrays["rows"][rows, 0]).all():
                        return f"rows recorded as written (windows {start}..{stop}) hold no compact rows"
                    continue
                if self.layout in DENSE:
                    kept = self.member_logits(rows)
                else:
                    t = self.topk(rows)
                    kept = torch.cat([t.logits, t.tail_logsumexp.unsqueeze(-1)], -1)
                if not bool((kept.logsumexp(-1).abs() < ROW_TOLERANCE).all()):
                    return f"rows recorded as written (windows {start}..{stop}) hold no distributions"
        return None

    # -- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, windows=None, tokenizer_sha256: str | None = None,
             vocab_size: int | None = None, verify: bool = True, combine: str | None = None,
             expected_key: str | None = None) -> SoftTargets:
        """Open a store of either form: a one-file store's header ``.json`` (or its ``.bin``), or a folder store.
        Checks format, key, sizes and (``verify``) each array's SHA-256, and refuses a store made for other
        ``windows``, tokenizer or vocabulary than the reader's; each in one :class:`DarkKnowledgeError` line
        (``compute`` and ``build`` catch it and rebuild)."""
        path = Path(path)
        store = cls._open_folder(path, verify, combine) if path.is_dir() else \
            cls._open_file(path, combine, verify, expected_key)
        if vocab_size is not None and vocab_size != store.num_classes:
            raise DarkKnowledgeError(f"store {path} holds a vocabulary of {store.num_classes} tokens, the student "
                                     f"has {vocab_size}: teacher and student vocabularies differ")
        made_with = store.header.get("tokenizer") or "no tokenizer"
        if tokenizer_sha256 is not None and tokenizer_sha256 != made_with:
            raise DarkKnowledgeError(f"store {path} was built with another tokenizer (SHA-256 {made_with[:12]}, "
                                     f"this run's {tokenizer_sha256[:12]}); build a store with this run's tokenizer")
        if windows is not None and windows.fingerprint() != store.transfer_fingerprint:
            raise DarkKnowledgeError(f"store {path} was built over another corpus or split (windows fingerprint "
                                     f"differs: {windows.describe()['split']} split, context {windows.context}); "
                                     "build a store over this data")
        return store

    @classmethod
    def _open_folder(cls, folder: Path, verify: bool, combine: str | None) -> SoftTargets:
        if not (folder / FOLDER_HEADER).exists():
            raise DarkKnowledgeError(f"{folder} holds no token store ({FOLDER_HEADER} missing)")
        header, problem = _read_folder_header(folder / FOLDER_HEADER)
        if problem is not None:
            raise DarkKnowledgeError(f"token store {folder / FOLDER_HEADER}: {problem}; build it again")
        problem = _folder_problem(folder, header, verify)
        if problem is not None:
            raise DarkKnowledgeError(f"token store {folder}: {problem}; build it again")
        return cls._in(folder, header, combine or "arithmetic")

    @classmethod
    def _open_file(cls, header_path: Path, combine: str | None, verify: bool,
                   expected_key: str | None) -> SoftTargets:
        if header_path.suffix == ".bin":
            header_path = header_path.with_suffix(".json")
        if not header_path.exists():
            raise DarkKnowledgeError(f"soft-target store header {header_path} is missing")
        header = store_files.read_json(header_path, "soft-target store")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DarkKnowledgeError(f"{header_path} is not a {FORMAT} soft-target store header")
        schemas.check(schemas.StoreHeader, header, header_path, "delete it: the store is computed again")
        if _key_problem(header) or (expected_key and header["key"] != expected_key):
            raise DarkKnowledgeError(f"soft-target store {header_path} was made for another teacher, transfer "
                                     "set or settings (key mismatch)")
        if problem := _compact_problem(header):
            raise DarkKnowledgeError(f"soft-target store {header_path}: {problem}; delete it: the store is computed "
                                     "again")
        data_path = header_path.parent / header["data_file"]
        if not data_path.is_file():
            raise DarkKnowledgeError(f"soft-target store data {data_path} is missing")
        size = reading.check_file(data_path, "soft-target store", None)  # opened below: a FIFO would block
        if size != header["data_bytes"]:
            raise DarkKnowledgeError(f"soft-target store data {data_path} has {size} bytes, its header says "
                                     f"{header['data_bytes']} (truncated or replaced)")
        arrays, mapping = store_files.map_arrays(data_path, header["arrays"], verify, "soft-target store")
        default = header["stored_combine"] if header["stored_combine"] in COMBINE_RULES else "arithmetic"
        if header["stored_combine"] == "mean-logits":
            default = "logits"
        return cls(header, arrays, combine or default, header_path, mapping)


# ---------------------------------------------------------------------------------------------------------------
# Both forms: settings, keys, draws
# ---------------------------------------------------------------------------------------------------------------

def _layout(top_k: int | None, samples: int | None, head: int, classes: int | None = None,
            compact: str | None = None) -> str:
    """The layout the sizes ask for (``full``, ``topk``, ``sampled`` or ``compact``), after refusing (one line)
    sizes no store can have; ``classes``: the number of classes when known before the teacher runs (a
    vocabulary)."""
    most = f", {classes}" if classes else ""
    for name, k in (("top_k", top_k), ("samples", samples)):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= (classes or k)):
            raise DarkKnowledgeError(f"{name} must be an integer >= 1 (and at most the number of classes{most}), "
                                     f"got {k!r}")
    if top_k is not None and samples is not None:
        raise DarkKnowledgeError("give top_k or samples, not both: a store is top-k or sampled")
    if head and (samples is None or isinstance(head, bool) or not isinstance(head, int) or head < 0
                 or head + samples > (classes or head + samples)):
        raise DarkKnowledgeError(f"head is for a sampled store (samples=K), an integer >= 0 with head + samples at "
                                 f"most the number of classes{most}; got head {head!r}, samples {samples!r}")
    if compact is not None and (samples is None or compact not in QUANTS):
        raise DarkKnowledgeError(f"compact is a quantisation of a sampled store's head ({' or '.join(QUANTS)}, "
                                 f"with samples=K); got compact {compact!r}, samples {samples!r}")
    if compact is not None:
        return "compact"
    return "full" if top_k is None and samples is None else "topk" if samples is None else "sampled"


def _compact_problem(header: dict[str, Any]) -> str | None:
    """Why a one-file compact store's header does not describe rows its codec reads, or None."""
    if header["layout"] != "compact":
        return None
    try:
        codec = _codec(header["key_parts"], header["num_classes"])
    except (DarkKnowledgeError, KeyError, TypeError):
        return "its key_parts hold no compact store's head, samples and quant (edited or damaged)"
    if header["arrays"]["rows"]["shape"][-1] != codec.bytes_per_row:
        return f"its rows are not the {codec.bytes_per_row} bytes its codec writes (edited or damaged)"
    return None


def _codec(key_parts: dict[str, Any], classes: int) -> CompactCodec | None:
    """How a compact store of these key parts packs its rows (None for the other layouts)."""
    if key_parts["layout"] != "compact":
        return None
    head = key_parts.get("head", 0)
    return CompactCodec(classes, head, key_parts["top_k"] - head, key_parts["quant"])


def _key_problem(header: dict[str, Any]) -> str | None:
    if header["key"] != store_files.key_of(header["key_parts"]):
        return "its header's key is not the hash of its key_parts (edited or damaged)"
    return None


def draws_key(key_parts: dict[str, Any]) -> str:
    """What seeds a store's draws: its key, and for a compact store the key of the sampled store of the same
    settings, so the two hold the same draws and differ only by the compact row's quantisation."""
    if key_parts["layout"] != "compact":
        return store_files.key_of(key_parts)
    return store_files.key_of({**{k: v for k, v in key_parts.items() if k != "quant"}, "layout": "sampled"})


def drawn_rows(logits: Tensor, key: str, draws: int, head: int, first: int, group: int = 1) -> TopKTargets:
    """:func:`darkknowledge.losses.sampled_targets` of rows ``[n, C]``, each ``group`` of rows (a case, or a
    folder store's window) drawn with a generator seeded by the store's ``key`` and the group's index (``first``
    for the first group): the same draws however the rows are batched or shared among ranks."""
    generator = torch.Generator()
    parts = []
    for offset, rows in enumerate(logits.split(group)):
        generator.manual_seed((int(key[:15], 16) + first + offset) % (1 << 63))
        parts.append(sampled_targets(rows, draws, generator, head))
    return TopKTargets(*(torch.cat([getattr(p, name) for p in parts]) for name in
                         ("logits", "indices", "tail_logsumexp", "tail_mean")))


# ---------------------------------------------------------------------------------------------------------------
# A store in a folder: its header, its files, and its build's progress
# ---------------------------------------------------------------------------------------------------------------

def _folder_arrays(parts: dict[str, Any], positions: int) -> dict[str, list]:
    """The header's ``arrays`` (name -> [dtype, shape]) of a store of these key parts: float16 logits, the tail's
    two numbers in one file; a compact store's one row of bytes a position."""
    layout, vocab_size, top_k = parts["layout"], parts["vocab_size"], parts["top_k"]
    if layout == "dense":
        return {"logits": ["<f2", [positions, vocab_size]]}
    if layout == "compact":
        return {"rows": ["|u1", [positions, _codec(parts, vocab_size).bytes_per_row]]}
    index_dtype = "<u2" if vocab_size <= 1 << 16 else "<i4"
    return {"topk_logits": ["<f2", [positions, top_k]], "topk_indices": [index_dtype, [positions, top_k]],
            "tail": ["<f4", [positions, 2]]}


def _folder_specs(header: dict[str, Any]) -> store_files.Specs:
    return {name: (dtype, tuple(shape)) for name, (dtype, shape) in header["arrays"].items()}


def _read_folder_header(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(header, None)`` when the header at ``path`` fits its schema and agrees with its key and with itself,
    else ``(None, why not)``: a header is never half-trusted."""
    try:
        header = store_files.read_json(path, "token store")
    except (OSError, ValueError, DarkKnowledgeError) as e:
        return None, (f"{FOLDER_HEADER} is unreadable or not JSON "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    try:
        schemas.check(schemas.TokenStoreHeader, header, path, "")
    except DarkKnowledgeError as e:
        return None, str(e).rstrip("; ")
    return (None, problem) if (problem := _folder_header_problem(header)) else (header, None)


def _folder_header_problem(header: dict[str, Any]) -> str | None:
    """Why a header that fits its schema does not describe its store, or None: its key must be the hash of its
    key parts, the fields a reader uses (layout, top_k, vocabulary, tokenizer, windows) those of the key parts,
    and its arrays those its layout and sizes make."""
    if problem := _key_problem(header):
        return problem
    parts = header["key_parts"]
    pairs = {"layout": "layout", "top_k": "top_k", "vocab_size": "vocab_size", "tokenizer": "tokenizer",
             "windows_fingerprint": "windows"}
    for field, part in pairs.items():
        if header[field] != parts.get(part):
            return f"its header's {field} is not the one in its key_parts (edited or damaged)"
    if not isinstance(parts.get("members"), list) or header["members"] != len(parts["members"]):
        return "its header's members is not the number of members in its key_parts"
    if header["positions"] != header["windows"] * header["context"]:
        return "its header's positions is not windows x context"
    try:
        arrays = _folder_arrays(parts, header["positions"])
    except (DarkKnowledgeError, KeyError, TypeError):  # a compact store's settings the codec refuses
        return "its key_parts do not describe a store (a compact store's head, samples or quant is damaged)"
    if header["arrays"] != arrays:
        return "its header's arrays are not those of its layout and sizes"
    return None


def _folder_problem(folder: Path, header: dict, verify: bool) -> str | None:
    """Why a store whose header was read cannot be used as it is (unfinished, a file missing, truncated or
    corrupted), or None."""
    if not header.get("complete"):
        return f"its build stopped after {header.get('positions_done', 0)} of {header.get('positions')} positions"
    if problem := store_files.array_files_problem(folder, _folder_specs(header)):
        return problem
    for name in header["arrays"]:
        path = folder / f"{name}.bin"
        if verify and checkpoint.sha256_file(path) != header["checksums"][name]:
            return f"{path.name} does not match its checksum (corrupted)"
    return None


@torch.no_grad()
def _fill(members: list, windows, folder: Path, header: dict, batch_windows: int, on_chunk, workers: Workers) -> None:
    """Compute this rank's share of the windows not yet done, chunk by chunk, and write their rows in place
    (``pwrite`` of whole rows: ranks on several machines never rewrite each other's bytes of a shared page).

    Progress is a list of done window ranges (``windows_done``; a header without it, from before, counts a
    prefix in ``positions_done``). One process records it in the header after every chunk. Under torchrun
    each rank records its own ranges in ``targets.rank<r>.json`` (rank-owned, so no rank waits for another
    or races for the header; the file is also its marker that rank 0 sees its rows); rank 0 folds them into
    the header when it finishes the store or resumes a killed build, and the next build, with any number of
    ranks, shares out whatever is still missing."""
    source = members[0] if isinstance(members[0], SoftTargets) else None
    for m in members if source is None else ():
        m.eval()
    context, started = windows.context, time.perf_counter()
    codec = _codec(header["key_parts"], windows.vocab_size)
    known = _windows_done(header)
    mine = store_files.rank_share(store_files.missing(known, len(windows)), workers)
    done_here: list[list[int]] = []
    progress = folder / RANK_PROGRESS.format(workers.rank)

    def record() -> None:
        if workers.distributed:
            checkpoint.write_json(progress, {"windows_done": done_here})
            return
        header["windows_done"] = store_files.merged(known + done_here)
        header["positions_done"] = store_files.count(header["windows_done"]) * context
        header["build_seconds"] = header.get("build_seconds", 0.0) + time.perf_counter() - started
        checkpoint.write_json(folder / FOLDER_HEADER, header)

    if workers.distributed:
        record()  # the marker, even for a rank with nothing left to do
    with store_files.RowFiles.per_array(_folder_specs(header), folder) as files:
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
                    t = (topk_targets(logits, header["top_k"]) if header["layout"] == "topk" else
                         drawn_rows(logits, draws_key(header["key_parts"]), header["top_k"] - head, head, start,
                                    context))
                    rows = {"rows": codec.encode(t)} if codec is not None else {
                        "topk_logits": t.logits.numpy(), "topk_indices": t.indices.numpy(),
                        "tail": torch.stack([t.tail_logsumexp, t.tail_mean], -1).numpy()}
                files.write(start * context, rows)
                files.sync()
                # Only after the rows are on disk is their range recorded: a kill never leaves rows counted
                # unwritten (rows written but not yet recorded are computed again).
                done_here = store_files.merged(done_here + [[start, stop]])
                record()
                started = time.perf_counter()
                if on_chunk is not None:
                    on_chunk(store_files.count(store_files.merged(known + done_here)) * context, header["positions"])


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
    checkpoint.write_json(folder / FOLDER_HEADER, header)
    return header


def _windows_done(header: dict[str, Any]) -> list[list[int]]:
    """Sorted, disjoint ranges [start, stop) of windows whose rows are on disk."""
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
    header = {**header, "windows_done": store_files.merged(ranges)}
    header["positions_done"] = store_files.count(header["windows_done"]) * header["context"]
    checkpoint.write_json(folder / FOLDER_HEADER, header)
    for f in files:
        f.unlink()
    return header


# ---------------------------------------------------------------------------------------------------------------
# A store in one file
# ---------------------------------------------------------------------------------------------------------------

def _header(key_parts: dict[str, Any], num_cases: int, specs: dict[str, tuple[str, tuple]], num_classes: int,
            extra: dict[str, Any] | None, arrays_meta: dict[str, Any], data_bytes: int,
            data_file: str | None) -> dict[str, Any]:
    num_members = next(iter(specs.values()))[1][1]
    return {"format": FORMAT, "key": store_files.key_of(key_parts), "key_parts": key_parts,
            "layout": key_parts["layout"], "top_k": key_parts["top_k"], "dtype": key_parts["dtype"],
            "num_cases": num_cases, "num_members": num_members, "num_classes": num_classes,
            "stored_combine": key_parts.get("stored_combine"), "members_in_teacher": num_members,
            **(extra or {}), "data_file": data_file, "data_bytes": data_bytes, "arrays": arrays_meta,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": checkpoint.provenance()}


def _stored_members(key_parts: dict[str, Any]) -> int:
    """Rows of outputs a case keeps: one per member, but one for mean logits and for draws."""
    mixed = key_parts.get("stored_combine") == "mean-logits" or key_parts["layout"] in DRAWN
    return 1 if mixed else len(key_parts["teacher"])


def _preprocessing(transfer_set) -> str:
    """What the store's key records of how inputs were made (the built-in images: the historic text)."""
    transform = getattr(transfer_set, "transform", None)
    if transform == UINT8_PIXELS:
        return PREPROCESSING
    return json.dumps(transform.describe() if transform is not None else "as the transfer set gives them",
                      sort_keys=True)


def _stored_logits(teacher: nn.Module, transfer_set, items: range, key_parts: dict[str, Any], batch_size: int,
                   bf16: bool) -> tuple[int | None, Iterator[Tensor]]:
    """(number of classes, chunks of the logits the store keeps ``[b, M, C]``) of ``transfer_set``'s ``items``,
    one row per case; the number of classes is None when ``items`` is empty."""
    chunks = _teacher_chunks(teacher, transfer_set, items, batch_size, bf16)
    first = next(chunks, None)
    if first is None:
        return None, iter(())
    num_classes = _check_classes(first, transfer_set)
    top_k = key_parts["top_k"]
    if top_k is not None and top_k > num_classes:
        raise DarkKnowledgeError(f"top_k (a sampled store: head + samples) must be at most the number of classes "
                                 f"({num_classes}), got {top_k}")
    chunks = itertools.chain([first], chunks)
    if key_parts["stored_combine"] == "mean-logits":
        chunks = (c.mean(1, keepdim=True) for c in chunks)
    return num_classes, chunks


def _compatible_rules(stored_combine: str) -> tuple[str, ...]:
    return ("arithmetic",) if stored_combine == "arithmetic" else ("geometric", "logits")


def _array_specs(key_parts: dict[str, Any], n: int, m: int, c: int) -> dict[str, tuple[str, tuple]]:
    """The arrays ``[n, m, ...]`` of a one-file store of these key parts over ``c`` classes."""
    layout, k = key_parts["layout"], key_parts["top_k"]
    if layout not in LAYOUTS:
        raise DarkKnowledgeError(f"store layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    logit_dtype = STORAGE_DTYPES[key_parts["dtype"]]
    if layout == "full":
        return {"logits": (logit_dtype, (n, m, c))}
    if layout == "compact":
        return {"rows": ("|u1", (n, m, _codec(key_parts, c).bytes_per_row))}
    index_dtype = "<u2" if c <= 1 << 16 else "<i4"  # 10,000 classes: 2 bytes per index
    return {"topk_logits": (logit_dtype, (n, m, k)), "topk_indices": (index_dtype, (n, m, k)),
            "tail_logsumexp": ("<f4", (n, m)), "tail_mean": ("<f4", (n, m))}


def _chunk_arrays(chunk, key_parts: dict[str, Any], first_row: int) -> dict[str, np.ndarray]:
    """The arrays of rows ``first_row..`` made from member logits ``[b, M, C]`` in the layout of ``key_parts``."""
    if isinstance(chunk, dict):
        return {name: (value.numpy() if isinstance(value, Tensor) else np.asarray(value))
                for name, value in chunk.items()}
    chunk = chunk.detach().float()
    layout = key_parts["layout"]
    if layout == "full":
        return {"logits": chunk.numpy()}
    if layout == "topk":
        t = topk_targets(chunk, key_parts["top_k"])
    else:  # the members' mixture at T = 1 (mean logits were averaged already), one row of draws a case
        mixture = chunk.log_softmax(-1).logsumexp(1) - math.log(chunk.shape[1])
        head = key_parts["head"]
        t = drawn_rows(mixture, draws_key(key_parts), key_parts["top_k"] - head, head, first_row)
        if layout == "compact":
            return {"rows": _codec(key_parts, chunk.shape[-1]).encode(t)[:, None]}
        t = TopKTargets(*(getattr(t, name).unsqueeze(1) for name in
                          ("logits", "indices", "tail_logsumexp", "tail_mean")))
    return {"topk_logits": t.logits.numpy(), "topk_indices": t.indices.numpy(),
            "tail_logsumexp": t.tail_logsumexp.numpy(), "tail_mean": t.tail_mean.numpy()}


def _precision_key(bf16: bool | str) -> dict[str, Any]:
    """The autocast the teacher ran under (``bf16``: True or a precision name), as the key records it: the same
    entry as before fp16 was told apart (``bf16``), so older stores keep their key."""
    precision = precision_of(bf16)
    return {"bf16": precision == "bf16", **({"precision": precision} if precision == "fp16" else {})}


def _check_classes(member_logits: Tensor, transfer_set) -> int:
    classes = member_logits.shape[-1]
    if classes != len(transfer_set.classes):
        raise DarkKnowledgeError(f"the teacher predicts {classes} classes but the transfer set "
                                 f"{transfer_set.name} has {len(transfer_set.classes)}")
    return classes


@torch.no_grad()
def _teacher_chunks(teacher: nn.Module, transfer_set, items: range, batch_size: int,
                    bf16: bool) -> Iterator[Tensor]:
    """Member logits ``[b, M, C]`` (b cases) batch by batch: one eval pass of each member over ``items``."""
    was_training = teacher.training
    teacher.eval()
    device = device_of(teacher)
    ensemble = isinstance(teacher, Ensemble)
    try:
        for inputs, labels, _ in batches(transfer_set, list(torch.arange(items.start, items.stop).split(batch_size))):
            with autocast(bf16, device):
                out = teacher.member_logits(to_device(inputs, device)) if ensemble else \
                    logits_of(teacher(to_device(inputs, device))).unsqueeze(1)
            # [b, M, ..., C] with the middle matching the labels' shape: one case per label
            if out.dim() < 3 or out.shape[0] != len(labels) or tuple(out.shape[2:-1]) != tuple(labels.shape[1:]):
                raise DarkKnowledgeError(f"the teacher must return logits [batch, classes] (or [batch, ..., classes] "
                                         f"matching labels {list(labels.shape)}), got shape "
                                         f"{tuple(out.shape if ensemble else out[:, 0].shape)}")
            yield out.movedim(1, -2).reshape(-1, out.shape[1], out.shape[-1]).float().cpu()
    finally:
        teacher.train(was_training)


def check_layout_temperature(layout: str, temperature: float) -> None:
    """Refuse (one line) a temperature a store of ``layout`` cannot distil at, before one is computed."""
    if layout in DRAWN and temperature != 1:
        raise DarkKnowledgeError(f"a sampled store holds draws at T = 1, so it distils at temperature 1 only, "
                                 f"got {temperature}; use temperature 1 or a dense or top-k store")
