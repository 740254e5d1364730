"""The probes that chose the FULL plan of ``reproduce specialists`` (see probes.md): one dataset, hard-target
specialists only, printing the generalist's and the combination's accuracy on validation (which chooses), overall
and by the number of specialists covering the correct class.

    DARKKNOWLEDGE_DATA=../shared/data python results/specialists/probe_plan.py OUT DATASET SPEC CLUSTERS OVERLAP \
        GENERALIST_JITTER SPECIALIST_JITTER SPECIALIST_EPOCHS [--overlap-ratio R] [--top-n N]
"""

import argparse
from pathlib import Path

import torch

from darkknowledge.experiments.specialists import DatasetPlan, run_dataset
from darkknowledge.training import TrainConfig

parser = argparse.ArgumentParser()
for name in ("out", "dataset", "spec"):
    parser.add_argument(name)
for name in ("clusters", "overlap", "generalist_jitter", "specialist_jitter", "specialist_epochs"):
    parser.add_argument(name, type=int)
parser.add_argument("--overlap-ratio", type=float, default=1.2)
parser.add_argument("--top-n", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(1)
plan = DatasetPlan(args.dataset, args.spec, TrainConfig(epochs=20, lr=0.1, jitter=args.generalist_jitter),
                   args.clusters, TrainConfig(epochs=args.specialist_epochs, batch_size=128, lr=0.05,
                                              schedule="cosine", jitter=args.specialist_jitter),
                   overlap=args.overlap, overlap_ratio=args.overlap_ratio)
hard = run_dataset(plan, Path(args.out), args.top_n, ("hard",), None, False, print)["variants"]["hard"]
# Validation only: it chooses the plan; the test set is read once, by the reproduction.
o = hard["val"]["overall"]
print(f"val: generalist {o['generalist_accuracy']:.4f}  + specialists {o['combined_accuracy']:.4f}  "
      f"relative gain {o['relative_gain']:+.4f}")
rows = hard["val"]["by_coverage"]
print("val by coverage (relative gain, cases):",
      {k: (round(v["relative_gain"], 4), v["cases"]) for k, v in rows.items()})
