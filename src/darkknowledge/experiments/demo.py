"""``darkknowledge demo``: the whole idea in a minute on scikit-learn's embedded 8x8 digits.

A large, dropout-regularized teacher; a small net trained on the labels alone; the same small net distilled
from the teacher's soft targets. The student's transfer set is the training set with each digit shifted by up
to one pixel: the teacher labels every shifted copy softly, which teaches the small net more than the ~1,150
hard labels can (jittering the baseline's inputs instead makes it worse: it cannot fit them).
The temperature was chosen on the validation split (T = 2 and 4 tried, two seeds).
Finished runs in the output folder are reused, so a rerun only prints the table.
"""

from __future__ import annotations

from pathlib import Path

from ..jobs import DataChoice, distill_run, evaluate_run, train_run
from ..training import TrainConfig

TEACHER = "mlp:1200x2,dropout=0.5,input_dropout=0.1,max_norm=3.5"
SMALL = "mlp:30x2"
TEMPERATURE = 2.0


def run_demo(out: str | Path = "runs/demo", seed: int = 0, progress: bool = True) -> str:
    """Train the three models (or reuse them) and return a table of their test errors."""
    out = Path(out)
    data = DataChoice("digits")

    def say(line: str) -> None:  # the three stages are announced even with progress off: a minute is long
        print(line, flush=True)

    log = say if progress else (lambda _: None)  # the runs' own lines (resuming, epochs)

    def config(**overrides) -> TrainConfig:
        return TrainConfig(**{"epochs": 60, "batch_size": 32, "lr": 0.05, "seed": seed, "progress": progress,
                              **overrides})

    say("1/3 teacher: " + TEACHER)
    train_run(TEACHER, data, config(epochs=100), out / "teacher", resume=True, log=log)
    say("2/3 small net on the labels alone: " + SMALL)
    train_run(SMALL, data, config(), out / "baseline", resume=True, log=log)
    say(f"3/3 small net distilled from the teacher at T = {TEMPERATURE:g}, on digits shifted by up to 1 pixel")
    distill_run(out / "teacher", SMALL, data, config(jitter=1), TEMPERATURE, out=out / "student", resume=True,
                log=log)

    rows = [("teacher", TEACHER), ("small net, labels only", SMALL), (f"small net, distilled (T={TEMPERATURE:g})",
                                                                   SMALL)]
    results = [evaluate_run(out / name) for name in ("teacher", "baseline", "student")]
    total = results[0]["total"]
    lines = [f"digits test set ({total} cases)", "",
             f"{'model':<30} {'spec':<54} {'parameters':>10} {'test errors':>12}"]
    for (label, spec), result in zip(rows, results):
        lines.append(f"{label:<30} {spec:<54} {result['parameters']:>10,} "
                     f"{result['errors']:>5} ({100 * result['error_rate']:.1f}%)")
    return "\n".join(lines)
