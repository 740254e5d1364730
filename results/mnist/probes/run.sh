#!/usr/bin/env bash
# Issue 17, student probes on validation (the 10,000 cases the teacher never trained on): the 800x2 student
# distilled at T = 20 on the unshifted transfer set, 50 epochs each, from a provisional teacher (the long run's
# best-validation checkpoint so far, copied to $RUNS/probe-teacher-e382). Resumable: a finished probe is skipped.
# Run from a checkout: RUNS=/path/outside/the/tree results/mnist/probes/run.sh
set -u
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD/src DARKKNOWLEDGE_DATA=${DARKKNOWLEDGE_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
probe() {  # name, then distill options
  local name=$1; shift
  tail -n 1 "$RUNS/probes/$name/metrics.jsonl" 2>/dev/null | grep -q '"epoch": 50,' && return  # finished
  local resume=""; [ -f "$RUNS/probes/$name/state.json" ] && resume="--resume"
  echo "[$name] $*"
  $PY -m darkknowledge distill --teacher "$RUNS/probe-teacher-e382" --student mlp:800x2 --temperature 20 \
    --epochs 50 --seed 0 --no-progress --store-dir "$RUNS/probes/store" --out "$RUNS/probes/$name" $resume "$@"
}
probe lr0.03-hard0 --lr 0.03 --hard-weight 0
probe lr0.03-hard0.1 --lr 0.03 --hard-weight 0.1
probe lr0.03-hard0.3 --lr 0.03 --hard-weight 0.3
probe lr0.1-hard0.3 --lr 0.1 --hard-weight 0.3
probe lr0.01-hard0.3 --lr 0.01 --hard-weight 0.3
