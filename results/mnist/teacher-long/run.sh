#!/usr/bin/env bash
# issue 17: the public §3 reproduction's teacher recipe on the 50,000/10,000 split; its epoch is chosen on validation.
# One thread, checkpoints every epoch in $RUNS (outside the work tree); rerun the script to resume after a stop.
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUNS=${RUNS:-/work/runs}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DARKKNOWLEDGE_DATA=${DARKKNOWLEDGE_DATA:-../shared/data}
R=""; [ -f "$RUNS/mnist-teacher-long/state.json" ] && R="--resume"
exec .venv/bin/python -m darkknowledge train --dataset mnist --model mlp:1200x2,dropout=0.5,input_dropout=0.2 \
  --jitter 2 --epochs 1000 --lr 0.01 --momentum 0.9 --schedule step --batch-size 128 --val-size 10000 \
  --seed 0 --no-progress --out "$RUNS/mnist-teacher-long" $R
