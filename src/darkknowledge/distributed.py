"""Several processes, one job: PyTorch's own torch.distributed, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m darkknowledge train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment; :func:`init_from_env` joins them
into one process group: nccl with each rank on GPU ``LOCAL_RANK`` when the job runs on CUDA (``--device auto`` on
a CUDA machine, or ``cuda``), gloo on the CPU (no CUDA, or ``--device cpu``). A node asked for more ranks than it
has GPUs is refused in one line before any process group forms. The library
never starts processes itself: a user who called ``torch.distributed.init_process_group`` gets the same
behaviour from :func:`current`.

What the rest of the package takes from here: who this process is (:class:`Workers`), which part of a range is
its own (:meth:`Workers.shard`), sums over all ranks, and JSON-able values sent from rank 0 to everyone (the
resume decision, an error to raise on every rank). Values travel as JSON bytes in tensors: nothing is pickled.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import DarkKnowledgeError


@dataclass(frozen=True)
class Workers:
    """This process's place in a job: ``rank`` of ``world_size`` ranks; ``device`` holds its model and batches."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and reports; the others compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)``: sizes differ by at most one, lower ranks take the extra."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # -- collectives (each a no-op for one process; every rank must call them in the same order) ---------------

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks (a new tensor on the CPU, as float64 or int64)."""
        if not self.distributed:
            return tensor.clone()
        wide = tensor.to(self.device, torch.float64 if tensor.is_floating_point() else torch.int64)
        dist.all_reduce(wide, op=dist.ReduceOp.SUM)
        return wide.cpu()

    def broadcast_json(self, value: Any = None) -> Any:
        """Rank 0's ``value`` (anything ``json`` can write), returned on every rank."""
        return self._from_rank(0, value) if self.distributed else value

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        return [self._from_rank(r, value) for r in range(self.world_size)]

    def _from_rank(self, source: int, value: Any) -> Any:
        data = json.dumps(value).encode() if self.rank == source else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, source)
        buffer = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.rank == source:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, source)
        return json.loads(buffer.cpu().numpy().tobytes().decode())

    def broadcast_tensors(self, tensors) -> None:
        """Overwrite ``tensors`` (in place, same shapes on every rank) with rank 0's values."""
        if self.distributed:
            for tensor in tensors:
                moved = tensor.detach().to(self.device)
                dist.broadcast(moved, 0)
                tensor.detach().copy_(moved)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, job: Callable[[], Any]) -> Any:
        """``job()`` on rank 0 alone (the ranks may not share its files); its JSON-able result returned on every
        rank, or the :class:`DarkKnowledgeError` it raised raised on every rank."""
        value, problem = None, None
        if self.is_main:
            try:
                value = job()
            except DarkKnowledgeError as e:
                problem = str(e)
        self.agree(problem)
        return self.broadcast_json(value)

    def agree(self, problem: str | None) -> None:
        """Raise the first ``problem`` any rank found (None: none) on every rank, so no rank waits forever for
        one that stopped."""
        found = [p for p in self.all_gather_json(problem) if p]
        if found:
            raise DarkKnowledgeError(found[0])

    def write_share(self, write: Callable[[], None], what: str) -> None:
        """Run this rank's part of a shared write, then :meth:`agree` on how it went: a refusal, or an OS error
        named by the rank that met it, is raised on every rank."""
        problem = None
        try:
            write()
        except DarkKnowledgeError as e:
            problem = str(e)
        except OSError as e:
            problem = f"rank {self.rank} could not write its share of the {what}: {e.strerror} ({e.filename})"
        self.agree(problem)


SINGLE = Workers()


def current() -> Workers:
    """The process group this process belongs to, or a single worker when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Workers(dist.get_rank(), dist.get_world_size(), device)


def backend(device: str | torch.device | None = None) -> str:
    """nccl when the job runs on CUDA (GPUs talk to each other directly), gloo on the CPU. ``device``: the job's
    (None: :data:`darkknowledge.devices.DEFAULT_DEVICE`)."""
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device | None = None, timeout_minutes: float = 30) -> Workers:
    """Join the process group described by torchrun's environment variables; a single worker without them.
    ``device``: where the job runs (see :func:`backend`); on CUDA each rank takes GPU ``LOCAL_RANK``."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 1:
        return SINGLE
    if not dist.is_available():
        raise DarkKnowledgeError("this PyTorch build has no torch.distributed; install one that has, or run "
                                 "without torchrun")
    if not dist.is_initialized():
        chosen = backend(device)
        if chosen == "nccl":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local_rank >= gpus:  # torch.cuda.set_device would fail with "invalid device ordinal"
                raise DarkKnowledgeError(f"torchrun started more processes on this node than it has GPUs (local "
                                         f"rank {local_rank}, {gpus} GPU(s)); use --nproc-per-node {gpus} or "
                                         "fewer, or run every rank on the CPU with --device cpu (gloo)")
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
        except (RuntimeError, ValueError) as e:
            raise DarkKnowledgeError(f"could not join the torchrun process group ({chosen}): "
                                     f"{str(e).splitlines()[0]}; check MASTER_ADDR/MASTER_PORT (or the rendezvous "
                                     "endpoint) and that every node can reach it") from None
    return current()


def shutdown(finished: bool = True) -> None:
    """Leave the process group. ``finished``: every rank got here normally, so wait for all first (a rank that
    tears its group down while another still talks to it aborts); after an error, leave at once."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        # DDP's reducer sits in a reference cycle and keeps gloo's threads alive; freed later, during interpreter
        # shutdown, they abort the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
