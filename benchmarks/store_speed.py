"""What the soft-target store costs: (a) a distillation epoch reading it against a plain hard-label epoch of the
same student, (b) a synthetic 1,000,000 x 10,000-class top-k store: size on disk and memory while reading it.

(a) The student (``mlp:800x2`` by default) trains one epoch on hard labels, then one epoch distilling from a
    store of a teacher's (or ``--members`` teachers') logits over the same training set, same initial weights,
    batch, optimizer and constant learning rate; both through ``darkknowledge.training.fit``, back to back,
    ``--repeats`` times alternating after one untimed warm-up epoch, and the best time of each is compared (the
    issue's target: at most 1.1x).
    The teachers are untrained ``mlp:1200x2`` nets: what the store holds does not change what reading it costs.
    Building the store (one batched pass of each member) is timed separately.
(b) A top-k store (k = 32) of 1,000,000 cases x 10,000 classes is written in chunks of ``--chunk`` cases (random
    top-k logits and distinct class indices, made per chunk: only one chunk is ever in memory), then opened
    (checksums verified by a streaming read), read in random batches as training would, and read once in order.
    Reported: the size on disk (target < 300 MB) and the growth of the process's resident memory, split into its
    own (anonymous) memory and file-backed pages of the memory map (page cache the kernel can reclaim, handed
    back by ``SoftTargets.release``).

    python benchmarks/store_speed.py [--dataset mnist] [--threads 1] [--members 1] [--repeats 2] [--skip-synthetic]

On a machine shared with another torch job pass ``--threads 1`` (oversubscribed threads made every timing ~20x
slower here).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from darkknowledge.ensemble import Ensemble
from darkknowledge.jobs import DataChoice
from darkknowledge.losses import topk_soft_target_cross_entropy
from darkknowledge.models import build_model
from darkknowledge.soft_targets import FORMAT, SoftTargets
from darkknowledge.training import Batch, Distillation, HardTargets, TrainConfig, fit


def memory_mb() -> dict[str, float]:
    """Resident memory of this process from /proc: total, anonymous (its own) and file-backed (mapped files)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0]) / 1024
    return values


def epoch_ratio(args) -> None:
    train, _, _ = DataChoice(args.dataset, args.data_dir, val_size=0).load()
    torch.manual_seed(0)
    teachers = [build_model(args.teacher, train.image_shape, train.num_classes) for _ in range(args.members)]
    teacher = teachers[0] if args.members == 1 else Ensemble(teachers)
    store_dir = Path(tempfile.mkdtemp(prefix="store-speed-"))
    try:
        started = time.perf_counter()
        store = SoftTargets.compute(teacher, train, store_dir)
        build_seconds = time.perf_counter() - started
        torch.manual_seed(1)
        initial = build_model(args.student, train.image_shape, train.num_classes).state_dict()
        config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="constant", progress=False)

        def one_epoch(objective) -> float:
            student = build_model(args.student, train.image_shape, train.num_classes)
            student.load_state_dict(initial)
            started = time.perf_counter()
            fit(student, train, None, config, objective, log=lambda _: None)
            return time.perf_counter() - started

        one_epoch(HardTargets())  # warm-up (allocator, kernels), not timed
        times = {"plain": [], "store": []}
        for _ in range(args.repeats):
            times["plain"].append(one_epoch(HardTargets()))
            times["store"].append(one_epoch(Distillation(args.temperature, 1.0, 0.5, store=store)))
        per_step = step_costs(store, train, args)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    plain, stored = min(times["plain"]), min(times["store"])
    print(f"(a) {args.dataset}: {len(train)} training cases, student {args.student}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} alternating repeats (best of each)")
    print(f"    store of {args.members} x {args.teacher} teacher(s): {store.nbytes / 1e6:.1f} MB, built in "
          f"{build_seconds:.2f} s (one batched pass of each member)")
    print("")
    print("| epoch | seconds (each repeat) | best |")
    print("|---|---|---:|")
    print(f"| plain, hard labels | {', '.join(f'{t:.2f}' for t in times['plain'])} | {plain:.2f} |")
    print(f"| distillation from the store (T={args.temperature:g}, soft 1 + hard 0.5) | "
          f"{', '.join(f'{t:.2f}' for t in times['store'])} | {stored:.2f} |")
    print(f"\n    ratio distillation / plain: {stored / plain:.3f}x (target <= 1.1x)")
    print(f"    per step: reading a batch's targets from the store {per_step['read']:.1f} us; loss forward + backward "
          f"{per_step['distill']:.0f} us for distillation against {per_step['hard']:.0f} us for cross-entropy\n")


def step_costs(store, train, args, calls: int = 2000) -> dict[str, float]:
    """Microseconds per training step of the parts that differ between the two epochs."""
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(train), generator=generator)[:args.batch_size]
    logits = torch.randn(args.batch_size, train.num_classes, generator=generator, requires_grad=True)
    labels = train.labels[indices]
    objective = Distillation(args.temperature, 1.0, 0.5, store=store)
    batch = Batch(None, labels, indices)

    def timed(step) -> float:
        step()
        started = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - started) / calls * 1e6

    return {"read": timed(lambda: store.targets(indices, args.temperature)),
            "distill": timed(lambda: objective.loss(logits, batch)[0].backward()),
            "hard": timed(lambda: HardTargets().loss(logits, batch)[0].backward())}


def synthetic_chunks(cases: int, classes: int, k: int, chunk: int, seed: int = 0):
    """Top-k chunks as a many-class teacher would give them, made chunk by chunk (never the whole store)."""
    generator = np.random.default_rng(seed)
    stride = 7919  # a prime not dividing the number of classes: start + i*stride (mod C) are k distinct classes
    for start in range(0, cases, chunk):
        rows = min(chunk, cases - start)
        logits = np.sort(generator.normal(8.0, 2.0, (rows, 1, k)).astype(np.float32), axis=-1)[..., ::-1]
        first = generator.integers(0, classes, (rows, 1, 1))
        indices = ((first + np.arange(k) * stride) % classes).astype(np.uint16)
        # A consistent tail: mean 6 below the k-th logit, logsumexp between log n + mean and log n + k-th logit.
        tail_mean = (logits[..., -1] - 6.0).astype(np.float32)
        tail_lse = (logits[..., -1] - 3.0 + math.log(classes - k)).astype(np.float32)
        yield {"topk_logits": np.ascontiguousarray(logits), "topk_indices": indices,
               "tail_logsumexp": tail_lse, "tail_mean": tail_mean}


def synthetic_store(args) -> None:
    cases, classes, k = args.cases, args.classes, args.k
    folder = Path(args.synthetic_dir) if args.synthetic_dir else Path(tempfile.mkdtemp(prefix="store-synthetic-"))
    header = folder / "synthetic.json"
    key_parts = {"format": FORMAT, "teacher": ["synthetic"], "transfer_set": f"synthetic-{cases}",
                 "layout": "topk", "top_k": k, "dtype": "float32", "stored_combine": None}
    try:
        before = memory_mb()
        started = time.perf_counter()
        peak = dict(before)
        chunks = synthetic_chunks(cases, classes, k, args.chunk)

        def tracked(chunks):
            for chunk in chunks:
                yield chunk
                for name, value in memory_mb().items():
                    peak[name] = max(peak[name], value)

        SoftTargets.write(tracked(chunks), header, key_parts=key_parts, num_cases=cases, num_members=1,
                          num_classes=classes)
        write_seconds = time.perf_counter() - started
        on_disk = header.with_suffix(".bin").stat().st_size + header.stat().st_size
        print(f"(b) synthetic top-k store: {cases:,} cases x {classes:,} classes, k = {k}, written in chunks of "
              f"{args.chunk:,} in {write_seconds:.1f} s")
        print(f"    size on disk: {on_disk / 1e6:.1f} MB (data {header.with_suffix('.bin').stat().st_size / 1e6:.1f} "
              f"MB + header; target < 300 MB); dense float32 logits would be {cases * classes * 4 / 1e9:.0f} GB")
        print(f"    writing: resident memory grew at most {peak['VmRSS'] - before['VmRSS']:.1f} MB "
              f"(anonymous {peak['RssAnon'] - before['RssAnon']:.1f} MB)")

        started = time.perf_counter()
        opened_before = memory_mb()
        store = SoftTargets.open(header)  # verifies every array's checksum by a streaming read
        open_seconds = time.perf_counter() - started
        opened = memory_mb()
        print(f"    open with checksum verification: {open_seconds:.2f} s; resident memory +"
              f"{opened['VmRSS'] - opened_before['VmRSS']:.1f} MB")

        generator = torch.Generator().manual_seed(0)
        peak = dict(opened)
        started = time.perf_counter()
        for _ in range(args.random_batches):
            rows = torch.randint(0, cases, (args.batch,), generator=generator)
            targets = store.topk(rows)
            for name, value in memory_mb().items():
                peak[name] = max(peak[name], value)
        random_seconds = time.perf_counter() - started
        touched = args.random_batches * args.batch
        print(f"    {args.random_batches} random batches of {args.batch} ({touched:,} rows, as training reads them): "
              f"{random_seconds:.2f} s, {1000 * random_seconds / args.random_batches:.1f} ms per batch")
        print(f"      resident memory grew at most {peak['VmRSS'] - opened['VmRSS']:.1f} MB: anonymous "
              f"{peak['RssAnon'] - opened['RssAnon']:.1f} MB (the batches), file-backed "
              f"{peak['RssFile'] - opened['RssFile']:.1f} MB (mapped pages of the store: page cache, reclaimable)")
        store.release()
        released = memory_mb()
        print(f"      after release(): file-backed {released['RssFile'] - opened['RssFile']:.1f} MB above the start")
        student = torch.randn(args.batch, classes, generator=generator)
        started = time.perf_counter()
        loss = topk_soft_target_cross_entropy(student, targets, 2.0)
        print(f"      the top-k loss of the last batch against a {args.batch} x {classes:,} student at T = 2: "
              f"{loss.item():.3f} in {time.perf_counter() - started:.2f} s (the student's log-softmax dominates)")

        released = memory_mb()
        peak = dict(released)
        started = time.perf_counter()
        rows_read = 0
        for rows, batch in store.iter_batches(batch_size=65536):
            rows_read += len(batch["topk_logits"])
            for name, value in memory_mb().items():
                peak[name] = max(peak[name], value)
        sequential_seconds = time.perf_counter() - started
        print(f"    one pass in order ({rows_read:,} rows in batches of 65,536): {sequential_seconds:.2f} s; resident "
              f"memory grew at most {peak['VmRSS'] - released['VmRSS']:.1f} MB (anonymous "
              f"{peak['RssAnon'] - released['RssAnon']:.1f} MB, file-backed {peak['RssFile'] - released['RssFile']:.1f}"
              f" MB) for a {on_disk / 1e6:.0f} MB store")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", help="dataset for (a) (default: mnist; digits needs no files)")
    parser.add_argument("--data-dir", help="folder with the dataset files (default: $DARKKNOWLEDGE_DATA)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--student", default="mlp:800x2")
    parser.add_argument("--teacher", default="mlp:1200x2")
    parser.add_argument("--members", type=int, default=1, help="teachers in the stored ensemble (default 1)")
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed epochs of each kind (default 2)")
    parser.add_argument("--skip-epochs", action="store_true", help="only (b)")
    parser.add_argument("--skip-synthetic", action="store_true", help="only (a)")
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=50_000, help="cases per written chunk in (b)")
    parser.add_argument("--batch", type=int, default=4096, help="cases per random batch in (b)")
    parser.add_argument("--random-batches", type=int, default=100)
    parser.add_argument("--synthetic-dir", help="where (b) writes its store (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep (b)'s store")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_epochs:
        epoch_ratio(args)
    if not args.skip_synthetic:
        synthetic_store(args)


if __name__ == "__main__":
    main()
