#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the current Slurm allocation ("host slots=N" per node).
#   launcher/slurm_hostfile.sh [SLOTS_PER_NODE] > hostfile     (default: SLURM_GPUS_ON_NODE or 8)
set -euo pipefail
slots="${1:-${SLURM_GPUS_ON_NODE:-8}}"
scontrol show hostnames "${SLURM_JOB_NODELIST:?run inside a Slurm allocation}" | sed "s/\$/ slots=$slots/"
