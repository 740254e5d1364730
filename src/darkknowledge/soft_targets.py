"""The soft-target store: a teacher's (or an ensemble's) outputs over a transfer set, computed once, on disk.

**What is stored: logits, so any temperature can be used later.**

- ``full`` layout: every member's logits ``[N, M, C]`` (M = 1 for one teacher). Soft targets at any T and under
  any combine rule are computed per batch from these (``ensemble.distillation_targets``), exactly: one store
  serves a whole temperature sweep and all three combine rules. (One logit vector per case could not: the
  arithmetic mean of the members' softened distributions does not commute with T; see ``ensemble.py``.)
- ``topk`` layout (many classes): the k largest logits, their class indices and two numbers summarising the
  rest (:class:`darkknowledge.losses.TopKTargets`; exact at T = 1, documented estimate at other T). For an
  ensemble under ``arithmetic`` each member's top-k is kept (``[N, M, k]``: the loss averages the members'
  cross-entropies, which equals the cross-entropy with their mean); under ``geometric`` or ``logits`` (the same
  targets at every T) the top-k of the mean logits is kept (``[N, 1, k]``).
- ``sampled`` layout (distilling at T = 1 only): the same arrays holding, per case, ``samples`` classes drawn from
  the teacher's distribution at T = 1 (an ensemble's under its combine rule, ``[N, 1, h + K]``) and their
  frequencies (:func:`darkknowledge.losses.sampled_targets`: unbiased, with an empty tail); with a head of h the h
  most probable classes are kept exact and only the rest is drawn. Each case's draws are seeded by the store's key
  and its row (:func:`drawn_rows`), so a store computed in other batches or by other ranks holds the same rows.

**Keyed so a stale store is never used.** The key is the SHA-256 of: each member's weights (a hash of its
state_dict tensors, names, shapes and dtypes, and its architecture's repr: what the logits depend on, even for a
model changed in memory), the transfer set's fingerprint (pixels, labels, classes), the preprocessing (uint8 / 255,
no jitter, bf16 autocast or not), the layout with k and the storage dtype, the combine rule where the stored numbers
depend on it (top-k of several members), and the format version. The key names the files, so a changed teacher or
data finds no store and computes a new one; stores of other keys are left alone (delete the folder to reclaim).

**Files.** ``STORE_DIR/<key[:16]>.bin`` holds the arrays back to back (page-aligned); ``<key[:16]>.json`` is the
header: full key and what went into it, shapes, dtypes, offsets, and the SHA-256 of every array. The data file is
written under a temporary name and renamed, then the header is written the same way, so a crash leaves no header
or an intact store. Opening checks the format, the key, the data file's size (truncation) and, by default, every
array's checksum (corruption; one streaming read, no copy kept); :meth:`SoftTargets.compute` rebuilds a store that
fails any check and says why. The file engine (layout, writes, checksums, locks) is :mod:`darkknowledge.store_files`.

**Reading does not load the file**: it is memory-mapped; a batch is a gather of its rows into a fresh tensor.
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
from .ensemble import COMBINE_RULES, Ensemble, check_combine, distillation_targets
from .errors import DarkKnowledgeError
from .data.transfer import UINT8_PIXELS, as_transfer_set, batches, cases_per_item, changes_between_reads, num_cases
from .evaluation import autocast, device_of, precision_of, to_device
from .losses import TopKTargets, sampled_targets, tail_logsumexp_at, topk_targets
from .outputs import logits_of

FORMAT = "darkknowledge/soft-targets-1"
LAYOUTS = ("full", "topk", "sampled")
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

    Make one with :meth:`compute` (reuses an intact store of the same key, else computes and writes it), open an
    existing one with :meth:`open`. ``combine`` is the rule applied when reading (``full`` layout: any rule).
    """

    def __init__(self, header: dict[str, Any], arrays: dict[str, np.ndarray], combine: str,
                 path: Path | None = None, mapping: mmap.mmap | None = None):
        self.header = header
        self._arrays = arrays
        self._mapping = mapping
        self.path = path
        if header["stored_combine"] is not None and combine not in _compatible_rules(header["stored_combine"]):
            raise DarkKnowledgeError(
                f"this top-k store holds {header['stored_combine']} targets of {header['members_in_teacher']} members "
                f"and cannot give {combine!r} ones; compute a store with combine={combine!r}")
        self.combine = check_combine(combine)

    # -- what it holds -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.header["num_cases"]

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        k = f", k={self.top_k}" if self.top_k else ""
        return (f"SoftTargets({where}: {len(self)} cases x {self.num_classes} classes, {self.layout}{k}, "
                f"{self.header['members_in_teacher']} member(s), combine={self.combine!r})")

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
    def num_classes(self) -> int:
        return self.header["num_classes"]

    @property
    def num_members(self) -> int:
        """Members whose outputs are stored (1 for a single teacher, a top-k store of mean logits, or draws)."""
        return self.header["num_members"]

    @property
    def transfer_fingerprint(self) -> str:
        return self.header["key_parts"]["transfer_set"]

    @property
    def nbytes(self) -> int:
        return self.header["data_bytes"]

    def with_combine(self, combine: str) -> SoftTargets:
        """The same stored numbers read under another rule (full layout: any rule)."""
        return SoftTargets(self.header, self._arrays, combine, self.path, self._mapping)

    def describe(self) -> dict[str, Any]:
        """For sidecars and the run key: what the targets are, not where the file happens to be."""
        return {"key": self.key, "layout": self.layout, "top_k": self.top_k, "combine": self.combine,
                "members": self.header["members_in_teacher"], "dtype": self.header["dtype"],
                **({"head": self.header["key_parts"]["head"]} if self.layout == "sampled" else {})}

    # -- reading ---------------------------------------------------------------------------------------------

    def _rows(self, name: str, indices: np.ndarray) -> Tensor:
        return torch.from_numpy(np.take(self._arrays[name], indices, axis=0))

    def _as_index(self, indices) -> np.ndarray:
        if isinstance(indices, slice):
            return np.arange(len(self))[indices]
        if isinstance(indices, Tensor):
            indices = indices.cpu().numpy()
        return np.asarray(indices, dtype=np.int64)

    def member_logits(self, indices) -> Tensor:
        """Stored logits ``[B, M, C]`` (float32) of the cases at ``indices`` (full layout only)."""
        if self.layout != "full":
            raise DarkKnowledgeError("a top-k store keeps only the k largest logits; use targets() or "
                                     "probabilities(), or compute a full store")
        return self._rows("logits", self._as_index(indices)).float()

    def topk(self, indices) -> TopKTargets:
        """The stored top-k summary ``[B, M, k]`` (top-k layout; sampled: the draws, ``[B, 1, h + K]``)."""
        if self.layout == "full":
            raise DarkKnowledgeError("this store holds full logits, not a top-k summary")
        rows = self._as_index(indices)
        indices = torch.from_numpy(np.take(self._arrays["topk_indices"], rows, axis=0).astype(np.int64))
        return TopKTargets(self._rows("topk_logits", rows).float(), indices, self._rows("tail_logsumexp", rows),
                           self._rows("tail_mean", rows))

    def targets(self, indices, temperature: float) -> dict[str, Any]:
        """Keyword arguments for :func:`darkknowledge.losses.distillation_loss` giving the targets at T:
        ``teacher_logits``, ``soft_targets`` (arithmetic mean of several members) or ``topk_targets``."""
        check_temperature(self.layout, temperature)
        if self.layout != "full":
            return {"topk_targets": self.topk(indices)}
        return distillation_targets(self.member_logits(indices), self.combine, temperature)

    def probabilities(self, indices, temperature: float) -> Tensor:
        """Dense soft targets ``[B, C]`` at ``temperature`` (top-k: the tail mass spread evenly over the tail)."""
        from .losses import softmax_with_temperature
        targets = self.targets(indices, temperature)
        if "soft_targets" in targets:
            return targets["soft_targets"]
        if "teacher_logits" in targets:
            return softmax_with_temperature(targets["teacher_logits"], temperature)
        t = targets["topk_targets"]
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
        row_bytes = sum(a[:1].nbytes for a in self._arrays.values())
        release_every = max(1, (64 << 20) // max(row_bytes * batch_size, 1))
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

    # -- making one --------------------------------------------------------------------------------------------

    @classmethod
    def compute(cls, teacher: nn.Module, transfer_set, store_dir: str | os.PathLike | None = None, *,
                top_k: int | None = None, samples: int | None = None, head: int = 0, dtype: str = "float32",
                combine: str | None = None, batch_size: int = 2048, bf16: bool | str = False,
                log: Callable[[str], None] | None = None) -> SoftTargets:
        """The teacher's outputs over ``transfer_set``, from ``store_dir`` if an intact store of the same key is
        there, else computed in one batched pass of each member and written there (on the device the teacher's
        weights are on). ``transfer_set``: a transfer set or anything :func:`darkknowledge.data.as_transfer_set`
        takes; one row per case (a set with labels ``[N, T]`` has T cases per item).

        ``teacher``: any module mapping inputs to logits, or an :class:`Ensemble` (its members' logits are kept;
        ``combine`` defaults to the ensemble's rule). ``top_k``: keep only the k largest logits per case (and
        member). ``samples=K``: the sampled layout, K classes drawn per case at T = 1, and ``head=h`` with it the h
        most probable kept exact. ``dtype``: ``float32`` or ``float16`` for the stored logits.
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
        for name, k in (("top_k", top_k), ("samples", samples)):
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise DarkKnowledgeError(f"{name} must be an integer >= 1 (and at most the number of classes), "
                                         f"got {k!r}")
        if top_k is not None and samples is not None:
            raise DarkKnowledgeError("give top_k or samples, not both: a store is top-k or sampled")
        if head and (samples is None or isinstance(head, bool) or not isinstance(head, int) or head < 0):
            raise DarkKnowledgeError(f"head is for a sampled store (samples=K), an integer >= 0; got head {head!r}, "
                                     f"samples {samples!r}")
        layout = "full" if top_k is None and samples is None else "topk" if samples is None else "sampled"
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
            "stored_combine": stored_combine, **({"head": head} if layout == "sampled" else {}),
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
        specs = _array_specs(key_parts["layout"], num_cases, _stored_members(key_parts), num_classes,
                             key_parts["top_k"], key_parts["dtype"])
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
        specs = _array_specs(key_parts["layout"], num_cases, num_members, num_classes, key_parts["top_k"],
                             key_parts["dtype"])
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

    @classmethod
    def open(cls, header_path: str | os.PathLike, *, combine: str | None = None, verify: bool = True,
             expected_key: str | None = None) -> SoftTargets:
        """Memory-map a store. Checks format, key, size and (``verify``) each array's SHA-256; raises a one-line
        :class:`DarkKnowledgeError` naming what is wrong (``compute`` catches it and rebuilds)."""
        header_path = Path(header_path)
        if header_path.suffix == ".bin":
            header_path = header_path.with_suffix(".json")
        if not header_path.exists():
            raise DarkKnowledgeError(f"soft-target store header {header_path} is missing")
        header = store_files.read_json(header_path, "soft-target store")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DarkKnowledgeError(f"{header_path} is not a {FORMAT} soft-target store header")
        schemas.check(schemas.StoreHeader, header, header_path, "delete it: the store is computed again")
        if store_files.key_of(header["key_parts"]) != header["key"] or (expected_key and header["key"] != expected_key):
            raise DarkKnowledgeError(f"soft-target store {header_path} was made for another teacher, transfer "
                                     "set or settings (key mismatch)")
        data_path = header_path.parent / header["data_file"]
        arrays_meta = header["arrays"]
        if not data_path.is_file():
            raise DarkKnowledgeError(f"soft-target store data {data_path} is missing")
        size = reading.check_file(data_path, "soft-target store", None)  # opened below: a FIFO would block
        if size != header["data_bytes"]:
            raise DarkKnowledgeError(f"soft-target store data {data_path} has {size} bytes, its header says "
                                     f"{header['data_bytes']} (truncated or replaced)")
        arrays, mapping = store_files.map_arrays(data_path, arrays_meta, verify, "soft-target store")
        default = header["stored_combine"] if header["stored_combine"] in COMBINE_RULES else "arithmetic"
        if header["stored_combine"] == "mean-logits":
            default = "logits"
        return cls(header, arrays, combine or default, header_path, mapping)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
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
    mixed = key_parts.get("stored_combine") == "mean-logits" or key_parts["layout"] == "sampled"
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


def _array_specs(layout: str, n: int, m: int, c: int, k: int | None, dtype: str) -> dict[str, tuple[str, tuple]]:
    if layout not in LAYOUTS:
        raise DarkKnowledgeError(f"store layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    logit_dtype = STORAGE_DTYPES[dtype]
    if layout == "full":
        return {"logits": (logit_dtype, (n, m, c))}
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
        t = drawn_rows(mixture, store_files.key_of(key_parts), key_parts["top_k"] - head, head, first_row)
        t = TopKTargets(*(getattr(t, name).unsqueeze(1) for name in
                          ("logits", "indices", "tail_logsumexp", "tail_mean")))
    return {"topk_logits": t.logits.numpy(), "topk_indices": t.indices.numpy(),
            "tail_logsumexp": t.tail_logsumexp.numpy(), "tail_mean": t.tail_mean.numpy()}


def drawn_rows(logits: Tensor, key: str, draws: int, head: int, first: int, group: int = 1) -> TopKTargets:
    """:func:`darkknowledge.losses.sampled_targets` of rows ``[n, C]``, each ``group`` of rows (a case, or a
    token store's window) drawn with a generator seeded by the store's ``key`` and the group's index (``first``
    for the first group): the same draws however the rows are batched or shared among ranks."""
    generator = torch.Generator()
    parts = []
    for offset, rows in enumerate(logits.split(group)):
        generator.manual_seed((int(key[:15], 16) + first + offset) % (1 << 63))
        parts.append(sampled_targets(rows, draws, generator, head))
    return TopKTargets(*(torch.cat([getattr(p, name) for p in parts]) for name in
                         ("logits", "indices", "tail_logsumexp", "tail_mean")))


def check_temperature(layout: str, temperature: float) -> None:
    """Refuse (one line) a temperature a store of ``layout`` cannot distil at: draws are frequencies at T = 1."""
    if layout == "sampled" and temperature != 1:
        raise DarkKnowledgeError(f"a sampled store holds draws at T = 1, so it distils at temperature 1 only, "
                                 f"got {temperature}; use temperature 1 or a dense or top-k store")


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
