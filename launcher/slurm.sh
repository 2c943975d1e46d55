#!/usr/bin/env bash
# Slurm batch script: srun starts one training process per GPU; no ssh, no DeepSpeed launcher.
#   cd /path/to/adaponder && sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 \
#       launcher/slurm.sh --config RUN.yaml [key.sub=value ...]
# or with one GPU bound to each task:
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-task 1 launcher/slurm.sh --config RUN.yaml
# training/distributed.py maps SLURM_PROCID/SLURM_NTASKS to RANK/WORLD_SIZE, and SLURM_LOCALID to the
# task's GPU (LOCAL_RANK): its number on the node, or 0 when the task sees only its own GPU.
# Working directory: the directory sbatch was run from (Slurm's default; --chdir changes it). Relative
# paths of the run config (run_dir, data paths, deepspeed_config) resolve against it, and the code is
# taken from it unless ADAPONDER_REPO names the repository.
# MASTER_ADDR: the allocation's first node; MASTER_PORT: 20000 + job id mod 20000 (two jobs on one
# node do not collide); either can be set in the environment.
#SBATCH --job-name=adaponder
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
# ^ five minutes before the time limit this script gets SIGUSR1 and passes it to the ranks: they finish
#   their step, checkpoint and exit 0; then the script requeues the job (`scontrol requeue`), which
#   resumes from that checkpoint when it runs again. The log is appended to across requeues.
set -euo pipefail

repo="${ADAPONDER_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
if [[ ! -f "$repo/training/pretrain.py" ]]; then
  echo "slurm.sh: $repo/training/pretrain.py not found: sbatch from the repository root or set ADAPONDER_REPO" >&2
  exit 2
fi
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:?not inside a Slurm job} % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-8} / ${SLURM_NTASKS_PER_NODE:-1} ))}"

stop_requested=0
srun_pid=""
on_usr1() {
  stop_requested=1
  echo "slurm.sh: SIGUSR1: the ranks checkpoint and stop, then job $SLURM_JOB_ID is requeued" >&2
  [[ -z "$srun_pid" ]] || kill -USR1 "$srun_pid" 2>/dev/null || true  # srun forwards it to every task
}
trap on_usr1 USR1

srun --kill-on-bad-exit=1 "${PYTHON:-python}" -u "$repo/training/pretrain.py" "$@" &
srun_pid=$!
((stop_requested == 0)) || kill -USR1 "$srun_pid" 2>/dev/null || true
while true; do
  status=0
  wait "$srun_pid" || status=$?
  # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait again.
  if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then
    continue
  fi
  break
done
if ((stop_requested)) && ((status == 0)); then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
