#!/usr/bin/env bash
# The checks only a GPU can make, in one short call; --cpu runs them all on the CPU (CI does).
#   bash benchmarks/gpu_check.sh [--cpu] [OUT]      # OUT: where results go (default: ./gpu_check)
# Each part prints PASS / FAIL; the exit status is the number of FAILs (see benchmarks/gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
