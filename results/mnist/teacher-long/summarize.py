"""Summarise the long §3 teacher run (issue 17) from its metrics.jsonl: validation errors every 25 epochs, the best
so far, and the speed of an epoch against the CPU's matmul peak.

    python results/mnist/teacher-long/summarize.py /work/runs/mnist-teacher-long > results/mnist/teacher-long/progress.md
"""

import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
best = min(rows, key=lambda r: (r["val_errors"], r["epoch"]))
# multiply-adds of 784-1200-1200-10 per case; forward + backward is 3 forwards of 2 flops per multiply-add
macs = 784 * 1200 + 1200 * 1200 + 1200 * 10
flops = 50_000 * 6 * macs + 10_000 * 2 * macs  # training cases, then the validation pass
recent = rows[-20:]
per_epoch = (recent[-1]["seconds"] - recent[0]["seconds"]) / (len(recent) - 1)
last = rows[-1]["epoch"]
print(f"# The long §3 teacher run ({'finished' if last >= 1000 else f'stopped at epoch {last} of 1000; run.sh resumes it'})\n")
print("Command: `results/mnist/teacher-long/run.sh` (784-1200-1200-10, dropout 0.2 on inputs and 0.5 on hidden units, "
      "no max-norm, SGD momentum 0.9, lr 0.01 halved every 100 epochs (`--schedule step`), batch 128, 2-pixel "
      "jitter, 1000 epochs, on the 50,000 training cases left after the 10,000-case validation split; one thread). "
      "The epoch will be chosen on validation; no test number is read before the run ends.\n")
print(f"Epochs done: {last} of 1000. Best validation errors so far: **{best['val_errors']}** "
      f"(epoch {best['epoch']}).\n")
for span in (100, 200):
    window = [r for r in rows if r["epoch"] > last - span]
    print(f"- last {span} epochs: validation errors {min(r['val_errors'] for r in window)} to "
          f"{max(r['val_errors'] for r in window)}, mean {sum(r['val_errors'] for r in window) / len(window):.1f}")
print()
print(f"Speed: {per_epoch:.1f} s an epoch over the last {len(recent) - 1} epochs (one thread, on a machine shared with other runs), "
      f"{flops / 1e9:.0f} GFLOP an epoch: {flops / per_epoch / 1e9:.0f} GFLOP/s, against a matmul peak of about "
      f"75-90 GFLOP/s for one of this machine's two cores.\n")
print("| epoch | lr | train loss | validation errors |\n|---:|---:|---:|---:|")
for r in rows:
    if r["epoch"] % 25 == 0 or r["epoch"] in (1, rows[-1]["epoch"]):
        print(f"| {r['epoch']} | {r['lr']:.2e} | {r['train_loss']:.4f} | {r['val_errors']} |")
