#!/usr/bin/env bash
# Every GPU measurement of the project in one run and one table (bench/gpu.py has the details).
#   bash bench/gpu.sh            # on one H100 or H200, from anywhere: about 7 minutes, no files needed
#   bash bench/gpu.sh --smoke    # every section at tiny shapes on the CPU, to check the script
# Rows print as they are measured; with OUT set, the table is also written to $OUT/gpu_table.md.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
# a hard stop inside the 10-minute limit, so that the rows measured so far always come back
exec timeout --signal=INT --kill-after=20 560 "$PYTHON" bench/gpu.py "$@"
