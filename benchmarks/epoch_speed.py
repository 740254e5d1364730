"""How long one distillation epoch on MNIST takes: a tutorial-style loop against ``darkknowledge.training.fit``.

The same student (``mlp:800x2``, same initial weights) learns from the same teacher (``mlp:1200x2`` with the
2012 dropout recipe) at T = 20, soft targets only, SGD lr 0.1 momentum 0.9, constant rate, batch 128, fp32:

1. tutorial            DataLoader(TensorDataset(float images / 255, labels), shuffle=True) and the teacher
                       run under no_grad on every batch; the loss is ``darkknowledge.losses.distillation_loss``.
2. ours, online        ``fit`` with ``Distillation(teacher=...)``: in-memory uint8 batches, teacher every step.
3. ours, cached        ``fit`` with ``Distillation(teacher_logits=cache_teacher_logits(...))``: the teacher runs
                       once over the training set in large eval batches (timed separately, reported both ways).

Times are wall-clock seconds for the whole call (for ``fit``, its setup included); building the tutorial's
float TensorDataset and training or loading the teacher are not timed. Test errors after the same number of
epochs show that the three ways learn alike. The teacher is trained briefly here (untimed) unless
``--teacher RUN_DIR`` names a saved one. On a machine shared with another torch job, pass ``--threads 1``:
oversubscribed OpenMP threads made every way ~20x slower here and swamped the differences.

    python benchmarks/epoch_speed.py [--epochs 1] [--data-dir DIR] [--threads N] [--teacher RUN_DIR]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from darkknowledge.checkpoint import load_model
from darkknowledge.evaluation import evaluate
from darkknowledge.jobs import DataChoice
from darkknowledge.losses import distillation_loss
from darkknowledge.models import build_model
from darkknowledge.training import Distillation, HardTargets, TrainConfig, cache_teacher_logits, fit

TEACHER = "mlp:1200x2,dropout=0.5,input_dropout=0.2,max_norm=3.5"
STUDENT = "mlp:800x2"
T, LR, MOMENTUM, BATCH = 20.0, 0.1, 0.9, 128


def tutorial(student, teacher, train, epochs: int) -> float:
    """The usual tutorial loop; returns its wall-clock seconds (dataset construction excluded)."""
    loader = DataLoader(TensorDataset(train.images.float() / 255, train.labels), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM)
    teacher.eval()
    student.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = distillation_loss(student(images), teacher_logits, labels, temperature=T,
                                     soft_weight=1, hard_weight=0).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def ours(student, train, epochs: int, objective: Distillation) -> float:
    config = TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, momentum=MOMENTUM, schedule="constant",
                         progress=False)
    started = time.perf_counter()
    fit(student, train, None, config, objective, log=lambda _: None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="timed distillation epochs per way (default 1)")
    parser.add_argument("--data-dir", help="folder with the MNIST IDX files (default: $DARKKNOWLEDGE_DATA)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--teacher", metavar="RUN_DIR", help="a saved teacher run instead of training one")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="epochs to train the teacher (untimed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train, _, test = DataChoice("mnist", args.data_dir, val_size=0).load()
    if args.teacher:
        teacher = load_model(args.teacher)[0]
    else:
        torch.manual_seed(0)
        teacher = build_model(TEACHER, train.image_shape, train.num_classes)
        fit(teacher, train, None, TrainConfig(epochs=args.teacher_epochs, progress=False), HardTargets(),
            log=lambda _: None)
    teacher.eval()
    torch.manual_seed(1)
    initial = build_model(STUDENT, train.image_shape, train.num_classes).state_dict()

    def student():
        model = build_model(STUDENT, train.image_shape, train.num_classes)
        model.load_state_dict(initial)
        return model

    rows = []  # (way, seconds, test errors)
    model = student()
    rows.append(("tutorial (DataLoader, teacher every batch)", tutorial(model, teacher, train, args.epochs),
                 evaluate(model, test).errors))
    model = student()
    rows.append(("ours, online teacher", ours(model, train, args.epochs, Distillation(T, teacher=teacher)),
                 evaluate(model, test).errors))
    started = time.perf_counter()
    cached = cache_teacher_logits(teacher, train)
    caching = time.perf_counter() - started
    model = student()
    epoch_only = ours(model, train, args.epochs, Distillation(T, teacher_logits=cached))
    errors = evaluate(model, test).errors
    rows.append(("ours, cached logits (epochs only)", epoch_only, errors))
    rows.append(("ours, cached logits (epochs + caching)", epoch_only + caching, errors))

    base = rows[0][1]
    print(f"MNIST, {len(train)} training cases, {args.epochs} epoch(s), batch {BATCH}, T={T:g}, "
          f"{torch.get_num_threads()} threads, teacher test errors {evaluate(teacher, test).errors}/{len(test)}, "
          f"caching pass {caching:.2f} s\n")
    print("| way | seconds | speed-up vs tutorial | student test errors |")
    print("|---|---:|---:|---:|")
    for way, seconds, errs in rows:
        print(f"| {way} | {seconds:.2f} | {base / seconds:.2f}x | {errs}/{len(test)} |")


if __name__ == "__main__":
    main()
