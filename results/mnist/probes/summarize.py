"""Summarise the student probes of issue 17 (results/mnist/probes/run.sh) from each probe's metrics.jsonl:
validation errors at the best and the last epoch, and the training errors then (has it fitted the soft targets?).

    python results/mnist/probes/summarize.py /work/runs/probes > results/mnist/probes.md
"""

import json
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])
script = (Path(__file__).parent / "run.sh").read_text()
options = dict(re.findall(r"^probe (\S+) (.*)$", script, flags=re.M))
print("# §3 student probes (validation only)\n")
print("Each probe distils the 800-800 student at T = 20 on the unshifted transfer set (the 50,000 training cases "
      "of the teacher's split), 50 epochs, one-cycle schedule, SGD momentum 0.9, batch 128, seed 0, from a "
      "provisional teacher: the long run's best-validation checkpoint at epoch 382 (88 validation errors). "
      "Commands: `results/mnist/probes/run.sh` (every probe's options below). Validation is the 10,000 training "
      "cases the teacher never saw; no test number is read here.\n")
print("| probe | options | best val errors (epoch) | val errors, last epoch | train errors, last epoch |")
print("|---|---|---:|---:|---:|")
for name, opts in options.items():
    path = root / name / "metrics.jsonl"
    if not path.exists():
        print(f"| {name} | `{opts}` | not run | | |")
        continue
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    best, last = min(rows, key=lambda r: (r["val_errors"], r["epoch"])), rows[-1]
    done = "" if last["epoch"] == 50 else f" (at epoch {last['epoch']} of 50)"
    print(f"| {name} | `{opts}` | {best['val_errors']} ({best['epoch']}) | {last['val_errors']}{done} | "
          f"{last['train_errors']} |")
