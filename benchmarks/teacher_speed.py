"""The §3 teacher's training epoch on this CPU: its GFLOP/s, the fraction of the fp32 matmul peak, where the time
goes, and what makes it faster.

The teacher and recipe are those of results/mnist/teacher-long/run.sh: ``mlp:1200x2,dropout=0.5,input_dropout=0.2``
(784-1200-1200-10), 2-pixel jitter, batch 128, SGD lr 0.01 momentum 0.9, fp32. One epoch of
``darkknowledge.training.fit`` over a slice of ``--cases`` MNIST training cases (no validation pass) is timed for
each way below, every way from the same initial weights and seed; the ways take turns, ``--repeats`` rounds after
an untimed warm-up, and the best time of each is kept. Speed-ups are over "before" in the same run: the library
until the SGD step was fused and the jitter copied windows (its for-loop step is ``optimizer_options
{"foreach": False}``; its per-element jitter gather is swapped in for that way only).

FLOPs counted: the matmuls only, forward + backward as 3 forwards, 2 per multiply-add: 6 x cases x (784*1200 +
1200*1200 + 1200*10) an epoch. (The first layer's input gradient is never computed, so the matmuls really do 13%
less: 2 x cases x (3 x 2,392,800 - 784*1200); printed as "matmuls actually done".) The peak is the best of a few
2048 x 2048 x 2048 ``torch.mm`` on the same thread count, in the same run.

Where the time goes: torch.profiler's self times over one epoch, grouped; then parts of one batch-128 step on their
own, before and after (jitter, dropout masks, SGD step). "torch.rand masks" replaces dropout's ``bernoulli_`` masks by
``torch.rand >= p``: the same distribution, other masks (so other numbers than the recipe's); measured, not adopted.

    python benchmarks/teacher_speed.py [--cases 10000] [--repeats 4] [--data-dir DIR]

Numbers in docs/speed.md; the machine had two other training processes (one thread each) on its two cores.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from darkknowledge import training
from darkknowledge.augment import jitter_offsets, translate
from darkknowledge.jobs import DataChoice
from darkknowledge.models import build_model
from darkknowledge.training import HardTargets, TrainConfig, fit

TEACHER = "mlp:1200x2,dropout=0.5,input_dropout=0.2"
RECIPE = TrainConfig(epochs=1, batch_size=128, lr=0.01, momentum=0.9, schedule="step", jitter=2, progress=False)
LAYERS = ((784, 1200), (1200, 1200), (1200, 10))
MACS = sum(i * o for i, o in LAYERS)  # multiply-adds of one case's forward pass


class UniformMaskDropout(nn.Module):
    """Dropout whose mask is ``torch.rand >= p`` (a vectorised uniform kernel) instead of ``bernoulli_``: the same
    distribution of masks, other masks, so not the library's dropout; timed to show what the masks cost."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1 / (1 - self.p))


def teacher(uniform_masks: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(TEACHER, (28, 28), 10)
    if uniform_masks:
        model.net = nn.Sequential(*(UniformMaskDropout(m.p) if isinstance(m, nn.Dropout) else m for m in model.net))
    return model


def best_of(f, repeats: int = 20, clock=time.perf_counter) -> float:
    f()
    times = []
    for _ in range(repeats):
        started = clock()
        f()
        times.append(clock() - started)
    return min(times)


def matmul_peak(threads: int) -> tuple[float, float]:
    """GFLOP/s of a large fp32 torch.mm on ``threads`` threads: by the wall clock, and per CPU second."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048 ** 3 / 1e9
    return flops / best_of(lambda: torch.mm(a, b), 5), flops / best_of(lambda: torch.mm(a, b), 5, time.process_time)


def step_matmuls(batch: int):
    """The eight matmuls of one step (forward, input gradients of layers 2-3, weight gradients), at the model's
    shapes and layouts, and their FLOPs."""
    xs = [torch.randn(batch, i) for i, _ in LAYERS]
    ws = [torch.randn(o, i) for i, o in LAYERS]
    gs = [torch.randn(batch, o) for _, o in LAYERS]

    def run():
        for x, w, g in zip(xs, ws, gs):
            x @ w.t()  # forward
            g.t() @ x  # weight gradient
        for w, g in zip(ws[1:], gs[1:]):
            g @ w  # input gradient (none for the first layer: the images need none)
    return run, 2 * batch * (3 * MACS - LAYERS[0][0] * LAYERS[0][1])


def previous_translate(images, offsets, max_shift):
    """The jitter before it copied windows: a per-element gather with three broadcast index tensors (timed only)."""
    b, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows, cols = offsets[0] + torch.arange(h), offsets[1] + torch.arange(w)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def parts_on_their_own() -> list[tuple[str, float, float]]:
    """(part, seconds before, seconds after) of one batch-128 step, each part alone, best of 20, 1 thread."""
    torch.set_num_threads(1)
    batch, shift = RECIPE.batch_size, RECIPE.jitter
    images = torch.rand(batch, 28, 28)
    offsets = jitter_offsets(batch, shift)
    assert torch.equal(translate(images, offsets, shift), previous_translate(images, offsets, shift))
    hidden = [(torch.randn(batch, 784), 0.2), (torch.randn(batch, 1200), 0.5), (torch.randn(batch, 1200), 0.5)]

    def sgd_step(**options):
        model = teacher()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **options)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        return optimizer.step

    return [("jitter: per-element gather -> window copy",
             best_of(lambda: previous_translate(images, offsets, shift)),
             best_of(lambda: translate(images, offsets, shift))),
            ("3 dropout masks: F.dropout (bernoulli_) -> torch.rand >= p",
             best_of(lambda: [F.dropout(h, p, True) for h, p in hidden]),
             best_of(lambda: [UniformMaskDropout(p)(h) for h, p in hidden])),
            ("SGD step: for-loop (torch's CPU default) -> fused", best_of(sgd_step(foreach=False)),
             best_of(sgd_step(fused=True)))]


def where_time_goes(train) -> list[tuple[str, float]]:
    """Shares of a baseline epoch's CPU time, from torch.profiler's self times."""
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(teacher(), train, None, RECIPE, HardTargets(), log=lambda _: None)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)

    def self_time(*names):
        return sum(e.self_cpu_time_total for e in events if e.key in names)
    shares = [("matmuls (aten::mm, aten::addmm)", self_time("aten::mm", "aten::addmm")),
              ("dropout masks (aten::bernoulli_)", self_time("aten::bernoulli_")),
              ("SGD step (Optimizer.step, with the ops it runs)",
               sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))),
              ("gathers (aten::index: the batch, its labels, the jitter)", self_time("aten::index"))]
    return [(name, t / total) for name, t in shares] + [("the rest", 1 - sum(t for _, t in shares) / total)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="training cases in the timed epoch (default 10000)")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds, best of (default 4; 2 threads: 2)")
    parser.add_argument("--data-dir", help="folder with mnist/ (default: $DARKKNOWLEDGE_DATA)")
    args = parser.parse_args()
    train = DataChoice("mnist", args.data_dir, val_size=0, subset=args.cases).load()[0]
    loop = replace(RECIPE, optimizer_options={"foreach": False})
    before = "before: for-loop SGD step, per-element jitter gather"
    now = "now: the library's default (fused SGD, window jitter)"
    ways = [  # (name, threads, config, dropout masks from torch.rand)
        (before, 1, loop, False),
        (now, 1, RECIPE, False),
        ("now, 2 threads (both cores already run a training job)", 2, RECIPE, False),
        ("now, batch 256 (a recipe change: lr would scale)", 1, replace(RECIPE, batch_size=256), False),
        ("now, batch 512 (a recipe change: lr would scale)", 1, replace(RECIPE, batch_size=512), False),
        ("now + dropout masks from torch.rand (other masks)", 1, RECIPE, True),
        ("now + torch.rand masks + batch 512", 1, replace(RECIPE, batch_size=512), True),
    ]

    def epoch(name, threads, config, uniform):
        """(wall seconds, CPU seconds of this process, train loss, weights after) of one epoch."""
        torch.set_num_threads(threads)
        model = teacher(uniform)
        training.translate = previous_translate if name == before else translate
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            result = fit(model, train, None, config, HardTargets(), log=lambda _: None)
        finally:
            training.translate = translate
        return time.perf_counter() - wall, time.process_time() - cpu, result.history[-1]["train_loss"], model

    wall = {name: [] for name, *_ in ways}
    cpu = {name: [] for name, *_ in ways}
    loss, weights = {}, {}
    epoch(now, 1, RECIPE, False)  # warm-up
    for round_ in range(args.repeats):
        for name, threads, config, uniform in ways:
            if threads > 1 and round_ >= 2:  # oversubscribed: slow, and 2 rounds show it
                continue
            seconds, cpu_seconds, loss[name], model = epoch(name, threads, config, uniform)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            weights[name] = model.state_dict()
    peaks = {1: matmul_peak(1), 2: matmul_peak(2)}
    matmuls, step_flops = step_matmuls(RECIPE.batch_size)
    torch.set_num_threads(1)
    shape_gflops = step_flops / best_of(matmuls) / 1e9

    counted = 6 * len(train) * MACS
    done = 2 * len(train) * (3 * MACS - LAYERS[0][0] * LAYERS[0][1])
    print(f"MNIST teacher {TEACHER}, jitter {RECIPE.jitter}, SGD lr {RECIPE.lr} momentum {RECIPE.momentum}, fp32; "
          f"one epoch of {len(train)} cases, best of {args.repeats} rounds; torch {torch.__version__}")
    print(f"FLOPs an epoch: {counted / 1e9:.1f} G counted (6 x cases x {MACS:,} multiply-adds), "
          f"{done / 1e9:.1f} G matmuls actually done")
    print(f"fp32 matmul peak (best 2048^3 torch.mm): 1 thread {peaks[1][0]:.0f} GFLOP/s by the wall clock, "
          f"{peaks[1][1]:.0f} per CPU second; 2 threads {peaks[2][0]:.0f} by the wall clock")
    print(f"the step's own eight matmuls at batch 128 on their own, 1 thread: {shape_gflops:.0f} GFLOP/s "
          f"({shape_gflops / peaks[1][0]:.0%} of the peak)\n")
    print("GFLOP/s: counted FLOPs over the best wall time, and over the best CPU time of this process "
          "(time.process_time: not counting time the other jobs had the core); each against the peak measured the "
          "same way. For 2 threads CPU time adds both threads', so only the wall clock compares.\n")
    print("| way | wall s (each round) | best wall s | best CPU s | GFLOP/s wall (of peak) | GFLOP/s CPU (of peak) | "
          "speed-up vs before, wall | CPU | train loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, threads, _, _ in ways:
        best, best_cpu = min(wall[name]), min(cpu[name])
        by_cpu = (f"{counted / best_cpu / 1e9:.1f} ({counted / best_cpu / 1e9 / peaks[1][1]:.0%})" if threads == 1
                  else "-")
        speed_cpu = f"{min(cpu[before]) / best_cpu:.2f}x" if threads == 1 else "-"
        print(f"| {name} | {', '.join(f'{t:.2f}' for t in wall[name])} | {best:.2f} | {best_cpu:.2f} | "
              f"{counted / best / 1e9:.1f} ({counted / best / 1e9 / peaks[threads][0]:.0%}) | {by_cpu} | "
              f"{min(wall[before]) / best:.2f}x | {speed_cpu} | {loss[name]:.6f} |")
    drift = max((weights[now][k] - weights[before][k]).abs().max().item() for k in weights[before])
    print(f"\nnow against before, same seed, one epoch: train loss {loss[now]!r} against {loss[before]!r}; "
          f"weights after it differ by at most {drift:.1e}")

    print("\nWhere the epoch's CPU time goes now (torch.profiler, self times):\n")
    print("| part | share |\n|---|---:|")
    for part, share in where_time_goes(train):
        print(f"| {part} | {share:.0%} |")
    print("\nParts of one batch-128 step on their own (best of 20, 1 thread):\n")
    print("| part: before -> after | ms before | ms after | speed-up |\n|---|---:|---:|---:|")
    for part, first, second in parts_on_their_own():
        print(f"| {part} | {first * 1e3:.2f} | {second * 1e3:.2f} | {first / second:.2f}x |")


if __name__ == "__main__":
    main()
