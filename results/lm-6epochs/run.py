"""§4 on text, the next FULL size: the FULL plan with every model trained 6 epochs instead of 2 (results/lm/sizing
measured that two members trained 6 epochs gain three times as much log-loss from being ensembled), and half the
works (21 of 42, 818,000 tokens) as the test split instead of a tenth (126,000 tokens), so the share's 95%
interval can be narrow enough to settle the 80% target. Resumable: a rerun reuses finished stages.

Usage (from the repository root): RUNS=/path/outside/the/tree [JOBS=2] python results/lm-6epochs/run.py
(JOBS: runs trained at a time, as reproduce lm --jobs; it may change between invocations, the numbers do not.
With JOBS=2 the baseline took 4 minutes of one core, so the 20 models should take about 80 minutes of both
cores: an estimate, the run has not been timed.)
"""
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from darkknowledge.experiments.lm import FULL, reproduce_lm


def main():
    torch.set_num_threads(1)
    plan = replace(FULL, test_fraction=0.5, sampled=(32,), training=replace(FULL.training, epochs=6),
                   student_training=replace(FULL.student_training, epochs=6))
    out = Path(os.environ["RUNS"]) / "lm-6epochs"
    reproduce_lm(out, plan=plan, progress=False, command="RUNS=... python results/lm-6epochs/run.py",
                 log=lambda line: print(line, flush=True), jobs=int(os.environ.get("JOBS", "2")))
    here = Path(__file__).parent
    for name in ("results.json", "report.md", "lm.png", "data.json"):
        shutil.copy(out / name, here / name)


if __name__ == "__main__":  # reproduce lm trains in spawned workers, which import this file again
    main()
