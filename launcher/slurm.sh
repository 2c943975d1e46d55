#!/usr/bin/env bash
# Slurm batch script: srun starts one training process per GPU; no ssh, no DeepSpeed launcher.
# training/distributed.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE
# and MASTER_ADDR to the first host of the allocation.
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 launcher/slurm.sh --config RUN.yaml [k=v ...]
#SBATCH --job-name=adaponder
#SBATCH --signal=USR1@300
# ^ five minutes before the time limit every rank gets SIGUSR1: it finishes its step, checkpoints and
#   exits 0; resubmitting the same script resumes from that checkpoint.
set -euo pipefail

repo="${ADAPONDER_REPO:-$(pwd)}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-8} / ${SLURM_NTASKS_PER_NODE:-1} ))}"
srun --kill-on-bad-exit=1 python -u "$repo/training/pretrain.py" "$@"
