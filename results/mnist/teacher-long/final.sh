#!/usr/bin/env bash
# Issue 17, this teacher's numbers: the long teacher's best-validation epoch (382; the run stopped at 476, its
# validation flat) and the student distilled from it with the recipe chosen in results/mnist/probes.md (800x2,
# T = 20, unshifted transfer set, lr 0.1, hard weight 0.3, 50 epochs, its epoch chosen on validation), each
# evaluated on validation and then once on test. Writes final.json here.
# Usage from a checkout: RUNS=/path/outside/the/tree results/mnist/teacher-long/final.sh
set -eu
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD/src DARKKNOWLEDGE_DATA=${DARKKNOWLEDGE_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
resume=""; [ -f "$RUNS/mnist-student-final/state.json" ] && resume="--resume"
tail -n 1 "$RUNS/mnist-student-final/metrics.jsonl" 2>/dev/null | grep -q '"epoch": 50,' || \
  $PY -m darkknowledge distill --teacher "$RUNS/mnist-teacher-long" --student mlp:800x2 --temperature 20 --lr 0.1 \
    --hard-weight 0.3 --epochs 50 --seed 0 --no-progress --store-dir "$RUNS/probes/store" \
    --out "$RUNS/mnist-student-final" $resume
out=results/mnist/teacher-long/final.json
{
  echo '{'
  for name in teacher student; do
    run=$RUNS/mnist-teacher-long; [ $name = student ] && run=$RUNS/mnist-student-final
    for split in val test; do
      echo "\"$name-$split\": $($PY -m darkknowledge evaluate "$run" --split $split),"
    done
  done
  echo '"command": "RUNS=... results/mnist/teacher-long/final.sh"}'
} > "$out.tmp" && mv "$out.tmp" "$out"
