"""Train `reproduce ensemble`'s students in several processes side by side (one per core), each claiming the next
unclaimed student by an atomic mkdir under results/ensemble/runs/claims/; the reproduction then reuses them.
Usage: python results/ensemble/students_side_by_side.py   (from the repository root, after the store exists)"""
import os
from pathlib import Path

from darkknowledge.errors import TrainingDiverged
from darkknowledge.experiments.ensemble import FULL as plan, distill_student, student_name
from darkknowledge.jobs import DataChoice

runs = Path("results") / "ensemble" / "runs"
claims = runs / "claims"
claims.mkdir(exist_ok=True)
data = DataChoice(plan.dataset, None, val_size=plan.val_size, subset=plan.subset)
for t in plan.temperatures:
    for rule in plan.rules:
        try:
            os.mkdir(claims / student_name(rule, t))
        except FileExistsError:
            continue
        print(f"[{student_name(rule, t)}]", flush=True)
        try:
            distill_student(plan, data, runs, rule, t, progress=False, log=lambda line: print(line, flush=True))
        except TrainingDiverged as e:
            print(e, flush=True)
