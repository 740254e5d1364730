#!/usr/bin/env bash
# The FULL `reproduce lm` behind results/lm, one thread, resumable (a rerun reuses finished stages); the run
# folder lives outside the work tree ($RUNS), and results.json, report.md, lm.png and data.json are copied here.
# Usage from a checkout: RUNS=/path/outside/the/tree results/lm/run.sh
set -eu
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DARKKNOWLEDGE_DATA=${DARKKNOWLEDGE_DATA:-../shared/data}
${PYTHON:-.venv/bin/python} -m darkknowledge reproduce lm --no-progress --out "$RUNS/lm"
cp "$RUNS/lm/results.json" "$RUNS/lm/report.md" "$RUNS/lm/lm.png" "$RUNS/lm/data.json" results/lm/
