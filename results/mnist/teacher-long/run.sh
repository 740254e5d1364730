#!/usr/bin/env bash
# issue 17: the public reproduction's teacher recipe on the 50,000/10,000 split; epoch chosen on validation.
cd /work/teacher-src; export PYTHONPATH=/work/teacher-src/src
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DARKKNOWLEDGE_DATA=/work/shared/data
R=""; [ -f /work/runs/mnist-teacher-long/state.json ] && R="--resume"
exec /work/main/.venv/bin/python -m darkknowledge train --dataset mnist --model mlp:1200x2,dropout=0.5,input_dropout=0.2 \
  --jitter 2 --epochs 1000 --lr 0.01 --momentum 0.9 --schedule step --batch-size 128 --val-size 10000 \
  --seed 0 --no-progress --out /work/runs/mnist-teacher-long $R
