"""Speed-up of data-parallel training (torchrun, gloo) over one process, for one fixed workload, in one run.

The workload: ``darkknowledge train`` of a 2x800 MLP on MNIST (50,000 training cases, fixed epochs) at each
global batch size of ``--batch-sizes``, run three ways back to back: one process with one thread, one process with two threads (PyTorch's own intra-op
parallelism: what two cores give without torchrun), and ``torchrun --nproc-per-node 2`` with one thread each.
Times are the training loop's own (``seconds`` of the last epoch in metrics.jsonl, start-up and data loading
excluded) and the whole command's wall time. Each way runs ``--repeats`` times; the best is kept.

    python benchmarks/distributed_speed.py --epochs 2 --repeats 2 --batch-sizes 128 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(workers: int, threads: int, batch_size: int, args: argparse.Namespace,
             folder: Path) -> tuple[float, float, int]:
    """(training seconds, wall seconds, validation errors) of one run."""
    out = folder / f"w{workers}-t{threads}-{time.monotonic_ns()}"
    train = ["train", "--dataset", args.dataset, "--model", args.model, "--epochs", str(args.epochs),
             "--batch-size", str(batch_size), "--lr", "0.05", "--no-progress", "--out", str(out)]
    if workers == 1:
        command = [sys.executable, "-m", "darkknowledge", *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                   "-m", "darkknowledge", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    last = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    return last["seconds"], wall, last["val_errors"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="mlp:800x2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    ways = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("torchrun, 2 processes x 1 thread", 2, 1)]
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every way alike
            for batch_size in args.batch_sizes:
                for name, workers, threads in ways:
                    result = run_once(workers, threads, batch_size, args, Path(folder))
                    best[batch_size, name] = min(best.get((batch_size, name), result), result)

    print(f"{args.dataset}, {args.model}, {args.epochs} epoch(s), best of {args.repeats}; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})\n")
    print("| global batch | way | training seconds | speed-up | whole command (s) | validation errors |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        base = best[batch_size, ways[0][0]][0]
        for name, _, _ in ways:
            seconds, wall, errors = best[batch_size, name]
            print(f"| {batch_size} | {name} | {seconds:.2f} | {base / seconds:.2f}x | {wall:.1f} | {errors} |")


if __name__ == "__main__":
    main()
