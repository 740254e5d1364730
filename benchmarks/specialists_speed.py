"""How many test cases per second §5's combination handles: 100 classes, 10 specialists (target >= 10,000/s).

Times ``darkknowledge.specialists.combine`` alone, the way inference uses it after the models have run: from
the generalist's logits and each specialist's logits to the combined distribution, picking the active
specialists from the generalist's top-n classes included (model forward passes are not part of it). The logits
are synthetic but shaped like real ones: a hidden "true" logit vector per case, the generalist and each
specialist seeing it through their own noise, each specialist's logits collapsed onto its subset + dustbin.

Three layouts of the 10 specialists:
  disjoint    10 subsets of 10 classes (as k-means without overlap gives), top-1 (the paper's setting)
  overlap     10 subsets of 20 classes, every class in two of them, top-1
  overlap-3   the same, top-3: about five active specialists per case, the hardest case for the solver

Float64, tolerance ``||dL/dz||_1 <= 1e-6`` per case (the library's defaults). Each layout is timed ``--repeats``
times; the median is reported.

    python benchmarks/specialists_speed.py [--cases 20000] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from darkknowledge.specialists import combine
from darkknowledge.specialists.specialist import collapse_logits

CLASSES, SPECIALISTS = 100, 10


def synthetic(cases: int, subsets: list[list[int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(cases, CLASSES, generator=g) * 3
    generalist = true + torch.randn(cases, CLASSES, generator=g) * 2
    specialists = [collapse_logits(true + torch.randn(cases, CLASSES, generator=g) * 1.5, s) for s in subsets]
    return generalist, specialists


def layouts() -> dict[str, tuple[list[list[int]], int]]:
    disjoint = [list(range(10 * m, 10 * m + 10)) for m in range(SPECIALISTS)]
    overlap = [sorted(set(range(10 * m, 10 * m + 20)) if m < 9 else set(range(90, 100)) | set(range(10)))
               for m in range(SPECIALISTS)]
    return {"disjoint": (disjoint, 1), "overlap": (overlap, 1), "overlap-3": (overlap, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.cases} cases, {CLASSES} classes, {SPECIALISTS} specialists, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| layout | top-n | active specialists per case | F evaluations | max L1 norm of dL/dz | seconds | cases/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (subsets, top_n) in layouts().items():
        generalist, specialists = synthetic(args.cases, subsets)
        combine(generalist[:100], [s[:100] for s in specialists], subsets, top_n=top_n)  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = combine(generalist, specialists, subsets, top_n=top_n)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        print(f"| {name} | {top_n} | {result.active.sum(1).double().mean():.2f} | {result.iterations} | "
              f"{result.gradient_norm.max():.1e} | {seconds:.3f} | {args.cases / seconds:,.0f} |")


if __name__ == "__main__":
    main()
