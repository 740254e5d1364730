"""Train `reproduce ensemble`'s students with exactly its settings, so the reproduction reuses them. Several copies
can run side by side: each claims the next unclaimed student (an atomic mkdir under claims/).
Usage: python results/ensemble/students_side_by_side.py   (from the repository root; the store must exist)"""
import os
from dataclasses import replace
from pathlib import Path

from darkknowledge.errors import TrainingDiverged
from darkknowledge.experiments.ensemble import FULL as plan
from darkknowledge.jobs import DataChoice, distill_run

runs = Path("results") / "ensemble" / "runs"
claims = runs / "claims"
claims.mkdir(exist_ok=True)
data = DataChoice(plan.dataset, None, val_size=plan.val_size, subset=plan.subset)
for t in plan.temperatures:
    for rule in plan.rules:
        name = f"student-{rule}-T{t:g}"
        try:
            os.mkdir(claims / name)
        except FileExistsError:
            continue
        print(f"[{name}]", flush=True)
        try:
            distill_run(runs / "ensemble", plan.spec, data, replace(plan.student_training, progress=False), t,
                        plan.soft_weight, plan.hard_weight, out=runs / name, resume=True,
                        log=lambda line: print(line, flush=True), combine=rule, store_dir=runs / "soft-targets")
        except TrainingDiverged as e:
            print(e, flush=True)
