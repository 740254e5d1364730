"""What the open transfer-set interface costs, measured in one run:

(a) One distillation epoch of the same student on the same cases, three ways:
    - ``memory``: the images held in memory (``LabeledImages``: a batch is one gather) and the teacher's outputs
      read from a soft-target store (the library's fast path);
    - ``streamed``: the same images read item by item from a ``.npy`` file on disk by a plain ``torch`` Dataset,
      batched by a ``DataLoader`` with ``--workers`` worker processes (``DatasetTransferSet``), targets from the
      same kind of store;
    - ``tutorial``: the loop of the usual tutorial, a ``DataLoader(TensorDataset, shuffle=True)`` and the teacher
      run on every batch, with ``KLDivLoss * T^2``.
    Each is timed ``--repeats`` times after one untimed warm-up; the best time of each is compared with memory's.
(b) Memory: a memory-mapped ``x.npy`` of ``--memmap-gb`` GB (several times the ``--budget-mb`` a process is
    allowed here) trains one epoch of a small MLP through ``darkknowledge.fit``; the peak resident memory
    (``VmRSS``, split into the process's own ``RssAnon`` and the file pages ``RssFile``) is sampled every 50 ms.

    python benchmarks/loader_speed.py [--dataset mnist] [--threads 1] [--workers 2] [--repeats 2]
        [--memmap-gb 4] [--budget-mb 1024] [--skip-memory] [--skip-speed] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from darkknowledge.data import ArrayTransferSet, DatasetTransferSet
from darkknowledge.jobs import DataChoice
from darkknowledge.models import build_model
from darkknowledge.soft_targets import SoftTargets
from darkknowledge.training import Distillation, TrainConfig, fit
from store_speed import memory_mb  # the benchmarks' folder is on sys.path when a script runs


class NpyImages(Dataset):
    """Images read one at a time from a memory-mapped .npy file, as a user's own Dataset would read files."""

    def __init__(self, images: Path, labels: np.ndarray):
        self.path, self.labels, self.images = images, labels, None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is None:  # opened in each worker process
            self.images = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])


def tutorial_epoch(student, teacher, images, labels, config, temperature) -> None:
    """The loop most tutorials show: DataLoader + the teacher on every batch."""
    loader = DataLoader(TensorDataset(images, labels), batch_size=config.batch_size, shuffle=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    student.train()
    teacher.eval()
    for x, y in loader:
        x = x.float() / 255
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, 1)
        logits = student(x)
        loss = kl(F.log_softmax(logits / temperature, 1), soft) * temperature ** 2 + 0.5 * F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def epoch_ratios(args) -> dict:
    train, _, _ = DataChoice(args.dataset, args.data_dir, val_size=0).load()
    torch.manual_seed(0)
    teacher = build_model(args.teacher, train.image_shape, train.num_classes)
    work = Path(tempfile.mkdtemp(prefix="loader-speed-"))
    try:
        np.save(work / "x.npy", train.images.numpy())
        streamed = DatasetTransferSet(NpyImages(work / "x.npy", train.labels.numpy()), classes=train.classes,
                                      name="npy files", num_workers=args.workers)
        stores = {"memory": SoftTargets.compute(teacher, train, work / "stores"),
                  "streamed": SoftTargets.compute(teacher, streamed, work / "stores")}
        sets = {"memory": train, "streamed": streamed}
        torch.manual_seed(1)
        initial = build_model(args.student, train.image_shape, train.num_classes).state_dict()
        config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="constant", progress=False)

        def one_epoch(way: str) -> float:
            student = build_model(args.student, train.image_shape, train.num_classes)
            student.load_state_dict(initial)
            started = time.perf_counter()
            if way == "tutorial":
                tutorial_epoch(student, teacher, train.images, train.labels, config, args.temperature)
            else:
                fit(student, sets[way], None, config, Distillation(args.temperature, 1.0, 0.5, store=stores[way]),
                    log=lambda _: None, device="cpu")
            return time.perf_counter() - started

        ways = ("memory", "streamed", "tutorial")
        for way in ways:
            one_epoch(way)  # warm-up (allocator, worker start-up paths, page cache), not timed
        times = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way in ways:
                times[way].append(one_epoch(way))
        best = {way: min(t) for way, t in times.items()}
        return {"cases": len(train), "student": args.student, "teacher": args.teacher, "workers": args.workers,
                "batch_size": args.batch_size, "seconds": times, "best_seconds": best,
                "streamed_over_memory": best["streamed"] / best["memory"],
                "tutorial_over_memory": best["tutorial"] / best["memory"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memmap_memory(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="memmap-memory-"))
    try:
        width = 1024
        rows = int(args.memmap_gb * (1 << 30)) // width
        x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=np.uint8, shape=(rows, width))
        rng = np.random.default_rng(0)
        for start in range(0, rows, 1 << 16):  # written in chunks: the file never sits in this process whole
            stop = min(start + (1 << 16), rows)
            x[start:stop] = rng.integers(0, 256, size=(stop - start, width), dtype=np.uint8)
        x.flush()
        del x
        labels = rng.integers(0, 10, size=rows)
        data = ArrayTransferSet(np.load(work / "x.npy", mmap_mode="r"), labels, name="memmap")
        peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
        before = memory_mb()
        done = threading.Event()

        def sample():
            while not done.is_set():
                for k, v in memory_mb().items():
                    peak[k] = max(peak[k], v)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        torch.manual_seed(0)
        model = build_model("mlp:32", (width,), 10)
        fit(model, data, None, TrainConfig(epochs=1, batch_size=args.memmap_batch, lr=0.01, progress=False),
            log=lambda _: None, device="cpu")
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        return {"file_mb": rows * width / 2**20, "rows": rows, "batch_size": args.memmap_batch,
                "budget_mb": args.budget_mb, "before_mb": before,
                "peak_mb": peak, "epoch_seconds": seconds,
                "peak_within_budget": peak["VmRSS"] <= args.budget_mb}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--teacher", default="mlp:1200x2")
    parser.add_argument("--student", default="mlp:800x2")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memmap-gb", type=float, default=4.0)
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument("--memmap-batch", type=int, default=1024, help="batch of the memory run (a random row maps "
                                                                         "~256 KB until handed back)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_speed:
        result["epoch"] = epoch_ratios(args)
        e = result["epoch"]
        print(f"one distillation epoch over {e['cases']} cases ({e['student']} from a {e['teacher']} teacher, "
              f"batch {e['batch_size']}): memory {e['best_seconds']['memory']:.2f}s, streamed from .npy through a "
              f"DataLoader with {e['workers']} workers {e['best_seconds']['streamed']:.2f}s "
              f"({e['streamed_over_memory']:.2f}x), tutorial loop {e['best_seconds']['tutorial']:.2f}s "
              f"({e['tutorial_over_memory']:.2f}x)")
    if not args.skip_memory:
        result["memory"] = m = memmap_memory(args)
        print(f"memory-mapped x.npy of {m['file_mb']:.0f} MB ({m['rows']} rows), one epoch (batch "
              f"{m['batch_size']}) in {m['epoch_seconds']:.1f}s: peak RSS {m['peak_mb']['VmRSS']:.0f} MB (own {m['peak_mb']['RssAnon']:.0f}"
              f" MB, file pages {m['peak_mb']['RssFile']:.0f} MB) against a budget of {m['budget_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
