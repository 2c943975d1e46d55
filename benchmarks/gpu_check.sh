#!/usr/bin/env bash
# GPU acceptance check: one GPU, about 10 minutes; PASS/FAIL lines with ratios, exit 1 on any FAIL.
#   benchmarks/gpu_check.sh            # on a GPU node (one GPU is enough)
#   benchmarks/gpu_check.sh --smoke    # CPU, tiny shapes, under a minute (tests/test_gpu_check.py)
# What each line checks: benchmarks/gpu_check.py.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ " $* " == *" --smoke "* ]]; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "${PYTHON:-python}" "$repo/benchmarks/gpu_check.py" "$@"
