"""§4 on text, the next FULL size: the FULL plan with every model trained 6 epochs instead of 2 (results/lm/sizing
measured that two members trained 6 epochs gain three times as much log-loss from being ensembled). Resumable:
a rerun reuses finished stages, so it may span several sessions.

Usage (from the repository root): RUNS=/path/outside/the/tree [JOBS=2] python results/lm-6epochs/run.py
(JOBS: runs trained at a time, as reproduce lm --jobs; it may change between invocations, the numbers do not)
"""
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from darkknowledge.experiments.lm import FULL, reproduce_lm

torch.set_num_threads(1)
plan = replace(FULL, training=replace(FULL.training, epochs=6), student_training=replace(FULL.student_training, epochs=6))
out = Path(os.environ["RUNS"]) / "lm-6epochs"
reproduce_lm(out, plan=plan, progress=False, command="RUNS=... python results/lm-6epochs/run.py",
             log=lambda line: print(line, flush=True), jobs=int(os.environ.get("JOBS", "1")))
here = Path(__file__).parent
for name in ("results.json", "report.md", "lm.png", "data.json"):
    shutil.copy(out / name, here / name)
