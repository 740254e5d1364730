#!/usr/bin/env bash
# The whole check on a CUDA machine, prepared on the CPU so that one run does it (issue 30). From the project's root:
#   bash ../shared/device/prepare.sh                                   # here, with network: fills .device-carry/
#   bash .device-carry/run.sh 'bash benchmarks/device_check.sh'        # there, with a GPU
# Writes to $OUT (default /tmp/device-check): suite.log (the suite with CUDA), forking.log (the tests that fork a
# child, in processes of their own on the CPU: a child forked after CUDA is up cannot use it), gpu.json and
# gpu.log (benchmarks/gpu.py at the sizes). Each part has its own time limit, so a slow one cannot starve
# the next (together under the device machine's 600 s a command); the last lines of each log are what the
# closing note quotes.
set -u
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
timeout "${SUITE_SECONDS:-270}" python3 -m pytest -q -n "${WORKERS:-8}" -p no:cacheprovider tests \
  > "$out/suite.log" 2>&1 || status=$?
tail -n 25 "$out/suite.log"
CUDA_VISIBLE_DEVICES="" timeout "${FORKING_SECONDS:-90}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_reliability.py tests/test_destinations.py tests/test_language_model_runs.py \
  > "$out/forking.log" 2>&1 || status=$?
tail -n 5 "$out/forking.log"
timeout "${BENCH_SECONDS:-200}" python3 benchmarks/gpu.py --out "$out/gpu.json" > "$out/gpu.log" 2>&1 || status=$?
tail -n 5 "$out/gpu.log"
exit $status
